"""Pixel normalisation, on the device: batches carry the resized pixels as uint8 (a quarter of
float32's bytes from host to device) and the encoders normalise them first thing.

Both encoders normalise as their reference processors do, (x * (1/255) - mean) / std in float32:
Qwen3-VL with mean = std = 0.5, SAM2 with ImageNet's mean and std. Every uint8 value has one
result per channel, so the normalisation is a gather from a [C, 256] float32 table computed with
those float32 ops (bit-identical to the arithmetic, and to the host's normalisation before
pixels travelled as uint8), then the cast to the compute dtype. Padding comes out 0.0, as a
zero-padded normalised batch has it: Qwen patch rows beyond sum(t*h*w) of ``grid_thw`` and SAM
pixels outside each frame's resized size ``valid_hw``.

Float pixels are taken as already normalised and pass through unchanged (the dtype decides, at
trace time): transformers' processor outputs and hand-made float batches keep working.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

QWEN_MEAN = (0.5, 0.5, 0.5)        # Qwen3-VL's preprocessor_config.json image_mean / image_std
QWEN_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM2
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=8)
def normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    """[C, 256] float32: every uint8 value normalised with the reference's float32 ops."""
    levels = np.arange(256, dtype=np.float32)[None, :] * np.float32(1 / 255)
    table = (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False
    return table


def _lookup(pixels: jax.Array, channel: jax.Array, mean, std) -> jax.Array:
    """float32 table[channel, pixels]; ``channel`` broadcasts against ``pixels``."""
    table = jnp.asarray(normalize_table(tuple(mean), tuple(std)).reshape(-1))
    index = channel.astype(jnp.int32) * 256 + pixels.astype(jnp.int32)
    return jnp.take(table, index, mode="clip")   # in range by construction; clip skips the bounds mask


def normalize_patches(patches: jax.Array, grid_thw: jax.Array, dtype, *, channels: int = 3,
                      mean=QWEN_MEAN, std=QWEN_STD) -> jax.Array:
    """Qwen3-VL patch rows [N, C*Tp*P*P] (``data.transforms.patchify`` order: the channel is
    the slowest of a row) -> ``dtype``; rows beyond sum(t*h*w) of ``grid_thw`` [M, 3] are 0.
    Float rows are returned as they are."""
    if patches.dtype != jnp.uint8:
        return patches
    width = patches.shape[-1]
    if width % channels:
        raise ValueError(f"uint8 pixel_values rows have {width} values, not a multiple of {channels} channels")
    channel = jnp.arange(width) // (width // channels)
    real = jnp.arange(patches.shape[-2]) < jnp.prod(grid_thw.astype(jnp.int32), axis=-1).sum(-1)[..., None]
    return jnp.where(real[..., None], _lookup(patches, channel, mean, std), 0).astype(dtype)


def normalize_frames(frames: jax.Array, valid_hw: jax.Array | None, dtype, *, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> jax.Array:
    """SAM2 frames [..., H, W, C] (zero-padded bottom/right) -> ``dtype``; pixels outside each
    frame's resized size ``valid_hw`` [..., 2] (rows, cols) are 0. Float frames are returned as
    they are."""
    if frames.dtype != jnp.uint8:
        return frames
    if valid_hw is None:
        raise ValueError("uint8 SAM pixels need sam_valid_hw (each frame's size before zero padding): "
                         "the padding must be 0 after normalisation")
    height, width, channels = frames.shape[-3:]
    valid_hw = valid_hw.astype(jnp.int32)
    inside = ((jnp.arange(height)[:, None] < valid_hw[..., None, None, 0])
              & (jnp.arange(width)[None, :] < valid_hw[..., None, None, 1]))
    return jnp.where(inside[..., None], _lookup(frames, jnp.arange(channels), mean, std), 0).astype(dtype)
