"""X2SAM pixel decoder: Mask2Former's multi-scale deformable-attention encoder + one FPN step.

Data flow (X2SAM, 1024 input): the three SAM2 FPN maps (256², 128², 64², highest resolution
first) each get a 1x1 conv + GroupNorm to ``hidden_size``; the encoder runs over all three
(lowest resolution first, as transformers orders them) with sine position embeddings plus a
learned level embedding; then the 256² input map gets a lateral 1x1 conv + GN, the upsampled
(bilinear) encoder output of the highest-resolution encoder level is added, and a 3x3 conv +
GN + ReLU and a 1x1 ``mask_projection`` give ``mask_features``. The decoder consumes the three
encoder outputs, lowest resolution first.

Parameter names follow transformers' ``Mask2FormerPixelDecoder`` (the conversion table is
``convert_weights/pixel_decoder.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax.config import PixelDecoderConfig
from x2sam_jax.layers.deformable import ms_deform_attn
from x2sam_jax.layers.interpolate import resize
from x2sam_jax.layers.position import sine_position_embedding
from x2sam_jax.layers.scan import create_stack, run_stack
from x2sam_jax.sharding import MAPS, TOKENS, constrain

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def dtypes(config) -> dict:
    """nnx layer dtype kwargs from a config's ``dtype`` (compute) and ``param_dtype`` (storage)."""
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          kernel_init=xavier, bias_init=zeros, use_bias: bool = True, **dt) -> nnx.Linear:
    """nnx.Linear whose kernel/bias carry logical axis names."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, **dt,
                      kernel_init=nnx.with_partitioning(kernel_init, names),
                      bias_init=nnx.with_partitioning(bias_init, (names[1],)), rngs=rngs)


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, **dt) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2], as torch computes it.
    return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, **dt,
                         scale_init=nnx.with_partitioning(ones, ("norm",)),
                         bias_init=nnx.with_partitioning(zeros, ("norm",)), rngs=rngs)


class ConvNorm(nnx.Module):
    """Conv2d (NHWC) + GroupNorm, optionally ReLU: transformers' Sequential(Conv2d, GroupNorm[, ReLU])."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, num_groups: int,
                 eps: float, use_bias: bool, relu: bool = False, rngs: nnx.Rngs, **dt):
        pad = kernel_size // 2
        self.conv = nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                             padding=((pad, pad), (pad, pad)), use_bias=use_bias, **dt,
                             kernel_init=nnx.with_partitioning(xavier, ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                             bias_init=nnx.with_partitioning(zeros, ("conv_out",)), rngs=rngs)
        self.norm = nnx.GroupNorm(out_channels, num_groups=num_groups, epsilon=eps, use_fast_variance=False, **dt,
                                  scale_init=nnx.with_partitioning(ones, ("norm",)),
                                  bias_init=nnx.with_partitioning(zeros, ("norm",)), rngs=rngs)
        self.relu = relu

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.norm(self.conv(x))
        return jax.nn.relu(x) if self.relu else x


def _sampling_offset_bias(num_heads: int, num_levels: int, num_points: int) -> np.ndarray:
    """Deformable DETR's initial offsets: head h points along angle 2*pi*h/heads, point p at (p+1)x."""
    thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid *= np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MultiscaleDeformableAttention(nnx.Module):
    """Deformable self-attention over the flattened levels (transformers' MSDeformAttn, 2-D references)."""

    def __init__(self, hidden_size: int, num_heads: int, num_levels: int, num_points: int, *, rngs: nnx.Rngs,
                 query_chunk_size: int | None = None, **dt):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.query_chunk_size = query_chunk_size
        offset_bias = _sampling_offset_bias(num_heads, num_levels, num_points)
        self.sampling_offsets = dense(hidden_size, num_heads * num_levels * num_points * 2, ("embed", "heads"),
                                      kernel_init=zeros, bias_init=lambda _, __, dtype: jnp.asarray(offset_bias, dtype),
                                      rngs=rngs, **dt)
        self.attention_weights = dense(hidden_size, num_heads * num_levels * num_points, ("embed", "heads"),
                                       kernel_init=zeros, rngs=rngs, **dt)
        self.value_proj = dense(hidden_size, hidden_size, ("embed", "heads"), rngs=rngs, **dt)
        self.output_proj = dense(hidden_size, hidden_size, ("heads", "embed"), rngs=rngs, **dt)

    def __call__(self, hidden: jnp.ndarray, position: jnp.ndarray, reference_points: jnp.ndarray,
                 spatial_shapes: tuple[tuple[int, int], ...]) -> jnp.ndarray:
        """hidden/position [B, S, D]; reference_points [S, 2] (x, y) in [0, 1], shared by all levels."""
        batch, seq, _ = hidden.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        query = hidden + position
        value = self.value_proj(hidden).reshape(batch, seq, heads, -1)
        offsets = self.sampling_offsets(query).reshape(batch, seq, heads, levels, points, 2)
        logits = self.attention_weights(query).reshape(batch, seq, heads, levels * points)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, seq, heads, levels, points)
        # Offsets are in pixels of each level: divide by (width, height).
        normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
        locations = (reference_points[None, :, None, None, None, :]
                     + offsets.astype(jnp.float32) / normalizer[None, None, None, :, None, :])
        out = ms_deform_attn(value, spatial_shapes, locations, weights, query_chunk_size=self.query_chunk_size)
        return self.output_proj(out.astype(hidden.dtype))


class PixelDecoderEncoderLayer(nnx.Module):
    """Post-norm: deformable self-attention -> add & LN -> FFN (ReLU) -> add & LN."""

    def __init__(self, config: PixelDecoderConfig, *, rngs: nnx.Rngs):
        d, dt = config.hidden_size, dtypes(config)
        self.self_attn = MultiscaleDeformableAttention(d, config.num_heads, config.num_encoder_levels,
                                                       config.num_points, rngs=rngs,
                                                       query_chunk_size=config.attention_query_chunk or 4096, **dt)
        self.self_attn_layer_norm = layer_norm(d, config.layer_norm_eps, rngs=rngs, **dt)
        self.fc1 = dense(d, config.ffn_dim, ("embed", "mlp"), rngs=rngs, **dt)
        self.fc2 = dense(config.ffn_dim, d, ("mlp", "embed"), rngs=rngs, **dt)
        self.final_layer_norm = layer_norm(d, config.layer_norm_eps, rngs=rngs, **dt)

    def __call__(self, hidden, position, reference_points, spatial_shapes):
        hidden = self.self_attn_layer_norm(
            hidden + self.self_attn(hidden, position, reference_points, spatial_shapes))
        return self.final_layer_norm(hidden + self.fc2(jax.nn.relu(self.fc1(hidden))))


@dataclasses.dataclass
class PixelDecoderOutput:
    mask_features: jnp.ndarray                     # [B, H/4, W/4, mask_feature_size]
    multi_scale_features: tuple[jnp.ndarray, ...]  # encoder outputs, lowest resolution first


jax.tree_util.register_dataclass(PixelDecoderOutput, data_fields=["mask_features", "multi_scale_features"],
                                 meta_fields=[])


def reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pixel centres of every level, normalised to [0, 1], as (x, y) [S, 2] (no padding masks)."""
    points = []
    for h, w in spatial_shapes:
        ref_y, ref_x = np.meshgrid((np.arange(h, dtype=np.float32) + 0.5) / np.float32(h),
                                   (np.arange(w, dtype=np.float32) + 0.5) / np.float32(w), indexing="ij")
        points.append(np.stack([ref_x.reshape(-1), ref_y.reshape(-1)], -1))
    return np.concatenate(points, 0).astype(np.float32)


class PixelDecoder(nnx.Module):
    def __init__(self, config: PixelDecoderConfig, *, rngs: nnx.Rngs):
        channels = tuple(config.feature_channels)
        if not 1 <= config.num_encoder_levels <= len(channels):
            raise ValueError(f"PixelDecoderConfig.num_encoder_levels={config.num_encoder_levels} must be in "
                             f"1..{len(channels)} (len(feature_channels))")
        if not 0 <= config.num_fpn_levels <= len(channels):
            raise ValueError(f"PixelDecoderConfig.num_fpn_levels={config.num_fpn_levels} must be in "
                             f"0..{len(channels)}")
        self.config = config
        d = config.hidden_size
        dt = dtypes(config)
        norm_kwargs = dict(num_groups=config.num_groups, eps=config.group_norm_eps, **dt)
        self.level_embed = nnx.Param(jnp.zeros((config.num_encoder_levels, d), dt["param_dtype"]),
                                     out_sharding=(None, "embed"))
        # input_projections[i] serves the i-th encoder level, lowest resolution first.
        encoder_channels = channels[len(channels) - config.num_encoder_levels:][::-1]
        self.input_projections = nnx.List([ConvNorm(c, d, 1, use_bias=True, rngs=rngs, **norm_kwargs)
                                           for c in encoder_channels])
        self.encoder_layers = create_stack(lambda r: PixelDecoderEncoderLayer(config, rngs=r),
                                           config.num_layers, rngs)
        # FPN step j serves input map j (adapter_1/layer_1 = the highest-resolution map).
        for j in range(config.num_fpn_levels):
            setattr(self, f"adapter_{j + 1}", ConvNorm(channels[j], d, 1, use_bias=False, rngs=rngs, **norm_kwargs))
            setattr(self, f"layer_{j + 1}", ConvNorm(d, d, 3, use_bias=False, relu=True, rngs=rngs, **norm_kwargs))
        self.mask_projection = nnx.Conv(
            d, config.mask_feature_size, (1, 1), padding="VALID", **dt,
            kernel_init=nnx.with_partitioning(xavier, ("kernel_h", "kernel_w", "conv_in", "conv_out")),
            bias_init=nnx.with_partitioning(zeros, ("conv_out",)), rngs=rngs)

    def __call__(self, features: Sequence[jnp.ndarray]) -> PixelDecoderOutput:
        """features: NHWC maps [B, h_i, w_i, C_i], highest resolution first."""
        cfg = self.config
        features = tuple(jnp.asarray(x, jnp.dtype(cfg.dtype)) for x in features)
        if len(features) != len(cfg.feature_channels):
            raise ValueError(f"PixelDecoder: expected {len(cfg.feature_channels)} feature maps, got {len(features)}")
        for i, (x, c) in enumerate(zip(features, cfg.feature_channels)):
            if x.ndim != 4 or x.shape[-1] != c:
                raise ValueError(f"PixelDecoder: features[{i}] must be [B, h, w, {c}], got {x.shape}")
        encoder_inputs = features[len(features) - cfg.num_encoder_levels:][::-1]  # lowest resolution first
        spatial_shapes = tuple((x.shape[1], x.shape[2]) for x in encoder_inputs)
        batch = features[0].shape[0]
        level_embed = self.level_embed[...]

        tokens, positions = [], []
        for level, x in enumerate(encoder_inputs):
            h, w = x.shape[1:3]
            projected = self.input_projections[level](x)
            tokens.append(projected.reshape(batch, h * w, -1))
            pos = sine_position_embedding(h, w, cfg.hidden_size // 2, dtype=projected.dtype)
            positions.append(pos.reshape(h * w, -1) + level_embed[level].astype(projected.dtype))
        hidden = constrain(jnp.concatenate(tokens, 1), TOKENS)
        position = jnp.concatenate(positions, 0)[None]
        refs = jnp.asarray(reference_points(spatial_shapes))

        def body(layer, carry, _):
            return constrain(layer(carry, position, refs, spatial_shapes), TOKENS), None

        hidden, _ = run_stack(self.encoder_layers, hidden, body, scan=cfg.scan_layers, remat=cfg.remat_policy)

        outputs, start = [], 0
        for h, w in spatial_shapes:
            outputs.append(hidden[:, start:start + h * w].reshape(batch, h, w, -1))
            start += h * w
        # FPN steps, lowest to highest resolution (transformers' lateral/output convolution order).
        for j in reversed(range(cfg.num_fpn_levels)):
            lateral = getattr(self, f"adapter_{j + 1}")(features[j])
            upsampled = resize(outputs[-1], lateral.shape[1:3], method="bilinear", align_corners=False)
            outputs.append(getattr(self, f"layer_{j + 1}")(lateral + upsampled))
        return PixelDecoderOutput(mask_features=constrain(self.mask_projection(outputs[-1]), MAPS),
                                  multi_scale_features=tuple(constrain(x, MAPS)
                                                             for x in outputs[:cfg.num_encoder_levels]))
