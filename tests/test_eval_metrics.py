"""Metrics of x2sam_jax.eval.metrics against their references on random inputs.

The references are test-only transcriptions of the official formulas (panopticapi pq_compute,
VIPSeg eval_vpq, detectron2 / VSPW mIoU, VSPW VC_perclip, youtubevos/cocoapi ytvoseval track IoU,
LISA cIoU/gIoU, davis2017-evaluation J/F, GLaMM GCG mIoU/recall), written loop by loop as the
originals do, or pycocotools itself. Deterministic references are matched to 1e-9 (both sides
compute the same float64 ratios, in a different order at most)."""

import hashlib
import math
from collections import defaultdict

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from x2sam_jax.data.sources.common import encode_mask
from x2sam_jax.eval import metrics
from x2sam_jax.eval.metrics import coco as coco_metrics

TOL = 1e-9


# ------------------------------------------------------------------------- panopticapi reference
def _ref_pq_image(pan_gt, gt_segms, pan_pred, pred_segms, stat):
    """panopticapi pq_compute_single_core for one image (gt areas from the map, as its JSON)."""
    OFFSET, VOID = 256 * 256 * 256, 0
    gt_segms = {k: dict(v) for k, v in gt_segms.items()}
    pred_segms = {k: dict(v) for k, v in pred_segms.items()}
    for label, cnt in zip(*np.unique(pan_gt, return_counts=True)):
        if label in gt_segms:
            gt_segms[label]["area"] = cnt
    for seg in gt_segms.values():
        seg.setdefault("area", 0)
    labels, counts = np.unique(pan_pred, return_counts=True)
    for label, cnt in zip(labels, counts):
        if label == VOID:
            continue
        pred_segms[label]["area"] = cnt
    pred_segms = {k: v for k, v in pred_segms.items() if "area" in v}
    pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    for label, inter in zip(*np.unique(pan_gt_pred, return_counts=True)):
        gt_pred_map[(label // OFFSET, label % OFFSET)] = inter
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), inter in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - inter - gt_pred_map.get((VOID, pred_label), 0)
        iou = inter / union
        if iou > 0.5:
            stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
            stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd = {}
    for gt_label, info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if info["iscrowd"] == 1:
            crowd[info["category_id"]] = gt_label
            continue
        stat[info["category_id"]]["fn"] += 1
    for pred_label, info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        inter = gt_pred_map.get((VOID, pred_label), 0)
        if info["category_id"] in crowd:
            inter += gt_pred_map.get((crowd[info["category_id"]], pred_label), 0)
        if inter / info["area"] > 0.5:
            continue
        stat[info["category_id"]]["fp"] += 1


def _ref_pq_average(stat, categories, isthing):
    pq = sq = rq = n = 0
    for label, thing in categories.items():
        if isthing is not None and thing != isthing:
            continue
        s = stat[label]
        if s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        pq += s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
        sq += s["iou"] / s["tp"] if s["tp"] != 0 else 0
        rq += s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
    return pq / n, sq / n, rq / n


def _new_stat():
    return defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})


def _random_panoptic(rng, shape, categories, n_gt, n_pred, crowd=True):
    """A gt map of blobs (some crowd, some VOID) and a prediction that perturbs it, so that
    matches, misses, VOID- and crowd-ignored false positives all occur."""
    cats = list(categories)
    gt = np.zeros(shape, np.int64)
    gt_segs = {}
    for k in range(1, n_gt + 1):
        y, x = rng.integers(0, shape[-2]), rng.integers(0, shape[-1])
        h, w = rng.integers(2, shape[-2] // 2 + 2), rng.integers(2, shape[-1] // 2 + 2)
        gt[..., y:y + h, x:x + w] = k * 7
        gt_segs[k * 7] = {"category_id": int(rng.choice(cats)), "iscrowd": int(crowd and rng.random() < 0.15)}
    gt_segs = {k: v for k, v in gt_segs.items() if (gt == k).any()}
    pred = np.where(rng.random(shape) < 0.9, gt, 0)
    pred_segs = {k: {"category_id": v["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))}
                 for k, v in gt_segs.items()}
    for k in range(n_pred):  # extra predicted blobs (false positives, partly on VOID / crowd)
        y, x = rng.integers(0, shape[-2]), rng.integers(0, shape[-1])
        pid = 1000 + k
        pred[..., y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = pid
        pred_segs[pid] = {"category_id": int(rng.choice(cats))}
    pred_segs = {k: v for k, v in pred_segs.items() if (pred == k).any()}
    return gt, gt_segs, pred, pred_segs


CATEGORIES = {1: True, 2: True, 3: True, 4: False, 5: False}


def test_pq_matches_panopticapi_on_random_images():
    rng = np.random.default_rng(0)
    ours, ref = metrics.PQStats(), _new_stat()
    for _ in range(25):
        gt, gt_segs, pred, pred_segs = _random_panoptic(rng, (24, 30), CATEGORIES, int(rng.integers(0, 7)),
                                                        int(rng.integers(0, 4)))
        ours += metrics.pq_stats(gt, gt_segs, pred, pred_segs, CATEGORIES)
        _ref_pq_image(gt, gt_segs, pred, pred_segs, ref)
    summary = ours.summary(CATEGORIES)
    for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
        pq, sq, rq = _ref_pq_average(ref, CATEGORIES, isthing)
        assert summary[f"PQ{suffix}"] == pytest.approx(pq, abs=TOL)
        assert summary[f"SQ{suffix}"] == pytest.approx(sq, abs=TOL)
        assert summary[f"RQ{suffix}"] == pytest.approx(rq, abs=TOL)
    assert 0 < summary["PQ"] < 1   # the random inputs exercise TP, FP and FN


def test_pq_edge_cases():
    gt = np.zeros((6, 6), np.int64)
    gt[:3] = 1
    gt[3:, :3] = 2                                      # crowd, category 1
    segs = {1: {"category_id": 1, "iscrowd": 0}, 2: {"category_id": 1, "iscrowd": 1}}
    # perfect prediction; the crowd region predicted as its own segment is ignored (not a FP)
    pred = gt.copy()
    stats = metrics.pq_stats(gt, segs, pred, {1: {"category_id": 1}, 2: {"category_id": 1}})
    assert stats.tp == {1: 1} and stats.fp == {} and stats.fn == {}
    assert stats.summary({1: True})["PQ"] == 1.0
    # no prediction: one FN, PQ 0; no ground truth and no prediction: undefined (NaN)
    stats = metrics.pq_stats(gt, segs, np.zeros_like(gt), {})
    assert stats.fn == {1: 1} and stats.summary({1: True})["PQ"] == 0.0
    assert math.isnan(metrics.PQStats().summary({1: True})["PQ"])
    # a prediction mostly on VOID is ignored, one mostly on a segment of another category is a FP
    pred = np.zeros_like(gt)
    pred[3:, 3:] = 9                                    # entirely VOID
    assert metrics.pq_stats(gt, segs, pred, {9: {"category_id": 1}}).fp == {}
    assert metrics.pq_stats(gt, segs, np.where(gt == 1, 9, 0), {9: {"category_id": 2}}).fp == {2: 1}
    with pytest.raises(ValueError, match="missing from the segment table"):
        metrics.pq_stats(gt, segs, pred, {})


def _ref_vpq_video(gt_frames, gt_jsons, pred_frames, pred_jsons, nframes, stat):
    """VIPSeg vpq_compute_single_core for one video (segments merged over the window; gt areas
    from the maps)."""
    for idx in range(0, len(gt_frames) - nframes + 1):
        gt_segms, pred_segms = {}, {}
        for t in range(idx, idx + nframes):
            for k, v in gt_jsons[t].items():
                gt_segms.setdefault(k, dict(v))
            for k, v in pred_jsons[t].items():
                pred_segms.setdefault(k, dict(v))
        _ref_pq_image(np.stack(gt_frames[idx:idx + nframes]), gt_segms, np.stack(pred_frames[idx:idx + nframes]),
                      pred_segms, stat)


def test_vpq_matches_vipseg_on_random_videos():
    rng = np.random.default_rng(1)
    windows = (1, 2, 4, 6)
    vpq = metrics.VPQ(CATEGORIES, windows)
    refs = {k: _new_stat() for k in windows}
    for _ in range(4):
        frames = int(rng.integers(3, 9))
        gt, gt_segs, pred, pred_segs = _random_panoptic(rng, (frames, 16, 20), CATEGORIES, 5, 2)
        # tracks vanish on some frames: per-frame tables list the ids present on that frame
        gt = np.where(rng.random(gt.shape[:1])[:, None, None] < 0.2, 0, gt)
        gt_tables = [{k: v for k, v in gt_segs.items() if (gt[t] == k).any()} for t in range(frames)]
        pred_tables = [{k: v for k, v in pred_segs.items() if (pred[t] == k).any()} for t in range(frames)]
        vpq.add_video(gt, gt_tables, pred, pred_tables)
        for k in windows:
            _ref_vpq_video(list(gt), gt_tables, list(pred), pred_tables, k, refs[k])
    summary = vpq.summary()
    expected = [_ref_pq_average(refs[k], CATEGORIES, None)[0] for k in windows]
    for k, value in zip(windows, expected):
        assert summary[f"VPQ_{k}"] == pytest.approx(value, abs=TOL)
    assert summary["VPQ"] == pytest.approx(np.mean(expected), abs=TOL)


# ------------------------------------------------------------------------- semantic
def test_miou_matches_detectron2_and_vspw_definition():
    rng = np.random.default_rng(2)
    k = 6
    matrix = metrics.ConfusionMatrix(k)
    ref = np.zeros((k + 1, k + 1), np.int64)             # detectron2: an extra row for ignore
    for _ in range(5):
        gt = rng.integers(0, k - 1, size=(9, 11))       # class k-1 never appears in the ground truth
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, k, size=gt.shape)
        matrix.update(gt, pred)
        g = np.where(gt == 255, k, gt)
        ref += np.bincount((k + 1) * pred.ravel() + g.ravel(), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    tp = ref.diagonal()[:-1].astype(float)
    pos_gt = ref[:-1, :-1].sum(0).astype(float)
    pos_pred = ref[:-1, :-1].sum(1).astype(float)
    valid = pos_gt > 0
    iou = tp[valid] / (pos_gt + pos_pred - tp)[valid]
    assert matrix.summary()["mIoU"] == pytest.approx(iou.mean(), abs=TOL)
    assert np.isnan(matrix.ious()[k - 1])
    with pytest.raises(ValueError, match="outside"):
        matrix.update(np.zeros((2, 2), int), np.full((2, 2), k))


def _ref_vc(gts, preds, clip_num):
    """VSPW VC_perclip.get_common."""
    accs = []
    for i in range(len(gts) - clip_num):
        global_common = np.ones(gts[0].shape)
        pred_global_common = np.ones(gts[0].shape)
        for j in range(1, clip_num):
            global_common = np.logical_and(global_common, gts[i] == gts[i + j])
            pred_global_common = np.logical_and(pred_global_common, preds[i] == preds[i + j])
        with np.errstate(invalid="ignore"):
            accs.append((pred_global_common * global_common).sum() / global_common.sum())
    return accs


def test_mvc_matches_vspw():
    rng = np.random.default_rng(3)
    vc = metrics.VideoConsistency(windows=(2, 4))
    refs = {2: [], 4: []}
    for frames in (3, 6, 9, 4):
        base = rng.integers(0, 3, size=(12, 10))
        gt = np.stack([np.where(rng.random(base.shape) < 0.1, 255, base) for _ in range(frames)])
        pred = np.stack([np.where(rng.random(base.shape) < 0.2, rng.integers(0, 3), base) for _ in range(frames)])
        vc.add_video(gt, pred)
        for n in refs:
            refs[n] += [] if frames <= n else _ref_vc(list(gt), list(pred), n)
    summary = vc.summary()
    for n in refs:
        assert summary[f"mVC_{n}"] == pytest.approx(np.nanmean(refs[n]), abs=TOL)


# ------------------------------------------------------------------------- COCO AP
def _blob(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
    m[y:y + rng.integers(3, h // 2 + 3), x:x + rng.integers(3, w // 2 + 3)] = 1
    return m


def _random_detection_set(rng, images, h, w, cats):
    gts, dts = [], []
    for image_id in range(1, images + 1):
        for _ in range(int(rng.integers(0, 4))):
            gts.append((image_id, _blob(rng, h, w), int(rng.choice(cats)), int(rng.random() < 0.1)))
        for _, m, c, _ in [g for g in gts if g[0] == image_id]:  # noisy copies: IoU spread over 0.5..1
            if rng.random() < 0.8:
                noisy = np.where(rng.random(m.shape) < rng.uniform(0, 0.4), 1 - m, m) & _grow(m)
                dts.append((image_id, noisy.astype(np.uint8), c, float(rng.random())))
        for _ in range(int(rng.integers(0, 3))):
            dts.append((image_id, _blob(rng, h, w), int(rng.choice(cats)), float(rng.random())))
    return gts, dts


def _grow(m):
    out = m.copy()
    out[1:] |= m[:-1]
    out[:, 1:] |= m[:, :-1]
    return out


def test_mask_ap_equals_pycocotools():
    rng = np.random.default_rng(4)
    h, w, cats = 20, 24, [3, 5, 8]
    gts, dts = _random_detection_set(rng, 12, h, w, cats)
    ap = metrics.MaskAP(cats)
    for image_id in range(1, 13):
        ap.add_image(h, w, [{"segmentation": encode_mask(m), "category_id": c, "iscrowd": z}
                            for i, m, c, z in gts if i == image_id],
                     [{"segmentation": encode_mask(m), "category_id": c, "score": s}
                      for i, m, c, s in dts if i == image_id])
    # pycocotools directly, from JSON-style dicts
    gt = COCO()
    anns = []
    for k, (i, m, c, z) in enumerate(gts):
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": k + 1, "image_id": i, "category_id": c, "iscrowd": z, "segmentation": rle,
                     "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle))})
    gt.dataset = {"images": [{"id": i, "height": h, "width": w} for i in range(1, 13)], "annotations": anns,
                  "categories": [{"id": c} for c in cats]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": i, "category_id": c, "score": s,
                      "segmentation": mask_utils.encode(np.asfortranarray(m))} for i, m, c, s in dts])
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    summary = ap.summary()
    assert summary["AP"] == pytest.approx(ev.stats[0], abs=TOL)
    assert summary["AP50"] == pytest.approx(ev.stats[1], abs=TOL)
    assert 0 < summary["AP"] < 1


def test_mask_ap_edge_cases():
    rng = np.random.default_rng(5)
    m = encode_mask(_blob(rng, 16, 16))
    perfect = metrics.MaskAP([1])
    perfect.add_image(16, 16, [{"segmentation": m, "category_id": 1}], [{"segmentation": m, "category_id": 1, "score": 0.3}])
    assert perfect.summary()["AP"] == pytest.approx(1.0)
    empty = metrics.MaskAP([1])
    empty.add_image(16, 16, [{"segmentation": m, "category_id": 1}], [])
    assert empty.summary()["AP"] == 0.0                 # ground truth without any prediction
    no_gt = metrics.MaskAP([1])
    no_gt.add_image(16, 16, [], [{"segmentation": m, "category_id": 1, "score": 0.3}])
    assert math.isnan(no_gt.summary()["AP"])             # undefined without ground truth


def _pycocotools_stats_without_results(images, gts, h, w, cats):
    """pycocotools' six segm statistics for ground truth `gts` [(image, mask, category, crowd)] and
    no predictions at all (an empty result set: `loadRes` refuses an empty list)."""
    gt = COCO()
    anns = []
    for k, (i, m, c, z) in enumerate(gts):
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": k + 1, "image_id": i, "category_id": c, "iscrowd": z, "segmentation": rle,
                     "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle))})
    images = [{"id": i, "height": h, "width": w} for i in range(1, images + 1)]
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cats]}
    gt.createIndex()
    dt = COCO()
    dt.dataset = {"images": images, "annotations": [], "categories": [{"id": c} for c in cats]}
    dt.createIndex()
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def _same_stats(summary, stats):
    """Every statistic equal to pycocotools' (its -1, "no ground truth in range", is our NaN)."""
    for name, ref in zip(coco_metrics.STAT_NAMES, stats):
        if ref == -1:
            assert math.isnan(summary[name]), (name, summary[name])
        else:
            assert summary[name] == pytest.approx(ref, abs=TOL), (name, summary[name], ref)


@pytest.mark.parametrize("medium", [False, True])
def test_mask_ap_without_predictions_equals_pycocotools(medium):
    """No predictions at all: AP 0 where the area range has ground truth, undefined (pycocotools'
    -1, NaN here) where it has none; the same for the YouTube-VIS track AP (one-frame videos are
    images). Small objects only (APm, APl undefined), or with one medium object (APm 0)."""
    rng = np.random.default_rng(8)
    h, w, cats = 48, 48, [2, 7]
    gts = [(i, _blob(rng, 12, 12), int(rng.choice(cats)), 0) for i in range(1, 5) for _ in range(2)]
    gts = [(i, np.pad(m, ((0, h - 12), (0, w - 12))), c, z) for i, m, c, z in gts]   # at most 12 x 12 < 32^2
    if medium:
        big = np.zeros((h, w), np.uint8)
        big[2:42, 3:40] = 1                               # 40 x 37 pixels: 32^2 < area < 96^2
        gts.append((3, big, cats[0], 0))
    stats = _pycocotools_stats_without_results(4, gts, h, w, cats)
    assert stats[4] == (0.0 if medium else -1.0) and stats[5] == -1.0 and stats[0] == 0.0
    image_ap, video_ap = metrics.MaskAP(cats), metrics.VideoMaskAP(cats)
    for image_id in range(1, 5):
        g = [(encode_mask(m), c) for i, m, c, _ in gts if i == image_id]
        image_ap.add_image(h, w, [{"segmentation": m, "category_id": c} for m, c in g], [])
        video_ap.add_video(h, w, [{"segmentations": [m], "category_id": c} for m, c in g], [])
    _same_stats(image_ap.summary(), stats)
    _same_stats(video_ap.summary(), stats)
    # A multi-frame track: its area is the mean over its non-empty frames (ytvoseval's avg_area).
    tracks = metrics.VideoMaskAP([1])
    tracks.add_video(h, w, [{"segmentations": [encode_mask(gts[0][1]), None, encode_mask(gts[1][1])],
                             "category_id": 1}], [])
    summary = tracks.summary()
    assert summary["AP"] == summary["APs"] == 0.0 and math.isnan(summary["APm"]) and math.isnan(summary["APl"])


def _ref_ytvis_iou(d_seq, g_seq):
    """youtubevos/cocoapi ytvoseval.computeIoU.iou_seq."""
    i = u = 0.0
    for d, g in zip(d_seq, g_seq):
        if d and g:
            i += mask_utils.area(mask_utils.merge([d, g], True))
            u += mask_utils.area(mask_utils.merge([d, g], False))
        elif not d and g:
            u += mask_utils.area(g)
        elif d and not g:
            u += mask_utils.area(d)
    return i / u if u > 0 else 0.0


def test_video_ap_track_iou_matches_ytvoseval_and_one_frame_videos_match_coco():
    rng = np.random.default_rng(6)
    for _ in range(20):
        frames = int(rng.integers(1, 6))
        d = [None if rng.random() < 0.3 else mask_utils.encode(np.asfortranarray(_blob(rng, 12, 14)))
             for _ in range(frames)]
        g = [None if rng.random() < 0.3 else mask_utils.encode(np.asfortranarray(_blob(rng, 12, 14)))
             for _ in range(frames)]
        assert metrics.track_iou(d, g) == pytest.approx(_ref_ytvis_iou(d, g), abs=TOL)
    # one-frame videos: the track AP is the image AP (no crowd: crowd IoU differs by definition)
    h, w, cats = 18, 18, [1, 2]
    gts, dts = _random_detection_set(rng, 10, h, w, cats)
    image_ap, video_ap = metrics.MaskAP(cats), metrics.VideoMaskAP(cats)
    for image_id in range(1, 11):
        g = [(encode_mask(m), c) for i, m, c, _ in gts if i == image_id]
        d = [(encode_mask(m), c, s) for i, m, c, s in dts if i == image_id]
        image_ap.add_image(h, w, [{"segmentation": m, "category_id": c} for m, c in g],
                           [{"segmentation": m, "category_id": c, "score": s} for m, c, s in d])
        video_ap.add_video(h, w, [{"segmentations": [m], "category_id": c} for m, c in g],
                           [{"segmentations": [m], "category_id": c, "score": s} for m, c, s in d])
    assert video_ap.summary()["AP"] == pytest.approx(image_ap.summary()["AP"], abs=TOL)
    assert video_ap.summary()["AP50"] == pytest.approx(image_ap.summary()["AP50"], abs=TOL)


def test_video_ap_of_true_tracks_is_one():
    rng = np.random.default_rng(7)
    tracks = [[encode_mask(_blob(rng, 10, 10)) if t != 1 else None for t in range(4)] for _ in range(3)]
    ap = metrics.VideoMaskAP([1])
    ap.add_video(10, 10, [{"segmentations": t, "category_id": 1} for t in tracks],
                 [{"segmentations": t, "category_id": 1, "score": 0.5 + 0.1 * k} for k, t in enumerate(tracks)])
    assert ap.summary()["AP"] == pytest.approx(1.0)
    assert coco_metrics.mean_area([None, encode_mask(np.zeros((3, 3))), encode_mask(np.ones((3, 3)))]) == 9.0


# ------------------------------------------------------------------------- referring (LISA)
def _ref_lisa(preds, gts):
    """LISA: intersectionAndUnion on {0, 1} maps, acc_iou[union == 0] += 1, foreground class."""
    inter_sum = union_sum = 0.0
    acc = []
    for p, g in zip(preds, gts):
        inter = float(np.logical_and(p, g).sum())
        union = float(np.logical_or(p, g).sum())
        inter_sum += inter
        union_sum += union
        a = inter / (union + 1e-10)
        if union == 0:
            a += 1.0
        acc.append(a)
    return inter_sum / (union_sum + 1e-10), float(np.mean(acc))


def test_ciou_giou_match_lisa_with_empty_masks():
    rng = np.random.default_rng(8)
    preds, gts = [], []
    for k in range(30):
        p, g = rng.random((9, 9)) < 0.4, rng.random((9, 9)) < 0.3
        if k % 7 == 0:
            p, g = np.zeros_like(p), np.zeros_like(g)   # both empty: IoU 1
        elif k % 7 == 1:
            p = np.zeros_like(p)                        # one empty: IoU 0
        preds.append(p)
        gts.append(g)
    scores = metrics.MaskIoU()
    ious = [scores.add(p, g) for p, g in zip(preds, gts)]
    assert ious[0] == 1.0 and ious[1] == 0.0
    c_iou, g_iou = _ref_lisa(preds, gts)
    summary = scores.summary()
    assert summary["cIoU"] == pytest.approx(c_iou, abs=TOL) and summary["gIoU"] == pytest.approx(g_iou, abs=TOL)
    ignore = np.zeros((9, 9), bool)
    ignore[0] = True
    inter, union = metrics.referring.intersection_union(np.ones((9, 9)), np.ones((9, 9)), ignore)
    assert (inter, union) == (72, 72)


# ------------------------------------------------------------------------- DAVIS J & F
def _ref_seg2bmap(seg):
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def _ref_dilate(b, r):
    """cv2.dilate with skimage.morphology.disk(r), written as a union of shifted copies."""
    out = np.zeros_like(b)
    h, w = b.shape
    r = int(r)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > r * r:
                continue
            out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] |= \
                b[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
    return out


def _ref_f_measure(fg, gt, bound_th=0.008):
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fg_b, gt_b = _ref_seg2bmap(fg), _ref_seg2bmap(gt)
    fg_dil, gt_dil = _ref_dilate(fg_b, bound_pix), _ref_dilate(gt_b, bound_pix)
    n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision = np.sum(fg_b * gt_dil) / float(n_fg)
        recall = np.sum(gt_b * fg_dil) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _ref_j(gt, seg):
    inter, union = np.sum(seg & gt), np.sum(seg | gt)
    return 1 if np.isclose(union, 0) else inter / union


def _shape_track(rng, frames, h, w):
    """Blobby masks (a jittered disk moving over the frames) with some empty frames."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 0.4 * min(h, w))
    out = []
    for t in range(frames):
        m = (yy - cy - 2 * t) ** 2 + (xx - cx) ** 2 < r ** 2
        m ^= rng.random((h, w)) < 0.03
        out.append(m if rng.random() > 0.15 else np.zeros_like(m))
    return np.stack(out)


def test_j_and_f_match_davis2017():
    rng = np.random.default_rng(9)
    jf = metrics.JF()
    ref_j, ref_f, pooled_j, pooled_f = [], [], [], []
    for obj in range(6):
        h, w = (int(v) for v in rng.integers(20, 90, size=2))   # radius ceil(0.008 * diagonal) = 1
        frames = int(rng.integers(2, 6))
        gt, pred = _shape_track(rng, frames, h, w), _shape_track(rng, frames, h, w)
        pred[0] = gt[0]                                            # one exact frame: J = F = 1
        jf.add(obj, pred, gt)
        js = [_ref_j(g, p) for g, p in zip(gt, pred)]
        fs = [_ref_f_measure(p, g) for g, p in zip(gt, pred)]
        assert js[0] == 1 and fs[0] == 1
        ref_j.append(np.mean(js))
        ref_f.append(np.mean(fs))
        pooled_j += js
        pooled_f += fs
    summary = jf.summary()
    assert summary["J"] == pytest.approx(np.mean(ref_j), abs=TOL)
    assert summary["F"] == pytest.approx(np.mean(ref_f), abs=TOL)
    assert summary["J&F"] == pytest.approx((np.mean(ref_j) + np.mean(ref_f)) / 2, abs=TOL)
    assert summary["J&F_x2sam"] == pytest.approx((np.mean(pooled_j) + np.mean(pooled_f)) / 2, abs=TOL)


def test_f_measure_radius_on_large_frames_and_edge_cases():
    rng = np.random.default_rng(10)
    for h, w in ((480, 854), (300, 200)):                   # radius 8 and 3
        gt, pred = _shape_track(rng, 1, h, w)[0], _shape_track(rng, 1, h, w)[0]
        pred |= np.roll(gt, 5, axis=1)
        assert metrics.f_measure(pred, gt) == pytest.approx(_ref_f_measure(pred, gt), abs=TOL)
    empty, full = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    full[2:6, 2:6] = True
    assert metrics.f_measure(empty, empty) == 1.0 and metrics.j_measure(empty, empty) == 1.0
    assert metrics.f_measure(empty, full) == 0.0 and metrics.j_measure(empty, full) == 0.0
    # semi-supervised protocol: first and last frames left out
    jf = metrics.JF(drop_first_last=True)
    track = np.stack([full, empty, full])
    jf.add("a", np.stack([empty, empty, empty]), track)
    assert jf.summary()["J"] == 1.0                          # only the middle (empty, empty) frame counts


# ------------------------------------------------------------------------- GCG (GLaMM)
def _ref_glamm_miou(pred, gt):
    m = np.zeros((len(pred), len(gt)))
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            m[i, j] = np.logical_and(p, g).sum() / np.logical_or(p, g).sum()
    paired = []
    while m.size > 0 and np.max(m) > 0:
        i, j = np.unravel_index(np.argmax(m, axis=None), m.shape)
        paired.append(m[i, j])
        m = np.delete(np.delete(m, i, axis=0), j, axis=1)
    return np.mean(paired) if paired else 0.0


def _ref_glamm_matches(gt, gt_labels, pred, pred_labels, sim):
    ious = np.zeros((len(gt), len(pred)))
    for i, g in enumerate(gt):
        for j, p in enumerate(pred):
            ious[i, j] = np.logical_and(p, g).sum() / np.logical_or(p, g).sum()
    sims = np.array([[sim(a, b) for b in pred_labels] for a in gt_labels]).reshape(ious.shape)
    n = 0
    while ious.size > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[i, j] < 0.5 or sims[i, j] < 0.5:
            break
        n += 1
        ious[i, :] = 0
        ious[:, j] = 0
        sims[i, :] = 0
        sims[:, j] = 0
    return n


def test_gcg_mask_metrics_match_glamm():
    rng = np.random.default_rng(11)
    gcg = metrics.GCG(captions=False)
    words = ["red circle", "blue square", "the green triangle", "a yellow square", "grass"]
    mious, tp, positives = [], 0, 0
    for k in range(8):
        gt = [_blob(rng, 16, 16) for _ in range(int(rng.integers(0, 4)))]
        kept = int(rng.integers(0, len(gt) + 1))
        pred = [np.where(rng.random((16, 16)) < 0.9, g, 0).astype(np.uint8) for g in gt[:kept]]
        pred += [_blob(rng, 16, 16) for _ in range(int(rng.integers(0, 2)))]
        gt_labels = [str(rng.choice(words)) for _ in gt]
        pred_labels = [gt_labels[i] if i < kept and rng.random() < 0.7 else str(rng.choice(words))
                       for i in range(len(pred))]
        gcg.add_image(k, 16, 16, caption="", references=[""], pred_masks=[encode_mask(m) for m in pred],
                      pred_phrases=pred_labels, gt_masks=[encode_mask(m) for m in gt], gt_phrases=gt_labels)
        mious.append(_ref_glamm_miou(pred, gt))
        tp += _ref_glamm_matches(gt, gt_labels, pred, pred_labels, metrics.gcg.bag_of_words_similarity)
        positives += len(gt)
    summary = gcg.summary()
    assert summary["mIoU"] == pytest.approx(np.mean(mious), abs=TOL)
    assert summary["recall"] == pytest.approx(tp / positives, abs=TOL)
    assert 0 < summary["recall"] <= 1 and 0 <= summary["AP50"] <= 1
    assert metrics.gcg.bag_of_words_similarity("the red circle", "red circle") == pytest.approx(2 / math.sqrt(6))


def _track(masks):
    """A phrase track from per-frame numpy masks (None: absent on that frame)."""
    return [None if m is None else encode_mask(np.asarray(m, np.uint8)) for m in masks]


def _box(y0, y1, x0, x1, size=4):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_video_gcg_mask_metrics_by_hand():
    """Two clips of 4x4 frames, scored by hand. Clip A: video IoUs red 4/6 and blue 6/8 both
    match (recall 2 of 2); frame 0 pairs IoU 1 and 2/4, frame 1 pairs blue's 1 (red is absent
    there). Clip B: the highest-IoU pair (0.94) has dissimilar phrases and ends the matching
    (GLaMM's rule: recall 0 of 1); its frame 1 shows no ground truth and scores 0 (official)."""
    gcg = metrics.VideoGCG(captions=False)
    gcg.add_clip("A", 4, 4, caption="", references=[""],
                 gt_tracks=[_track([_box(0, 2, 0, 2), None]), _track([_box(2, 4, 2, 4), _box(2, 4, 2, 4)])],
                 gt_phrases=["red circle", "blue square"],
                 pred_tracks=[_track([_box(0, 2, 0, 2), _box(0, 1, 0, 2)]),
                              _track([_box(2, 4, 2, 3), _box(2, 4, 2, 4)])],
                 pred_phrases=["red circle", "blue square"])
    gcg.add_clip("B", 4, 4, caption="", references=[""], gt_tracks=[_track([_box(0, 4, 0, 4), None])],
                 gt_phrases=["blue square"], pred_tracks=[_track([_box(0, 4, 0, 4), _box(0, 1, 0, 1)])],
                 pred_phrases=["green triangle"])
    summary = gcg.summary()
    assert summary["recall"] == pytest.approx(2 / 3, abs=TOL)
    assert summary["mIoU"] == pytest.approx(np.mean([(1 + 0.5) / 2, 1.0, 1.0, 0.0]), abs=TOL)
    assert set(summary) == {"mIoU", "recall"}                  # no AP50 for video (X2SAM reports none)
    ious = metrics.gcg.track_iou_matrix([_track([_box(0, 2, 0, 2), None])],
                                        [_track([_box(0, 2, 0, 2), _box(0, 1, 0, 2)]), _track([None, None])], 4, 4)
    np.testing.assert_allclose(ious, [[4 / 6, 0.0]], atol=TOL)
    with pytest.raises(ValueError, match="different frame counts"):
        gcg.add_clip("C", 4, 4, caption="", references=[""], gt_tracks=[_track([_box(0, 2, 0, 2)])],
                     gt_phrases=["red circle"], pred_tracks=[_track([None, None])], pred_phrases=["red circle"])


def test_video_gcg_matches_the_official_loops():
    """Random clips against X2SAM's VidGCGSegEvaluator loops: per-frame GLaMM mIoU over the phrases
    present on the frame, recall from IoUs of whole [T, H, W] tracks."""
    rng = np.random.default_rng(5)
    gcg = metrics.VideoGCG(captions=False)
    words = ["red circle", "blue square", "the green triangle", "a yellow square", "grass"]
    mious, tp, positives = [], 0, 0
    for k in range(10):
        frames = int(rng.integers(1, 5))
        gt = [[_blob(rng, 12, 12) if t == 0 or rng.random() < 0.7 else None for t in range(frames)]
              for _ in range(int(rng.integers(1, 4)))]
        pred = [[None if g is None or rng.random() < 0.2 else np.where(rng.random((12, 12)) < 0.85, g, 0)
                 for g in track] for track in gt[: int(rng.integers(1, len(gt) + 1))]]
        pred += [[_blob(rng, 12, 12) for _ in range(frames)] for _ in range(int(rng.integers(0, 2)))]
        gt_labels = [str(rng.choice(words)) for _ in gt]
        pred_labels = [gt_labels[i] if i < len(gt) and rng.random() < 0.8 else str(rng.choice(words))
                       for i in range(len(pred))]
        gcg.add_clip(k, 12, 12, caption="", references=[""], pred_tracks=[_track(t) for t in pred],
                     pred_phrases=pred_labels, gt_tracks=[_track(t) for t in gt], gt_phrases=gt_labels)
        dense = lambda track: np.stack([np.zeros((12, 12), np.uint8) if m is None else m for m in track])  # noqa: E731
        for t in range(frames):
            mious.append(_ref_glamm_miou([dense(p)[t] for p in pred], [g[t] for g in gt if g[t] is not None]))
        tp += _ref_glamm_matches([dense(g) for g in gt], gt_labels, [dense(p) for p in pred], pred_labels,
                                 metrics.gcg.bag_of_words_similarity)
        positives += len(gt)
    summary = gcg.summary()
    assert summary["mIoU"] == pytest.approx(np.mean(mious), abs=TOL)
    assert summary["recall"] == pytest.approx(tp / positives, abs=TOL) and 0 < summary["recall"] < 1


@pytest.mark.slow
def test_caption_scores_through_pycocoevalcap():
    """METEOR / CIDEr need Java (~20 s to start); an exact caption scores METEOR 1."""
    scores = metrics.caption_scores({1: ["a red circle above the blue square"], 2: ["a green triangle on grass"]},
                                    {1: "a red circle above the blue square", 2: "a yellow square"})
    assert 0 < scores["METEOR"] < 1 and scores["CIDEr"] > 0
    same = metrics.caption_scores({1: ["a red circle"]}, {1: "a red circle"})
    assert same["METEOR"] == pytest.approx(1.0, abs=1e-6)


def test_undefined_metrics_stay_undefined_in_the_results_files():
    """A NaN metric (pycocotools' -1) is null in results.json and n/a in results.md and in eval.py's
    headline table, never a number."""
    import json
    import sys
    from pathlib import Path

    from x2sam_jax.eval.evaluator import _json_value, format_markdown

    empty = metrics.MaskAP([1])
    empty.add_image(16, 16, [{"segmentation": encode_mask(np.ones((4, 4), np.uint8)), "category_id": 1}], [])
    summary = empty.summary()
    results = {"coco_vgd": {"AP": summary["AP"], "APm": summary["APm"], "samples": 1}}
    assert json.loads(json.dumps(_json_value(results)))["coco_vgd"] == {"AP": 0.0, "APm": None, "samples": 1}
    assert "| coco_vgd | 0.00 | 1 | n/a |" in format_markdown(results)
    # eval.py as the module "eval", as test_eval.py imports it: a second copy under another name
    # would define its absl flags again in the same process.
    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        import eval as cli
    finally:
        sys.path.remove(root)
    table = cli.headline_table({"coco_vgd": {"AP": float("nan")}, "refcoco": {"cIoU": 0.5}})
    assert "| image VGD | coco_vgd | AP | n/a |" in table and "| refcoco | cIoU | 50.0 |" in table


# ------------------------------------------------------------------------- GCG phrase similarity (BERT)
def _ref_glamm_bert_similarity(model_dir):
    """GLaMM's eval/gcg/evaluate.py `text_similarity_bert`, transcribed (sklearn's cosine_similarity
    written out: each float32 embedding divided by its norm, then their dot product)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)

    def embedding(text):
        inputs = tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
        return torch.mean(model(**inputs).last_hidden_state[0], dim=0).detach().numpy()

    def similarity(a, b):
        ea, eb = embedding(a), embedding(b)
        return float(np.dot(ea / np.linalg.norm(ea), eb / np.linalg.norm(eb)))

    return similarity


def test_bert_phrase_similarity_matches_glamm_and_decides_the_recall(tmp_path):
    """A tiny random BERT saved like a bert-base-uncased download: the similarity equals GLaMM's
    computation (float32 noise), embeddings are computed once per phrase, and one image's recall by
    hand: "red circle" found by its own mask (IoU 1, same phrase), "blue square" by a mask of IoU
    12/16 named "the ball": the BERT similarity passes 0.5 there, the bag-of-words one (0) does not."""
    from _tiny_bert import save_tiny_bert

    model_dir = save_tiny_bert(tmp_path / "bert")
    similarity = metrics.gcg.phrase_similarity(str(model_dir))
    reference = _ref_glamm_bert_similarity(str(model_dir))
    pairs = [("blue square", "the ball"), ("red circle", "man on the left"), ("Dog", "zebra dog"), ("a", "a")]
    for a, b in pairs:
        assert similarity(a, b) == pytest.approx(reference(a, b), rel=1e-6, abs=1e-6), (a, b)
    assert similarity("a", "a") == pytest.approx(1.0, abs=1e-6)
    assert similarity.embedding("the ball") is similarity.embedding("the ball")          # cached
    assert metrics.gcg.phrase_similarity(str(model_dir)) is similarity                     # loaded once
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert metrics.gcg.describe_similarity(similarity) == \
        f"BERT mean-pooled cosine (GLaMM), {model_dir}, weights sha256 {weights}"
    assert metrics.gcg.describe_similarity(metrics.gcg.phrase_similarity("")) == metrics.gcg.BAG_OF_WORDS

    red, blue = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    red[:4, :4], blue[4:, 4:] = 1, 1
    blue_pred = blue.copy()
    blue_pred[4, 4:] = 0                                                                   # IoU 12 / 16
    args = dict(caption="", references=[""], pred_masks=[encode_mask(red), encode_mask(blue_pred)],
                pred_phrases=["red circle", "the ball"], gt_masks=[encode_mask(red), encode_mask(blue)],
                gt_phrases=["red circle", "blue square"])
    assert reference("blue square", "the ball") >= 0.5                                    # the tiny BERT's value
    recalls = {}
    for name, sim in (("bert", similarity), ("words", metrics.gcg.bag_of_words_similarity)):
        gcg = metrics.GCG(sim, captions=False)
        gcg.add_image(0, 8, 8, **args)
        recalls[name] = gcg.summary()["recall"]
    assert recalls == {"bert": 1.0, "words": 0.5}


def test_phrase_encoder_that_is_not_a_bert_is_a_clear_error(tmp_path):
    import json as json_mod

    with pytest.raises(FileNotFoundError, match="no config.json"):
        metrics.gcg.phrase_similarity(str(tmp_path / "nowhere"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json_mod.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2', expected 'bert'"):
        metrics.gcg.phrase_similarity(str(tmp_path / "gpt"))
    (tmp_path / "empty_bert").mkdir()
    (tmp_path / "empty_bert" / "config.json").write_text(json_mod.dumps({"model_type": "bert"}))
    with pytest.raises(OSError, match="cannot load its BERT"):
        metrics.gcg.phrase_similarity(str(tmp_path / "empty_bert"))
