"""The training mixture: which samples form which batch, for every step of every epoch.

X2SAM's joint stage (docs/recipe.md#stage-3-unified-joint-training) draws every optimizer step
from ONE dataset. Small datasets are repeated r_d = max(1, sqrt(t / f_d)) times per epoch (t = 0.1,
f_d = the dataset's share of all samples), a dataset contributes floor(n_d * r_d) samples per
epoch (as the official ConcatDataset does). Within a video dataset the samples are sorted by frame
count before batches are cut, so a batch holds clips of similar length. An optimizer step holds 4
images per device, or 1 clip per device accumulated over 4 micro-steps; the micro-steps of one
optimizer step come from the same dataset and are consecutive.

The plan is pure arithmetic on (sizes, frame counts, seed, epoch): every host computes the same
plan, so all hosts agree on which dataset a step draws from, and each host keeps its slice of every
global micro-batch. `MixtureDataset` exposes the plan as a Grain `MapDataset` of `MicroBatch`
records (random access by micro-batch index), which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from x2sam_jax.data.schema import TASKS

# Image VGD ("vgd_seg") starts with a "v" but is an image task.
VIDEO_TASKS = frozenset(t for t in TASKS if t.startswith("v") and t != "vgd_seg")

# Seed-sequence tags keep the random streams of the plan independent of each other.
_TAG_REPEAT, _TAG_SHUFFLE, _TAG_STEPS = 1, 2, 3


def split_global_batch(global_batch: int, max_per_device: int, devices: int, what: str = "images") -> tuple[int, int]:
    """(per-device micro-batch, micro-steps) that make ``global_batch`` samples per optimizer
    step on ``devices`` devices with at most ``max_per_device`` per device per micro-step: the
    fewest micro-steps, then the per-device size they imply. The recipe's global batch is the
    same on any cluster; a cluster it does not divide is an error naming the sizes."""
    if global_batch < 1 or max_per_device < 1 or devices < 1:
        raise ValueError(f"global batch of {what} {global_batch}, per device {max_per_device}, devices {devices}: "
                         "all must be >= 1")
    accumulate = math.ceil(global_batch / (max_per_device * devices))
    per_device, rest = divmod(global_batch, devices * accumulate)
    if rest or per_device < 1:
        raise ValueError(
            f"a global batch of {global_batch} {what} does not split over {devices} devices: with at most "
            f"{max_per_device} per device it needs {accumulate} micro-step(s) of {global_batch / (devices * accumulate):g} "
            f"per device; choose a global batch that {devices} x micro-steps divides, or another device count")
    return per_device, accumulate


def repeat_factors(sizes: Sequence[int], threshold: float = 0.1) -> list[float]:
    """r_d = max(1, sqrt(threshold / f_d)) with f_d = n_d / sum(n); empty datasets get 1."""
    total = float(sum(sizes))
    if total <= 0:
        return [1.0 for _ in sizes]
    return [max(1.0, math.sqrt(threshold / (n / total))) if n > 0 else 1.0 for n in sizes]


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the plan needs to know about one source (cheap to compute at start-up)."""

    name: str
    size: int
    is_video: bool
    frame_counts: tuple[int, ...] | None = None  # per sample; used to length-sort video sources
    task: str | None = None  # schema.TASKS name (None: unknown); the compile plan reads it


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """This host's part of one global micro-batch.

    `positions` index the source's epoch order (`MixturePlan.epoch_order`); the sample index is
    `order[position]`. A bad sample is refilled from the following positions of the same order.
    """

    epoch: int
    step: int  # optimizer step within the epoch
    micro_step: int  # 0 .. accumulate_steps-1
    accumulate_steps: int
    source: int
    positions: tuple[int, ...]


class MixturePlan:
    """Deterministic, host-sharded batch plan over a list of sources.

    Args:
      sources: one `SourceInfo` per source.
      global_batch_images: images per micro-step over all devices; the number of devices is
        global_batch_images // images_per_device.
      images_per_device / clips_per_device: micro-batch size per device for image / video sources.
      image_accumulate_steps / video_accumulate_steps: micro-steps per optimizer step for image /
        video sources (``split_global_batch`` derives them from the recipe's global batch).
      repeat_threshold: t of the repeat factor; `repeats` overrides the computed factors (a list in
        source order, or {source name: factor} for some sources).
      seed: the plan's seed; epoch e uses an independent stream derived from (seed, e).
      process_index / process_count: this host's slice of every global micro-batch.
      sort_video_by_frames: length-sort video sources before batches are cut.
    """

    def __init__(
        self,
        sources: Sequence[SourceInfo],
        *,
        global_batch_images: int,
        images_per_device: int = 4,
        clips_per_device: int = 1,
        video_accumulate_steps: int = 4,
        repeat_threshold: float = 0.1,
        repeats: Sequence[float] | Mapping[str, float] | None = None,
        seed: int = 0,
        image_accumulate_steps: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        sort_video_by_frames: bool = True,
    ):
        if not sources:
            raise ValueError("MixturePlan needs at least one source")
        for src in sources:
            if src.size <= 0:
                raise ValueError(f"source {src.name!r} is empty (0 samples)")
            if src.frame_counts is not None and len(src.frame_counts) != src.size:
                raise ValueError(f"source {src.name!r}: {len(src.frame_counts)} frame counts for {src.size} samples")
        if global_batch_images % images_per_device:
            raise ValueError(
                f"global_batch_images={global_batch_images} is not a multiple of images_per_device={images_per_device}"
            )
        self.num_devices = global_batch_images // images_per_device
        if self.num_devices < 1:
            raise ValueError(f"global_batch_images={global_batch_images} < images_per_device={images_per_device}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.sources = tuple(sources)
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.sort_video_by_frames = sort_video_by_frames
        if repeats is None or isinstance(repeats, Mapping):  # {source name: factor} overrides some
            by_name = dict(repeats or {})
            unknown = sorted(set(by_name) - {s.name for s in sources})
            if unknown:
                raise ValueError(f"repeats: no source named {unknown}; the sources are {[s.name for s in sources]}")
            computed = repeat_factors([s.size for s in sources], repeat_threshold)
            repeats = [by_name.get(s.name, r) for s, r in zip(sources, computed)]
        self.repeats = [float(r) for r in repeats]
        if len(self.repeats) != len(sources):
            raise ValueError(f"{len(self.repeats)} repeat factors for {len(sources)} sources")

        # Global micro-batch size and micro-steps per optimizer step, per source.
        self.micro_batch_size = []
        self.accumulate_steps = []
        for src in sources:
            per_device = clips_per_device if src.is_video else images_per_device
            self.micro_batch_size.append(per_device * self.num_devices)
            self.accumulate_steps.append(video_accumulate_steps if src.is_video else image_accumulate_steps)
        for src, size in zip(sources, self.micro_batch_size):
            if size % process_count:
                raise ValueError(
                    f"source {src.name!r}: global micro-batch of {size} does not split over {process_count} hosts"
                )
        # Samples per epoch and optimizer steps per epoch, per source (the same every epoch).
        self.epoch_samples = [int(s.size * r) for s, r in zip(sources, self.repeats)]
        self.steps_per_source = [
            math.ceil(n / (b * a)) for n, b, a in zip(self.epoch_samples, self.micro_batch_size, self.accumulate_steps)
        ]
        self.steps_per_epoch = sum(self.steps_per_source)
        self.micro_batches_per_epoch = sum(s * a for s, a in zip(self.steps_per_source, self.accumulate_steps))
        # Per-epoch results, computed on first use; Grain reads from several threads, and the
        # values are deterministic, so a lock only avoids duplicate work.
        self._cache: dict[tuple, object] = {}
        self._lock = threading.Lock()

    # Picklable for Grain's worker processes: the cache and the lock are per process.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _cached(self, key: tuple, compute):
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = compute()
        with self._lock:
            epoch = key[1]
            for old in [k for k in self._cache if k[1] < epoch - 1]:  # keep this and the last epoch
                del self._cache[old]
            self._cache[key] = value
        return value

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *tags]))

    def epoch_order(self, epoch: int, source: int) -> np.ndarray:
        """The source's sample indices for `epoch`: repeated, shuffled, length-sorted if video,
        padded (round-up, by the preceding neighbours) to a whole number of optimizer steps."""
        return self._cached(("order", epoch, source), lambda: self._compute_epoch_order(epoch, source))

    def _compute_epoch_order(self, epoch: int, source: int) -> np.ndarray:
        info = self.sources[source]
        n, want = info.size, self.epoch_samples[source]
        copies, extra = divmod(want, n)
        pieces = [np.arange(n)] * copies
        if extra:  # the fractional part of the repeat factor: a random subset, once more
            pieces.append(np.sort(self._rng(_TAG_REPEAT, epoch, source).permutation(n)[:extra]))
        order = self._rng(_TAG_SHUFFLE, epoch, source).permutation(np.concatenate(pieces))
        if info.is_video and self.sort_video_by_frames and info.frame_counts is not None:
            frames = np.asarray(info.frame_counts)[order]
            order = order[np.argsort(frames, kind="stable")]  # stable: ties keep the random order
        step_size = self.micro_batch_size[source] * self.accumulate_steps[source]
        total = self.steps_per_source[source] * step_size
        if total > len(order):  # fill the last step with its neighbours (cycling for tiny sources)
            pad = total - len(order)
            pool = order[-step_size:] if len(order) >= step_size else order
            order = np.concatenate([order, np.resize(pool, pad)])
        return order

    def _step_sources(self, epoch: int) -> np.ndarray:
        """Source of every optimizer step of `epoch`, in (shuffled) step order."""
        return self._cached(("steps", epoch), lambda: self._compute_step_sources(epoch))

    def _compute_step_sources(self, epoch: int) -> np.ndarray:
        owners = np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(self.steps_per_source)])
        return self._rng(_TAG_STEPS, epoch).permutation(owners)

    def _epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per micro-batch of `epoch`: (optimizer step, micro step, step index within its source)."""
        return self._cached(("index", epoch), lambda: self._compute_epoch_index(epoch))

    def _compute_epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step_sources = self._step_sources(epoch)
        seen = np.zeros(len(self.sources), np.int64)
        steps, micro, within = [], [], []
        for step, d in enumerate(step_sources):
            for m in range(self.accumulate_steps[d]):
                steps.append(step)
                micro.append(m)
                within.append(seen[d])
            seen[d] += 1
        return np.asarray(steps), np.asarray(micro), np.asarray(within)

    def micro_batch(self, index: int) -> MicroBatch:
        """This host's part of global micro-batch `index` (counting over all epochs)."""
        epoch, i = divmod(int(index), self.micro_batches_per_epoch)
        steps, micro, within = self._epoch_index(epoch)
        step, m = int(steps[i]), int(micro[i])
        d = int(self._step_sources(epoch)[step])
        size, acc = self.micro_batch_size[d], self.accumulate_steps[d]
        start = (int(within[i]) * acc + m) * size
        per_host = size // self.process_count
        start += self.process_index * per_host
        return MicroBatch(epoch, step, m, acc, d, tuple(range(start, start + per_host)))

    def sample_index(self, mb: MicroBatch, position: int) -> int:
        """Source-local sample index at `position` of the source's epoch order (wrapping)."""
        order = self.epoch_order(mb.epoch, mb.source)
        return int(order[position % len(order)])


class MixtureDataset(grain.MapDataset):
    """The plan as a Grain MapDataset: element i = `MicroBatch` i (this host's slice).

    `num_epochs=None` runs (practically) forever; every epoch gets a fresh shuffle.
    """

    def __init__(self, plan: MixturePlan, num_epochs: int | None = 1):
        super().__init__()
        self.plan = plan
        self.num_epochs = num_epochs
        epochs = num_epochs if num_epochs is not None else 1_000_000
        self._len = plan.micro_batches_per_epoch * epochs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._len:
            raise IndexError(f"micro-batch {index} out of range [0, {self._len})")
        return self.plan.micro_batch(index)

    def __str__(self) -> str:
        return f"MixtureDataset(sources={[s.name for s in self.plan.sources]}, epochs={self.num_epochs})"
