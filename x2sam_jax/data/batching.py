"""Padding to bucket shapes and collation of model-input features into batches.

Every variable size of a batch (sequence length, Qwen patch count, images per sample, instances,
conditions, regions, <SEG> tokens, frames) is rounded up to the next value of a short bucket list,
so `jit` compiles a bounded number of programs (`BucketConfig.max_programs`). Padded entries get a
False validity mask; padded `grid_thw` rows and padded pixel rows are zeros, padded labels are -100.

Input: a list of per-sample feature dicts (docs/data.md#features, produced by `data/features.py`).
Output: one dict of numpy arrays, batch-major:

  input_ids [B, L] int32 (pad_token_id)   labels [B, L] int32 (-100)   attention_mask [B, L] bool
  pixel_values [B, P, D] uint8            pixel_valid [B, P] bool      grid_thw [B, M, 3] int32
  sam_pixel_values [B, T, S, S, 3] uint8  sam_valid_hw [B, T, 2] int32 frame_valid [B, T] bool
  orig_hw [B, 2] int32
  gt_masks [B, T, N, S/4, S/4] bool       gt_classes [B, N] int32 (-1) gt_frame_valid [B, T, N] bool
  instance_valid [B, N] bool
  region_masks [B, R, S, S] bool          region_frame [B, R] int32    region_valid [B, R] bool
  cond_spans [B, C, 2] int32              cond_valid [B, C] bool
  seg_positions [B, G] int32              seg_valid [B, G] bool
  task_id [B] int32   num_frames [B] int32   sample_valid [B] bool

Pixels are uint8 (resized, not normalised: the encoders normalise them on the device,
`x2sam_jax.layers.pixels`, which reads `grid_thw` and `sam_valid_hw` for where the padding is).
Features with float pixels (already normalised by their maker) give a float batch instead: the
pixel arrays take the dtype of the features' pixels.

A batch in which no sample carries SAM frames (every sample chat) has none: T = 0 and R = 0
(`NO_FRAME_DIMS`), so `sam_pixel_values`, `gt_masks` and `region_masks` are empty. That shape is
the train step's static signal to run the LLM alone (`train.step.Task.language_only`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.tokenizer import IGNORE_LABEL

# The dimensions a batch without SAM frames (chat) pads to 0, whatever their buckets: no frames,
# and so no visual prompts (drawn on frames) either.
NO_FRAME_DIMS = ("frames", "regions")


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """Allowed padded sizes per dimension (sorted ascending). A sample larger than the largest
    bucket of any dimension is skipped as `exceeds_bucket` (robust.py), never truncated.

    `max_programs()` is the worst case; a source realises only a few combinations (its frame count
    and grid count are fixed, its text lengths span 2-3 buckets). To trade padding for fewer
    compiles, give a dimension a single bucket (e.g. conditions=(128,)), which pins its shape, or
    tie dimensions that grow together (`tied`): the dimensions of a group have bucket lists of one
    length and a batch takes the same position in all of them (the largest any of them needs), so
    a group adds as many programs as one of its lists."""

    seq_lengths: tuple[int, ...] = _powers_of_two(256, 32768)
    patch_counts: tuple[int, ...] = _powers_of_two(256, 65536)
    grids: tuple[int, ...] = (1, 2, 4, 8)  # images / videos per sample (grid_thw rows)
    frames: tuple[int, ...] = (1, 8)
    instances: tuple[int, ...] = _powers_of_two(1, 512)
    conditions: tuple[int, ...] = _powers_of_two(1, 1024)  # evaluation lists all categories (ADE-847)
    regions: tuple[int, ...] = _powers_of_two(1, 128)
    seg_tokens: tuple[int, ...] = _powers_of_two(1, 256)
    tied: tuple[tuple[str, ...], ...] = ()  # groups of dimensions that take the same bucket position

    def __post_init__(self):
        for name in self.dims():
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"BucketConfig.{name} must be sorted, unique, positive: {values}")
        object.__setattr__(self, "tied", tuple(tuple(group) for group in self.tied))
        seen = set()
        for group in self.tied:
            unknown = [n for n in group if n not in self.dims()]
            if unknown or seen & set(group):
                raise ValueError(f"BucketConfig.tied: {group} names an unknown dimension {unknown} or one "
                                 f"already tied; dimensions: {self.dims()}")
            seen |= set(group)
            if len({len(getattr(self, n)) for n in group}) != 1:
                raise ValueError(f"BucketConfig.tied: {group} need bucket lists of one length, got "
                                 f"{[getattr(self, n) for n in group]}")

    @staticmethod
    def dims() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(BucketConfig) if f.name != "tied")

    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The tied groups, then every other dimension on its own."""
        tied = {n for group in self.tied for n in group}
        return self.tied + tuple((n,) for n in self.dims() if n not in tied)

    def padded(self, sizes: dict[str, int]) -> dict[str, int]:
        """The bucket size of every dimension for the largest sizes of a batch (a tied group at the
        position its largest member needs); ExceedsBucket beyond the largest bucket."""
        position = {n: bucket_index(sizes.get(n, 0), getattr(self, n), n) for n in self.dims()}
        for group in self.tied:
            top = max(position[n] for n in group)
            position.update({n: top for n in group})
        return {n: getattr(self, n)[position[n]] for n in self.dims()}

    def max_programs(self) -> int:
        """Upper bound on distinct batch shapes for a fixed batch size and SAM size."""
        return int(np.prod([len(getattr(self, group[0])) for group in self.groups()]))


class ExceedsBucket(BadSample):
    """A sample with a dimension beyond the largest bucket (skipped and counted, not truncated)."""

    kind = "exceeds_bucket"


def bucket_index(n: int, buckets: Sequence[int], what: str) -> int:
    """Position of the smallest bucket >= n (at least the first bucket)."""
    for i, b in enumerate(buckets):
        if n <= b:
            return i
    raise ExceedsBucket(f"{what}={n} exceeds the largest bucket {buckets[-1]}")


def bucket_size(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n (at least the first bucket)."""
    return buckets[bucket_index(n, buckets, what)]


def sample_sizes(features: dict) -> dict[str, int]:
    """The variable sizes of one feature dict, by BucketConfig field name."""
    sam = features.get("sam_pixel_values")
    return {
        "seq_lengths": len(features["input_ids"]),
        "patch_counts": len(features["pixel_values"]) if "pixel_values" in features else 0,
        "grids": len(features["grid_thw"]) if "grid_thw" in features else 0,
        "frames": sam.shape[0] if sam is not None else 0,
        "instances": len(features["gt_classes"]) if "gt_classes" in features else 0,
        "conditions": len(features["cond_spans"]) if "cond_spans" in features else 0,
        "regions": len(features["region_frame"]) if "region_frame" in features else 0,
        "seg_tokens": len(features["seg_positions"]) if "seg_positions" in features else 0,
    }


def check_fits(features: dict, buckets: BucketConfig) -> None:
    """Raise ExceedsBucket when a sample cannot be padded into any bucket."""
    for name, n in sample_sizes(features).items():
        bucket_size(n, getattr(buckets, name), name)


def batch_shape_key(batch: dict) -> tuple:
    """The shapes that decide which compiled program a batch uses."""
    return tuple(sorted((k, v.shape) for k, v in batch.items() if isinstance(v, np.ndarray)))


# Which axis of which batch array each BucketConfig dimension sizes, and the padding value.
PADDED_AXES: dict[str, tuple[tuple[str, int], ...]] = {
    "seq_lengths": (("input_ids", 1), ("labels", 1), ("attention_mask", 1)),
    "patch_counts": (("pixel_values", 1), ("pixel_valid", 1)),
    "grids": (("grid_thw", 1),),
    "frames": (("sam_pixel_values", 1), ("sam_valid_hw", 1), ("frame_valid", 1), ("gt_masks", 1),
               ("gt_frame_valid", 1)),
    "instances": (("gt_masks", 2), ("gt_classes", 1), ("gt_frame_valid", 2), ("instance_valid", 1)),
    "conditions": (("cond_spans", 1), ("cond_valid", 1)),
    "regions": (("region_masks", 1), ("region_frame", 1), ("region_valid", 1)),
    "seg_tokens": (("seg_positions", 1), ("seg_valid", 1)),
}
PAD_VALUES = {"labels": IGNORE_LABEL, "gt_classes": -1}   # input_ids: the pad token; others: 0 / False


def batch_dims(batch: dict) -> dict[str, int]:
    """The padded size of every bucketed dimension of a collated batch (BucketConfig names)."""
    return {name: int(batch[axes[0][0]].shape[axes[0][1]]) for name, axes in PADDED_AXES.items()}


def pad_batch(batch: dict, dims: dict[str, int], pad_token_id: int) -> dict:
    """A collated batch padded further to larger sizes (e.g. the bucket sizes every host and every
    micro-batch of an optimizer step agreed on); padding as the Collator writes it. Arrays not
    named in PADDED_AXES (scalars, per-sample ids) are kept as they are."""
    out = dict(batch)
    for name, size in dims.items():
        for key, axis in PADDED_AXES[name]:
            array = out[key]
            extra = size - array.shape[axis]
            if extra < 0:
                raise ValueError(f"pad_batch: {key} has {array.shape[axis]} on axis {axis} ({name}), "
                                 f"more than the requested {size}")
            if extra:
                widths = [(0, 0)] * array.ndim
                widths[axis] = (0, extra)
                value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
                out[key] = np.pad(array, widths, constant_values=value)
    return out


PIXEL_KEYS = ("pixel_values", "sam_pixel_values")


def _pixel_dtype(features: Sequence[dict], key: str) -> np.dtype:
    """The one dtype of the samples' ``key`` pixels (uint8 when none has any): a float sample
    among uint8 ones would otherwise be cast to uint8 silently."""
    found = {np.asarray(f[key]).dtype for f in features if key in f}
    if len(found) > 1:
        raise ValueError(f"{key} of one batch mix dtypes {sorted(map(str, found))}: give every sample uint8 "
                         "pixels (make_features) or every sample normalised float pixels")
    return found.pop() if found else np.dtype(np.uint8)


class Collator:
    """Collates per-sample feature dicts into one padded batch of bucket shapes.

    Args:
      buckets: the allowed padded sizes.
      pad_token_id: the tokenizer's padding id.
      sam_size: S of `sam_pixel_values` (and of the other S-sized arrays) when no sample of a batch
        carries SAM pixels (chat: 0 frames; an all-padding batch: one padded frame).
      patch_dim: width of a Qwen patch row (3*2*16*16) when no sample carries pixel values.

    `pixel_values` and `sam_pixel_values` take the dtype of the samples' pixels (uint8 from
    `make_features`; uint8 when no sample carries any); samples of one batch must agree.
    """

    def __init__(self, buckets: BucketConfig = BucketConfig(), *, pad_token_id: int = 0, sam_size: int = 1024,
                 patch_dim: int = 3 * 2 * 16 * 16):
        self.buckets = buckets
        self.pad_token_id = int(pad_token_id)
        self.sam_size = int(sam_size)
        self.patch_dim = int(patch_dim)

    def padded_sizes(self, features: Sequence[dict]) -> dict[str, int]:
        """The bucket sizes of a batch of ``features``; 0 for `NO_FRAME_DIMS` when there are samples
        and none of them carries SAM frames (chat)."""
        sizes = [sample_sizes(f) for f in features]
        padded = self.buckets.padded({n: max((s[n] for s in sizes), default=0) for n in self.buckets.dims()})
        if features and not any("sam_pixel_values" in f for f in features):
            padded.update({name: 0 for name in NO_FRAME_DIMS})
        return padded

    def __call__(self, features: Sequence[dict], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """`batch_size` > len(features) appends all-padding rows with sample_valid False (eval)."""
        if not features and not batch_size:
            raise ValueError("cannot collate an empty list of samples without a batch_size")
        B = len(features) if batch_size is None else int(batch_size)
        if B < len(features):
            raise ValueError(f"batch_size={B} < {len(features)} samples")
        S = next((f["sam_pixel_values"].shape[1] for f in features if "sam_pixel_values" in f), self.sam_size)
        D = next((f["pixel_values"].shape[1] for f in features if "pixel_values" in f), self.patch_dim)
        dtypes = {key: _pixel_dtype(features, key) for key in PIXEL_KEYS}
        out = self.empty(B, self.padded_sizes(features), sam_size=S, patch_dim=D, pixel_dtypes=dtypes)
        for b, f in enumerate(features):
            self._fill(out, b, f)
        return out

    def empty(self, batch_size: int, size: dict[str, int], *, sam_size: int | None = None,
              patch_dim: int | None = None, pixel_dtypes: dict | None = None) -> dict[str, np.ndarray]:
        """An all-padding batch of ``batch_size`` rows and the padded sizes ``size`` (the shapes
        a compiled program takes); pixels uint8 unless ``pixel_dtypes`` says otherwise per key."""
        dtypes = {key: np.uint8 for key in PIXEL_KEYS} | (pixel_dtypes or {})
        B, S = batch_size, self.sam_size if sam_size is None else sam_size
        D = self.patch_dim if patch_dim is None else patch_dim
        L, P, M, T = size["seq_lengths"], size["patch_counts"], size["grids"], size["frames"]
        N, C, R, G = size["instances"], size["conditions"], size["regions"], size["seg_tokens"]
        Sm = S // 4

        out = {
            "input_ids": np.full((B, L), self.pad_token_id, np.int32),
            "labels": np.full((B, L), IGNORE_LABEL, np.int32),
            "attention_mask": np.zeros((B, L), bool),
            "pixel_values": np.zeros((B, P, D), dtypes["pixel_values"]),
            "pixel_valid": np.zeros((B, P), bool),
            "grid_thw": np.zeros((B, M, 3), np.int32),
            "sam_pixel_values": np.zeros((B, T, S, S, 3), dtypes["sam_pixel_values"]),
            "sam_valid_hw": np.zeros((B, T, 2), np.int32),
            "frame_valid": np.zeros((B, T), bool),
            "orig_hw": np.zeros((B, 2), np.int32),
            "gt_masks": np.zeros((B, T, N, Sm, Sm), bool),
            "gt_classes": np.full((B, N), -1, np.int32),
            "gt_frame_valid": np.zeros((B, T, N), bool),
            "instance_valid": np.zeros((B, N), bool),
            "region_masks": np.zeros((B, R, S, S), bool),
            "region_frame": np.zeros((B, R), np.int32),
            "region_valid": np.zeros((B, R), bool),
            "cond_spans": np.zeros((B, C, 2), np.int32),
            "cond_valid": np.zeros((B, C), bool),
            "seg_positions": np.zeros((B, G), np.int32),
            "seg_valid": np.zeros((B, G), bool),
            "task_id": np.zeros((B,), np.int32),
            "num_frames": np.zeros((B,), np.int32),
            "sample_valid": np.zeros((B,), bool),
        }
        return out

    @staticmethod
    def _fill(out: dict, b: int, f: dict) -> None:
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise BadSample(f"labels ({len(f['labels'])}) and input_ids ({n}) differ in length")
        out["input_ids"][b, :n] = f["input_ids"]
        out["labels"][b, :n] = f["labels"]
        out["attention_mask"][b, :n] = True
        if "pixel_values" in f:
            p = len(f["pixel_values"])
            out["pixel_values"][b, :p] = f["pixel_values"]
            out["pixel_valid"][b, :p] = True
        if "grid_thw" in f:
            out["grid_thw"][b, : len(f["grid_thw"])] = f["grid_thw"]
        if "sam_pixel_values" in f:
            t = f["sam_pixel_values"].shape[0]
            out["sam_pixel_values"][b, :t] = f["sam_pixel_values"]
            out["sam_valid_hw"][b, :t] = f["sam_valid_hw"]
            out["frame_valid"][b, :t] = True
        if "orig_hw" in f:
            out["orig_hw"][b] = f["orig_hw"]
        if "gt_classes" in f:
            k = len(f["gt_classes"])
            gt = np.asarray(f["gt_masks"])
            out["gt_masks"][b, : gt.shape[0], :k] = gt
            out["gt_classes"][b, :k] = f["gt_classes"]
            out["gt_frame_valid"][b, : gt.shape[0], :k] = f["gt_frame_valid"]
            out["instance_valid"][b, :k] = True
        if "region_frame" in f:
            r = len(f["region_frame"])
            out["region_masks"][b, :r] = f["region_masks"]
            out["region_frame"][b, :r] = f["region_frame"]
            out["region_valid"][b, :r] = True
        if "cond_spans" in f:
            c = len(f["cond_spans"])
            out["cond_spans"][b, :c] = np.asarray(f["cond_spans"]).reshape(c, 2)
            out["cond_valid"][b, :c] = True
        if "seg_positions" in f:
            g = len(f["seg_positions"])
            out["seg_positions"][b, :g] = f["seg_positions"]
            out["seg_valid"][b, :g] = True
        out["task_id"][b] = f.get("task_id", 0)
        out["num_frames"][b] = f.get("num_frames", out["frame_valid"][b].sum())
        out["sample_valid"][b] = True

