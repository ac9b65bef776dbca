"""``torch.nn.functional.interpolate`` for channels-last arrays, written out exactly.

Resizing is separable: each spatial axis is resampled by gathering a few source rows and
summing them with per-output weights. Indices and weights depend only on static sizes, so they
are computed with numpy at trace time (float32, as torch computes them on CPU), and the
gathers keep the result independent of matmul precision.

Conventions copied from ATen (``UpSample.h``):
- bilinear, align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped below at 0.
- bicubic, align_corners=False: the same source index without the clamp, Keys kernel with
  A = -0.75 over the taps floor(src)-1 .. floor(src)+2, taps clamped to the border.
- align_corners=True (both): src = dst * (in - 1) / (out - 1) (0 when out == 1).
- nearest (torch's legacy 'nearest'): src = min(floor(dst * in/out), in - 1).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75
METHODS = ("bilinear", "bicubic", "nearest")


def _source_coordinate(in_size: int, out_size: int, align_corners: bool, cubic: bool) -> np.ndarray:
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
        return dst * scale
    scale = np.float32(in_size / out_size)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    # Linear modes never read before the first pixel; cubic keeps negative coordinates.
    return src if cubic else np.maximum(src, np.float32(0.0))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 ([out, 4])."""
    a = np.float32(_CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1).astype(np.float32)


def _axis_taps(in_size: int, out_size: int, method: str, align_corners: bool):
    """Source indices [out, taps] and weights [out, taps] for resampling one axis."""
    if method == "nearest":
        if out_size == in_size:
            idx = np.arange(out_size)
        else:
            scale = np.float32(in_size / out_size)
            idx = np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64),
                             in_size - 1)
        return idx[:, None], np.ones((out_size, 1), np.float32)
    src = _source_coordinate(in_size, out_size, align_corners, cubic=(method == "bicubic"))
    base = np.floor(src).astype(np.int64)
    t = (src - base.astype(np.float32)).astype(np.float32)
    if method == "bilinear":
        idx = np.stack([base, np.minimum(base + 1, in_size - 1)], axis=-1)
        weights = np.stack([1 - t, t], axis=-1).astype(np.float32)
        return idx, weights
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return idx, _cubic_weights(t)


def _resample_axis(x: jnp.ndarray, axis: int, out_size: int, method: str, align_corners: bool):
    in_size = x.shape[axis]
    if in_size == out_size and method != "bicubic":
        # Identity for nearest/bilinear; bicubic at equal size is an identity too, but its
        # weights are exact only up to float rounding, so keep the general path for fidelity.
        return x
    idx, weights = _axis_taps(in_size, out_size, method, align_corners)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = None
    for tap in range(idx.shape[1]):
        gathered = jnp.take(x, jnp.asarray(idx[:, tap]), axis=axis).astype(compute_dtype)
        shape = [1] * x.ndim
        shape[axis] = out_size
        term = gathered * jnp.asarray(weights[:, tap]).reshape(shape)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def resize(x: jnp.ndarray, size: Sequence[int], *, method: str = "bilinear",
           align_corners: bool = False) -> jnp.ndarray:
    """Resizes ``x`` [..., H, W, C] to ``size`` = (H', W') exactly as torch ``F.interpolate``.

    ``method`` is "bilinear", "bicubic" or "nearest" (torch's legacy nearest; align_corners
    must stay False for it, as in torch). Output has x's dtype; math runs in float32 or wider.
    """
    if method not in METHODS:
        raise ValueError(f"resize: unknown method {method!r}; choose one of {METHODS}")
    if method == "nearest" and align_corners:
        raise ValueError("resize: align_corners=True is not defined for method='nearest' (as in torch)")
    if x.ndim < 3:
        raise ValueError(f"resize: expected an array [..., H, W, C], got shape {x.shape}")
    out_h, out_w = (int(s) for s in size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize: output size must be positive, got {tuple(size)}")
    # Width first, then height: the order ATen's CPU kernels accumulate in.
    x = _resample_axis(x, x.ndim - 2, out_w, method, align_corners)
    return _resample_axis(x, x.ndim - 3, out_h, method, align_corners)


def resize_numpy(x: np.ndarray, size: Sequence[int], *, method: str = "bilinear",
                 align_corners: bool = False) -> np.ndarray:
    """The numpy twin of `resize` for host-side post-processing: resizes the LAST two axes of
    ``x`` [..., H, W] (e.g. masks [K, H, W]) with the same taps, weights and float32 sums (width
    first), so it agrees with `resize` and torch bit for bit on CPU."""
    if method not in METHODS:
        raise ValueError(f"resize_numpy: unknown method {method!r}; choose one of {METHODS}")
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"resize_numpy: expected an array [..., H, W], got shape {x.shape}")
    out = x.astype(np.promote_types(x.dtype, np.float32))
    for axis, out_size in ((x.ndim - 1, int(size[1])), (x.ndim - 2, int(size[0]))):
        in_size = out.shape[axis]
        if in_size == out_size and method != "bicubic":
            continue
        idx, weights = _axis_taps(in_size, out_size, method, align_corners)
        shape = [1] * out.ndim
        shape[axis] = out_size
        total = None
        for tap in range(idx.shape[1]):
            term = np.take(out, idx[:, tap], axis=axis) * weights[:, tap].reshape(shape)
            total = term if total is None else total + term
        out = total
    return out.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else out
