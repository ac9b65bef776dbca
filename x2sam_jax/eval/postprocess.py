"""Post-processing of X2SAM outputs per task (docs/architecture.md#post-processing-and-metrics;
the official post-process functions).

Inputs are one sample's numpy outputs: class logits [..., Q, C + 1] (background last) and mask
logits [..., Q, h, w] on the padded S/4 grid. Steps shared by every task:

  scores  = softmax over [real conditions, background], background dropped   (`class_probabilities`)
  masks   = bilinear to the padded S x S input, crop to the unpadded size, bilinear to the original
            size (torch's F.interpolate, align_corners=False)                  (`upsample`)

Then, at the original resolution:
  panoptic   keep queries with score > threshold (X2SAM: 0.0), per pixel argmax of score x mask
             probability, keep a query's segment when its area / area(score x prob >= 0.5) > 0.8
             (transformers' compute_segments, which X2SAM copies, tests the weighted probability);
             stuff segments of one class are fused; segment ids are unique (X2SAM's id generator)
  semantic   argmax over conditions of sum_q score[q, c] x sigmoid(mask[q])
  instance   top-k (k = Q) over (query, condition) pairs; mask = logit > 0; score = class score x
  / VGD      mean mask probability inside the mask (Mask2Former); X2SAM keeps score >= 0.0
  referring  per condition its top-scoring query, mask = probability > 0.5 (per frame for videos);
             gRefCOCO unions the masks of every query scoring >= 0.6 (and the top one)
  interactive per condition the queries scoring >= 0.5 (and the top one); of those, the mask that
             best overlaps the visual prompt (the official rule)
  video tracks a query is one track over the clip's frames: class score = mean over frames, then
             the instance rule on tracks (Mask2Former-VIS), for the spatio-temporal YouTube-VIS AP
"""

from __future__ import annotations

import numpy as np

from x2sam_jax.layers.interpolate import resize_numpy

# A query scoring at least this is a detection: the interactive rule's candidates (X2SAM's 0.5);
# overlays draw the masks that score this much (eval/visualize.py).
SCORE_THRESHOLD = 0.5


def class_probabilities(class_logits: np.ndarray, num_conditions: int) -> np.ndarray:
    """[..., Q, C_pad + 1] logits -> [..., Q, num_conditions] probabilities (float64): softmax over
    the real condition slots (the first `num_conditions`) and the background (the last slot)."""
    logits = np.asarray(class_logits, np.float64)
    real = np.concatenate([logits[..., :num_conditions], logits[..., -1:]], axis=-1)
    real = np.exp(real - real.max(-1, keepdims=True))
    return (real / real.sum(-1, keepdims=True))[..., :-1]


def upsample(mask_logits: np.ndarray, sam_size: int, sam_valid_hw, orig_hw, chunk: int = 16) -> np.ndarray:
    """Mask logits [..., h, w] on the padded S/4 grid -> float32 logits [..., H, W] at the original
    size: bilinear to S x S, crop to the unpadded (valid) part, bilinear to the original size.
    Masks go `chunk` at a time, so the S x S intermediate stays small (200 queries at S = 1024
    would take 800 MB at once)."""
    logits = np.asarray(mask_logits, np.float32)
    lead, grid = logits.shape[:-2], logits.shape[-2:]
    flat = logits.reshape((-1,) + grid)
    out = np.empty((flat.shape[0], int(orig_hw[0]), int(orig_hw[1])), np.float32)
    for start in range(0, flat.shape[0], chunk):
        x = resize_numpy(flat[start:start + chunk], (sam_size, sam_size))
        x = x[..., : int(sam_valid_hw[0]), : int(sam_valid_hw[1])]
        out[start:start + chunk] = resize_numpy(x, (int(orig_hw[0]), int(orig_hw[1])))
    return out.reshape(lead + out.shape[1:])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ---------------------------------------------------------------------------------- images
def panoptic(scores: np.ndarray, logits: np.ndarray, is_thing: np.ndarray, *, threshold: float = 0.0,
             mask_threshold: float = 0.5, overlap_threshold: float = 0.8,
             track_ids: bool = False) -> tuple[np.ndarray, list[dict]]:
    """scores [Q, C], logits [Q, H, W] -> (segment id map [H, W] int32 (0 = void), segments
    [{"id", "category" (condition index), "is_thing", "score"}]). Segment ids count 1, 2, ...;
    with `track_ids` a thing segment's id is its query + 1 and a stuff segment's Q + 1 + its
    class, so the ids of a clip's frames form tracks (the memory keeps a query on its object)."""
    score, label = scores.max(-1), scores.argmax(-1)
    keep = score > threshold
    height, width = logits.shape[-2:]
    ids = np.zeros((height, width), np.int32)
    segments: list[dict] = []
    if not keep.any():
        return ids, segments
    queries = np.flatnonzero(keep)
    probs = sigmoid(logits[keep])
    weighted = probs * score[keep][:, None, None]
    owner = weighted.argmax(0)
    stuff_ids: dict[int, int] = {}
    for k, (s, c) in enumerate(zip(score[keep], label[keep])):
        region = owner == k
        # As transformers' compute_segments (X2SAM's copy): the area test reads the score-weighted
        # probabilities.
        area, original = int(region.sum()), int((weighted[k] >= mask_threshold).sum())
        if area == 0 or original == 0 or not area / original > overlap_threshold:
            continue
        thing = bool(is_thing[c])
        if not thing and int(c) in stuff_ids:       # stuff: one segment per class
            segment_id = stuff_ids[int(c)]
        else:
            if not track_ids:
                segment_id = len(segments) + 1
            else:
                segment_id = int(queries[k]) + 1 if thing else scores.shape[0] + 1 + int(c)
            segments.append({"id": segment_id, "category": int(c), "is_thing": thing, "score": float(s)})
            if not thing:
                stuff_ids[int(c)] = segment_id
        ids[region] = segment_id
    return ids, segments


def semantic(scores: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """scores [Q, C], logits [Q, H, W] -> condition index per pixel [H, W] int32."""
    return np.einsum("qc,qhw->chw", scores, sigmoid(logits)).argmax(0).astype(np.int32)


def instances(scores: np.ndarray, logits, *, keep: np.ndarray | None = None, threshold: float = 0.0,
              top_k: int | None = None) -> list[dict]:
    """scores [Q, C], logits [Q, H, W] (or tracks [Q, T, H, W], or a function query -> its logits,
    so that only the selected queries are upsampled) -> [{"mask" bool, "category", "score",
    "query"}], highest score first; `keep` [C] restricts the conditions (things)."""
    num_queries, num_conditions = scores.shape
    k = min(num_queries if top_k is None else top_k, scores.size)
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    logits_of = logits if callable(logits) else logits.__getitem__
    out = []
    for index in order:
        query, category = divmod(int(index), num_conditions)
        if keep is not None and not keep[category]:
            continue
        query_logits = logits_of(query)
        mask = query_logits > 0
        mask_score = float((sigmoid(query_logits) * mask).sum() / (mask.sum() + 1e-6))
        score = float(flat[index]) * mask_score
        if score >= threshold:
            out.append({"mask": mask, "category": category, "score": score, "query": query})
    return sorted(out, key=lambda d: -d["score"])


def referring(scores: np.ndarray, logits: np.ndarray, *, multi_threshold: float | None = None) -> np.ndarray:
    """scores [Q, C], logits [Q, H, W] -> masks [C, H, W]: each condition's top query (prob > 0.5);
    with `multi_threshold` (gRefCOCO) the union of every query scoring >= it and the top one."""
    best = scores.argmax(0)
    masks = logits[best] > 0
    if multi_threshold is not None:
        for c in range(scores.shape[1]):
            chosen = (scores[:, c] >= multi_threshold) | (scores[:, c] == scores[best[c], c])
            masks[c] = (logits[chosen] > 0).any(0)
    return masks


def interactive(scores: np.ndarray, logits: np.ndarray, prompts: np.ndarray, *,
                threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """scores [Q, C], logits [Q, H, W], prompt masks [C, H, W] -> masks [C, H, W]: among the
    queries scoring >= threshold (and the top one), the mask with the highest IoU to the prompt."""
    masks = logits > 0
    out = np.zeros((scores.shape[1],) + logits.shape[1:], bool)
    for c in range(scores.shape[1]):
        candidates = np.flatnonzero((scores[:, c] >= threshold) | (scores[:, c] == scores[:, c].max()))
        prompt = prompts[c]
        inter = (masks[candidates] & prompt).sum((1, 2))
        union = (masks[candidates] | prompt).sum((1, 2))
        ious = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        out[c] = masks[candidates[int(np.argmax(ious))]]
    return out


def resize_prompt(region_mask: np.ndarray, sam_valid_hw, orig_hw) -> np.ndarray:
    """A visual-prompt mask on the padded S grid [S, S] -> nearest at the original size [H, W]."""
    valid = np.asarray(region_mask, np.float32)[: int(sam_valid_hw[0]), : int(sam_valid_hw[1])]
    return resize_numpy(valid, (int(orig_hw[0]), int(orig_hw[1])), method="nearest") > 0.5
