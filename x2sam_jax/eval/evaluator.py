"""`evaluate(model, tokenizer, eval_config, *, mesh, ...)`: every configured dataset through the
evaluation pipeline, the jitted forward, the task's post-processing and its metrics.

Per dataset: the source (a spec of `x2sam_jax.data.sources.FACTORIES`, its "root" relative to
`eval_config.data_root`) -> `data.pipeline.build_eval_pipeline` (every sample exactly once, long
videos clip by clip, padded to the config's buckets, templates and visual prompts drawn with a
generator seeded by (template seed, sample id)) -> `inference.make_forward` (one program per bucket,
the batch sharded over the mesh) -> `tasks.*.process` per row -> `tasks.*.finalize` on all rows.
`oracle=True` replaces the model by the batch's own targets (`inference.oracle_outputs`), which
must score 1.0 where the S/4 grid holds the ground truth exactly.

Splits without public ground truth (the source's `has_targets` False: Ref-YouTube-VOS valid/test,
YouTube-VOS 2019 valid/test, YouTube-VIS valid/test) are not scored: their predictions go to the
file the benchmark's server takes (eval/submissions.py), OUT/submissions/<dataset>/submission.zip
(Ref-YouTube-VOS: a PNG per expression and frame; YouTube-VOS: a palette PNG of all objects per
frame) or results.zip (YouTube-VIS: results.json of tracks), and their results row says how many
samples and entries were written and where (YouTube-VOS also how many frames had no prediction at
all, `frames_background`). The format follows from the source's reader; `submission` in a dataset
spec names it explicitly, and on a split with ground truth also writes the file beside the metrics.

The eval config (`config.eval` of a run config; ConfigDict or dict):
  data_root         root of the datasets; a source spec's relative paths ("root", "*_file",
                    "*_dir") are joined to it
  datasets          {name: {"source": {"type", "root", ...}, "options": {...}, "feature": {...},
                            "split_phrases": bool, "max_samples": int, "max_new_tokens": int,
                            "submission": "ref_youtube_vos" | "youtube_vos" | "youtube_vis"
                            (default: the reader's format when the split has no ground truth)}}
  batch_size        global rows per batch (each process takes batch_size / process_count)
  seed              the seed of templates, visual prompts and region sampling
  buckets           BucketConfig fields (few values: one compiled program per combination)
  feature           make_features options for every dataset (e.g. clip_len)
  max_samples       0 = whole datasets; else the first N samples of each (quick evaluation)
  sam_size, region_tokens   only for `oracle=True` without a model
  max_new_tokens    the longest generated answer (GCG, chat), within the sequence bucket; a dataset
                    spec's own "max_new_tokens" wins (X2SAM answers chat benchmarks in 16 tokens)
  fast_compile      None = XLA backend optimisation off on CPU (compiles ~2x faster)
  averages          {row name: [dataset, ...]}: a results row holding the mean of each metric the
                    datasets all report (counts summed), written when all of them were evaluated
                    (video GCG: the paper reports the mean of VideoGLaMM's three sets)
  phrase_encoder    "" or the directory of a BERT (bert-base-uncased as GLaMM uses): the GCG
                    recall's phrase similarity (metrics.gcg.phrase_similarity; "" = the
                    bag-of-words stand-in); results.json names the one used per GCG dataset
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import x2sam_jax

from x2sam_jax.data import features as features_mod
from x2sam_jax.data import pipeline
from x2sam_jax.data.batching import BucketConfig
from x2sam_jax.data.features import select_frames
from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import build_source as build_plain_source
from x2sam_jax.data.tokenizer import IGNORE_LABEL, SpecialIds
from x2sam_jax.data.transforms import load_image
from x2sam_jax.distributed import absolute_path
from x2sam_jax.eval import chat, inference, postprocess, submissions, tasks
from x2sam_jax.eval import visualize as overlays   # evaluate() has an argument `visualize`
from x2sam_jax.eval.metrics.gcg import describe_similarity, phrase_similarity
from x2sam_jax.sharding import compiler_options

logger = logging.getLogger("x2sam_jax.eval")

# The order of metric columns in results.md; counts are written as integers.
COUNTS = ("samples", "skipped", "failed", "entries", "frames_filled", "frames_background")
METRIC_ORDER = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "AP", "AP50", "mAP_x2sam", "cIoU", "gIoU", "J", "F",
                "J&F", "J_x2sam", "F_x2sam", "J&F_x2sam", "VPQ", "VPQ_th", "VPQ_st", "mVC", "METEOR", "CIDEr",
                "recall") + COUNTS + ("submission",)


# ------------------------------------------------------------------------------------ sources
class Subset:
    """The first `count` samples of a source (same name, task and frame counts)."""

    def __init__(self, source, count: int):
        self.source, self.count = source, min(int(count), len(source))
        self.name, self.task = source.name, source.task

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not 0 <= int(index) < self.count:
            raise IndexError(f"{self.name}: index {index} out of range for {self.count} samples")
        return self.source[index]

    def frame_count(self, index):
        return self.source.frame_count(index)


class SplitPhrases:
    """One sample per expression of a referring source (the official protocol: each expression
    is its own forward pass, never a turn after other expressions). The expressions are counted
    at start-up (the first `limit` of them when given)."""

    def __init__(self, source, limit: int | None = None):
        self.source, self.name, self.task = source, source.name, source.task
        self._items = []
        for i in range(len(source)):
            if limit is not None and len(self._items) >= limit:
                break
            try:
                count = len(source[i].phrases)
            except BadSample:
                count = 1          # a bad record keeps one item, whose load reports it
            self._items.extend((i, k) for k in range(count))
        if limit is not None:
            self._items = self._items[:limit]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        i, k = self._items[int(index)]
        sample = self.source[i]
        meta = dict(sample.meta)
        if len(meta.get("expression_ids") or ()) == len(sample.phrases):   # the kept expression's id
            meta["expression_ids"] = [meta["expression_ids"][k]]
        return dataclasses.replace(sample, phrases=[sample.phrases[k]], sample_id=f"{sample.sample_id}/{k}", meta=meta)

    def frame_count(self, index):
        return self.source.frame_count(self._items[int(index)][0])


def build_source(spec: Mapping, data_root: str | None):
    """The plain source of one `datasets` entry, its paths resolved against data_root."""
    source_spec = dict(spec["source"])
    for key, value in source_spec.items():   # paths ("root", "*_file", "*_dir") are relative to data_root
        if (key == "root" or key.endswith(("_file", "_dir"))) and isinstance(value, str) and data_root \
                and not os.path.isabs(value):
            source_spec[key] = os.path.join(data_root, value)
    return build_plain_source(source_spec)


def prepare_source(source, spec: Mapping, max_samples: int = 0):
    """The evaluated form of a source: referring expressions split (`split_phrases`, default on
    for image referring / reasoning), the first `max_samples` samples (0 = all)."""
    limit = int(spec.get("max_samples", 0) or max_samples or 0) or None
    if spec.get("split_phrases", source.task in ("ref_seg", "reason_seg")):
        source = SplitPhrases(source, limit)
    return Subset(source, limit) if limit else source


# ------------------------------------------------------------------------------------ helpers
def _plain(value):
    """ConfigDict / FrozenConfigDict / tuples -> plain dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def condition_texts(tokenizer, input_ids: np.ndarray, spans: np.ndarray) -> list[str]:
    """The text inside each <p>..</p> span (brackets excluded; regions read "<region>")."""
    out = []
    for start, end in np.asarray(spans).reshape(-1, 2):
        text = tokenizer.decode(np.asarray(input_ids)[start + 1:end].tolist()).strip()
        out.append("<region>" if "<|vision_pad|>" in text else text)
    return out


def _gather(records: list) -> list:
    """Every process's records, concatenated in process order (identical on all processes)."""
    if jax.process_count() == 1:
        return records
    payload = np.frombuffer(pickle.dumps(records), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    out = []
    for size, data in zip(np.asarray(sizes).reshape(-1), np.asarray(gathered)):
        out.extend(pickle.loads(data[: int(size)].tobytes()))
    return out


def _answer_text(tokenizer, batch: dict, b: int) -> str:
    labels = np.asarray(batch["labels"][b])
    return tokenizer.decode(labels[labels != IGNORE_LABEL].tolist(), skip_special_tokens=False)


def _rows(batch: dict, outputs: dict, source, tokenizer, sam_size: int):
    """The batch's valid rows as tasks.Row (with the row's clip of its sample)."""
    for b in np.flatnonzero(batch["sample_valid"]):
        index = int(batch["sample_index"][b])
        frames = int(batch["frame_valid"][b].sum())
        clip_frames = np.asarray(batch["clip_frames"][b, :frames])
        sample = source[index]
        if frames != sample.num_frames or not np.array_equal(clip_frames, np.arange(frames)):
            sample = select_frames(sample, clip_frames.tolist())
        conditions = int(batch["cond_valid"][b].sum())
        regions = int(batch["region_valid"][b].sum())
        yield tasks.Row(
            index=index, clip=int(batch["clip_index"][b]), frames=clip_frames, sample=sample,
            num_conditions=conditions, condition_instances=tuple(batch["condition_instances"][b]),
            mask_logits=np.asarray(outputs["mask_logits"][b, :frames]),
            class_logits=np.asarray(outputs["class_logits"][b, :frames]), sam_size=sam_size,
            sam_valid_hw=np.asarray(batch["sam_valid_hw"][b, :frames]),
            region_masks=np.asarray(batch["region_masks"][b, :regions]),
            region_frame=np.asarray(batch["region_frame"][b, :regions]),
            labels=condition_texts(tokenizer, batch["input_ids"][b], batch["cond_spans"][b, :conditions]),
            answer=_answer_text(tokenizer, batch, b))


def overlay_prompts(row: tasks.Row) -> list:
    """The row's visual prompts as the model read them (the region masks, at the original size),
    drawn as outlines on the input panel; region r asks for the mask labelled "region r"."""
    return [overlays.Prompt("mask", mask=postprocess.resize_prompt(mask, row.sam_valid_hw[int(frame)], row.orig_hw),
                            frame=int(frame), label=f"region {r}")
            for r, (mask, frame) in enumerate(zip(row.region_masks, row.region_frame))]


def row_frame_times(row: tasks.Row) -> list | None:
    """The row's frame times in seconds: the sample's, else from its frame rate (meta "fps")."""
    if row.sample.frame_times is not None and len(row.sample.frame_times) == len(row.frames):
        return list(row.sample.frame_times)
    fps = row.sample.meta.get("fps")
    return [float(f) / float(fps) for f in row.frames] if fps else None


def draw_overlay(path_stem: Path, row: tasks.Row, visual: tasks.Visual, *, prompts=None, frame_times=None,
                 threshold: float = 0.0) -> str:
    """input (visual prompts drawn) | prediction | ground truth, with legends
    (``visualize.render_pages``): PNG for an image, GIF for a clip at the source's pace. A split
    without ground truth (`visual.gt` None) has no ground-truth panel. ``prompts`` default to the
    row's region masks; ``frame_times`` to the sample's. The evaluation draws every mask its
    metrics scored (threshold 0: a referring mask counts whatever its score; the legend gives the
    scores); the Predictor passes its own threshold."""
    frames = [load_image(row.sample.frames[t]) for t in range(len(row.frames))]
    pages = overlays.render_pages(frames, visual.pred, visual.pred_labels, visual.pred_scores, threshold=threshold,
                                  prompts=overlay_prompts(row) if prompts is None else prompts, gt=visual.gt,
                                  gt_labels=visual.gt_labels)
    times = row_frame_times(row) if frame_times is None else frame_times
    return overlays.save_pages(path_stem, pages, duration_ms=overlays.frame_duration_ms(times))


def format_markdown(results: Mapping[str, Mapping[str, float]], step: int | None = None,
                    std: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """results.md: one row per dataset, metrics in percent (counts as they are); a metric with a
    standard deviation over template seeds in `std` ({dataset: {metric: std}}) reads "mean ± std"."""
    names = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    names += sorted({m for r in results.values() for m in r} - set(names))
    title = "# Evaluation results" + ("" if step is None else f" at step {step}")
    lines = [title, "", "Metrics in percent; `_x2sam` columns follow X2SAM's own evaluator "
             "(docs/architecture.md#post-processing-and-metrics); "
             "`submission` files (under the output folder) are for the benchmark's server; `failed` samples "
             "produced no prediction and count as misses (results.json: protocol).", "",
             "| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for dataset, row in results.items():
        cells = []
        for name in names:
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–" if value is None else "n/a")
            elif isinstance(value, str):                       # the submission file
                cells.append(f"`{value}`")
            elif name in COUNTS or name.split("/")[0] == "unparsed":   # chat: answers no option matched
                cells.append(str(int(value)))
            else:
                spread = (std or {}).get(dataset, {}).get(name)
                cells.append(f"{100 * value:.2f}" + ("" if spread is None or math.isnan(spread)
                                                     else f" ± {100 * spread:.2f}"))
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_value(value):
    """NaN (an undefined metric) -> null at any depth (results.json holds nested sections)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def results_document(results, report: Mapping | None = None) -> dict:
    """results.json: {"results": {dataset: {metric: value}}, "protocol": what decides the numbers
    (package version, checkpoint step and checksum, seed, per dataset its template policy and seeds,
    its frame sampling and, GCG, the recall's phrase similarity), "template_seeds": {dataset: each
    seed's row, mean, std} (datasets evaluated under several seeds), "timing": the run's batch size, process and device counts, and
    per dataset its wall time and samples/s (compilation included)}. Everything but "timing" is
    the same at any batch size, device count and run."""
    report = dict(report or {})
    return _json_value({"results": results, **{k: report[k] for k in ("protocol", "template_seeds", "timing")
                                                if k in report}})


def _replace(path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def write_results(output_dir, results, step=None, *, report: Mapping | None = None) -> None:
    """results.json (`results_document`) and results.md in `output_dir`."""
    out = absolute_path(output_dir)   # an etils.epath.Path: gs://bucket/out keeps its scheme
    out.mkdir(parents=True, exist_ok=True)
    std = {name: entry["std"] for name, entry in ((report or {}).get("template_seeds") or {}).items()}
    _replace(out / "results.json", json.dumps(results_document(results, report), indent=2, sort_keys=True) + "\n")
    _replace(out / "results.md", format_markdown(results, step, std))


def write_per_sample(output_dir, lines: Mapping[str, list]) -> None:
    """output_dir/per_sample/<dataset>.jsonl: one JSON object per line (sorted by template seed,
    sample and clip), comparable run to run with `diff`."""
    out = absolute_path(output_dir) / "per_sample"
    out.mkdir(parents=True, exist_ok=True)
    for name, entries in lines.items():
        _replace(out / f"{name}.jsonl", "".join(json.dumps(_json_value(e), sort_keys=True) + "\n" for e in entries))


# What generate_answers reads of a batch.
GENERATION_KEYS = ("input_ids", "labels", "attention_mask", "sample_valid", "pixel_values", "pixel_valid", "grid_thw")


def _generated(model, tokenizer, batch: dict, max_new_tokens: int) -> dict:
    """The batch with generated answers (GCG): greedy decoding up to the sequence bucket's end.

    ``generate`` takes host arrays as the whole batch, so with several processes every one
    decodes the same global batch (all processes' rows, gathered; one program, the same inputs)
    and keeps its own rows' answers; the batch shapes must agree (``agree_batch_shapes``)."""
    rows = len(batch["sample_valid"])
    whole = {key: batch[key] for key in GENERATION_KEYS}
    if jax.process_count() > 1:
        whole = {key: np.concatenate(list(multihost_utils.process_allgather(np.asarray(value))))
                 for key, value in whole.items()}
    if not np.asarray(whole["sample_valid"]).any():   # all padding on every process (the hosts' tails)
        return batch
    ids = SpecialIds.from_tokenizer(tokenizer)
    room = batch["input_ids"].shape[1] - int(inference.prompt_lengths(whole).max())
    if room < 1:
        raise ValueError("the generation prompts fill the sequence bucket: no room for an answer")
    tokens, lengths = inference.generate_answers(model, whole, max_new_tokens=min(max_new_tokens, room),
                                                 stop_token_ids=(ids.im_end,), pad_token_id=ids.pad)
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows) if jax.process_count() > 1 \
        else slice(0, rows)
    return inference.with_answers(batch, tokens[mine], lengths[mine], ids)


# ------------------------------------------------------------------------------------ submissions
def submission_plan(name: str, spec: Mapping, source) -> tuple[bool, str | None]:
    """(scored, submission format or None) of one dataset: a split without ground truth is not
    scored and must have a format (the spec's "submission", else its reader's); a split with
    ground truth writes a submission only when the spec names one."""
    scored = bool(getattr(source, "has_targets", True))
    fmt = spec.get("submission") or (None if scored else submissions.detect_format(source))
    if fmt is None and not scored:
        raise ValueError(f"dataset {name}: the split has no ground truth (the server scores it) and its "
                         f"{type(source).__name__} source writes no submission file; "
                         f"formats: {sorted(submissions.FORMATS)}")
    return scored, None if fmt is None else submissions.check_format(fmt, source, name)


def _source_indices(plain, source, fmt: str = "ref_youtube_vos") -> list[int] | None:
    """The indices of `plain` that the evaluated `source` (prepare_source's) holds: None = all."""
    if source is plain:
        return None
    if isinstance(source, Subset) and source.source is plain:
        return list(range(len(source)))
    if fmt == "youtube_vos":
        raise ValueError(f"{plain.name}: a YouTube-VOS submission needs the source's own samples (one per video)")
    raise ValueError(f"{plain.name}: a Ref-YouTube-VOS submission needs the source's own samples (split_phrases "
                     "off; the source's group='expression' gives one sample per expression)")


def write_submission(fmt: str, plain, source, evaluator, records: list, path) -> dict:
    """The submission file of one dataset's gathered records at `path` (None: checked and counted
    only); returns its counts. `plain` is the dataset's source, `source` the evaluated form of it."""
    if fmt == "ref_youtube_vos":
        predictions = submissions.ref_youtube_vos_predictions(source, evaluator.frame_masks(records))
        expected = submissions.ref_youtube_vos_expected(plain, _source_indices(plain, source))
        return submissions.write_ref_youtube_vos_rles(predictions, path, expected=expected)
    if fmt == "youtube_vos":
        masks, scores = submissions.youtube_vos_predictions(source, evaluator.frame_masks(records),
                                                            evaluator.frame_scores(records))
        expected = submissions.youtube_vos_expected(plain, _source_indices(plain, source, fmt))
        return submissions.write_youtube_vos_rles(masks, path, expected=expected, scores=scores)
    predictions = submissions.youtube_vis_predictions(source, evaluator, records)
    if path is not None:
        submissions.write_youtube_vis_results(predictions, path,
                                              video_lengths=submissions.youtube_vis_video_lengths(plain),
                                              category_ids=submissions.youtube_vis_category_ids(plain))
    return {"entries": len(predictions)}


# ------------------------------------------------------------------------------------ entry point
_FORWARDS: dict = {}

# Tasks whose prompt is a paraphrase drawn per sample: `template_seeds` evaluates them under several draws.
TEMPLATED_TASKS = ("ref_seg", "reason_seg", "gcg_seg", "vref_seg", "vreason_seg", "vgcg_seg")
TEMPLATE_POLICY = ("one paraphrase of the task's templates (data/templates.py) per sample, drawn by a generator "
                   "seeded by (template seed, sha256 of the sample id); every clip of a video asks the same")
_PADS = re.compile(r"(<\|(?:image|video|vision)_pad\|>)+")


def _forward(options):
    key = json.dumps(options, sort_keys=True)
    if key not in _FORWARDS:
        _FORWARDS[key] = inference.make_forward(options)
    return _FORWARDS[key]


def prompt_text(tokenizer, batch: dict, b: int) -> str:
    """Row b's prompt as the model read it (every token before the answer), runs of image / video /
    region placeholders shown once."""
    ids = np.asarray(batch["input_ids"][b])
    keep = np.asarray(batch["attention_mask"][b]).astype(bool)
    keep &= np.asarray(batch["labels"][b]) == IGNORE_LABEL
    return _PADS.sub(r"\1", tokenizer.decode(ids[keep].tolist(), skip_special_tokens=False)).strip()


def frame_policy(task: str, feature_config) -> dict:
    """How a dataset's frames are sampled in evaluation (features.eval_clips)."""
    if task not in features_mod.VIDEO_TASKS:
        return {"policy": "image"}
    if task in chat.CHAT_TASKS:
        return {"policy": "the source's frames, uniformly over the whole video (MVBench's bounded tasks: within "
                          "their [start, end] clip, transforms.bounded_frame_indices)"}
    mode = "span" if task in feature_config.span_tasks else feature_config.clip_mode
    out = {"policy": f"every frame, in {mode} clips (videos no longer than a clip whole)",
           "clip_len": feature_config.clip_len, "clip_mode": mode, "clip_stride": feature_config.clip_stride}
    if task in tasks.GENERATION_TASKS:   # video GCG: each clip is its own question
        out["answer"] = "generated per clip, over the clip's frames"
    return out


def _missed_records(evaluator, source, items, records) -> tuple[list, set]:
    """Miss records (`TaskEvaluator.missed`) of the items that produced no row, and the failed
    sample indices: those with such an item, and those whose row predicted nothing."""
    done = {(r["index"], r["clip"]) for r in records}
    misses, failed = [], {r["index"] for r in records if evaluator.empty(r)}
    for index, clip_index, clip in items:
        if (index, clip_index) in done:
            continue
        failed.add(index)
        try:
            sample = source[index]
            frames = list(clip) if clip is not None else list(range(sample.num_frames))
            if clip is not None:
                sample = select_frames(sample, frames)
            record = evaluator.missed(sample, frames) if sample.has_targets else None
        except (BadSample, OSError, ValueError, KeyError, IndexError) as err:   # its annotations are unreadable too
            logger.warning("%s[%d]: no miss recorded (%s)", source.name, index, err)
            continue
        if record is not None:
            misses.append({"index": index, "clip": clip_index, "sample_id": sample.sample_id, "missed": True, **record})
    return misses, failed


def _per_sample_lines(name, evaluator, records, failed, template_seed) -> list[dict]:
    return [{"dataset": name, "template_seed": template_seed, "index": r["index"], "clip": r["clip"],
             "sample_id": r.get("sample_id"), "prompt": r.get("prompt"),
             "failed": r["index"] in failed, **evaluator.sample_scores(r)} for r in records]


def _mean_std(rows: list[dict]) -> tuple[dict, dict]:
    """Per metric over template seeds: mean and sample standard deviation (ddof 1; NaN seeds left out)."""
    mean, std = {}, {}
    for metric in rows[0]:
        values = [r.get(metric) for r in rows]
        if metric in COUNTS or not all(isinstance(v, (int, float)) for v in values):
            continue
        finite = np.array([v for v in values if not math.isnan(v)], np.float64)
        mean[metric] = float(finite.mean()) if finite.size else float("nan")
        std[metric] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return mean, std


def evaluate(model, tokenizer, eval_config, *, mesh, output_dir=None, visualize: int = 0, step: int | None = None,
             datasets: Sequence[str] | None = None, oracle: bool = False, template_seeds: int = 1,
             per_sample: bool = False, checkpoint: Mapping | None = None) -> dict[str, dict[str, float]]:
    """Evaluates `model` on every dataset of `eval_config` (see the module docstring).

    Returns {dataset: {metric: value}} (fractions, NaN where undefined; "samples", "skipped",
    "failed", "entries", "frames_filled" and "frames_background" are counts; "submission" is the
    path of a submission file relative to `output_dir`). With `output_dir`, process 0 writes
    results.json and results.md there (`write_results`), the submission files of splits without
    ground truth to output_dir/submissions/<dataset>/, and with `visualize` N overlays of the first
    N samples of each dataset to output_dir/overlays/<dataset>/.
    `datasets` keeps the named datasets (or tasks) only; `oracle` scores the ground truth itself.
    `template_seeds` N evaluates the referring / reasoning / GCG datasets (TEMPLATED_TASKS) under
    the template seeds seed, ..., seed + N - 1: their row is the mean over seeds (results.json
    keeps each seed's row and the standard deviation). `per_sample` writes
    output_dir/per_sample/<dataset>.jsonl (one line per sample and clip, per seed). `checkpoint`
    ({"step", "checksum", ...}, eval.py's `checkpoint_info`) is recorded in results.json.
    """
    config = _plain(eval_config)
    if model is None and not oracle:
        raise ValueError("evaluate needs a model (or oracle=True)")
    if int(template_seeds) < 1:
        raise ValueError(f"template_seeds must be at least 1 (got {template_seeds})")
    if per_sample and output_dir is None:
        raise ValueError("per_sample writes output_dir/per_sample/: give an output_dir")
    sam_size = int(model.config.mask_encoder.image_size if model is not None else config["sam_size"])
    region_tokens = int(model.config.region_tokens if model is not None else config.get("region_tokens", 64))
    seed = int(config.get("seed", 0))
    process_index, process_count = jax.process_index(), jax.process_count()
    batch_size = int(config.get("batch_size", 8))
    if batch_size % process_count:
        raise ValueError(f"eval batch_size {batch_size} is not divisible by the {process_count} processes")
    specs = config.get("datasets") or {}
    sources = {name: build_source(spec, config.get("data_root")) for name, spec in specs.items()}
    wanted = set(datasets or ())
    unknown = wanted - set(sources) - {s.task for s in sources.values()}
    if unknown:
        raise ValueError(f"no dataset or task named {sorted(unknown)}; datasets: {sorted(sources)}, "
                         f"tasks: {sorted({s.task for s in sources.values()})}")
    selected = {name: spec for name, spec in specs.items()
                if not wanted or name in wanted or sources[name].task in wanted}
    similarity = None   # loaded before the evaluation: a wrong path fails at once
    if any(sources[name].task in tasks.PHRASE_MATCHING_TASKS for name in selected):
        similarity = phrase_similarity(str(config.get("phrase_encoder") or ""))
        if not config.get("phrase_encoder"):
            logger.warning("GCG recall with the bag-of-words phrase similarity; eval.phrase_encoder=DIR (a BERT "
                           "such as bert-base-uncased) gives GLaMM's")
    evaluators = {}
    for name, spec in selected.items():   # every evaluator first: a missing metric dependency fails at once
        scored, fmt = submission_plan(name, spec, sources[name])
        source = prepare_source(sources[name], spec, int(config.get("max_samples", 0) or 0))
        if fmt in ("ref_youtube_vos", "youtube_vos"):
            _source_indices(sources[name], source, fmt)   # an unusable form of the source fails before the evaluation
        evaluators[name] = (scored, fmt, source,
                            tasks.evaluator_for(source, spec.get("options"), scored=scored, submission=fmt is not None,
                                                phrase_similarity=similarity))
    run = _Run(model, tokenizer, config, mesh=mesh, sam_size=sam_size, oracle=oracle, per_sample=per_sample)
    results: dict[str, dict[str, float]] = {}
    recorded = dict(checkpoint) if checkpoint else ({"step": step} if step is not None else None)
    report = {"protocol": {"version": x2sam_jax.__version__, "oracle": bool(oracle), "seed": seed,
                           "checkpoint": recorded, "datasets": {}},
              "template_seeds": {},
              "timing": {"batch_size": batch_size, "processes": process_count, "devices": jax.device_count(),
                         "datasets": {}}}
    lines: dict[str, list] = {}
    for name, spec in selected.items():
        plain = sources[name]
        scored, fmt, source, evaluator = evaluators[name]
        feature = {"region_tokens": region_tokens, **(config.get("feature") or {}), **(spec.get("feature") or {})}
        for key, value in list(feature.items()):
            if isinstance(value, list):
                feature[key] = tuple(value)
        feature_config = features_mod.feature_config(sam_size=sam_size, **feature)
        items = pipeline.eval_items(source, feature_config)
        seeds = [seed + k for k in range(int(template_seeds))] if source.task in TEMPLATED_TASKS else [seed]
        report["protocol"]["datasets"][name] = {
            "task": source.task, "templates": {"policy": TEMPLATE_POLICY, "seeds": seeds},
            "frames": frame_policy(source.task, feature_config), "items": len(items)}
        if source.task in tasks.PHRASE_MATCHING_TASKS:   # what decides the recall
            report["protocol"]["datasets"][name]["phrase_similarity"] = describe_similarity(similarity)
        start = time.perf_counter()
        rows, lines[name] = [], []
        for k, template_seed in enumerate(seeds):
            records, skipped = run.dataset(name, source, evaluator, items, feature, template_seed,
                                           visualize=visualize if k == 0 else 0, output_dir=output_dir)
            misses, failed = _missed_records(evaluator, source, items, records)   # none scored without targets
            scored_records = sorted(records + misses, key=lambda r: (r["index"], r["clip"]))
            row = evaluator.finalize(scored_records) if scored else {}
            if fmt is not None and k == 0:   # one submission, of the first template seed
                row.update(_submission_row(name, fmt, plain, source, evaluator, records, skipped, output_dir))
            row.update({"samples": len({r["index"] for r in records}), "skipped": skipped, "failed": len(failed)})
            rows.append(row)
            if per_sample and jax.process_index() == 0:   # the writer's lines only
                lines[name] += _per_sample_lines(name, evaluator, scored_records, failed, template_seed)
        seconds = time.perf_counter() - start
        results[name] = rows[0]
        if len(rows) > 1:   # the mean over template seeds, counts of the first seed
            mean, std = _mean_std(rows)
            results[name] = {**rows[0], **mean}
            report["template_seeds"][name] = {"seeds": seeds, "per_seed": rows, "mean": mean, "std": std}
        evaluations = results[name]["samples"] * len(seeds)
        report["timing"]["datasets"][name] = {
            "seconds": round(seconds, 3), "samples_evaluated": evaluations,
            "samples_per_s": round(evaluations / seconds, 3) if seconds > 0 else None}
        logger.info("%s: %s (%.1f s)", name, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in results[name].items()), seconds)
    for name, members in (config.get("averages") or {}).items():
        if all(m in results for m in members):
            results[name] = average_row([results[m] for m in members])
            report["protocol"].setdefault("averages", {})[name] = list(members)
    if output_dir is not None and process_index == 0:
        write_results(output_dir, results, step, report=report)
        if per_sample:
            write_per_sample(output_dir, lines)
    return results


def average_row(rows: Sequence[Mapping]) -> dict:
    """The mean of each metric every row reports (NaN if any row's is; counts summed)."""
    out = {}
    for metric in rows[0]:
        values = [r.get(metric) for r in rows]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        out[metric] = int(sum(values)) if metric in COUNTS else float(np.mean(values))
    return out


def _submission_row(name, fmt, plain, source, evaluator, records, skipped, output_dir) -> dict:
    """The submission file of a dataset (process 0 writes it; every process checks and counts the
    same gathered records) and its results row entries."""
    relative = Path("submissions") / name / submissions.FORMATS[fmt]
    path = None if output_dir is None or jax.process_index() != 0 else Path(output_dir) / relative
    try:
        row = dict(write_submission(fmt, plain, source, evaluator, records, path))
    except ValueError as err:
        raise ValueError(f"dataset {name}: {err}" + (f" ({skipped} samples were skipped: see the log)"
                                                     if skipped else "")) from err
    if output_dir is None:
        logger.warning("%s: no output directory, the %s submission is not written", name, fmt)
    else:
        row["submission"] = relative.as_posix()
    return row


class _Run:
    """What every dataset of one `evaluate` call shares: the model, its forward, the batch layout."""

    def __init__(self, model, tokenizer, config, *, mesh, sam_size, oracle, per_sample):
        self.model, self.tokenizer, self.config, self.mesh = model, tokenizer, config, mesh
        self.sam_size, self.oracle, self.per_sample = sam_size, oracle, per_sample
        self.seed = int(config.get("seed", 0))
        self.per_process = int(config.get("batch_size", 8)) // jax.process_count()
        self.pad_id = pipeline.padding_id(tokenizer)
        self.buckets = BucketConfig(**{k: tuple(v) for k, v in (config.get("buckets") or {}).items()})
        self.forward = None if oracle else _forward(compiler_options(config.get("fast_compile")))

    def dataset(self, name, source, evaluator, items, feature, template_seed, *, visualize, output_dir):
        """One pass over a dataset with one template seed: (records of every process, sorted by
        (sample, clip); the number of items the pipeline skipped)."""
        process_index, process_count = jax.process_index(), jax.process_count()
        total = math.ceil(math.ceil(len(items) / process_count) / self.per_process)   # batches of this process
        iterator = pipeline.build_eval_pipeline(
            source, tokenizer=self.tokenizer, batch_size=self.per_process, buckets=self.buckets,
            sam_size=self.sam_size, seed=template_seed, process_index=process_index, process_count=process_count,
            feature_kwargs=feature)
        records, overlay_dir = [], None if output_dir is None else Path(output_dir) / "overlays" / name
        generates = source.task in tasks.GENERATION_TASKS and not self.oracle
        chats = source.task in chat.CHAT_TASKS      # answers only: no SAM frames, nothing to segment
        spec_tokens = self.config.get("datasets", {}).get(name, {}).get("max_new_tokens")
        max_new_tokens = int(spec_tokens if spec_tokens is not None else self.config.get("max_new_tokens", 128))
        for batch in tqdm(iterator, total=total, desc=name, unit="batch", disable=process_index != 0):
            if process_count > 1:   # each process collated its own rows: one program needs one set of sizes
                batch = pipeline.agree_batch_shapes([batch], pad_token_id=self.pad_id)[0]
            if generates:
                batch = _generated(self.model, self.tokenizer, batch, max_new_tokens)
            if chats:
                rows = chat.answer_rows(batch, source, self.tokenizer)
            else:
                if self.oracle:
                    outputs = inference.oracle_outputs(batch)
                else:   # the region sampler keeps the evaluation seed: only templates move with template_seed
                    outputs = inference.to_host(self.forward(self.model, inference.model_inputs(batch, self.mesh),
                                                             inference.row_inputs(batch, self.mesh), self.seed),
                                                self.mesh)
                rows = _rows(batch, outputs, source, self.tokenizer, self.sam_size)
            prompts = {}
            if self.per_sample:
                prompts = {(int(batch["sample_index"][b]), int(batch["clip_index"][b])):
                           prompt_text(self.tokenizer, batch, b) for b in np.flatnonzero(batch["sample_valid"])}
            for row in rows:
                if evaluator.scored and not row.sample.has_targets:
                    raise ValueError(f"dataset {name}: sample {row.sample.sample_id} has no ground truth while its "
                                     "source has; evaluate a split whose samples all have targets or none")
                draw = overlay_dir is not None and row.index < visualize and process_index == 0 and not chats
                record, visual = evaluator.process(row, visual=draw)
                extra = {"sample_id": row.sample.sample_id, "prompt": prompts.get((row.index, row.clip))} \
                    if self.per_sample else {}
                records.append({"index": row.index, "clip": row.clip, **extra, **record})
                if draw:
                    stem = overlay_dir / (f"{row.index:05d}" + (f"_clip{row.clip:02d}" if row.clip else ""))
                    draw_overlay(stem, row, visual)
        skipped = int(sum(_gather([iterator.stats()["total"]])))
        iterator.close()
        return sorted(_gather(records), key=lambda r: (r["index"], r["clip"])), skipped


def from_run_config(config):
    """The training loop's evaluation of a run config, or None when ``eval_every`` is 0: a function
    ``(model, tokenizer, mesh, output_dir, step) -> {dataset: {metric: value}}`` that runs
    :func:`evaluate` with ``config.eval`` on the datasets ``eval_tasks`` (default: all of them), at
    most ``eval_max_samples`` samples each (``train.py`` hands it to ``x2sam_jax.train.loop.train``)."""
    if not config.get("eval_every"):
        return None
    eval_config = _plain(config.eval)
    if config.get("eval_max_samples"):
        eval_config["max_samples"] = int(config.eval_max_samples)
    datasets = list(config.get("eval_tasks", ()) or ()) or None

    def evaluate_in_training(model, tokenizer, mesh, output_dir, step: int) -> dict:
        return evaluate(model, tokenizer, eval_config, mesh=mesh, output_dir=output_dir, step=step, datasets=datasets)

    return evaluate_in_training
