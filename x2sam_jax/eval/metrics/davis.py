"""Video object segmentation: region similarity J, boundary accuracy F and J&F (DAVIS 2017).

As davis2017-evaluation (`db_eval_iou`, `db_eval_boundary`, `DAVISEvaluation`):
  J (per frame) = |pred & gt| / |pred | gt| outside void pixels, 1 when the union is empty;
  F (per frame) = the F-measure of boundary precision and recall: the one-pixel boundaries of
    both masks (`_seg2bmap`'s definition), each matched against the other's boundary dilated by a
    disk of radius ceil(0.008 * image diagonal) (a pixel is matched when it lies within that
    Euclidean distance of the other boundary); no predicted boundary gives precision 1 / recall
    0, no ground-truth boundary the reverse, neither gives 1;
  official J&F: per object (track / expression) the mean over its frames, then the mean over
    objects of J and of F, J&F = (J + F) / 2. The semi-supervised protocol leaves out each
    object's first and last frame (`drop_first_last=True`).
X2SAM's evaluator instead averages J and F over all (object, frame) pairs pooled together;
`JF.summary()` reports that too, as J_x2sam, F_x2sam, J&F_x2sam.
Masks are evaluated at their native (original) resolution.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
from scipy import ndimage

BOUNDARY_THRESHOLD = 0.008


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a binary mask (davis2017's `_seg2bmap`): a pixel that differs from its
    right, lower or lower-right neighbour (outside the image is background); the last row compares
    with the right neighbour only, the last column with the lower one, the corner is never set."""
    m = np.asarray(mask, bool)
    right = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down = np.zeros_like(m)
    down[:-1, :] = m[1:, :]
    diag = np.zeros_like(m)
    diag[:-1, :-1] = m[1:, 1:]
    out = (m ^ right) | (m ^ down) | (m ^ diag)
    out[-1, :] = m[-1, :] ^ right[-1, :]
    out[:, -1] = m[:, -1] ^ down[:, -1]
    out[-1, -1] = False
    return out


def _within(boundary: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean distance `radius` of a boundary pixel (= dilation by a disk)."""
    if not boundary.any():
        return np.zeros_like(boundary)
    return ndimage.distance_transform_edt(~boundary) <= radius


def f_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
              threshold: float = BOUNDARY_THRESHOLD) -> float:
    """Boundary F-measure of one frame."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} masks differ in shape")
    if void is not None:
        keep = ~np.asarray(void, bool)
        pred, gt = pred & keep, gt & keep
    radius = threshold if threshold >= 1 else math.ceil(threshold * math.hypot(*pred.shape))
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(pred_b & _within(gt_b, radius)) / n_pred
        recall = np.count_nonzero(gt_b & _within(pred_b, radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity (IoU) of one frame; 1 when both masks are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} masks differ in shape")
    keep = np.ones_like(pred) if void is None else ~np.asarray(void, bool)
    union = np.count_nonzero((pred | gt) & keep)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt & keep) / union


def track_scores(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                 threshold: float = BOUNDARY_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame J and F of one object over frames [T, H, W]."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected prediction and ground truth tracks [T, H, W], got {pred.shape} / {gt.shape}")
    voids = [None] * len(gt) if void is None else list(np.asarray(void, bool))
    j = np.array([j_measure(p, g, v) for p, g, v in zip(pred, gt, voids)], np.float64)
    f = np.array([f_measure(p, g, v, threshold) for p, g, v in zip(pred, gt, voids)], np.float64)
    return j, f


class JF:
    """J and F over objects: `add(key, pred [T, H, W], gt [T, H, W])`, then `summary()`."""

    def __init__(self, drop_first_last: bool = False, threshold: float = BOUNDARY_THRESHOLD):
        self.drop_first_last = drop_first_last
        self.threshold = threshold
        self.j: dict[Hashable, np.ndarray] = {}
        self.f: dict[Hashable, np.ndarray] = {}

    def add(self, key: Hashable, pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> None:
        j, f = track_scores(pred, gt, void, self.threshold)
        self.add_scores(key, j, f)

    def add_scores(self, key: Hashable, j: np.ndarray, f: np.ndarray) -> None:
        """Adds an object's per-frame J and F (in frame order) computed elsewhere."""
        if key in self.j:
            raise ValueError(f"object {key!r} was added twice")
        j, f = np.asarray(j, np.float64), np.asarray(f, np.float64)
        if self.drop_first_last:
            j, f = j[1:-1], f[1:-1]
        self.j[key], self.f[key] = j, f

    def summary(self) -> dict[str, float]:
        nan = float("nan")
        keys = [k for k in self.j if len(self.j[k])]
        if not keys:
            return dict.fromkeys(("J", "F", "J&F", "J_x2sam", "F_x2sam", "J&F_x2sam"), nan)
        j = float(np.mean([np.nanmean(self.j[k]) for k in keys]))
        f = float(np.mean([np.nanmean(self.f[k]) for k in keys]))
        pooled_j = float(np.concatenate([self.j[k] for k in keys]).mean())
        pooled_f = float(np.concatenate([self.f[k] for k in keys]).mean())
        return {"J": j, "F": f, "J&F": (j + f) / 2,
                "J_x2sam": pooled_j, "F_x2sam": pooled_f, "J&F_x2sam": (pooled_j + pooled_f) / 2}
