"""Mask IoU statistics of referring / reasoning / interactive segmentation (LISA's evaluation).

For each expression (or interactive prompt) the foreground intersection I and union U of the
predicted and the ground-truth mask at the original resolution (pixels marked ignore excluded):
  cIoU = sum I / (sum U + 1e-10)                     (cumulative IoU)
  gIoU = mean over expressions of I / (U + 1e-10), where an expression with U = 0 (both masks
         empty: a no-target expression answered with no mask) scores 1
LISA's `intersectionAndUnionGPU` + `acc_iou[union == 0] += 1.0`. X2SAM reports the same two
numbers for interactive segmentation as "cIoU" and "mIoU" (mIoU = gIoU).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-10


def intersection_union(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """Foreground intersection and union pixel counts of two binary masks."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} masks differ in shape")
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, gt = pred & keep, gt & keep
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


class MaskIoU:
    """Per-expression intersections and unions; `summary()` -> cIoU, gIoU (and mIoU = gIoU)."""

    def __init__(self):
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def add(self, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        """Adds one expression; returns its IoU (1 when both masks are empty)."""
        inter, union = intersection_union(pred, gt, ignore)
        return self.add_counts(inter, union)

    def add_counts(self, intersection: int, union: int) -> float:
        self.intersections.append(int(intersection))
        self.unions.append(int(union))
        return intersection / (union + EPS) + (1.0 if union == 0 else 0.0)

    def summary(self) -> dict[str, float]:
        if not self.unions:
            nan = float("nan")
            return {"cIoU": nan, "gIoU": nan, "mIoU": nan}
        inter = np.asarray(self.intersections, np.float64)
        union = np.asarray(self.unions, np.float64)
        per_expression = inter / (union + EPS) + (union == 0)
        g_iou = float(per_expression.mean())
        return {"cIoU": float(inter.sum() / (union.sum() + EPS)), "gIoU": g_iou, "mIoU": g_iou}
