"""`evaluate(model, tokenizer, eval_config, *, mesh, ...)`: every configured dataset through the
evaluation pipeline, the jitted forward, the task's post-processing and its metrics.

Per dataset: the source (a spec of `x2sam_jax.data.sources.FACTORIES`, its "root" relative to
`eval_config.data_root`) -> `data.pipeline.build_eval_pipeline` (every sample exactly once, long
videos clip by clip, padded to the config's buckets, templates and visual prompts drawn with a
generator seeded by (seed, sample, clip)) -> `inference.make_forward` (one program per bucket,
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from x2sam_jax.data import features as features_mod
from x2sam_jax.data import pipeline
from x2sam_jax.data.batching import BucketConfig
from x2sam_jax.data.features import select_frames
from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import build_source as build_plain_source
from x2sam_jax.data.tokenizer import SpecialIds
from x2sam_jax.data.transforms import load_image
from x2sam_jax.distributed import absolute_path
from x2sam_jax.eval import chat, inference, submissions, tasks
from x2sam_jax.eval import visualize as overlays   # evaluate() has an argument `visualize`
from x2sam_jax.sharding import compiler_options

logger = logging.getLogger("x2sam_jax.eval")

MIN_PANEL_WIDTH = 200  # overlay panels narrower than this are enlarged
# The order of metric columns in results.md; counts are written as integers.
COUNTS = ("samples", "skipped", "entries", "frames_filled", "frames_background")
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
    return tokenizer.decode(labels[labels != inference.IGNORE_LABEL].tolist(), skip_special_tokens=False)


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


def _enlarge(x: np.ndarray, scale: int, axes: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(x, scale, axis=axes[0]), scale, axis=axes[1]) if scale > 1 else x


def draw_overlay(path_stem: Path, row: tasks.Row, visual: tasks.Visual) -> str:
    """prediction | ground truth, each with a legend of its labels: PNG for an image, GIF for a clip.
    A split without ground truth (`visual.gt` None) shows the prediction alone."""
    names = list(dict.fromkeys(list(visual.pred_labels) + list(visual.gt_labels)))
    table = dict(zip(names, overlays.palette(max(len(names), 1))))
    pred_colors = np.array([table[n] for n in visual.pred_labels], np.uint8).reshape(-1, 3)
    gt_colors = np.array([table[n] for n in visual.gt_labels], np.uint8).reshape(-1, 3)
    pred_text = [n if visual.pred_scores is None else f"{n} {s:.2f}"
                 for n, s in zip(visual.pred_labels, visual.pred_scores or visual.pred_labels)]
    # Small frames are enlarged (nearest) so that the legend text fits under each panel.
    scale = max(1, math.ceil(MIN_PANEL_WIDTH / row.orig_hw[1]))
    pages = []
    for t in range(len(row.frames)):
        image = _enlarge(load_image(row.sample.frames[t]), scale, (0, 1))
        pred = overlays.add_legend(overlays.overlay(image, _enlarge(visual.pred[t], scale, (1, 2)), pred_colors),
                                   pred_text, pred_colors)
        if visual.gt is None:
            pages.append(overlays.side_by_side([pred], ["prediction"]))
            continue
        gt = overlays.add_legend(overlays.overlay(image, _enlarge(visual.gt[t], scale, (1, 2)), gt_colors),
                                 visual.gt_labels, gt_colors)
        pages.append(overlays.side_by_side([pred, gt], ["prediction", "ground truth"]))
    if len(pages) == 1:
        return overlays.save_png(f"{path_stem}.png", pages[0])
    height = max(p.shape[0] for p in pages)
    pages = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in pages]
    return overlays.save_gif(f"{path_stem}.gif", pages)


def format_markdown(results: Mapping[str, Mapping[str, float]], step: int | None = None) -> str:
    """results.md: one row per dataset, metrics in percent (counts as they are)."""
    names = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    names += sorted({m for r in results.values() for m in r} - set(names))
    title = "# Evaluation results" + ("" if step is None else f" at step {step}")
    lines = [title, "", "Metrics in percent; `_x2sam` columns follow X2SAM's own evaluator "
             "(docs/architecture.md#post-processing-and-metrics); "
             "`submission` files (under the output folder) are for the benchmark's server.", "",
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
                cells.append(f"{100 * value:.2f}")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_ready(results):
    """NaN (undefined metric) -> null."""
    return {d: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()}
            for d, r in results.items()}


def write_results(output_dir, results, step=None) -> None:
    out = absolute_path(output_dir)   # an etils.epath.Path: gs://bucket/out keeps its scheme
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(_json_ready(results), indent=2, sort_keys=True) + "\n"),
                       ("results.md", format_markdown(results, step))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


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


def _forward(options):
    key = json.dumps(options, sort_keys=True)
    if key not in _FORWARDS:
        _FORWARDS[key] = inference.make_forward(options)
    return _FORWARDS[key]


def evaluate(model, tokenizer, eval_config, *, mesh, output_dir=None, visualize: int = 0, step: int | None = None,
             datasets: Sequence[str] | None = None, oracle: bool = False) -> dict[str, dict[str, float]]:
    """Evaluates `model` on every dataset of `eval_config` (see the module docstring).

    Returns {dataset: {metric: value}} (fractions, NaN where undefined; "samples", "skipped",
    "entries", "frames_filled" and "frames_background" are counts; "submission" is the path of a
    submission file relative to `output_dir`). With `output_dir`, process 0 writes results.json and
    results.md there, the submission files of splits without ground truth to
    output_dir/submissions/<dataset>/, and with `visualize` N overlays of the first N samples of
    each dataset to output_dir/overlays/<dataset>/.
    `datasets` keeps the named datasets (or tasks) only; `oracle` scores the ground truth itself.
    """
    config = _plain(eval_config)
    if model is None and not oracle:
        raise ValueError("evaluate needs a model (or oracle=True)")
    sam_size = int(model.config.mask_encoder.image_size if model is not None else config["sam_size"])
    region_tokens = int(model.config.region_tokens if model is not None else config.get("region_tokens", 64))
    seed = int(config.get("seed", 0))
    process_index, process_count = jax.process_index(), jax.process_count()
    batch_size = int(config.get("batch_size", 8))
    if batch_size % process_count:
        raise ValueError(f"eval batch_size {batch_size} is not divisible by the {process_count} processes")
    per_process = batch_size // process_count
    pad_id = pipeline.padding_id(tokenizer)
    buckets = BucketConfig(**{k: tuple(v) for k, v in (config.get("buckets") or {}).items()})
    fast = config.get("fast_compile")
    compile_options = compiler_options(fast)
    forward = None if oracle else _forward(compile_options)
    specs = config.get("datasets") or {}
    sources = {name: build_source(spec, config.get("data_root")) for name, spec in specs.items()}
    wanted = set(datasets or ())
    unknown = wanted - set(sources) - {s.task for s in sources.values()}
    if unknown:
        raise ValueError(f"no dataset or task named {sorted(unknown)}; datasets: {sorted(sources)}, "
                         f"tasks: {sorted({s.task for s in sources.values()})}")
    selected = {name: spec for name, spec in specs.items()
                if not wanted or name in wanted or sources[name].task in wanted}
    evaluators = {}
    for name, spec in selected.items():   # every evaluator first: a missing metric dependency fails at once
        scored, fmt = submission_plan(name, spec, sources[name])
        source = prepare_source(sources[name], spec, int(config.get("max_samples", 0) or 0))
        if fmt in ("ref_youtube_vos", "youtube_vos"):
            _source_indices(sources[name], source, fmt)   # an unusable form of the source fails before the evaluation
        evaluators[name] = (scored, fmt, source,
                            tasks.evaluator_for(source, spec.get("options"), scored=scored, submission=fmt is not None))
    results: dict[str, dict[str, float]] = {}
    for name, spec in selected.items():
        plain = sources[name]
        scored, fmt, source, evaluator = evaluators[name]
        feature = {"region_tokens": region_tokens, **(config.get("feature") or {}), **(spec.get("feature") or {})}
        for key, value in list(feature.items()):
            if isinstance(value, list):
                feature[key] = tuple(value)
        items = pipeline.eval_items(source, features_mod.feature_config(sam_size=sam_size, **feature))
        total = math.ceil(math.ceil(len(items) / process_count) / per_process)   # batches of this process
        iterator = pipeline.build_eval_pipeline(
            source, tokenizer=tokenizer, batch_size=per_process, buckets=buckets, sam_size=sam_size, seed=seed,
            process_index=process_index, process_count=process_count, feature_kwargs=feature)
        records, overlay_dir = [], None if output_dir is None else Path(output_dir) / "overlays" / name
        generates = source.task in tasks.GENERATION_TASKS and not oracle
        chats = source.task in chat.CHAT_TASKS      # answers only: no SAM frames, nothing to segment
        max_new_tokens = int(spec.get("max_new_tokens", config.get("max_new_tokens", 128)))
        for batch in tqdm(iterator, total=total, desc=name, unit="batch", disable=process_index != 0):
            if process_count > 1:   # each process collated its own rows: one program needs one set of sizes
                batch = pipeline.agree_batch_shapes([batch], pad_token_id=pad_id)[0]
            if generates:
                batch = _generated(model, tokenizer, batch, max_new_tokens)
            if chats:
                rows = chat.answer_rows(batch, source, tokenizer)
            else:
                if oracle:
                    outputs = inference.oracle_outputs(batch)
                else:
                    outputs = inference.to_host(forward(model, inference.model_inputs(batch, mesh),
                                                        inference.row_inputs(batch, mesh), seed), mesh)
                rows = _rows(batch, outputs, source, tokenizer, sam_size)
            for row in rows:
                if scored and not row.sample.has_targets:
                    raise ValueError(f"dataset {name}: sample {row.sample.sample_id} has no ground truth while its "
                                     "source has; evaluate a split whose samples all have targets or none")
                draw = overlay_dir is not None and row.index < visualize and process_index == 0 and not chats
                record, visual = evaluator.process(row, visual=draw)
                records.append({"index": row.index, "clip": row.clip, **record})
                if draw:
                    stem = overlay_dir / (f"{row.index:05d}" + (f"_clip{row.clip:02d}" if row.clip else ""))
                    draw_overlay(stem, row, visual)
        skipped = int(sum(_gather([iterator.stats()["total"]])))
        iterator.close()
        records = sorted(_gather(records), key=lambda r: (r["index"], r["clip"]))
        results[name] = evaluator.finalize(records) if scored else {}
        if fmt is not None:
            # Every process checks and counts the same gathered records; process 0 writes the file.
            relative = Path("submissions") / name / submissions.FORMATS[fmt]
            path = None if output_dir is None or process_index != 0 else Path(output_dir) / relative
            try:
                results[name].update(write_submission(fmt, plain, source, evaluator, records, path))
            except ValueError as err:
                raise ValueError(f"dataset {name}: {err}" + (f" ({skipped} samples were skipped: see the log)"
                                                             if skipped else "")) from err
            if output_dir is None:
                logger.warning("%s: no output directory, the %s submission is not written", name, fmt)
            else:
                results[name]["submission"] = relative.as_posix()
        results[name].update({"samples": len({r["index"] for r in records}), "skipped": skipped})
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in results[name].items()))
    if output_dir is not None and process_index == 0:
        write_results(output_dir, results, step)
    return results


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
