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
Phrase similarity (recall): GLaMM and X2SAM's evaluators take the cosine of two phrases' BERT
embeddings, each the mean of bert-base-uncased's last hidden states over all of the phrase's
tokens ([CLS] and [SEP] included, truncated at 512), `BertPhraseSimilarity` (a local copy of the
model: `phrase_similarity(model_dir)`). No BERT weights ship with this project: without one the
similarity is the cosine of bag-of-words count vectors (`bag_of_words_similarity`, a lexical
stand-in); `describe_similarity` names which one decided a recall.

Video GCG (`VideoGCG`, X2SAM's `VidGCGSegEvaluator` over VideoGLaMM's benchmark): the unit is one
clip (16 frames sampled over the whole video) with its generated caption;
  METEOR, CIDEr  each clip's caption against its video's reference caption;
  mIoU           per frame, GLaMM's paired mIoU of every predicted phrase mask against the
                 ground-truth phrases visible on that frame (a frame where none is visible scores
                 0, as the official code); the mean over every frame of every clip;
  recall         per clip, GLaMM's greedy matching with the video IoU of two phrase tracks
                 (intersection summed over the clip's frames / union summed over them).
The official evaluator reports no AP50 for video.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
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


BAG_OF_WORDS = "bag-of-words cosine (a lexical stand-in for GLaMM's BERT similarity)"


class BertPhraseSimilarity:
    """GLaMM's phrase similarity (groundingLMM eval/gcg/evaluate.py `text_similarity_bert`, the
    same in X2SAM's GCG evaluators) with a BERT read from `model_dir` (config.json, weights and
    tokenizer files, e.g. a download of bert-base-uncased): float32 embeddings, computed once per
    phrase (`embedding`), compared by their cosine (0 when either is all zeros, as sklearn's)."""

    def __init__(self, model_dir: str):
        config_file = os.path.join(model_dir, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"phrase encoder {model_dir}: no config.json there (expected a BERT model "
                                    "directory, e.g. a download of bert-base-uncased)")
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type != "bert":
            raise ValueError(f"phrase encoder {model_dir}: config.json says model_type {model_type!r}, expected 'bert'")
        if importlib.util.find_spec("torch") is None:
            raise ModuleNotFoundError("the BERT phrase similarity needs torch: pip install 'x2sam_jax[torch]'")
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        except (OSError, ValueError) as err:   # weights or vocabulary missing
            raise OSError(f"phrase encoder {model_dir}: cannot load its BERT ({err})") from err
        self.description = (f"BERT mean-pooled cosine (GLaMM), {os.path.abspath(model_dir)}, weights sha256 "
                            f"{_weights_digest(model_dir)}")
        self._cache: dict[str, np.ndarray] = {}

    def embedding(self, text: str) -> np.ndarray:
        """The mean of the last hidden states over the phrase's tokens, [hidden] float32."""
        if text not in self._cache:
            import torch

            inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state[0]
            self._cache[text] = torch.mean(hidden, dim=0).numpy()
        return self._cache[text]

    def __call__(self, a: str, b: str) -> float:
        ea, eb = self.embedding(a), self.embedding(b)
        na, nb = np.linalg.norm(ea), np.linalg.norm(eb)
        if not na or not nb:
            return 0.0
        return float(np.dot(ea / na, eb / nb))


def _weights_digest(model_dir: str) -> str:
    """sha256 of the directory's weight files (*.safetensors, *.bin, in name order): which BERT it was."""
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(model_dir) if n.endswith((".safetensors", ".bin"))):
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _bert_similarity(model_dir: str) -> BertPhraseSimilarity:
    return BertPhraseSimilarity(model_dir)


def phrase_similarity(encoder: str = "") -> PhraseSimilarity:
    """The recall's phrase similarity: `BertPhraseSimilarity` of the BERT in directory `encoder`
    (loaded once per process, its embeddings kept across evaluations), or the bag-of-words stand-in
    when `encoder` is empty."""
    if not encoder:
        return bag_of_words_similarity
    return _bert_similarity(os.path.abspath(os.path.expanduser(encoder)))


def describe_similarity(similarity: PhraseSimilarity) -> str:
    """What results.json records as a recall's phrase similarity."""
    if similarity is bag_of_words_similarity:
        return BAG_OF_WORDS
    return getattr(similarity, "description", getattr(similarity, "__name__", repr(similarity)))


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
    return _greedy_matches(iou_matrix(gt, pred), pred_phrases, gt_phrases, similarity, iou_threshold,
                           similarity_threshold)


def _greedy_matches(ious: np.ndarray, pred_phrases, gt_phrases, similarity, iou_threshold: float = 0.5,
                    similarity_threshold: float = 0.5) -> int:
    """GLaMM's matching on a [G, P] IoU matrix: the highest remaining IoU pair counts while its IoU
    and its phrases' similarity both pass; the first that fails ends the matching."""
    ious = np.array(ious, np.float64)
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


def track_iou_matrix(gt_tracks: Sequence[Sequence], pred_tracks: Sequence[Sequence], height: int,
                     width: int) -> np.ndarray:
    """[G, P] video IoU of phrase tracks (one RLE or None per frame, None = empty): intersection
    summed over the frames / union summed over them (0 where both tracks are empty)."""
    def decode(track):
        return np.stack([np.zeros((height, width), bool) if m is None else
                         mask_utils.decode(_rle(m)).astype(bool) for m in track]) if len(track) else \
            np.zeros((0, height, width), bool)

    gts, preds = [decode(t) for t in gt_tracks], [decode(t) for t in pred_tracks]
    out = np.zeros((len(gts), len(preds)))
    for i, g in enumerate(gts):
        for j, p in enumerate(preds):
            if g.shape != p.shape:
                raise ValueError(f"a ground-truth track of {len(g)} frames against a predicted one of {len(p)}")
            union = np.logical_or(g, p).sum()
            out[i, j] = np.logical_and(g, p).sum() / union if union else 0.0
    return out


def frame_mious(pred_tracks: Sequence[Sequence], gt_tracks: Sequence[Sequence]) -> list[float]:
    """Per frame of a clip: GLaMM's paired mIoU of the predicted phrase masks against the
    ground-truth phrases present on the frame (None = absent)."""
    frames = len(gt_tracks[0]) if gt_tracks else (len(pred_tracks[0]) if pred_tracks else 0)
    return [paired_miou([p[t] for p in pred_tracks if p[t] is not None], [g[t] for g in gt_tracks if g[t] is not None])
            for t in range(frames)]


class VideoGCG:
    """Accumulates clips: `add_clip(...)`, then `summary()` (METEOR / CIDEr need Java); see the
    module docstring for the video protocol."""

    def __init__(self, similarity: PhraseSimilarity = bag_of_words_similarity, captions: bool = True):
        self.similarity, self.captions = similarity, captions
        if captions:
            require_caption_metrics()
        self.references, self.predictions = {}, {}
        self.mious, self.true_positives, self.positives = [], 0, 0

    def add_clip(self, key, height: int, width: int, *, caption: str, references: Sequence[str],
                 pred_tracks: Sequence[Sequence], pred_phrases: Sequence[str], gt_tracks: Sequence[Sequence],
                 gt_phrases: Sequence[str]) -> None:
        """`pred_tracks` / `gt_tracks`: per phrase, its mask on each of the clip's frames (RLE, or
        None where it is absent), all tracks of one clip the same length."""
        if len(pred_tracks) != len(pred_phrases) or len(gt_tracks) != len(gt_phrases):
            raise ValueError("one phrase per track expected")
        if len({len(t) for t in list(pred_tracks) + list(gt_tracks)}) > 1:
            raise ValueError(f"clip {key}: tracks of different frame counts")
        self.references[key], self.predictions[key] = list(references), caption
        self.mious += frame_mious(pred_tracks, gt_tracks)
        self.positives += len(gt_phrases)
        self.true_positives += _greedy_matches(track_iou_matrix(gt_tracks, pred_tracks, height, width), pred_phrases,
                                               gt_phrases, self.similarity)

    def summary(self) -> dict[str, float]:
        out = {"mIoU": float(np.mean(self.mious)) if self.mious else float("nan"),
               "recall": self.true_positives / self.positives if self.positives else 0.0}
        if self.captions:
            out.update(caption_scores(self.references, self.predictions))
        return out
