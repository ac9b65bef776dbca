"""Video clip sampling: which frame indices form the fixed-length clips the model sees.

Two modes (the official X2SAM `_sample_frames`):
- stride: consecutive frames (every `stride`-th frame) cut into clips of `clip_len`; with
  stride s there are s interleaved frame sequences starting at 0..s-1. The last clip of a
  sequence longer than `clip_len` is shifted back to end at its last frame (overlapping the one
  before), so every frame is covered by a full-length clip (one clip shape; evaluation merges
  overlaps by taking the earlier clip's prediction); a shorter sequence is one short clip.
- span: `clip_len` frames spread evenly over the whole video (step = max(1, L // clip_len)),
  one clip per start offset 0..ceil(L / clip_len) - 1; together they cover the video except,
  when step > 1 and L is not a multiple of clip_len, up to its last few frames (as the official).
Clips are sorted by their first frame. Training draws one clip at random; evaluation walks all.
"""

from __future__ import annotations

import math

import numpy as np

CLIP_MODES = ("stride", "span")


def stride_clips(num_frames: int, clip_len: int = 8, stride: int = 1) -> list[list[int]]:
    if num_frames <= 0 or clip_len <= 0 or stride <= 0:
        raise ValueError(f"need positive sizes, got num_frames={num_frames} clip_len={clip_len} stride={stride}")
    if num_frames == 1:
        return [[0]]
    clips = []
    for start in range(stride):
        sequence = list(range(start, num_frames, stride))
        for i in range(0, len(sequence), clip_len):
            clip = sequence[i : i + clip_len] if i + clip_len <= len(sequence) else sequence[-clip_len:]
            if clip not in clips:
                clips.append(clip)
    return sorted(clips, key=lambda c: c[0])


def span_clips(num_frames: int, clip_len: int = 8) -> list[list[int]]:
    if num_frames <= 0 or clip_len <= 0:
        raise ValueError(f"need positive sizes, got num_frames={num_frames} clip_len={clip_len}")
    step = max(1, num_frames // clip_len)
    clips = [list(range(start, num_frames, step))[:clip_len] for start in range(math.ceil(num_frames / clip_len))]
    return sorted([c for c in clips if c], key=lambda c: c[0])


def all_clips(num_frames: int, mode: str = "stride", clip_len: int = 8, stride: int = 1) -> list[list[int]]:
    if mode == "stride":
        return stride_clips(num_frames, clip_len, stride)
    if mode == "span":
        return span_clips(num_frames, clip_len)
    raise ValueError(f"unknown clip mode {mode!r}; expected one of {CLIP_MODES}")


def choose_clip(
    num_frames: int, rng: np.random.Generator, mode: str = "stride", clip_len: int = 8, stride: int = 1
) -> list[int]:
    """One clip drawn uniformly (training)."""
    clips = all_clips(num_frames, mode, clip_len, stride)
    return clips[int(rng.integers(len(clips)))]
