"""torch-exact bilinear ``grid_sample`` and multi-scale deformable attention in plain JAX.

``grid_sample`` follows ATen's ``grid_sampler_2d`` (bilinear, zeros padding): a normalised
coordinate g in [-1, 1] maps to the pixel coordinate ``((g + 1) * size - 1) / 2``
(align_corners=False) or ``(g + 1) / 2 * (size - 1)`` (align_corners=True); the four
neighbours are weighted by the opposite-corner areas and a neighbour outside the map
contributes zero.

``ms_deform_attn`` is the Deformable-DETR attention core (transformers'
``multi_scale_deformable_attention``, which the official X2SAM's CUDA kernel computes too):
per query, head, level and point, bilinearly sample the level's value map at the sampling
location (in [0, 1], align_corners=False, zero padding) and sum with the attention weights.
All levels are gathered from one flattened value array with a single gather, so the cost does
not grow with Python loops over levels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _unnormalize(coord: jnp.ndarray, size, align_corners: bool) -> jnp.ndarray:
    """Normalised coordinate in [-1, 1] -> pixel coordinate, as ATen's grid_sampler_unnormalize."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _bilinear_corners(ix: jnp.ndarray, iy: jnp.ndarray, height, width):
    """Flat indices and weights of the 4 bilinear neighbours (nw, ne, sw, se), shape [..., 4].

    ``height``/``width`` broadcast against ``ix``/``iy``. Neighbours outside the map get weight
    0 (zeros padding) and a clipped, valid index, so a gather never reads out of bounds.
    """
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1
    y1 = y0 + 1
    corners_x = (x0, x1, x0, x1)
    corners_y = (y0, y0, y1, y1)
    weights = ((x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0))
    indices, masked = [], []
    for cx, cy, w in zip(corners_x, corners_y, weights):
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
        xi = jnp.clip(cx, 0, width - 1).astype(jnp.int32)
        yi = jnp.clip(cy, 0, height - 1).astype(jnp.int32)
        indices.append(yi * jnp.asarray(width, jnp.int32) + xi)
        masked.append(jnp.where(inside, w, 0.0))
    return jnp.stack(indices, -1), jnp.stack(masked, -1)


def grid_sample(value: jnp.ndarray, grid: jnp.ndarray, *, align_corners: bool = False) -> jnp.ndarray:
    """torch ``F.grid_sample(mode="bilinear", padding_mode="zeros")`` for channels-last maps.

    Args:
      value: [B, H, W, C].
      grid: [B, *spatial, 2], (x, y) in [-1, 1] (x indexes W, y indexes H, as in torch).
      align_corners: torch's flag.

    Returns:
      [B, *spatial, C] in ``value``'s dtype (weights and sums in float32).
    """
    if value.ndim != 4:
        raise ValueError(f"grid_sample: value must be [B, H, W, C], got shape {value.shape}")
    if grid.shape[0] != value.shape[0] or grid.shape[-1] != 2:
        raise ValueError(f"grid_sample: grid must be [B, ..., 2] with B={value.shape[0]}, got {grid.shape}")
    batch, height, width, channels = value.shape
    spatial = grid.shape[1:-1]
    grid = grid.reshape(batch, -1, 2).astype(jnp.float32)
    ix = _unnormalize(grid[..., 0], width, align_corners)
    iy = _unnormalize(grid[..., 1], height, align_corners)
    indices, weights = _bilinear_corners(ix, iy, height, width)           # [B, N, 4]
    flat = value.reshape(batch, height * width, channels)
    gathered = jnp.take_along_axis(flat, indices.reshape(batch, -1, 1), axis=1)  # [B, N*4, C]
    gathered = gathered.reshape(batch, -1, 4, channels).astype(jnp.float32)
    out = jnp.sum(gathered * weights[..., None], axis=2)
    return out.reshape(batch, *spatial, channels).astype(value.dtype)


def level_start_indices(spatial_shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Offsets of each level in the flattened (level-concatenated) sequence."""
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    return tuple(int(s) for s in np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def ms_deform_attn(value: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]],
                   sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray, *,
                   query_chunk_size: int | None = None) -> jnp.ndarray:
    """Multi-scale deformable attention core.

    Args:
      value: [B, S, heads, head_dim], the levels flattened row-major and concatenated in the
        order of ``spatial_shapes`` (S = sum h*w).
      spatial_shapes: static ((h, w), ...) per level.
      sampling_locations: [B, Q, heads, L, P, 2], (x, y) in [0, 1] of each level.
      attention_weights: [B, Q, heads, L, P] (already softmax-normalised).
      query_chunk_size: process queries in sequential chunks of this size (``lax.map``), which
        bounds the gathered [chunk, L*P*4, head_dim] block; None = all queries at once.

    Returns:
      [B, Q, heads * head_dim] in ``value``'s dtype.

    The gathered block is never kept for the backward pass (``jax.checkpoint``): gradients
    recompute it from the inputs, so memory stays at the size of the inputs and outputs.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    batch, seq, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if sum(h * w for h, w in spatial_shapes) != seq:
        raise ValueError(f"ms_deform_attn: spatial_shapes {spatial_shapes} cover "
                         f"{sum(h * w for h, w in spatial_shapes)} positions, value has {seq}")
    if levels != len(spatial_shapes):
        raise ValueError(f"ms_deform_attn: {levels} levels in sampling_locations, "
                         f"{len(spatial_shapes)} spatial shapes")
    heights = jnp.asarray([h for h, _ in spatial_shapes], jnp.float32)[:, None]  # [L, 1] vs [.., L, P]
    widths = jnp.asarray([w for _, w in spatial_shapes], jnp.float32)[:, None]
    starts = jnp.asarray(level_start_indices(spatial_shapes), jnp.int32)[:, None, None]
    per_query = levels * points * 4

    @jax.checkpoint
    def sample(value_by_head, locations, weights):
        num = locations.shape[1]
        # Same arithmetic chain as the reference: grid = 2 * loc - 1, then grid_sample's unnormalize.
        grid = 2 * locations.astype(jnp.float32) - 1
        ix = _unnormalize(grid[..., 0], widths, align_corners=False)    # [B, q, heads, L, P]
        iy = _unnormalize(grid[..., 1], heights, align_corners=False)
        indices, corner_weights = _bilinear_corners(ix, iy, heights, widths)   # [B, q, heads, L, P, 4]
        indices = indices + starts
        corner_weights = corner_weights * weights.astype(jnp.float32)[..., None]
        # One gather over all levels, points and corners per (batch, head).
        indices = indices.transpose(0, 2, 1, 3, 4, 5).reshape(batch, heads, num * per_query, 1)
        corner_weights = corner_weights.transpose(0, 2, 1, 3, 4, 5).reshape(batch, heads, num, per_query, 1)
        gathered = jnp.take_along_axis(value_by_head, indices, axis=2)
        gathered = gathered.reshape(batch, heads, num, per_query, head_dim).astype(jnp.float32)
        out = jnp.sum(gathered * corner_weights, axis=3)                       # [B, heads, q, head_dim]
        return out.transpose(0, 2, 1, 3).reshape(batch, num, heads * head_dim).astype(value.dtype)

    value_by_head = value.transpose(0, 2, 1, 3)                     # [B, heads, S, head_dim]
    if query_chunk_size is None or queries <= query_chunk_size:
        return sample(value_by_head, sampling_locations, attention_weights)
    chunks = -(-queries // query_chunk_size)
    pad = chunks * query_chunk_size - queries

    def split(x):  # [B, Q, ...] -> [chunks, B, chunk, ...], zero-padded (padded rows are dropped)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, chunks, query_chunk_size, *x.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(lambda args: sample(value_by_head, *args),
                      (split(sampling_locations), split(attention_weights)))
    return out.swapaxes(0, 1).reshape(batch, chunks * query_chunk_size, -1)[:, :queries]
