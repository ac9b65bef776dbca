"""Panoptic quality (PQ / SQ / RQ, all / things / stuff) and video panoptic quality (VPQ).

PQ follows panopticapi's `pq_compute`: per image, a predicted and a ground-truth segment of the
same category match when IoU > 0.5, where the union leaves out the prediction's pixels on VOID
(id 0); crowd ground truth is never matched; unmatched predictions are not false positives when
more than half of them lies on VOID plus the crowd region of their category (one crowd region per
category: the last listed, as panopticapi's dict); per category PQ = sum IoU / (TP + FP/2 + FN/2),
averaged over the categories with TP + FP + FN > 0.

VPQ follows VIPSeg's `eval_vpq`: for a window of k frames, each k-frame tube (windows start at
every frame) is one "image" whose segments are tracks (an id keeps its identity over the frames);
the tube statistics of every window and video are summed and VPQ_k is their PQ. The reported VPQ
averages VPQ_k over the window sizes (VIPSeg: 1, 2, 4, 6, 8; X2SAM: 1, 2, 4, 6).

Inputs are numpy id maps ([H, W] or stacked frames [k, H, W]) plus segment tables
{segment id: {"category_id": int, "iscrowd": 0|1}}; id 0 is VOID in both maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

VOID = 0


@dataclasses.dataclass
class PQStats:
    """Per-category sums (IoU of true positives, TP, FP, FN); `+=` adds another PQStats."""

    iou: dict = dataclasses.field(default_factory=dict)
    tp: dict = dataclasses.field(default_factory=dict)
    fp: dict = dataclasses.field(default_factory=dict)
    fn: dict = dataclasses.field(default_factory=dict)

    def _add(self, table: dict, category: int, value) -> None:
        table[category] = table.get(category, 0) + value

    def __iadd__(self, other: "PQStats") -> "PQStats":
        for name in ("iou", "tp", "fp", "fn"):
            for category, value in getattr(other, name).items():
                self._add(getattr(self, name), category, value)
        return self

    def summary(self, categories: Mapping[int, bool]) -> dict[str, float]:
        """{"PQ", "SQ", "RQ", and the same for things ("_th") and stuff ("_st")}; `categories`
        maps every category id of the dataset to its is-thing flag. A group with no category
        seen (no TP, FP or FN) is NaN (panopticapi divides by zero there)."""
        out = {}
        for suffix, keep in (("", None), ("_th", True), ("_st", False)):
            pq = sq = rq = 0.0
            n = 0
            for category, is_thing in categories.items():
                if keep is not None and bool(is_thing) != keep:
                    continue
                tp, fp, fn = self.tp.get(category, 0), self.fp.get(category, 0), self.fn.get(category, 0)
                if tp + fp + fn == 0:
                    continue
                n += 1
                iou = self.iou.get(category, 0.0)
                pq += iou / (tp + 0.5 * fp + 0.5 * fn)
                sq += iou / tp if tp else 0.0
                rq += tp / (tp + 0.5 * fp + 0.5 * fn)
            nan = float("nan")
            out.update({f"PQ{suffix}": pq / n if n else nan, f"SQ{suffix}": sq / n if n else nan,
                        f"RQ{suffix}": rq / n if n else nan})
        return out


def pq_stats(gt_ids: np.ndarray, gt_segments: Mapping[int, Mapping], pred_ids: np.ndarray,
             pred_segments: Mapping[int, Mapping], categories: Mapping[int, bool] | None = None) -> PQStats:
    """The PQ statistics of one image (or of one stacked tube of frames).

    gt_segments / pred_segments: {id: {"category_id", "iscrowd" (gt only, default 0)}}; every gt
    segment counts (a listed segment without pixels is a false negative, as panopticapi with its
    JSON areas); predicted segments without pixels are ignored. A pixel of `pred_ids` with an id
    that is neither VOID nor listed is an error, as is a predicted category outside `categories`.
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} id maps differ in shape")
    gt_values, gt_index = np.unique(gt_ids.ravel(), return_inverse=True)
    pred_values, pred_index = np.unique(pred_ids.ravel(), return_inverse=True)
    unknown = [int(v) for v in pred_values if v != VOID and int(v) not in pred_segments]
    if unknown:
        raise ValueError(f"predicted id map holds segment ids {unknown} missing from the segment table")
    if categories is not None:
        bad = sorted({int(s["category_id"]) for s in pred_segments.values()} - set(categories))
        if bad:
            raise ValueError(f"predicted segments use unknown category ids {bad}")
    # Pixel counts of every (gt id, pred id) pair present in the maps.
    overlap = np.bincount(gt_index.ravel() * len(pred_values) + pred_index.ravel(),
                          minlength=len(gt_values) * len(pred_values)).reshape(len(gt_values), len(pred_values))
    gt_row = {int(v): k for k, v in enumerate(gt_values)}
    pred_col = {int(v): k for k, v in enumerate(pred_values)}
    gt_area = overlap.sum(1)
    pred_area = overlap.sum(0)
    void_row = overlap[gt_row[VOID]] if VOID in gt_row else np.zeros(len(pred_values), np.int64)

    stats = PQStats()
    gt_matched, pred_matched = set(), set()
    for g, g_info in gt_segments.items():
        g = int(g)
        if g == VOID or g_info.get("iscrowd", 0) or g not in gt_row:
            continue
        row = gt_row[g]
        for p in np.flatnonzero(overlap[row]):
            p_id = int(pred_values[p])
            if p_id == VOID or int(pred_segments[p_id]["category_id"]) != int(g_info["category_id"]):
                continue
            inter = int(overlap[row, p])
            union = int(pred_area[p]) + int(gt_area[row]) - inter - int(void_row[p])
            iou = inter / union
            if iou > 0.5:  # IoU > 0.5 makes the match unique
                category = int(g_info["category_id"])
                stats._add(stats.tp, category, 1)
                stats._add(stats.iou, category, iou)
                gt_matched.add(g)
                pred_matched.add(p_id)

    crowd_of_category = {}
    for g, g_info in gt_segments.items():
        g = int(g)
        if g == VOID or g in gt_matched:
            continue
        if g_info.get("iscrowd", 0):
            crowd_of_category[int(g_info["category_id"])] = g
            continue
        stats._add(stats.fn, int(g_info["category_id"]), 1)

    for p_id, p_info in pred_segments.items():
        p_id = int(p_id)
        if p_id == VOID or p_id in pred_matched or p_id not in pred_col:
            continue
        col = pred_col[p_id]
        category = int(p_info["category_id"])
        ignored = int(void_row[col])
        crowd = crowd_of_category.get(category)
        if crowd is not None and crowd in gt_row:
            ignored += int(overlap[gt_row[crowd], col])
        if ignored / int(pred_area[col]) > 0.5:
            continue
        stats._add(stats.fp, category, 1)
    return stats


def _merge_tables(tables: Sequence[Mapping[int, Mapping]]) -> dict[int, Mapping]:
    merged: dict[int, Mapping] = {}
    for table in tables:
        for segment_id, info in table.items():
            merged.setdefault(int(segment_id), info)  # a track keeps its first frame's category/crowd flag
    return merged


def vpq_stats(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[int, Mapping]], pred_ids: np.ndarray,
              pred_segments: Sequence[Mapping[int, Mapping]], window: int,
              categories: Mapping[int, bool] | None = None) -> PQStats:
    """VIPSeg's tube statistics of one video for windows of `window` frames.

    gt_ids / pred_ids: [T, H, W] id maps whose ids are tracks; *_segments: one table per frame.
    Windows start at every frame 0 .. T - window (none when the video is shorter)."""
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    frames = gt_ids.shape[0]
    if not (len(gt_segments) == len(pred_segments) == frames == pred_ids.shape[0]):
        raise ValueError(f"{frames} gt frames, {pred_ids.shape[0]} predicted frames, "
                         f"{len(gt_segments)} / {len(pred_segments)} segment tables")
    total = PQStats()
    for start in range(frames - window + 1):
        span = slice(start, start + window)
        total += pq_stats(gt_ids[span], _merge_tables(gt_segments[span]), pred_ids[span],
                          _merge_tables(pred_segments[span]), categories)
    return total


class VPQ:
    """Accumulates tube statistics per window size; `summary()` gives VPQ_k and their mean."""

    def __init__(self, categories: Mapping[int, bool], windows: Sequence[int] = (1, 2, 4, 6)):
        self.categories = dict(categories)
        self.windows = tuple(int(k) for k in windows)
        self.stats = {k: PQStats() for k in self.windows}

    def add_video(self, gt_ids, gt_segments, pred_ids, pred_segments) -> None:
        for k in self.windows:
            self.stats[k] += vpq_stats(gt_ids, gt_segments, pred_ids, pred_segments, k, self.categories)

    def summary(self) -> dict[str, float]:
        out = {}
        per_window = {k: self.stats[k].summary(self.categories) for k in self.windows}
        for k, summary in per_window.items():
            out[f"VPQ_{k}"] = summary["PQ"]
        for suffix in ("", "_th", "_st"):
            values = [per_window[k][f"PQ{suffix}"] for k in self.windows]
            out[f"VPQ{suffix}"] = float(np.mean(values)) if values else float("nan")
        return out
