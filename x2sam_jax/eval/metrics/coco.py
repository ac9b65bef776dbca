"""COCO mask AP through pycocotools, and the YouTube-VIS spatio-temporal AP.

`MaskAP` (images): pycocotools `COCOeval(iouType="segm")` on in-memory ground truth and
predictions; AP is the mean over IoU 0.50:0.95 and categories, AP50 at IoU 0.5. Crowd ground
truth is matched as pycocotools does (ignored, IoU = intersection / prediction area). Per-frame
video AP (X2SAM's "mAP" of YouTube-VIS) is this with every annotated frame as one image.

`VideoMaskAP` (YouTube-VIS's official metric, youtubevos/cocoapi `ytvoseval`): a prediction and a
ground truth are whole tracks; their IoU is sum_t |d_t & g_t| / sum_t |d_t | g_t| over the frames
(a missing mask is empty), crowd tracks are ignored but matched with that same IoU, and the area
ranges use a track's mean area over the frames where it is non-empty. Matching, precision and
recall are pycocotools' (COCOeval with this IoU plugged in).

Masks are COCO RLE dicts ({"size": [h, w], "counts": str | bytes}) at the original resolution.
Undefined results are NaN: pycocotools' -1, a statistic whose area range (or the whole split) has
no ground truth. No predictions at all still goes through pycocotools (an empty result set): AP is
0 where there is ground truth and NaN where there is none, exactly as pycocotools reports.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(dict(rle), *rle["size"])
    return {"size": [int(v) for v in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _area(rle: Mapping | None) -> int:
    return 0 if rle is None else int(mask_utils.area(_rle(rle)))


def _coco(images: list, annotations: list, categories: Sequence[int]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": int(c)} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _no_results(gt: COCO) -> COCO:
    """An empty result set on gt's images and categories (`COCO.loadRes` refuses an empty list)."""
    return _coco(copy.deepcopy(gt.dataset["images"]), [], [c["id"] for c in gt.dataset["categories"]])


def _summarize(evaluator: COCOeval) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools reports -1 where no category has ground truth in range.
    return {name: float("nan") if value < 0 else float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


class MaskAP:
    """COCO segm AP over images: `add_image(...)` per image, `summary()` at the end."""

    def __init__(self, categories: Sequence[int]):
        self.categories = [int(c) for c in categories]
        self.images, self.gt, self.predictions = [], [], []

    def add_image(self, height: int, width: int, gt: Sequence[Mapping], predictions: Sequence[Mapping]) -> int:
        """gt: [{"segmentation": RLE, "category_id", "iscrowd"}]; predictions: [{"segmentation",
        "category_id", "score"}]. Returns the internal image id."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        for g in gt:
            rle = _rle(g["segmentation"])
            self.gt.append({"id": len(self.gt) + 1, "image_id": image_id, "category_id": int(g["category_id"]),
                            "iscrowd": int(g.get("iscrowd", 0)), "segmentation": rle,
                            "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle))})
        for p in predictions:
            self.predictions.append({"image_id": image_id, "category_id": int(p["category_id"]),
                                     "segmentation": _rle(p["segmentation"]), "score": float(p["score"])})
        return image_id

    def summary(self) -> dict[str, float]:
        gt = _coco(self.images, copy.deepcopy(self.gt), self.categories)
        if not any(not g["iscrowd"] for g in self.gt):     # pycocotools: -1 everywhere
            return dict.fromkeys(STAT_NAMES, float("nan"))
        if not self.predictions:                             # 0 where there is ground truth, else undefined
            return _summarize(COCOeval(gt, _no_results(gt), iouType="segm"))
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(self.predictions))
        return _summarize(COCOeval(gt, dt, iouType="segm"))


class _TrackEval(COCOeval):
    """COCOeval with the YouTube-VIS track IoU (per-frame masks in ann["track"])."""

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        p = self.params
        gt = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
        dt = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
        if not gt and not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        ious = np.zeros((len(dt), len(gt)))
        for i, d in enumerate(dt):
            for j, g in enumerate(gt):
                ious[i, j] = track_iou(d["track"], g["track"])
        return ious


def track_iou(pred: Sequence[Mapping | None], gt: Sequence[Mapping | None]) -> float:
    """sum_t |d_t & g_t| / sum_t |d_t | g_t| (None = no mask on that frame); 0 when both are empty."""
    if len(pred) != len(gt):
        raise ValueError(f"tracks of {len(pred)} and {len(gt)} frames")
    inter = union = 0
    for d, g in zip(pred, gt):
        if d is not None and g is not None:
            rd, rg = _rle(d), _rle(g)
            both = int(mask_utils.area(mask_utils.merge([rd, rg], intersect=True)))
            inter += both
            union += int(mask_utils.area(rd)) + int(mask_utils.area(rg)) - both
        else:
            union += _area(d) + _area(g)
    return inter / union if union > 0 else 0.0


def mean_area(track: Sequence[Mapping | None]) -> float:
    """A track's mean area over its non-empty frames (0 when it has none), as ytvoseval's avg_area."""
    areas = [a for a in (_area(m) for m in track) if a]
    return float(np.mean(areas)) if areas else 0.0


class VideoMaskAP:
    """YouTube-VIS AP over videos: `add_video(...)` per video, `summary()` at the end."""

    def __init__(self, categories: Sequence[int]):
        self.categories = [int(c) for c in categories]
        self.videos, self.gt, self.predictions = [], [], []

    def add_video(self, height: int, width: int, gt: Sequence[Mapping], predictions: Sequence[Mapping]) -> int:
        """gt: [{"segmentations": [RLE | None per frame], "category_id", "iscrowd"}]; predictions:
        [{"segmentations", "category_id", "score"}]."""
        video_id = len(self.videos) + 1
        self.videos.append({"id": video_id, "height": int(height), "width": int(width)})
        for g in gt:
            track = [None if m is None else _rle(m) for m in g["segmentations"]]
            self.gt.append({"id": len(self.gt) + 1, "image_id": video_id, "category_id": int(g["category_id"]),
                            "iscrowd": int(g.get("iscrowd", 0)), "track": track, "area": mean_area(track)})
        for p in predictions:
            track = [None if m is None else _rle(m) for m in p["segmentations"]]
            self.predictions.append({"id": len(self.predictions) + 1, "image_id": video_id,
                                     "category_id": int(p["category_id"]), "score": float(p["score"]),
                                     "iscrowd": 0, "track": track, "area": mean_area(track)})
        return video_id

    def summary(self) -> dict[str, float]:
        if not any(not g["iscrowd"] for g in self.gt):     # pycocotools: -1 everywhere
            return dict.fromkeys(STAT_NAMES, float("nan"))
        gt = _coco(self.videos, copy.deepcopy(self.gt), self.categories)
        dt = _coco(self.videos, copy.deepcopy(self.predictions), self.categories)
        # iouType "bbox" only keeps COCOeval from converting "segmentation" polygons; the IoU is the
        # track IoU of _TrackEval.computeIoU.
        return _summarize(_TrackEval(gt, dt, iouType="bbox"))
