"""Task evaluators: one row of model outputs -> post-processing -> a compact record; the records of
a dataset -> its metrics.

`process(row)` post-processes one row (one image, or one clip of a video) at the original
resolution against the row's ground truth from the source (never the S/4 training targets) and
returns a small picklable record (COCO RLEs, counts, per-frame scores). `finalize(records)` runs
once per dataset on all records sorted by (sample, clip), so results do not depend on batching,
device count or host count (records from several hosts are simply concatenated). Clips of one
video are merged there: per-frame results by source frame index, tracks as one track per clip.

A split whose ground truth is withheld is evaluated with `scored=False`: `process` compares
nothing and `finalize` is not called. With `submission=True` the video evaluators also keep what
the benchmark servers' files need (eval/submissions.py), compactly as RLEs: VideoObject each
condition's mask and score per frame (`frame_masks`, `frame_scores`), VideoGeneric each clip's
top tracks (`video_tracks`).

Families (by the source's task):
  ImageGeneric   gen_seg / ov_seg / vgd_seg     PQ/SQ/RQ, mIoU, AP/AP50 (VGD: AP over its categories)
  Referring      ref_seg / reason_seg           cIoU, gIoU (gRefCOCO: `multi_threshold`)
  Interactive    inter_seg                      cIoU, mIoU
  VideoObject    vref_seg / vreason_seg /       J, F, J&F (official) and J_x2sam, F_x2sam, J&F_x2sam
                 vobj_seg / vinter_seg          (X2SAM's pooling)
  VideoGeneric   vgen_seg / vov_seg / vvgd_seg  AP/AP50 (YouTube-VIS track AP) and mAP_x2sam (per-frame
                                                COCO AP), VPQ, mIoU, mVC
  Gcg            gcg_seg (answers generated)    METEOR, CIDEr, AP50, mIoU, recall (GLaMM)
  VideoGcg       vgcg_seg (answers generated    METEOR, CIDEr, mIoU, recall (X2SAM's video GCG
                 per clip)                      evaluator over VideoGLaMM's benchmark)
  ChatBench      chat / vchat (answers          MME, POPE, multiple-choice accuracy (eval/chat.py)
                 generated, benchmarks only)
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import numpy as np

from x2sam_jax.data.sources.common import encode_mask
from x2sam_jax.data.transforms import decode_rle
from x2sam_jax.eval import metrics, postprocess
from x2sam_jax.eval.metrics.gcg import bag_of_words_similarity, frame_mious, paired_miou


@dataclasses.dataclass
class Row:
    """One valid row of a batch, with its sample (restricted to the row's frames)."""

    index: int                     # source index
    clip: int                      # clip of that sample (0 for images and whole videos)
    frames: np.ndarray             # [T] source frame index of each frame of the row
    sample: object                 # data.schema.Sample restricted to `frames`
    num_conditions: int
    condition_instances: tuple     # per condition, the sample instances it targets
    mask_logits: np.ndarray        # [T, Q, h, w]
    class_logits: np.ndarray       # [T, Q, C_pad + 1]
    sam_size: int
    sam_valid_hw: np.ndarray       # [T, 2]
    region_masks: np.ndarray       # [R, S, S]
    region_frame: np.ndarray       # [R]
    labels: list                   # condition texts (overlays)
    answer: str = ""               # the answer text (generated for GCG, else the template's)

    @property
    def orig_hw(self) -> tuple[int, int]:
        return int(self.sample.height), int(self.sample.width)

    def probs(self, t: int) -> np.ndarray:
        return postprocess.class_probabilities(self.class_logits[t], self.num_conditions)

    def upsample(self, t: int, queries) -> np.ndarray:
        return postprocess.upsample(self.mask_logits[t][queries], self.sam_size, self.sam_valid_hw[t], self.orig_hw)


@dataclasses.dataclass
class Visual:
    """What an overlay shows for one row: per frame prediction / ground-truth masks and labels."""

    pred: np.ndarray               # [T, K, H, W] bool
    pred_labels: list              # names (a name keeps its colour in both panels)
    gt: np.ndarray | None          # [T, K', H, W] bool; None for a split without ground truth
    gt_labels: list
    pred_scores: list | None = None   # one per predicted mask; overlays draw those >= a threshold


def instance_mask(sample, instances, t: int) -> np.ndarray:
    """Union of some instances' masks on frame t at the original resolution."""
    out = np.zeros((sample.height, sample.width), bool)
    for i in instances:
        out |= decode_rle(sample.instances[i].masks[t], sample.height, sample.width)
    return out


def _rle(mask: np.ndarray) -> dict:
    return encode_mask(mask)


def _top_scores(probs: np.ndarray) -> list:
    """Each condition's score: the class probability of its top query (probs [Q, C])."""
    return [float(s) for s in np.asarray(probs).max(0)]


def _stack(masks, shape) -> np.ndarray:
    return np.stack(masks) if len(masks) else np.zeros((0,) + tuple(shape), bool)


class TaskEvaluator:
    """Base class: `process(row, visual=False) -> (record, Visual | None)`, `finalize(records)`.

    `scored=False`: the source has no ground truth (nothing is compared, no metrics);
    `submission=True`: records keep the predictions a submission file needs (video families)."""

    family = "base"
    writes_submissions = False

    def __init__(self, source, options: dict | None = None, *, scored: bool = True, submission: bool = False):
        self.source = source
        self.options = dict(options or {})
        self.scored, self.submission = bool(scored), bool(submission)
        if (self.submission or not self.scored) and not self.writes_submissions:
            raise ValueError(f"{getattr(source, 'name', source)}: the {self.family} evaluator (task "
                             f"{getattr(source, 'task', None)!r}) needs ground truth and writes no submission files")

    def process(self, row: Row, visual: bool = False):
        raise NotImplementedError

    def finalize(self, records: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def missed(self, sample, frames) -> dict | None:
        """The record of `sample` (restricted to the source frames `frames`) when it produced no
        prediction (its load failed): a miss against its annotations, as an empty prediction
        scores. None where the family cannot express one (its conditions come from the features,
        e.g. visual prompts): the sample is then only counted as failed."""
        return None

    def empty(self, record: dict) -> bool:
        """Whether a processed row predicted nothing at all (counted as a failed sample)."""
        return False

    def sample_scores(self, record: dict) -> dict:
        """A record's own scores for the per-sample report (plain JSON values)."""
        return {}


# ------------------------------------------------------------------------------------ categories
def vocabulary_flags(sample, num_conditions: int, stuff=()) -> tuple[np.ndarray, dict[int, bool]]:
    """Is-thing flags of a vocabulary task's conditions (condition c = the c-th category of the
    sample's vocabulary: evaluation lists the whole vocabulary in order), from the sample alone:
    the source's per-category flags (meta["is_thing"], COCO panoptic) or the `stuff` names of the
    dataset options, else the flags of the sample's own instances (a category absent from the
    sample counts as a thing). Returns (flags [C], the flags known from evidence {c: flag})."""
    if len(sample.categories) != num_conditions:
        raise ValueError(f"{sample.dataset}[{sample.sample_id}]: {num_conditions} conditions for a vocabulary "
                         f"of {len(sample.categories)} categories")
    meta = sample.meta.get("is_thing")
    if meta is not None and len(meta) == num_conditions:
        known = {c: bool(f) for c, f in enumerate(meta)}
    elif stuff:
        known = {c: name not in set(stuff) for c, name in enumerate(sample.categories)}
    else:
        seen = {inst.category: inst.is_thing for inst in sample.instances if inst.category is not None}
        known = {c: bool(seen[name]) for c, name in enumerate(sample.categories) if name in seen}
    return np.array([known.get(c, True) for c in range(num_conditions)], bool), known


def _merged_flags(records) -> dict[int, bool]:
    """The dataset's is-thing flags from every record's evidence (categories never seen: thing)."""
    flags: dict[int, bool] = {}
    for r in records:
        for c, flag in r["is_thing"].items():
            flags.setdefault(int(c), bool(flag))
    size = max((len(r["names"]) for r in records), default=0)
    return {c: flags.get(c, True) for c in range(size)}


def _vocabulary_index(sample, instance) -> int | None:
    try:
        return sample.categories.index(instance.category)
    except ValueError:
        return None


def _condition_category(sample, instances) -> int | None:
    """The dataset category id a region condition stands for (VGD: one category per region)."""
    for i in instances:
        category = sample.instances[i].category_id
        if category is not None:
            return int(category)
    return None


# ------------------------------------------------------------------------------------ images
class ImageGeneric(TaskEvaluator):
    """Generic / open-vocabulary (conditions = categories) and VGD (conditions = category regions)
    image segmentation: panoptic, semantic and instance post-processing from one forward."""

    family = "image_generic"

    def __init__(self, source, options=None, **kwargs):
        super().__init__(source, options, **kwargs)
        self.vgd = source.task == "vgd_seg"
        default = ("AP",) if self.vgd else ("PQ", "mIoU", "AP")
        self.metrics = tuple(self.options.get("metrics", default))

    def process(self, row: Row, visual: bool = False):
        sample, n = row.sample, row.num_conditions
        probs = row.probs(0)
        logits = row.upsample(0, np.arange(probs.shape[0]))                    # [Q, H, W]
        if self.vgd:
            category_of = [_condition_category(sample, inst) for inst in row.condition_instances]
            names = [f"region {c}" for c in range(n)]
            keep = np.array([c is not None for c in category_of], bool)
            known = {}
        else:
            names = list(sample.categories)
            category_of = list(range(1, n + 1))            # vocabulary index + 1 (pycocotools ids)
            keep, known = vocabulary_flags(sample, n, self.options.get("stuff", ()))
        record: dict = {"is_thing": known, "names": names}
        preds = []
        if "AP" in self.metrics:
            preds = postprocess.instances(probs, logits, keep=keep, threshold=self.options.get("instance_threshold", 0.0))
            gt = [{"segmentation": inst.masks[0], "category_id": self._gt_category(sample, inst),
                   "iscrowd": int(inst.iscrowd)} for inst in sample.instances]
            gt = [g for g in gt if g["category_id"] is not None and (self.vgd or keep[g["category_id"] - 1])]
            record["ap"] = (row.orig_hw, gt, [{"segmentation": _rle(p["mask"]), "category_id": category_of[p["category"]],
                                               "score": p["score"]} for p in preds])
        if "PQ" in self.metrics:
            ids, segments = postprocess.panoptic(probs, logits, keep,
                                                 threshold=self.options.get("panoptic_threshold", 0.0))
            gt_ids, gt_segments = self._panoptic_gt(sample)
            record["pq"] = metrics.pq_stats(gt_ids, gt_segments, ids,
                                            {s["id"]: {"category_id": s["category"]} for s in segments})
        if "mIoU" in self.metrics:
            sem = postprocess.semantic(probs, logits)
            gt_sem = self._semantic_gt(sample)
            keep_pixels = gt_sem != metrics.semantic.IGNORE
            pairs, counts = np.unique(gt_sem[keep_pixels].astype(np.int64) * n + sem[keep_pixels], return_counts=True)
            record["confusion"] = (n, pairs, counts)
        out = None
        if visual:  # panoptic segments when computed, else the top non-empty instances
            if "PQ" in self.metrics:
                shown = [{"mask": ids == s["id"], "category": s["category"], "score": s["score"]} for s in segments]
            else:
                shown = [p for p in preds if p["mask"].any()][: self.options.get("visual_instances", 8)]
            gt_shown = [i for i, inst in enumerate(sample.instances) if not inst.iscrowd]
            out = Visual(_stack([p["mask"] for p in shown], row.orig_hw)[None], [names[p["category"]] for p in shown],
                         _stack([instance_mask(sample, [i], 0) for i in gt_shown], row.orig_hw)[None],
                         [self._gt_name(sample, i, names, row.condition_instances) for i in gt_shown],
                         [p["score"] for p in shown])
        return record, out

    def missed(self, sample, frames):
        if self.vgd:          # the regions (conditions) are drawn by the features
            return None
        n = len(sample.categories)
        keep, known = vocabulary_flags(sample, n, self.options.get("stuff", ()))
        record: dict = {"is_thing": known, "names": list(sample.categories)}
        hw = (int(sample.height), int(sample.width))
        if "AP" in self.metrics:   # its ground truth, no detection
            gt = [{"segmentation": inst.masks[0], "category_id": self._gt_category(sample, inst),
                   "iscrowd": int(inst.iscrowd)} for inst in sample.instances]
            record["ap"] = (hw, [g for g in gt if g["category_id"] is not None and keep[g["category_id"] - 1]], [])
        if "PQ" in self.metrics:   # every ground-truth segment a false negative
            gt_ids, gt_segments = self._panoptic_gt(sample)
            record["pq"] = metrics.pq_stats(gt_ids, gt_segments, np.zeros_like(gt_ids), {})
        if "mIoU" in self.metrics:  # a semantic map has no "nothing": the sample adds no pixels
            record["confusion"] = (n, np.zeros(0, np.int64), np.zeros(0, np.int64))
        return record

    def sample_scores(self, record):
        out = {}
        if "pq" in record:
            stats = metrics.PQStats()
            stats += record["pq"]
            out["PQ"] = _finite(stats.summary(_merged_flags([record]))["PQ"])
        if "ap" in record:
            out["detections"] = len(record["ap"][2])
        return out

    def _gt_name(self, sample, i, names, condition_instances):
        inst = sample.instances[i]
        if self.vgd:  # the region whose targets include the instance
            for c, members in enumerate(condition_instances):
                if i in members:
                    return names[c]
            return f"category {inst.category_id}"
        return inst.category

    def _gt_category(self, sample, inst):
        if self.vgd:
            return None if inst.category_id is None else int(inst.category_id)
        index = _vocabulary_index(sample, inst)
        return None if index is None else index + 1

    def _panoptic_gt(self, sample):
        ids = np.zeros((sample.height, sample.width), np.int64)
        segments = {}
        for k, inst in enumerate(sample.instances):
            category = _vocabulary_index(sample, inst)
            if category is None:
                continue
            ids[instance_mask(sample, [k], 0)] = k + 1
            segments[k + 1] = {"category_id": category, "iscrowd": int(inst.iscrowd)}
        return ids, segments

    def _semantic_gt(self, sample):
        out = np.full((sample.height, sample.width), metrics.semantic.IGNORE, np.int64)
        for k, inst in enumerate(sample.instances):
            category = _vocabulary_index(sample, inst)
            if category is not None:
                out[instance_mask(sample, [k], 0)] = category
        return out

    def finalize(self, records):
        out = {}
        if "PQ" in self.metrics:
            stats = metrics.PQStats()
            for r in records:
                stats += r["pq"]
            summary = stats.summary(_merged_flags(records))
            out.update({k: summary[k] for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")})
        if "mIoU" in self.metrics:
            sizes = {r["confusion"][0] for r in records}
            if len(sizes) > 1:
                raise ValueError(f"samples of one dataset list different vocabularies ({sorted(sizes)} categories)")
            matrix = metrics.ConfusionMatrix(sizes.pop() if sizes else 1)
            for r in records:
                _, pairs, counts = r["confusion"]
                np.add.at(matrix.matrix.reshape(-1), pairs, counts)
            out["mIoU"] = matrix.summary()["mIoU"]
        if "AP" in self.metrics:
            categories = sorted({g["category_id"] for r in records for g in r["ap"][1]}
                                | {p["category_id"] for r in records for p in r["ap"][2]})
            ap = metrics.MaskAP(categories)
            for r in records:
                (height, width), gt, preds = r["ap"]
                ap.add_image(height, width, gt, preds)
            summary = ap.summary()
            out.update({"AP": summary["AP"], "AP50": summary["AP50"]})
        return out


class Referring(TaskEvaluator):
    """Referring / reasoning image segmentation: one mask per expression (condition)."""

    family = "referring"

    def process(self, row: Row, visual: bool = False):
        sample = row.sample
        probs = row.probs(0)
        threshold = self.options.get("multi_threshold")
        if threshold is None:
            logits = row.upsample(0, probs.argmax(0))                          # the top query only
            masks = logits > 0
        else:
            masks = postprocess.referring(probs, row.upsample(0, np.arange(probs.shape[0])),
                                          multi_threshold=threshold)
        if len(sample.phrases) != row.num_conditions:
            raise ValueError(f"{sample.dataset}[{sample.sample_id}]: {row.num_conditions} conditions for "
                             f"{len(sample.phrases)} expressions")
        gts = [instance_mask(sample, p.instance_indices, 0) for p in sample.phrases]
        record = {"iou": [metrics.referring.intersection_union(m, g) for m, g in zip(masks, gts)]}
        out = Visual(masks[None], [p.text for p in sample.phrases], _stack(gts, row.orig_hw)[None],
                     [p.text for p in sample.phrases], _top_scores(probs)) if visual else None
        return record, out

    def missed(self, sample, frames):   # an empty mask per expression: IoU 0 (or a no-target's)
        gts = [instance_mask(sample, p.instance_indices, 0) for p in sample.phrases]
        return {"iou": [metrics.referring.intersection_union(np.zeros_like(g), g) for g in gts]}

    def sample_scores(self, record):
        return _iou_scores(record)

    def finalize(self, records):
        scores = metrics.MaskIoU()
        for r in records:
            for inter, union in r["iou"]:
                scores.add_counts(inter, union)
        summary = scores.summary()
        return {"cIoU": summary["cIoU"], "gIoU": summary["gIoU"]}


class Interactive(TaskEvaluator):
    """Interactive segmentation: one mask per visual prompt, chosen as the official rule."""

    family = "interactive"

    def process(self, row: Row, visual: bool = False):
        sample = row.sample
        probs = row.probs(0)
        logits = row.upsample(0, np.arange(probs.shape[0]))
        prompts = np.stack([postprocess.resize_prompt(row.region_masks[c], row.sam_valid_hw[0], row.orig_hw)
                            for c in range(row.num_conditions)])
        masks = postprocess.interactive(probs, logits, prompts,
                                        threshold=self.options.get("threshold", postprocess.SCORE_THRESHOLD))
        gts = [instance_mask(sample, inst, 0) for inst in row.condition_instances]
        record = {"iou": [metrics.referring.intersection_union(m, g) for m, g in zip(masks, gts)]}
        labels = [f"region {c}" for c in range(row.num_conditions)]
        out = (Visual(masks[None], labels, _stack(gts, row.orig_hw)[None], labels, _top_scores(probs)) if visual
               else None)
        return record, out

    def missed(self, sample, frames):   # an empty mask per region: IoU 0
        gts = [instance_mask(sample, g, 0) for g in _region_groups(sample)]
        return {"iou": [metrics.referring.intersection_union(np.zeros_like(g), g) for g in gts]} if gts else None

    def sample_scores(self, record):
        return _iou_scores(record)

    def finalize(self, records):
        scores = metrics.MaskIoU()
        for r in records:
            for inter, union in r["iou"]:
                scores.add_counts(inter, union)
        summary = scores.summary()
        return {"cIoU": summary["cIoU"], "mIoU": summary["mIoU"]}


# ------------------------------------------------------------------------------------ videos
class VideoObject(TaskEvaluator):
    """Video referring / reasoning / object segmentation: per frame, each condition's top query;
    J and F per (object, frame) at the original resolution, merged over the clips of a video.
    With `submission`, records also keep each predicted mask (RLE) and its score (the class
    probability of the condition's top query on that frame) for `frame_masks` / `frame_scores`."""

    family = "video_object"
    writes_submissions = True

    def _targets(self, row: Row):
        """(object key, instance indices) per condition: expressions for referring sources,
        the prompted instances for region (object / interactive) sources."""
        sample = row.sample
        if sample.phrases:
            if len(sample.phrases) != row.num_conditions:
                raise ValueError(f"{sample.dataset}[{sample.sample_id}]: {row.num_conditions} conditions for "
                                 f"{len(sample.phrases)} expressions")
            return [(("phrase", c), p.instance_indices) for c, p in enumerate(sample.phrases)]
        return [(("instances",) + tuple(inst) if inst else ("condition", c), inst)
                for c, inst in enumerate(row.condition_instances)]

    def process(self, row: Row, visual: bool = False):
        sample = row.sample
        targets = self._targets(row)
        scores, kept, pred_frames, gt_frames, top_scores = [], [], [], [], []
        for t in range(len(row.frames)):
            probs = row.probs(t)
            top = probs.argmax(0)                                             # [C]
            top_scores.append(_top_scores(probs))
            masks = row.upsample(t, top) > 0                                  # [C, H, W]
            frame = int(row.frames[t])
            gts = [instance_mask(sample, inst, t) for _, inst in targets] if self.scored else []
            for c, (key, _) in enumerate(targets):
                if self.scored:
                    pred, gt = masks[c], gts[c]
                    scores.append((key, frame, metrics.j_measure(pred, gt), metrics.f_measure(pred, gt)))
                if self.submission:
                    kept.append((key, frame, _rle(masks[c]), float(probs[top[c], c])))
            if visual:
                pred_frames.append(masks)
                gt_frames.append(_stack(gts, row.orig_hw))
        labels = [p.text for p in sample.phrases] if sample.phrases else [f"region {k}" for k in range(len(targets))]
        out = None
        if visual:   # a condition's score: its top query's, averaged over the frames (as a track's)
            out = Visual(np.stack(pred_frames), labels, np.stack(gt_frames) if self.scored else None, labels,
                         [float(s) for s in np.mean(top_scores, axis=0)])
        record = {"jf": scores} if self.scored else {}
        if self.submission:
            record["masks"] = kept
        return record, out

    def missed(self, sample, frames):
        if not self.scored:
            return None
        if sample.phrases:
            targets = [(("phrase", c), p.instance_indices) for c, p in enumerate(sample.phrases)]
        else:   # region sources
            targets = [(("instances",) + g, list(g)) for g in _region_groups(sample)]
            if not targets:
                return None
        scores = []
        for t, frame in enumerate(frames):
            for key, instances in targets:
                gt = instance_mask(sample, instances, t)
                empty = np.zeros_like(gt)
                scores.append((key, int(frame), metrics.j_measure(empty, gt), metrics.f_measure(empty, gt)))
        return {"jf": scores}

    def sample_scores(self, record):
        jf = record.get("jf") or []
        if not jf:
            return {}
        return {"J": _finite(np.mean([j for *_, j, _ in jf])), "F": _finite(np.mean([f for *_, f in jf]))}

    def finalize(self, records):
        per_object = _per_object_frame(records, "jf")
        jf = metrics.JF(drop_first_last=self.options.get("drop_first_last", False))
        for key in sorted(per_object, key=repr):
            frames = sorted(per_object[key])
            j = np.array([per_object[key][t][0] for t in frames])
            f = np.array([per_object[key][t][1] for t in frames])
            jf.add_scores(key, j, f)
        return jf.summary()

    @staticmethod
    def frame_masks(records) -> dict:
        """{(sample index, object key): {source frame: RLE}} of `submission` records, the clips of
        a video merged as the metrics merge them (the first clip covering a frame wins)."""
        return {key: {frame: value[0] for frame, value in frames.items()}
                for key, frames in _per_object_frame(records, "masks").items()}

    @staticmethod
    def frame_scores(records) -> dict:
        """{(sample index, object key): {source frame: score}} of `submission` records, merged as
        `frame_masks` (the score of the mask it keeps)."""
        return {key: {frame: value[1] for frame, value in frames.items()}
                for key, frames in _per_object_frame(records, "masks").items()}


def _per_object_frame(records, field: str) -> dict:
    """{(sample index,) + object key: {source frame: values}} from the (key, frame, *values)
    entries of every record's `field`; the first clip covering a frame wins (records come sorted
    by sample and clip)."""
    out: dict = defaultdict(dict)
    for r in records:
        for key, frame, *values in r[field]:
            out[(r["index"],) + tuple(key)].setdefault(frame, values)
    return out


class VideoGeneric(TaskEvaluator):
    """Video generic segmentation: instance tracks (YouTube-VIS AP and X2SAM's per-frame mAP),
    panoptic tracks (VPQ) and semantic frames (mIoU, mVC). With `submission`, records keep each
    clip's tracks with their dataset category ids for `video_tracks` (option `submission_top_k`,
    default 10: the tracks of a clip kept in the results file, as Mask2Former-VIS keeps 10 per video)."""

    family = "video_generic"
    writes_submissions = True

    def __init__(self, source, options=None, **kwargs):
        super().__init__(source, options, **kwargs)
        self.vgd = source.task == "vvgd_seg"
        self.metrics = tuple(self.options.get("metrics", ("AP",))) if self.scored else ()
        self.top_k = int(self.options.get("submission_top_k", 10))

    def process(self, row: Row, visual: bool = False):
        sample, n = row.sample, row.num_conditions
        frames = len(row.frames)
        if self.vgd:
            category_of = [_condition_category(sample, inst) for inst in row.condition_instances]
            keep = np.array([c is not None for c in category_of], bool)
            names = [f"region {c}" for c in range(n)]
            known = {}
        else:
            names = list(sample.categories)
            category_of = list(range(1, n + 1))
            keep, known = vocabulary_flags(sample, n, self.options.get("stuff", ()))
        probs = np.stack([row.probs(t) for t in range(frames)])               # [T, Q, C]
        num_queries = probs.shape[1]
        threshold = self.options.get("instance_threshold", 0.0)
        record: dict = {"frames": [int(f) for f in row.frames], "is_thing": known, "names": names}
        tracks = []
        if "AP" in self.metrics or self.submission:
            # A query's masks over the clip form a track, upsampled only for the selected queries:
            # every (query, class) pair of the Q best for the AP, the top_k best for a results file
            # alone (both by class score, then scored x mean mask probability).
            class_scores = probs.mean(0)
            tracks = postprocess.instances(class_scores, lambda q: np.stack([row.upsample(t, [q])[0]
                                                                             for t in range(frames)]),
                                           keep=keep, threshold=threshold,
                                           top_k=None if "AP" in self.metrics else self.top_k)
            record["tracks"] = [{"masks": [_rle(m) for m in tr["mask"]], "category_id": category_of[tr["category"]],
                                 "score": tr["score"], "class_score": float(class_scores[tr["query"], tr["category"]])}
                                for tr in tracks]
            if self.submission:  # the dataset's own category ids (the metric's are vocabulary index + 1)
                dataset_ids = category_of if self.vgd else sample.meta.get("category_ids")
                if dataset_ids is None or len(dataset_ids) != n:
                    raise ValueError(f"{sample.dataset}[{sample.sample_id}]: a results file needs the dataset "
                                     f"category id of each of the {n} conditions (meta['category_ids'])")
                for entry, tr in zip(record["tracks"], tracks):
                    entry["dataset_category_id"] = int(dataset_ids[tr["category"]])
        if "AP" in self.metrics:
            record["frame_instances"] = []
        if "VPQ" in self.metrics:
            record["panoptic"] = []
        if "mIoU" in self.metrics or "mVC" in self.metrics:
            record["semantic"] = []
        for t in range(frames if self.metrics else 0):   # per-frame results, one frame's logits at a time
            logits = row.upsample(t, np.arange(num_queries))                  # [Q, H, W]
            if "AP" in self.metrics:
                record["frame_instances"].append(
                    [{"segmentation": _rle(p["mask"]), "category_id": category_of[p["category"]], "score": p["score"]}
                     for p in postprocess.instances(probs[t], logits, keep=keep, threshold=threshold)])
            if "VPQ" in self.metrics:
                ids, segments = postprocess.panoptic(probs[t], logits, keep, track_ids=True,
                                                     threshold=self.options.get("panoptic_threshold", 0.0))
                # A query is a track within its clip only: ids of later clips start past this one's.
                offset = row.clip * (num_queries + n + 1)
                record["panoptic"].append([(s["id"] + offset, s["category"], _rle(ids == s["id"])) for s in segments])
            if "semantic" in record:
                record["semantic"].append(_label_rles(postprocess.semantic(probs[t], logits)))
        out = None
        if visual:
            shown = [tr for tr in tracks if tr["mask"].any()][: self.options.get("visual_instances", 8)]
            gt_shown = [i for i, inst in enumerate(sample.instances) if not inst.iscrowd]
            pred = (np.stack([tr["mask"] for tr in shown], axis=1) if shown
                    else np.zeros((frames, 0) + row.orig_hw, bool))
            gt = (np.stack([[instance_mask(sample, [i], t) for i in gt_shown] for t in range(frames)])
                  if gt_shown else np.zeros((frames, 0) + row.orig_hw, bool))
            out = Visual(pred, [names[tr["category"]] for tr in shown], gt if self.scored else None,
                         [sample.instances[i].category or f"category {sample.instances[i].category_id}"
                          for i in gt_shown], [tr["score"] for tr in shown])
        return record, out

    def missed(self, sample, frames):
        # No track, no segment: AP and VPQ count its ground truth as missed; a semantic map has no
        # "nothing" (mIoU, mVC), and VGD regions come from the features.
        if self.vgd or not self.scored or {"mIoU", "mVC"} & set(self.metrics):
            return None
        _, known = vocabulary_flags(sample, len(sample.categories), self.options.get("stuff", ()))
        record: dict = {"frames": [int(f) for f in frames], "is_thing": known, "names": list(sample.categories),
                        "tracks": []}
        if "AP" in self.metrics:
            record["frame_instances"] = [[] for _ in frames]
        if "VPQ" in self.metrics:
            record["panoptic"] = [[] for _ in frames]
        return record

    def sample_scores(self, record):
        return {"tracks": len(record.get("tracks") or ())}

    @staticmethod
    def video_tracks(records, num_frames: int, top_k: int | None = None, field: str = "category_id") -> list:
        """The tracks of one video's records (its clips, in order) as video-long tracks
        {"segmentations": [RLE or None per frame], "category_id": record[field], "score"}:
        None outside the clip a track comes from. `top_k`: each clip's best tracks by class score."""
        out = []
        for r in records:
            tracks = r["tracks"]
            if top_k is not None:
                tracks = sorted(tracks, key=lambda tr: -tr["class_score"])[:top_k]
            for tr in tracks:
                masks = [None] * num_frames
                for f, m in zip(r["frames"], tr["masks"]):
                    masks[f] = m
                out.append({"segmentations": masks, "category_id": tr[field], "score": tr["score"]})
        return out

    def _gt_category(self, sample, inst):
        if self.vgd:
            return None if inst.category_id is None else int(inst.category_id)
        index = _vocabulary_index(sample, inst)
        return None if index is None else index + 1

    def finalize(self, records):
        by_video = defaultdict(list)
        for r in records:
            by_video[r["index"]].append(r)
        out = {}
        if "AP" in self.metrics:
            out.update(self._ap(by_video))
        if "VPQ" in self.metrics:
            out.update(self._vpq(by_video, _merged_flags(records)))
        if "mIoU" in self.metrics or "mVC" in self.metrics:
            out.update(self._semantic(by_video))
        return out

    def _ap(self, by_video):
        gt_all, video_inputs, frame_inputs = set(), [], []
        for index in sorted(by_video):
            sample = self.source[index]
            gt = [{"segmentations": inst.masks, "category_id": self._gt_category(sample, inst),
                   "iscrowd": int(inst.iscrowd)} for inst in sample.instances]
            gt = [g for g in gt if g["category_id"] is not None]
            gt_all |= {g["category_id"] for g in gt}
            tracks, per_frame = self.video_tracks(by_video[index], sample.num_frames), {}
            for r in by_video[index]:
                for f, preds in zip(r["frames"], r["frame_instances"]):
                    per_frame.setdefault(f, preds)
            video_inputs.append(((sample.height, sample.width), gt, tracks))
            for f in sorted(per_frame):
                frame_gt = [{"segmentation": g["segmentations"][f], "category_id": g["category_id"],
                             "iscrowd": g["iscrowd"]} for g in gt if g["segmentations"][f] is not None]
                frame_inputs.append(((sample.height, sample.width), frame_gt, per_frame[f]))
        categories = sorted(gt_all | {t["category_id"] for _, _, ts in video_inputs for t in ts})
        video_ap, frame_ap = metrics.VideoMaskAP(categories), metrics.MaskAP(categories)
        for (h, w), gt, tracks in video_inputs:
            video_ap.add_video(h, w, gt, tracks)
        for (h, w), gt, preds in frame_inputs:
            frame_ap.add_image(h, w, gt, preds)
        video, frame = video_ap.summary(), frame_ap.summary()
        return {"AP": video["AP"], "AP50": video["AP50"], "mAP_x2sam": frame["AP"]}

    def _vpq(self, by_video, categories):
        vpq = metrics.VPQ(categories, self.options.get("vpq_windows", (1, 2, 4, 6)))
        for index in sorted(by_video):
            sample = self.source[index]
            per_frame = {}
            for r in by_video[index]:
                for f, segments in zip(r["frames"], r["panoptic"]):
                    per_frame.setdefault(f, segments)
            frames = sorted(per_frame)
            gt_ids = np.zeros((len(frames), sample.height, sample.width), np.int64)
            pred_ids = np.zeros_like(gt_ids)
            gt_tables, pred_tables = [], []
            for k, f in enumerate(frames):
                table = {}
                for i, inst in enumerate(sample.instances):
                    category = _vocabulary_index(sample, inst)
                    if category is None or inst.masks[f] is None:
                        continue
                    mask = instance_mask(sample, [i], f)
                    if mask.any():
                        gt_ids[k][mask] = i + 1
                        table[i + 1] = {"category_id": category, "iscrowd": int(inst.iscrowd)}
                gt_tables.append(table)
                pred_table = {}
                for segment_id, category, rle in per_frame[f]:
                    pred_ids[k][decode_rle(rle, sample.height, sample.width)] = segment_id
                    pred_table[segment_id] = {"category_id": category}
                pred_tables.append(pred_table)
            vpq.add_video(gt_ids, gt_tables, pred_ids, pred_tables)
        return vpq.summary()

    def _semantic(self, by_video):
        sizes = {len(self.source[index].categories) for index in sorted(by_video)[:1]}
        matrix = metrics.ConfusionMatrix(sizes.pop() if sizes else 1)
        consistency = metrics.VideoConsistency(self.options.get("vc_windows", (8, 16)))
        for index in sorted(by_video):
            sample = self.source[index]
            per_frame = {}
            for r in by_video[index]:
                for f, labels in zip(r["frames"], r["semantic"]):
                    per_frame.setdefault(f, labels)
            frames = sorted(per_frame)
            gts, preds = [], []
            for f in frames:
                gt = np.full((sample.height, sample.width), metrics.semantic.IGNORE, np.int64)
                for i, inst in enumerate(sample.instances):
                    category = _vocabulary_index(sample, inst)
                    if category is not None and inst.masks[f] is not None:
                        gt[instance_mask(sample, [i], f)] = category
                pred = _labels_from_rles(per_frame[f], sample.height, sample.width)
                matrix.update(gt, pred)
                gts.append(gt)
                preds.append(pred)
            consistency.add_video(np.stack(gts), np.stack(preds))
        out = {}
        if "mIoU" in self.metrics:
            out["mIoU"] = matrix.summary()["mIoU"]
        if "mVC" in self.metrics:
            out.update(consistency.summary())
        return out


def _region_groups(sample) -> list[tuple[int, ...]]:
    """The instances of each region condition of a sample, as the features make them: one per
    given prompt's instances, else one per non-crowd instance (a miss's targets)."""
    if sample.visual_prompts:
        return sorted({tuple(sorted(vp.instance_indices)) for vp in sample.visual_prompts if vp.instance_indices})
    return [(i,) for i, inst in enumerate(sample.instances) if not inst.iscrowd]


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _iou_scores(record) -> dict:
    """Per condition: its IoU (None for an empty prediction of an empty target) and the counts."""
    pairs = record.get("iou") or []
    return {"iou": [inter / union if union else None for inter, union in pairs],
            "intersection": [int(i) for i, _ in pairs], "union": [int(u) for _, u in pairs]}


def _label_rles(labels: np.ndarray) -> list:
    return [(int(c), _rle(labels == c)) for c in np.unique(labels)]


def _labels_from_rles(rles, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), np.int64)
    for c, rle in rles:
        out[decode_rle(rle, height, width)] = c
    return out


def gcg_caption(answer: str, seg_token: str = "<SEG>") -> str:
    """X2SAM's caption of a GCG answer: "" without <SEG>; else its sentences without the one that
    holds <SEG>, tags removed, whitespace collapsed, quotes stripped."""
    if seg_token not in answer:
        return ""
    parts = re.split(r"(?<=[.!?])(?:\s+|$)|(?:\n+)|(?<=\s)(?=[A-Z])", answer)
    caption = " ".join(p.strip() for p in parts if p and p.strip() and seg_token not in p)
    caption = re.sub(r"<.*?>", "", caption)
    return " ".join(caption.split()).strip("'").strip('"').strip()


class _PhraseMatching(TaskEvaluator):
    """GCG families: the recall compares phrases with `phrase_similarity` (metrics.gcg: GLaMM's
    BERT similarity, or the bag-of-words stand-in by default)."""

    def __init__(self, source, options=None, *, phrase_similarity=None, **kwargs):
        super().__init__(source, options, **kwargs)
        self.phrase_similarity = phrase_similarity or bag_of_words_similarity


class Gcg(_PhraseMatching):
    """Grounded conversation generation: the generated caption against the reference, and each
    generated phrase's mask (its top query) against the ground-truth phrase masks (GLaMM)."""

    family = "gcg"

    def process(self, row: Row, visual: bool = False):
        sample = row.sample
        n = row.num_conditions
        if n:
            probs = row.probs(0)
            masks = row.upsample(0, probs.argmax(0)) > 0
        else:
            masks = np.zeros((0,) + row.orig_hw, bool)
        gts = [instance_mask(sample, p.instance_indices, 0) for p in sample.phrases]
        record = {"gcg": {"hw": row.orig_hw, "caption": gcg_caption(row.answer), "references": [sample.caption or ""],
                          "pred_masks": [_rle(m) for m in masks], "pred_phrases": list(row.labels[:n]),
                          "gt_masks": [_rle(g) for g in gts], "gt_phrases": [p.text for p in sample.phrases]}}
        out = Visual(masks[None], list(row.labels[:n]), _stack(gts, row.orig_hw)[None],
                     [p.text for p in sample.phrases], _top_scores(probs) if n else []) if visual else None
        return record, out

    def missed(self, sample, frames):   # no caption, no phrase: every ground-truth phrase missed
        hw = (int(sample.height), int(sample.width))
        gts = [instance_mask(sample, p.instance_indices, 0) for p in sample.phrases]
        return {"gcg": {"hw": hw, "caption": "", "references": [sample.caption or ""], "pred_masks": [],
                        "pred_phrases": [], "gt_masks": [_rle(g) for g in gts],
                        "gt_phrases": [p.text for p in sample.phrases]}}

    def empty(self, record):   # the generated answer segmented no phrase
        return not record["gcg"]["pred_masks"]

    def sample_scores(self, record):
        g = record["gcg"]
        return {"mIoU": paired_miou(g["pred_masks"], g["gt_masks"]), "caption": g["caption"],
                "phrases": list(g["pred_phrases"])}

    def finalize(self, records):
        gcg = metrics.GCG(self.phrase_similarity, captions=self.options.get("captions", True))
        for r in records:
            g = r["gcg"]
            gcg.add_image((r["index"], r["clip"]), *g["hw"], caption=g["caption"], references=g["references"],
                          pred_masks=g["pred_masks"], pred_phrases=g["pred_phrases"], gt_masks=g["gt_masks"],
                          gt_phrases=g["gt_phrases"])
        return gcg.summary()


class VideoGcg(_PhraseMatching):
    """Video grounded conversation generation (X2SAM's protocol on VideoGLaMM's benchmark): each
    row is one clip of frames sampled over the whole video (span clips), its caption generated
    over those frames; each generated phrase's mask on each frame is its top query there. Scored
    per clip (metrics.VideoGCG): METEOR / CIDEr, per-frame mIoU, recall over phrase tracks."""

    family = "video_gcg"

    def process(self, row: Row, visual: bool = False):
        sample, n, frames = row.sample, row.num_conditions, len(row.frames)
        tracks, shown = [[] for _ in range(n)], []
        for t in range(frames if n else 0):   # one frame's masks at a time (a 720p clip's are large)
            masks = row.upsample(t, row.probs(t).argmax(0)) > 0               # [n, H, W]
            for c in range(n):
                tracks[c].append(_rle(masks[c]))
            if visual:
                shown.append(masks)
        record = self._record(sample, row.answer, tracks, list(row.labels[:n]))
        out = None
        if visual:
            pred = np.stack(shown) if n else np.zeros((frames, 0) + row.orig_hw, bool)
            gt = np.stack([_stack([instance_mask(sample, p.instance_indices, t) for p in sample.phrases], row.orig_hw)
                           for t in range(frames)])
            out = Visual(pred, list(row.labels[:n]), gt, [p.text for p in sample.phrases])
        return record, out

    @staticmethod
    def _record(sample, answer: str, pred_tracks: list, pred_phrases: list) -> dict:
        """The clip's record; ground-truth tracks hold None where a phrase is not visible."""
        gt_tracks = []
        for p in sample.phrases:
            track = []
            for t in range(sample.num_frames):
                present = [sample.instances[i].masks[t] for i in p.instance_indices
                           if sample.instances[i].masks[t] is not None]
                track.append(_rle(instance_mask(sample, p.instance_indices, t)) if present else None)
            gt_tracks.append(track)
        return {"vgcg": {"hw": (int(sample.height), int(sample.width)), "caption": gcg_caption(answer),
                         "references": [sample.caption or ""], "pred_tracks": pred_tracks, "pred_phrases": pred_phrases,
                         "gt_tracks": gt_tracks, "gt_phrases": [p.text for p in sample.phrases]}}

    def missed(self, sample, frames):   # no caption, no phrase: every frame and phrase missed
        return self._record(sample, "", [], [])

    def empty(self, record):   # the generated answer segmented no phrase
        return not record["vgcg"]["pred_tracks"]

    def sample_scores(self, record):
        g = record["vgcg"]
        mious = frame_mious(g["pred_tracks"], g["gt_tracks"])
        return {"mIoU": float(np.mean(mious)) if mious else None, "caption": g["caption"],
                "phrases": list(g["pred_phrases"])}

    def finalize(self, records):
        gcg = metrics.VideoGCG(self.phrase_similarity, captions=self.options.get("captions", True))
        for r in records:
            g = r["vgcg"]
            gcg.add_clip((r["index"], r["clip"]), *g["hw"], caption=g["caption"], references=g["references"],
                         pred_tracks=g["pred_tracks"], pred_phrases=g["pred_phrases"], gt_tracks=g["gt_tracks"],
                         gt_phrases=g["gt_phrases"])
        return gcg.summary()


FAMILIES = {
    "gen_seg": ImageGeneric, "ov_seg": ImageGeneric, "vgd_seg": ImageGeneric,
    "ref_seg": Referring, "reason_seg": Referring,
    "inter_seg": Interactive,
    "vref_seg": VideoObject, "vreason_seg": VideoObject, "vobj_seg": VideoObject, "vinter_seg": VideoObject,
    "vgen_seg": VideoGeneric, "vov_seg": VideoGeneric, "vvgd_seg": VideoGeneric,
    "gcg_seg": Gcg, "vgcg_seg": VideoGcg,
}
GENERATION_TASKS = ("gcg_seg", "vgcg_seg", "chat", "vchat")   # the answer is generated (then segmented: GCG)


def _chat_benchmarks(source, options=None, **kwargs):   # eval/chat.py builds on this module
    from x2sam_jax.eval.chat import ChatBench

    return ChatBench(source, options, **kwargs)


FAMILIES.update({"chat": _chat_benchmarks, "vchat": _chat_benchmarks})   # MME, POPE, MMBench, ... VideoMME


PHRASE_MATCHING_TASKS = ("gcg_seg", "vgcg_seg")   # their recall compares phrases (metrics.gcg.phrase_similarity)


def evaluator_for(source, options: dict | None = None, *, scored: bool = True,
                  submission: bool = False, phrase_similarity=None) -> TaskEvaluator:
    """The evaluator of a source's task; `scored` and `submission` as in TaskEvaluator;
    `phrase_similarity` the GCG recall's (None: the bag-of-words stand-in)."""
    task = getattr(source, "task", None)
    if task not in FAMILIES:
        raise ValueError(f"{getattr(source, 'name', source)}: no evaluator for task {task!r}; "
                         f"evaluated tasks: {sorted(FAMILIES)}")
    extra = {"phrase_similarity": phrase_similarity} if task in PHRASE_MATCHING_TASKS else {}
    return FAMILIES[task](source, options, scored=scored, submission=submission, **extra)
