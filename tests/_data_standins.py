"""Small stand-in sources and feature functions for the mixture / batching / pipeline tests.

They follow the interfaces of docs/data.md#sources-and-samples (a source: name, task, __len__,
__getitem__ -> Sample, frame_count; a feature fn: (Sample, rng) -> feature dict) at a tiny SAM
size, so the pipeline is tested without images or a tokenizer.
"""

from __future__ import annotations

import numpy as np

from x2sam_jax.data.schema import BadSample, Instance, Sample

SAM = 32  # tiny SAM input size (masks at SAM / 4)
PATCH_DIM = 8


class ToySource:
    """`size` samples; sample i has `frames[i]` frames; indices in `bad` raise the given errors."""

    def __init__(self, name, size, *, task="gen_seg", frames=None, bad=None):
        self.name, self.task, self._size = name, task, size
        self._frames = list(frames) if frames is not None else [1] * size
        self.bad = dict(bad or {})  # index -> exception instance raised by __getitem__
        self.calls = 0

    def __len__(self):
        return self._size

    def frame_count(self, i):
        return self._frames[i]

    def __getitem__(self, i):
        i = int(i)
        self.calls += 1
        if i in self.bad:
            raise self.bad[i]
        t = self._frames[i]
        inst = Instance(masks=[None] * t, category="thing")
        return Sample(dataset=self.name, task=self.task, sample_id=str(i),
                      frames=[f"{self.name}/{i}_{k}.jpg" for k in range(t)], height=20, width=30,
                      instances=[inst] * (1 + i % 3), meta={"index": i})


def toy_features(sample: Sample, rng: np.random.Generator) -> dict:
    """Feature dict whose sizes depend on the sample, and whose values encode (source, index, rng)."""
    i = int(sample.meta["index"])
    if sample.meta.get("corrupt_in_features"):
        raise OSError("cannot identify image file")
    t = sample.num_frames
    n_inst = len(sample.instances)
    seq = 10 + (7 * i) % 50
    n_patch = 4 * (1 + i % 5)
    ids = np.arange(seq, dtype=np.int32) + 1000 * (sum(map(ord, sample.dataset)) % 7)
    ids[0] = i
    noise = rng.random()  # makes the augmentation RNG visible in the batch
    return {
        "input_ids": ids,
        "labels": np.where(np.arange(seq) > seq // 2, ids, -100).astype(np.int32),
        "pixel_values": np.full((n_patch, PATCH_DIM), noise, np.float32),
        "grid_thw": np.array([[t, 2, n_patch // 2]], np.int32),
        "sam_pixel_values": np.full((t, SAM, SAM, 3), i, np.float32),
        "sam_valid_hw": np.tile(np.array([[20, 30]], np.int32), (t, 1)),
        "orig_hw": np.array([20, 30], np.int32),
        "gt_masks": np.ones((t, n_inst, SAM // 4, SAM // 4), bool),
        "gt_classes": np.arange(n_inst, dtype=np.int32),
        "gt_frame_valid": np.ones((t, n_inst), bool),
        "region_masks": np.zeros((1, SAM, SAM), bool),
        "region_frame": np.zeros((1,), np.int32),
        "cond_spans": np.array([[1, 3]] * n_inst, np.int32),
        "seg_positions": np.array([seq - 2], np.int32),
        "task_id": np.int32(0),
        "num_frames": np.int32(t),
    }


def empty_mask_error(index):
    return BadSample(f"toy[{index}]: instance 0 has an empty mask")
