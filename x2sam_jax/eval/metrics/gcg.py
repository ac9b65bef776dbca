"""Grounded conversation generation (GLaMM's `eval/gcg/evaluate.py`).

  METEOR, CIDEr  captions through pycocoevalcap (PTB tokenizer, Java), predicted caption against
                 the reference caption(s) of each image;
  AP50           pycocotools segm AP at IoU 0.5 with every mask of one class and score 1;
  mIoU           per image, greedy one-to-one pairing of predicted and ground-truth masks by the
                 highest remaining IoU while it is > 0; the image's mIoU is the mean of the paired
                 IoUs (0 when nothing pairs); the dataset's is the mean over images;
  recall         greedy pairing by the highest remaining IoU; a pair counts when its IoU >= 0.5 and
                 its phrases are similar (>= 0.5); the first highest-IoU pair that fails either
                 test ends the image (as GLaMM); recall = pairs / ground-truth phrases.
GLaMM measures phrase similarity as the cosine of mean-pooled bert-base-uncased embeddings. No
BERT weights ship with this project: `phrase_similarity` defaults to the cosine of bag-of-words
count vectors (a lexical stand-in, reported under the name "recall"; pass a function that embeds
with BERT for GLaMM's exact number).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from x2sam_jax.eval.metrics.coco import MaskAP, _rle

PhraseSimilarity = Callable[[str, str], float]


def bag_of_words_similarity(a: str, b: str) -> float:
    """Cosine of word-count vectors (lower-cased words)."""
    ca = collections.Counter(re.findall(r"\w+", a.lower()))
    cb = collections.Counter(re.findall(r"\w+", b.lower()))
    dot = sum(ca[w] * cb[w] for w in ca)
    norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return dot / norm if norm else 0.0


def require_caption_metrics() -> None:
    """pycocoevalcap (METEOR, CIDEr; METEOR runs Java) is an optional dependency: a clear error
    naming the fix when it is missing."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise ModuleNotFoundError("GCG caption metrics (METEOR, CIDEr) need pycocoevalcap and Java: "
                                  "pip install 'x2sam_jax[eval]', or set the dataset's options.captions=False")


def caption_scores(references: Mapping, predictions: Mapping) -> dict[str, float]:
    """METEOR and CIDEr of predicted captions {image: str} against {image: [reference str, ...]}."""
    require_caption_metrics()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = sorted(predictions)
    missing = [k for k in keys if k not in references]
    if missing:
        raise KeyError(f"no reference caption for images {missing[:5]}")
    if not keys:
        return {"METEOR": float("nan"), "CIDEr": float("nan")}
    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        refs = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
        preds = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
        meteor, _ = Meteor().compute_score(refs, preds)
        cider, _ = Cider().compute_score(refs, preds)
    return {"METEOR": float(meteor), "CIDEr": float(cider)}


def iou_matrix(pred: Sequence[Mapping], gt: Sequence[Mapping]) -> np.ndarray:
    """[P, G] IoU of RLE masks (plain IoU, no crowd)."""
    if not pred or not gt:
        return np.zeros((len(pred), len(gt)))
    return np.asarray(mask_utils.iou([_rle(p) for p in pred], [_rle(g) for g in gt], [0] * len(gt)), np.float64)


def paired_miou(pred: Sequence[Mapping], gt: Sequence[Mapping]) -> float:
    """GLaMM's per-image mIoU (greedy max-IoU pairing while IoU > 0)."""
    ious = iou_matrix(pred, gt)
    paired = []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        paired.append(ious[i, j])
        ious = np.delete(np.delete(ious, i, axis=0), j, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def matched_phrases(pred: Sequence[Mapping], pred_phrases: Sequence[str], gt: Sequence[Mapping],
                    gt_phrases: Sequence[str], similarity: PhraseSimilarity = bag_of_words_similarity,
                    iou_threshold: float = 0.5, similarity_threshold: float = 0.5) -> int:
    """GLaMM's recall matches of one image (see the module docstring)."""
    ious = iou_matrix(gt, pred)  # [G, P], as GLaMM
    sims = np.array([[similarity(g, p) for p in pred_phrases] for g in gt_phrases], np.float64).reshape(ious.shape)
    matches = 0
    while ious.size:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[i, j] < iou_threshold or sims[i, j] < similarity_threshold:
            break
        matches += 1
        ious[i, :] = 0
        ious[:, j] = 0
        sims[i, :] = 0
        sims[:, j] = 0
    return matches


class GCG:
    """Accumulates images: `add_image(...)`, then `summary()` (METEOR/CIDEr need Java)."""

    def __init__(self, similarity: PhraseSimilarity = bag_of_words_similarity, captions: bool = True):
        self.similarity, self.captions = similarity, captions
        if captions:
            require_caption_metrics()   # before the evaluation runs, not after it
        self.ap = MaskAP(categories=[1])
        self.references, self.predictions = {}, {}
        self.mious, self.true_positives, self.positives = [], 0, 0

    def add_image(self, key, height: int, width: int, *, caption: str, references: Sequence[str],
                  pred_masks: Sequence[Mapping], pred_phrases: Sequence[str], gt_masks: Sequence[Mapping],
                  gt_phrases: Sequence[str]) -> None:
        if len(pred_masks) != len(pred_phrases) or len(gt_masks) != len(gt_phrases):
            raise ValueError("one phrase per mask expected")
        self.references[key], self.predictions[key] = list(references), caption
        self.ap.add_image(height, width, [{"segmentation": m, "category_id": 1} for m in gt_masks],
                          [{"segmentation": m, "category_id": 1, "score": 1.0} for m in pred_masks])
        self.mious.append(paired_miou(pred_masks, gt_masks))
        self.positives += len(gt_phrases)
        self.true_positives += matched_phrases(pred_masks, pred_phrases, gt_masks, gt_phrases, self.similarity)

    def summary(self) -> dict[str, float]:
        out = {"AP50": self.ap.summary()["AP50"],
               "mIoU": float(np.mean(self.mious)) if self.mious else float("nan"),
               "recall": self.true_positives / self.positives if self.positives else 0.0}
        if self.captions:
            out.update(caption_scores(self.references, self.predictions))
        return out
