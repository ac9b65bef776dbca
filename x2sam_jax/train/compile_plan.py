"""The programs a training run compiles, known before its first step.

A batch's shape is set by its source's micro-batch (global rows and micro-steps, ``MixturePlan``)
and by the bucket of every padded dimension (``data.batching.BucketConfig``). From what each
source can produce — its frame counts (clips of at most ``clip_len`` frames), whether its task
carries visual prompts (regions) or targets at all (chat) — :func:`program_shapes` lists every
combination the run can meet. Chat batches carry no SAM frames (``data.batching.NO_FRAME_DIMS``
are 0): their programs are the LLM alone (``train.step.Task.language_only``), never shared with a
segmentation source's. The loop compiles them all before step 1 when
``config.max_programs`` is set (a run whose plan holds more is refused at start-up), so no host
stops for a compile in the middle of training, and every host compiles the same list.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from x2sam_jax.data.batching import NO_FRAME_DIMS, BucketConfig, Collator, bucket_size
from x2sam_jax.data.mixture import MixturePlan, SourceInfo

REGION_TASKS = ("inter_seg", "vinter_seg", "vobj_seg", "vgd_seg", "vvgd_seg")   # visual prompts
CHAT_TASKS = ("chat", "vchat")                                     # no masks, no conditions, no frames
TARGET_DIMS = ("instances", "conditions", "seg_tokens")


@dataclasses.dataclass(frozen=True, order=True)
class ProgramShape:
    """One compiled program: micro-steps x global rows, and the padded size of every dimension."""

    accumulate: int
    rows: int
    dims: tuple[tuple[str, int], ...]


def _reachable(buckets: BucketConfig, info: SourceInfo, clip_len: int) -> dict[str, set[int]]:
    """The bucket sizes a batch of this source can take, per dimension."""
    reachable = {name: set(getattr(buckets, name)) for name in buckets.dims()}
    if not info.is_video:
        reachable["frames"] = {bucket_size(1, buckets.frames, "frames")}
    elif info.frame_counts:
        reachable["frames"] = {bucket_size(min(n, clip_len), buckets.frames, "frames") for n in set(info.frame_counts)}
    if info.task not in REGION_TASKS:
        reachable["regions"] = {buckets.regions[0]}
    if info.task in CHAT_TASKS:
        reachable.update({name: {getattr(buckets, name)[0]} for name in TARGET_DIMS})
    return reachable


def program_shapes(plan: MixturePlan, buckets: BucketConfig, clip_len: int = 8) -> list[ProgramShape]:
    """Every program the run's batches can need, sorted (the same list on every host)."""
    shapes = set()
    for source, info in enumerate(plan.sources):
        reachable = _reachable(buckets, info, clip_len)
        no_frames = info.task in CHAT_TASKS      # these dimensions are 0, outside their buckets
        options = []
        for group in buckets.groups():   # a tied group moves as one: the positions all members reach
            group = tuple(name for name in group if not (no_frames and name in NO_FRAME_DIMS))
            if not group:
                continue
            positions = [k for k in range(len(getattr(buckets, group[0])))
                         if all(getattr(buckets, name)[k] in reachable[name] for name in group)]
            options.append([{name: getattr(buckets, name)[k] for name in group} for k in positions])
        for choice in itertools.product(*options):
            dims = {name: size for part in choice for name, size in part.items()}
            if no_frames:
                dims.update({name: 0 for name in NO_FRAME_DIMS})
            shapes.add(ProgramShape(plan.accumulate_steps[source], plan.micro_batch_size[source],
                                    tuple(sorted(dims.items()))))
    return sorted(shapes)


def abstract_batch(shape: ProgramShape, collator: Collator, keys, patch_dim: int) -> dict:
    """The step's input batch of ``shape`` as ShapeDtypeStructs ([A, rows, ...], the arrays of ``keys``)."""
    empty = collator.empty(1, dict(shape.dims), patch_dim=patch_dim)
    return {key: jax.ShapeDtypeStruct((shape.accumulate, shape.rows, *empty[key].shape[1:]), empty[key].dtype)
            for key in keys}


def describe(shapes: list[ProgramShape]) -> str:
    """One line per program, for the log."""
    return "\n".join(f"  {s.accumulate} x {s.rows} rows, " + ", ".join(f"{k}={v}" for k, v in s.dims)
                     for s in shapes)


def count_by_source(plan: MixturePlan, buckets: BucketConfig, clip_len: int = 8) -> dict[str, int]:
    """Programs each source can need on its own (sources of one kind share theirs)."""
    out = {}
    for info, rows, accumulate in zip(plan.sources, plan.micro_batch_size, plan.accumulate_steps):
        one = MixturePlan.__new__(MixturePlan)
        one.sources, one.micro_batch_size, one.accumulate_steps = (info,), [rows], [accumulate]
        out[info.name] = len(program_shapes(one, buckets, clip_len))
    return out


__all__ = ["ProgramShape", "program_shapes", "abstract_batch", "describe", "count_by_source", "np"]
