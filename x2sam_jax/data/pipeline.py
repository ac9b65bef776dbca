"""The data pipeline end to end: sources -> features -> padded batches, on Grain.

Training (`build_train_pipeline`):

  MixtureDataset (MapDataset of this host's MicroBatch records, mixture.py)
    .map(load + make_features + skip-and-refill + collate)       one padded micro-batch each
    .to_iter_dataset(ReadOptions(threads, small buffer))         [+ mp_prefetch workers]
  -> PipelineIterator: pops the skip records, counts them (robust.SkipStats), logs a summary.

Each batch also carries `sample_index` (the source's index of every row), `source_index`, `epoch`,
`step` (optimizer step within the epoch),
`micro_step` and `accumulate_steps` (0-d int32): an optimizer step is `accumulate_steps`
consecutive micro-batches of one source (images: 1, video clips: 4); the training loop
accumulates gradients over them. Skip records ride inside each batch until PipelineIterator pops
them, so skips in Grain worker processes are counted in the main process.

Determinism: the plan is arithmetic on (seed, epoch), every sample's augmentation RNG is seeded by
(seed, epoch, source, position, attempt), refills follow the source's epoch order, so batch k is
the same whatever the thread or worker count, and the iterator state (grain's position plus the
skip counts) restores mid-epoch exactly. `save_iterator` / `restore_iterator` store that state
with Orbax through grain's `CheckpointHandler` (one JSON per process); inside a training
checkpoint use `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))`.
Evaluation (`build_eval_pipeline`) seeds each sample's generator (templates, visual prompts)
by (seed, sha256 of its sample id): the same for every clip of a video and in any split or order.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import pkgutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from x2sam_jax.data import features as features_mod, sources as sources_pkg
from x2sam_jax.data.batching import PADDED_AXES, BucketConfig, Collator, batch_dims, check_fits, pad_batch
from x2sam_jax.data.features import select_frames
from x2sam_jax.data.mixture import VIDEO_TASKS, MicroBatch, MixtureDataset, MixturePlan, SourceInfo
from x2sam_jax.data.robust import SKIPPABLE_EXCEPTIONS, SkipStats, classify, load_first_good
from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources.common import Source

logger = logging.getLogger("x2sam_jax.data")

FeatureFn = Callable[[Any, np.random.Generator], dict]  # (Sample, rng) -> feature dict

_TAG_SAMPLE_RNG = 11


# ------------------------------------------------------------------------------------- sources
def source_factories() -> dict:
    """Source factories (coco_panoptic, refcoco...) and Source classes of
    `x2sam_jax.data.sources.*`, by name: what a dict spec's "type" names."""
    def returns_source(fn) -> bool:
        annotation = inspect.signature(fn).return_annotation
        name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        return name.endswith("Source")

    found = {}
    for info in pkgutil.iter_modules(sources_pkg.__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{sources_pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isfunction(obj) and returns_source(obj)) or (
                inspect.isclass(obj) and issubclass(obj, Source)
            ):
                found.setdefault(name, obj)
    return found


def materialize_source(spec):
    """A source object from a spec: a source itself, a zero-argument factory, or a dict
    {"type": factory or class name (see `source_factories`), **kwargs}.

    Construction errors (a missing dataset directory is a FileNotFoundError naming the path)
    propagate unchanged: they are configuration errors, reported at start-up.
    """
    if isinstance(spec, dict):
        kwargs = dict(spec)
        kind = kwargs.pop("type", None)
        factories = source_factories()
        if kind not in factories:
            raise ValueError(f"source spec {spec!r}: unknown type {kind!r}; known: {sorted(factories)}")
        return factories[kind](**kwargs)
    if callable(spec) and not hasattr(spec, "__getitem__"):
        return spec()
    if hasattr(spec, "__getitem__") and hasattr(spec, "__len__"):
        return spec
    raise TypeError(f"not a source or source spec: {spec!r}")


def _source_name(source, index: int) -> str:
    return str(getattr(source, "name", f"source{index}"))


def source_info(source, index: int = 0) -> SourceInfo:
    task, explicit = getattr(source, "task", None), getattr(source, "is_video", None)
    if task is None and explicit is None and len(source):
        task = source[0].task
    video = bool(explicit) if explicit is not None else task in VIDEO_TASKS
    frames = None
    if video and hasattr(source, "frame_count"):
        frames = tuple(int(source.frame_count(i)) for i in range(len(source)))
    return SourceInfo(name=_source_name(source, index), size=len(source), is_video=video, frame_counts=frames,
                      task=task)


# ------------------------------------------------------------------------------------- features
def default_feature_fn(tokenizer, *, train: bool, **kwargs) -> FeatureFn:
    """`data/features.make_features` bound to a tokenizer (the TRANSFORMS helper's function)."""
    make = features_mod.make_features

    def feature_fn(sample, rng):
        return make(sample, tokenizer=tokenizer, rng=rng, train=train, **kwargs)

    return feature_fn


def _sample_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_SAMPLE_RNG, *(int(k) for k in key)]))


def sample_id_key(sample_id) -> tuple[int, int]:
    """Two 32-bit words of sha256(str(sample_id)): an evaluation sample's generator key (stable
    across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256(str(sample_id).encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


class _LoadMicroBatch:
    """MicroBatch -> padded batch dict (+ "skipped" records, popped by PipelineIterator)."""

    def __init__(self, plan: MixturePlan, sources, feature_fn: FeatureFn, collator: Collator, seed: int,
                 max_attempts: int):
        self.plan, self.sources, self.feature_fn = plan, sources, feature_fn
        self.collator, self.seed, self.max_attempts = collator, seed, max_attempts
        self.names = [_source_name(s, i) for i, s in enumerate(sources)]

    def _candidates(self, mb: MicroBatch, position: int):
        # The slot's own sample first, then the following samples of the source's epoch order
        # (for length-sorted video sources: clips of about the same length).
        source = self.sources[mb.source]
        for attempt in range(self.plan.epoch_samples[mb.source] + 1):
            p = position + attempt
            index = self.plan.sample_index(mb, p)
            rng_key = (mb.epoch, mb.source, position, attempt)
            yield index, (lambda index=index, rng_key=rng_key: self._load(source, index, rng_key))

    def _load(self, source, index: int, rng_key) -> dict:
        features = self.feature_fn(source[index], _sample_rng(self.seed, *rng_key))
        check_fits(features, self.collator.buckets)
        return {**features, "sample_index": index}

    def __call__(self, mb: MicroBatch) -> dict:
        features, skipped = [], []
        for position in mb.positions:
            f, s = load_first_good(
                self.names[mb.source], self._candidates(mb, position), max_attempts=self.max_attempts
            )
            features.append(f)
            skipped.extend(s)
        batch = self.collator(features)
        batch["sample_index"] = np.asarray([f["sample_index"] for f in features], np.int64)  # in the source
        batch["source_index"] = np.asarray(mb.source, np.int32)
        batch["step"] = np.asarray(mb.step, np.int32)
        batch["micro_step"] = np.asarray(mb.micro_step, np.int32)
        batch["accumulate_steps"] = np.asarray(mb.accumulate_steps, np.int32)
        batch["epoch"] = np.asarray(mb.epoch, np.int32)
        batch["skipped"] = skipped
        return batch


# ------------------------------------------------------------------------------------- iterator
class PipelineIterator(grain.DatasetIterator):
    """Wraps the Grain iterator: counts and logs skipped samples; state = grain state + counts."""

    def __init__(self, parent: grain.DatasetIterator, skip_stats: SkipStats, *, plan=None,
                 log_every_s: float = 60.0):
        super().__init__(parent)
        self.skip_stats = skip_stats
        self.plan = plan
        self._log_every_s = log_every_s
        self._last_log = -float("inf")  # the first skip is logged at once

    def __next__(self) -> dict:
        batch = next(self._parent)
        skipped = batch.pop("skipped", [])
        if skipped:
            self.skip_stats.merge(skipped)
            now = time.monotonic()
            if now - self._last_log >= self._log_every_s:
                self._last_log = now
                logger.warning(self.skip_stats.log_line())
        return batch

    def stats(self) -> dict:
        """Skip counts: {"total", "by_reason", "by_source", "examples"}."""
        return self.skip_stats.stats()

    def log_line(self) -> str:
        return self.skip_stats.log_line()

    def get_state(self) -> dict:
        return {"grain": self._parent.get_state(), "skipped": self.skip_stats.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["grain"])
        self.skip_stats.set_state(state.get("skipped", []))

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def optimizer_steps(iterator):
    """Groups micro-batches into optimizer steps: yields lists of `accumulate_steps` batches of one
    source (1 for images, 4 for clips). The iterator state between two yields is at an optimizer
    step boundary, the place to checkpoint it."""
    for first in iterator:
        group = [first]
        for _ in range(int(first["accumulate_steps"]) - 1):
            group.append(next(iterator))
        key = [(int(b["epoch"]), int(b["step"]), int(b["source_index"])) for b in group]
        if len(set(key)) != 1 or [int(b["micro_step"]) for b in group] != list(range(len(group))):
            raise RuntimeError(f"micro-batches of one optimizer step are out of order: {key}")
        yield group


def agree_batch_shapes(micro_batches: Sequence[dict], *, pad_token_id: int, allgather=None) -> list[dict]:
    """Pads the micro-batches of one optimizer step to common sizes, the same on every host.

    Each host's Collator pads to its own bucket maxima, so two hosts (or two micro-batches of
    one accumulated step) may pick different buckets for one global batch. Every bucketed
    dimension is raised to its maximum over the micro-batches and over all processes (a tiny
    all-gather of a few integers per step); the maxima are bucket values themselves, so the set
    of compiled programs stays bounded. ``allgather`` maps an int32 vector to [processes, n]
    (default: ``jax.experimental.multihost_utils.process_allgather`` when there are several
    processes).
    """
    names = list(PADDED_AXES)
    local = np.max([[batch_dims(b)[n] for n in names] for b in micro_batches], axis=0).astype(np.int32)
    if allgather is None:
        if jax.process_count() > 1:
            allgather = multihost_utils.process_allgather
    agreed = local if allgather is None else np.max(np.asarray(allgather(local)).reshape(-1, len(names)), axis=0)
    dims = {n: int(v) for n, v in zip(names, agreed)}
    return [pad_batch(b, dims, pad_token_id) for b in micro_batches]


def _to_iterator(dataset: grain.MapDataset, *, num_threads: int, prefetch: int, num_workers: int,
                 plan=None) -> PipelineIterator:
    it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return PipelineIterator(iter(it_ds), SkipStats(), plan=plan)


def _host() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


# ------------------------------------------------------------------------------------- builders
def build_train_pipeline(
    sources: Sequence,
    *,
    tokenizer=None,
    global_batch_images: int,
    seed: int = 0,
    feature_fn: FeatureFn | None = None,
    buckets: BucketConfig = BucketConfig(),
    pad_token_id: int | None = None,
    sam_size: int = 1024,
    images_per_device: int = 4,
    clips_per_device: int = 1,
    video_accumulate_steps: int = 4,
    image_accumulate_steps: int = 1,
    repeat_threshold: float = 0.1,
    repeats: Sequence[float] | Mapping[str, float] | None = None,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    num_workers: int = 0,
    max_attempts: int = 64,
    feature_kwargs: dict | None = None,
) -> PipelineIterator:
    """Iterator of padded training micro-batches (this host's slice of each global micro-batch).

    Args:
      sources: source objects, zero-argument factories or dict specs (see `materialize_source`).
      tokenizer: used by the default feature function and for the padding id.
      global_batch_images: images per micro-step over all devices (images_per_device x devices);
        an optimizer step is ``image_accumulate_steps`` of them (clips: ``video_accumulate_steps``).
      feature_fn: (Sample, rng) -> feature dict; default `data/features.make_features`.
      repeats: per-source repeat factors (a list in source order, or {source name: factor} for
        some of them); default r_d = max(1, sqrt(repeat_threshold / f_d)).
      num_epochs: None = endless (each epoch reshuffled).
      num_threads / prefetch / num_workers: Grain reader threads, prefetch buffer (batches),
        worker processes (0 = in-process).
    The returned iterator has `.plan` (steps per epoch, repeat factors...) and `.stats()`.
    """
    built = [materialize_source(spec) for spec in sources]
    infos = [source_info(s, i) for i, s in enumerate(built)]
    if process_index is None or process_count is None:
        process_index, process_count = _host()
    plan = MixturePlan(
        infos, global_batch_images=global_batch_images, images_per_device=images_per_device,
        clips_per_device=clips_per_device, video_accumulate_steps=video_accumulate_steps,
        image_accumulate_steps=image_accumulate_steps, repeat_threshold=repeat_threshold, repeats=repeats, seed=seed,
        process_index=process_index, process_count=process_count,
    )
    if feature_fn is None:
        if tokenizer is None:
            raise ValueError("build_train_pipeline needs a tokenizer or a feature_fn")
        feature_fn = default_feature_fn(tokenizer, train=True, **{"sam_size": sam_size, **(feature_kwargs or {})})
    collator = Collator(buckets, pad_token_id=padding_id(tokenizer, pad_token_id), sam_size=sam_size)
    logger.info(
        "train mixture: %s",
        ", ".join(
            f"{s.name} n={s.size} r={r:.2f} steps={k}" for s, r, k in zip(infos, plan.repeats, plan.steps_per_source)
        ),
    )
    dataset = MixtureDataset(plan, num_epochs=num_epochs).map(
        _LoadMicroBatch(plan, built, feature_fn, collator, seed, max_attempts)
    )
    return _to_iterator(dataset, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers, plan=plan)


def padding_id(tokenizer, override: int | None = None) -> int:
    """The id that pads token rows: ``override``, else the tokenizer's, else 0."""
    if override is not None:
        return int(override)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return int(pad) if pad is not None else 0


class _EvalBatches(grain.MapDataset):
    """Eval batch k of this host: items process_index + process_count * (k * B + j)."""

    def __init__(self, size: int, batch_size: int, process_index: int, process_count: int):
        super().__init__()
        self.size, self.batch_size = size, batch_size
        self.process_index, self.process_count = process_index, process_count
        per_host = -(-size // process_count)
        self._len = -(-per_host // batch_size)  # the same on every host (collectives stay aligned)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        first = index * self.batch_size
        ids = [self.process_index + self.process_count * (first + j) for j in range(self.batch_size)]
        return tuple(i for i in ids if i < self.size)


def eval_items(source, clip_config=None, whole_videos: bool = True) -> list[tuple[int, int, tuple | None]]:
    """(sample index, clip index, clip frame indices or None) for every evaluation item, in order.

    Videos longer than the clip length give one item per clip of `features.eval_clips` (all the
    clips of the video, sorted by first frame), so evaluation covers every frame; other samples
    give one item with clip None. `whole_videos=False` keeps one item per sample (the first clip)."""
    cfg = clip_config or features_mod.FeatureConfig()
    task = getattr(source, "task", None)
    if task is None and len(source):
        task = source[0].task
    if not whole_videos or task not in features_mod.VIDEO_TASKS or not hasattr(source, "frame_count"):
        return [(i, 0, None) for i in range(len(source))]
    items = []
    for i in range(len(source)):
        clips = features_mod.eval_clips(task, int(source.frame_count(i)), cfg)
        if clips is None:  # a malformed record counts 0 frames: one item, whose load reports it
            items.append((i, 0, None))
        else:
            items.extend((i, c, tuple(clip)) for c, clip in enumerate(clips))
    return items


class _LoadEvalBatch:
    """Every item exactly once: a bad sample leaves its slot invalid (counted), no refill."""

    def __init__(self, source, items, feature_fn, collator, batch_size, seed):
        self.source, self.items, self.feature_fn, self.collator = source, items, feature_fn, collator
        self.batch_size, self.seed = batch_size, seed
        self.name = _source_name(source, 0)

    def _features(self, index: int, clip_index: int, clip) -> dict:
        sample = self.source[index]
        # Keyed by the sample's id, not its position: a sample draws the same template (and visual
        # prompt) whatever else the split holds, and every clip of a video asks the same question.
        rng = _sample_rng(self.seed, *sample_id_key(sample.sample_id))
        if clip is None:
            return self.feature_fn(sample, rng)
        if max(clip) >= sample.num_frames:  # the annotation's frame count disagrees with the sample
            raise BadSample(f"{self.name}[{index}]: clip {list(clip)} beyond its {sample.num_frames} frames")
        # The clip is cut here, so any feature function (Sample, rng) sees a clip-length sample.
        return self.feature_fn(select_frames(sample, list(clip)), rng)

    def __call__(self, ids: tuple[int, ...]) -> dict:
        features, kept, skipped = [], [], []
        for k in ids:
            index, clip_index, clip = self.items[k]
            where = f"{self.name}[{index}]" + ("" if clip is None else f" clip {clip_index}")
            try:
                f = self._features(index, clip_index, clip)
                check_fits(f, self.collator.buckets)
            except SKIPPABLE_EXCEPTIONS as err:
                skipped.append((self.name, classify(err), f"{where}: {err}"))
                continue
            features.append(f)
            kept.append((index, clip_index, clip, int(np.asarray(f["num_frames"]))))
        batch = self.collator(features, batch_size=self.batch_size)
        sample_index = np.full((self.batch_size,), -1, np.int32)
        clip_index = np.full((self.batch_size,), -1, np.int32)
        clip_frames = np.full((self.batch_size, batch["sam_pixel_values"].shape[1]), -1, np.int32)
        width = clip_frames.shape[1]   # 0 for chat batches (no SAM frames), whose videos still have frames
        for row, (index, c, clip, frames) in enumerate(kept):
            sample_index[row], clip_index[row] = index, c
            clip_frames[row, :min(frames, width)] = (np.arange(frames) if clip is None else np.asarray(clip))[:width]
        batch["sample_index"] = sample_index
        batch["clip_index"] = clip_index
        batch["clip_frames"] = clip_frames
        # Per row (None for padding): condition -> sample instances (see features.make_features).
        batch["condition_instances"] = [f.get("condition_instances") for f in features] + \
            [None] * (self.batch_size - len(features))
        batch["skipped"] = skipped
        return batch


def build_eval_pipeline(
    source,
    *,
    tokenizer=None,
    batch_size: int,
    feature_fn: FeatureFn | None = None,
    buckets: BucketConfig = BucketConfig(),
    pad_token_id: int | None = None,
    sam_size: int = 1024,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    feature_kwargs: dict | None = None,
    whole_videos: bool = True,
) -> PipelineIterator:
    """Iterator over one source in order, `batch_size` items per host batch. Every host yields
    the same number of batches; the tail is padded with `sample_valid` False rows.

    Videos longer than the clip length (feature_kwargs clip_len / clip_mode / clip_stride /
    span_tasks, the FeatureConfig defaults otherwise) are walked clip by clip: one item per clip
    (see `eval_items`). Rows map back with `sample_index` [B] (source index, -1 for padding),
    `clip_index` [B] (clip of that sample, -1 for padding) and `clip_frames` [B, T] (the source
    frame index of each frame of the row, -1 past its frames); `condition_instances` (a list of B
    entries) maps each row's conditions to the sample's instances."""
    built = materialize_source(source)
    if process_index is None or process_count is None:
        process_index, process_count = _host()
    options = {"sam_size": sam_size, **(feature_kwargs or {})}
    if feature_fn is None:
        if tokenizer is None:
            raise ValueError("build_eval_pipeline needs a tokenizer or a feature_fn")
        feature_fn = default_feature_fn(tokenizer, train=False, **options)
    items = eval_items(built, features_mod.feature_config(**options), whole_videos)
    collator = Collator(buckets, pad_token_id=padding_id(tokenizer, pad_token_id), sam_size=sam_size)
    dataset = _EvalBatches(len(items), batch_size, process_index, process_count).map(
        _LoadEvalBatch(built, items, feature_fn, collator, batch_size, seed)
    )
    return _to_iterator(dataset, num_threads=num_threads, prefetch=prefetch, num_workers=0)


# ------------------------------------------------------------------------------------- Orbax
def save_iterator(directory: str | os.PathLike, iterator: PipelineIterator) -> None:
    """Writes the iterator state with Orbax (grain's CheckpointHandler, one JSON per process)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        ckptr.save(os.fspath(directory), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator(directory: str | os.PathLike, iterator: PipelineIterator) -> PipelineIterator:
    """Restores a freshly built iterator (same sources/seed/config) to the saved position."""
    import orbax.checkpoint as ocp

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data iterator checkpoint not found: {directory}")
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        return ckptr.restore(directory, args=grain.checkpoint.CheckpointRestore(iterator))
