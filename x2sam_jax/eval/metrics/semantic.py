"""Semantic segmentation: mIoU from one dataset-wide confusion matrix, and VSPW's video
consistency (mVC).

mIoU (detectron2's SemSegEvaluator, VSPW's Evaluator): pixels whose ground truth is outside
[0, num_classes) (the ignore label 255) are left out; per class IoU = TP / (TP + FP + FN);
the mean runs over the classes that occur in the ground truth.

mVC_n (VSPW's VC_perclip.py): for every window of n frames starting at frames 0 .. T - n - 1 (the
official range leaves out the last window), the share of the pixels whose ground-truth label stays
the same over the window on which the predicted label also stays the same; mVC_n is the mean over
all windows of all videos (videos of at most n frames are skipped; a window without a constant
ground-truth pixel is NaN and left out of the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = 255


class ConfusionMatrix:
    """Counts (ground truth, prediction) pixel pairs over a dataset: `update` per image or frame."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt, pred = np.asarray(gt).astype(np.int64), np.asarray(pred).astype(np.int64)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        keep = (gt >= 0) & (gt < self.num_classes)
        if keep.any() and (pred[keep].min() < 0 or pred[keep].max() >= self.num_classes):
            raise ValueError(f"predicted labels outside [0, {self.num_classes})")
        counts = np.bincount(gt[keep] * self.num_classes + pred[keep], minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def ious(self) -> np.ndarray:
        """Per-class IoU, NaN for classes absent from the ground truth."""
        tp = np.diag(self.matrix).astype(np.float64)
        gt = self.matrix.sum(1).astype(np.float64)
        pred = self.matrix.sum(0).astype(np.float64)
        out = np.full(self.num_classes, np.nan)
        present = gt > 0
        out[present] = tp[present] / (gt[present] + pred[present] - tp[present])
        return out

    def summary(self) -> dict[str, float]:
        ious = self.ious()
        present = ~np.isnan(ious)
        total = self.matrix.sum()
        return {"mIoU": float(ious[present].mean()) if present.any() else float("nan"),
                "pixel_accuracy": float(np.trace(self.matrix) / total) if total else float("nan")}


def consistency_windows(gt_frames: Sequence[np.ndarray], pred_frames: Sequence[np.ndarray],
                        window: int) -> list[float]:
    """VSPW's per-window consistency of one video (see the module docstring)."""
    gt, pred = np.asarray(gt_frames), np.asarray(pred_frames)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} frames differ in shape")
    frames = gt.shape[0]
    if frames <= window:
        return []
    out = []
    for start in range(frames - window):
        span = slice(start, start + window)
        gt_same = (gt[span] == gt[start]).all(0)
        pred_same = (pred[span] == pred[start]).all(0)
        constant = gt_same.sum()
        out.append(float((gt_same & pred_same).sum() / constant) if constant else float("nan"))
    return out


class VideoConsistency:
    """mVC_n over videos: `add_video(gt [T, H, W], pred [T, H, W])`, then `summary()`."""

    def __init__(self, windows: Sequence[int] = (8, 16)):
        self.windows = tuple(int(n) for n in windows)
        self.values = {n: [] for n in self.windows}

    def add_video(self, gt_frames, pred_frames) -> None:
        for n in self.windows:
            self.values[n].extend(consistency_windows(gt_frames, pred_frames, n))

    def summary(self) -> dict[str, float]:
        out = {}
        for n in self.windows:
            values = np.asarray(self.values[n], np.float64)
            kept = values[~np.isnan(values)]
            out[f"mVC_{n}"] = float(kept.mean()) if kept.size else float("nan")
        kept = [out[f"mVC_{n}"] for n in self.windows if not np.isnan(out[f"mVC_{n}"])]
        out["mVC"] = float(np.mean(kept)) if kept else float("nan")
        return out
