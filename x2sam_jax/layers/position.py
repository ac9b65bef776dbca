"""2-D sine position embedding of DETR / Mask2Former / SAM2, channels-last.

transformers' ``Sam2SinePositionEmbedding`` and ``Mask2FormerSinePositionEmbedding`` compute the
same thing: per pixel, cumulative row/column counts (1-based, over valid pixels when a mask is
given), optionally normalised to (0, scale], divided by temperature ** (2*floor(i/2)/F) and
mapped to interleaved [sin, cos, sin, cos, ...]; the y features come first, then x.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def sine_position_embedding(height: int, width: int, num_pos_feats: int, *,
                            temperature: float = 10000.0, normalize: bool = True,
                            scale: float = 2 * math.pi, mask: jnp.ndarray | None = None,
                            dtype=jnp.float32) -> jnp.ndarray:
    """Sine position embedding [H, W, 2*num_pos_feats], or [B, H, W, 2*num_pos_feats] with a mask.

    ``mask`` [B, H, W] marks valid pixels with 1/True (transformers' ``pixel_mask`` convention);
    padded pixels do not advance the counts. Computed in float32, returned in ``dtype``.
    """
    if num_pos_feats % 2:
        raise ValueError(f"sine_position_embedding: num_pos_feats must be even, got {num_pos_feats}")
    if mask is None:
        y_embed = jnp.broadcast_to(jnp.arange(1, height + 1, dtype=jnp.float32)[:, None], (height, width))
        x_embed = jnp.broadcast_to(jnp.arange(1, width + 1, dtype=jnp.float32)[None, :], (height, width))
    else:
        if mask.shape[-2:] != (height, width):
            raise ValueError(f"sine_position_embedding: mask shape {mask.shape} does not end with "
                             f"({height}, {width})")
        valid = mask.astype(jnp.float32)
        y_embed = jnp.cumsum(valid, axis=-2)
        x_embed = jnp.cumsum(valid, axis=-1)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[..., -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[..., :, -1:] + eps) * scale

    # Computed in float32 from integer exponents, as torch does with arange(...).to(float32).
    exponent = 2 * (jnp.arange(num_pos_feats) // 2).astype(jnp.float32) / num_pos_feats
    dim_t = jnp.asarray(temperature, jnp.float32) ** exponent

    def encode(embed):
        angles = embed[..., None] / dim_t
        # Pair (sin of even, cos of odd) channels and interleave them, like stack(...).flatten().
        pairs = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
        return pairs.reshape(*angles.shape[:-1], num_pos_feats)

    return jnp.concatenate([encode(y_embed), encode(x_embed)], axis=-1).astype(dtype)
