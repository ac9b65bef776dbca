"""Region sampler of X2SAM (no parameters; docs/architecture.md#region-sampler).

For every visual-prompt mask (at SAM input resolution) the official ``NaiveSamplerModel``:
1. takes the nonzero pixel coordinates (row-major order), normalised as (row/H, col/W);
2. keeps them as they are when there are exactly P (=256), draws a random subset of P in random
   order (``randperm``) when there are more, and appends random repeats (``randint``) when
   there are fewer;
3. samples the extra_projector map bilinearly at those points (``grid_sample``,
   align_corners=True, point (x, y) = (col/W, row/H));
4. average-pools along the points with kernel 4 -> P/4 tokens of LLM width.

Here it is jittable with fixed shapes: a top_k over per-pixel scores picks the points (random
scores when the mask has more than P pixels, descending "row-major" scores otherwise), and the
repeats index the first ``count`` picks. Regions are batched with a validity mask; an empty
mask yields zero tokens and ``valid=False`` (the official code would crash on it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from x2sam_jax.layers.deformable import grid_sample


def sample_region_points(masks: jax.Array, key: jax.Array, num_points: int = 256):
    """Picks ``num_points`` pixels of each mask, as the official ``rand_sample_repeat``.

    Args:
      masks: [..., H, W] (bool or numeric; nonzero = inside).
      key: PRNG key; the same key gives the same points.
    Returns:
      points [..., P, 2] float32 (row/H, col/W) — the official ``m.nonzero() / [H, W]`` order;
      count [...] int32 (number of pixels in the mask).
    """
    *lead, height, width = masks.shape
    flat = masks.reshape(-1, height * width) != 0
    num_regions, num_pixels = flat.shape
    if num_pixels < num_points:
        raise ValueError(f"sample_region_points: a {height}x{width} mask has fewer pixels than "
                         f"num_points={num_points}")
    count = flat.sum(axis=-1).astype(jnp.int32)
    score_key, repeat_key = jax.random.split(key)
    random_scores = jax.random.uniform(score_key, (num_regions, num_pixels))
    # With at most P pixels every pixel is kept in row-major order: larger score = earlier pixel.
    ordered_scores = 1.0 - jnp.arange(num_pixels, dtype=jnp.float32) / num_pixels
    scores = jnp.where((count > num_points)[:, None], random_scores, ordered_scores[None, :])
    scores = jnp.where(flat, scores, -1.0)
    _, picked = jax.lax.top_k(scores, num_points)                       # [R, P]
    # Slots past `count` repeat one of the first `count` picks, uniformly (torch.randint).
    uniform = jax.random.uniform(repeat_key, (num_regions, num_points))
    repeat_slot = jnp.minimum(jnp.floor(uniform * count[:, None]).astype(jnp.int32),
                              jnp.maximum(count[:, None] - 1, 0))
    slot = jnp.arange(num_points, dtype=jnp.int32)[None, :]
    source_slot = jnp.where(slot < count[:, None], slot, repeat_slot)
    picked = jnp.take_along_axis(picked, source_slot, axis=-1)
    rows = (picked // width).astype(jnp.float32)
    cols = (picked % width).astype(jnp.float32)
    points = jnp.stack([rows / height, cols / width], axis=-1)
    return points.reshape(*lead, num_points, 2), count.reshape(lead)


def region_tokens(feature_map: jax.Array, masks: jax.Array, key: jax.Array, *,
                  region_valid: jax.Array | None = None, num_points: int = 256,
                  pool_kernel: int = 4):
    """Region tokens for ``<region>`` placeholders.

    Args:
      feature_map: the extra_projector output of the prompt frame, [B, h, w, D] or tokens
        [B, h*w, D] of a square grid (as the official code assumes).
      masks: prompt masks [B, R, H, W] at SAM input resolution.
      key: PRNG key for the point draw.
      region_valid: [B, R] bool, padded region slots (default: all valid).
    Returns:
      tokens [B, R, num_points // pool_kernel, D] (feature dtype; zero for invalid regions),
      valid [B, R] (region_valid and the mask is nonempty).
    """
    if feature_map.ndim == 3:
        side = int(round(feature_map.shape[1] ** 0.5))
        if side * side != feature_map.shape[1]:
            raise ValueError(f"region_tokens: {feature_map.shape[1]} tokens do not form a square grid; "
                             "pass the map as [B, h, w, D]")
        feature_map = feature_map.reshape(feature_map.shape[0], side, side, feature_map.shape[-1])
    if masks.ndim != 4 or masks.shape[0] != feature_map.shape[0]:
        raise ValueError(f"region_tokens: masks must be [B, R, H, W] with B={feature_map.shape[0]}, "
                         f"got {masks.shape}")
    if num_points % pool_kernel:
        raise ValueError(f"region_tokens: num_points={num_points} is not a multiple of "
                         f"pool_kernel={pool_kernel}")
    batch, num_regions = masks.shape[:2]
    points, count = sample_region_points(masks, key, num_points)     # [B, R, P, 2] (y, x)
    grid = 2.0 * points[..., ::-1] - 1.0           # the official flip(dims=(2,)), then 2p - 1
    sampled = grid_sample(feature_map, grid, align_corners=True)     # [B, R, P, D]
    pooled = sampled.reshape(batch, num_regions, num_points // pool_kernel, pool_kernel, -1)
    pooled = pooled.astype(jnp.float32).mean(3)
    valid = count > 0
    if region_valid is not None:
        valid = valid & region_valid.astype(bool)
    pooled = jnp.where(valid[..., None, None], pooled, 0.0)
    return pooled.astype(feature_map.dtype), valid
