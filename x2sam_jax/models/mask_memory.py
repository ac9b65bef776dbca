"""Mask memory of X2SAM: memory attention, memory encoder, a fixed-shape FIFO bank, and the
per-frame loop as one ``jax.lax.scan`` (docs/architecture.md#mask-memory).

What the official code (``XSegmentor.forward``, SAM2 memory modules as modified by X2SAM) does
per frame t, and what this module reproduces:
1. at t = 0 the learned ``no_memory_embedding`` is added to every SAM level (before the pixel
   decoder);
2. pixel decoder -> ``mask_features`` and multi-scale features (scales 64², 128², 256²);
3. for t > 0, memory attention, one module shared by the 3 scales: 4 pre-norm layers
   (self-attention with 2-D axial RoPE on queries and keys, one table per scale;
   cross-attention to the bank with RoPE on the *queries only* — X2SAM passes
   ``key_rope_position_embeddings=(None, None)``, unlike SAM2 which rotates the memory keys
   too; ``rope_on_memory_keys=True`` gives the SAM2 behaviour); keys = memory + 2-D sine PE
   of the memory map + 1-D sinusoid of the frame gap, values = memory; query input = feature +
   0.1 x sine PE; final LayerNorm. At t = 0 the decoder gets the pixel-decoder features
   unchanged (the official code skips memory attention when the bank is empty);
4. mask decoder -> mask logits [B, Q, Hm, Wm] and class logits [B, Q, C+1] (background last);
5. memory encoder per scale on the *pre-memory* features: vision downsampler to the memory
   map (0/1/2 x [conv3x3 s2, x4 channels, LayerNorm2d, GELU] + 1x1 conv), mask guide
   = sum_q softmax_q(mask_logits + log p_q) * sigmoid(mask_logits), p_q = max non-background
   class probability (clamped at 1e-6), x20 - 10, mask downsampler (stride 4), sum, 2 ConvNeXt
   fuser blocks, 1x1 projection;
6. FIFO: the bank keeps the last K frames. Here it is a ring buffer of fixed shape
   ([K, B, h*w, C] per scale, frame index and validity [K, B], a write count [B]); attention
   masks invalid slots, so one compiled scan serves every clip length. A padded frame
   (``frame_valid`` False) writes nothing: each sample's ring advances on its own valid frames.

In the scan, memory attention (t > 0) and the memory encoder (t < T-1, the last frame's memory
is never read) run under ``lax.cond``, so no frame pays for work whose result is discarded; a
single frame (images) skips both statically. ``run_video(scan=False)`` is the reference: a
Python loop with the official list-based bank.

The frame gap encoding is X2SAM's ``get_temporal_encoding``: [sin(g*f), cos(g*f)] with
f_i = exp(-ln(1e4) * i / (C/2)), i < C/2.

All maps are channels-last: features [B, H, W, C], memory tokens [B, h*w, C] row-major.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from x2sam_jax.config import MemoryConfig
from x2sam_jax.layers.position import sine_position_embedding
from x2sam_jax.layers.attention import Attention
from x2sam_jax.layers.scan import create_stack, remat_policy, run_stack
from x2sam_jax.sharding import MAPS, TOKENS, constrain


# ---------------------------------------------------------------------------------------------
# Position encodings
# ---------------------------------------------------------------------------------------------

def axial_rope(height: int, width: int, head_dim: int, theta: float = 10000.0):
    """SAM2's 2-D axial RoPE table for a row-major [height*width] grid.

    Returns (cos, sin), each [height*width, head_dim] float32: the first half of the (pairwise
    interleaved) angles uses the x coordinate, the second half y, frequencies
    theta^(-4i/head_dim), i < head_dim/4.
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs head_dim divisible by 4, got {head_dim}")
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32)[: head_dim // 4] / head_dim))
    index = jnp.arange(height * width)
    x_pos = (index % width).astype(jnp.float32)
    y_pos = (index // width).astype(jnp.float32)
    angles = jnp.concatenate([jnp.outer(x_pos, freqs), jnp.outer(y_pos, freqs)], axis=-1)
    angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_pairwise(x):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, L, H, D] with tables [L, D] (computed in float32, as SAM2 forces)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, None, :] + _rotate_pairwise(x32) * sin[:, None, :]
    return out.astype(x.dtype)


def temporal_encoding(gap: jax.Array, dim: int) -> jax.Array:
    """X2SAM's 1-D sinusoid of the frame gap: [..., dim] = [sin(gap*f), cos(gap*f)]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(gap, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def _linear(in_features, out_features, names, rngs, dtype, param_dtype):
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
                      rngs=rngs)


def _layer_norm(features, eps, rngs, dtype, param_dtype):
    # Two-pass variance, as torch computes it.
    return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
                         rngs=rngs)


def _conv(in_features, out_features, kernel, stride, padding, rngs, dtype, param_dtype, groups=1):
    return nnx.Conv(in_features, out_features, kernel_size=(kernel, kernel), strides=stride,
                    padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                    dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                      ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
                    rngs=rngs)


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch ACT2FN["gelu"]


class RoPEAttention(Attention):
    """SAM2 ``RoPEAttention``: q/k/v/o projections, RoPE on queries (and optionally keys)."""

    def __init__(self, config: MemoryConfig, kv_in_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        internal_dim = config.hidden_size // config.downsample_rate
        super().__init__(config.hidden_size, config.num_heads, internal_dim // config.num_heads, kv_dim=kv_in_dim,
                         make_linear=lambda name, din, dout, axes: _linear(din, dout, axes, rngs, dtype, param_dtype),
                         implementation=config.attention_implementation, query_chunk=config.attention_query_chunk)
        self.attention_dropout = nnx.Dropout(config.attention_dropout, deterministic=True, rngs=rngs)

    def __call__(self, query, key, value, query_rope, key_rope=None, key_mask=None):
        q, k, v = self.project(query, key, value)
        q = apply_rope(q, *query_rope)
        if key_rope is not None:
            k = apply_rope(k, *key_rope)
        dropout = self.attention_dropout
        training = not dropout.deterministic and dropout.rate > 0
        return self.attend(q, k, v, key_mask=key_mask, dropout_rate=dropout.rate if training else 0.0,
                           dropout_key=dropout.rngs() if training else None)


class MemoryAttentionLayer(nnx.Module):
    """Pre-norm: RoPE self-attention, cross-attention to memory, ReLU FFN."""

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        hidden = config.hidden_size
        self.self_attn = RoPEAttention(config, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.cross_attn = RoPEAttention(config, config.memory_dim, rngs=rngs, dtype=dtype,
                                        param_dtype=param_dtype)
        self.linear1 = _linear(hidden, config.mlp_dim, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.linear2 = _linear(config.mlp_dim, hidden, ("mlp", "embed"), rngs, dtype, param_dtype)
        self.layer_norm1 = _layer_norm(hidden, config.layer_norm_eps, rngs, dtype, param_dtype)
        self.layer_norm2 = _layer_norm(hidden, config.layer_norm_eps, rngs, dtype, param_dtype)
        self.layer_norm3 = _layer_norm(hidden, config.layer_norm_eps, rngs, dtype, param_dtype)
        self.dropout = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.dropout1 = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.dropout2 = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.dropout3 = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.rope_on_memory_keys = config.rope_on_memory_keys

    def __call__(self, queries, memory, memory_pos, query_rope, key_mask):
        x = self.layer_norm1(queries)
        queries = queries + self.dropout1(self.self_attn(x, x, x, query_rope, query_rope))

        key_rope = None
        if self.rope_on_memory_keys:
            # SAM2: the query table repeated over the memory entries (memory length = k * Lq).
            repeats = memory.shape[1] // queries.shape[1]
            if repeats * queries.shape[1] != memory.shape[1]:
                raise ValueError(f"rope_on_memory_keys: memory length {memory.shape[1]} is not a multiple "
                                 f"of the query length {queries.shape[1]}")
            key_rope = tuple(jnp.tile(t, (repeats, 1)) for t in query_rope)
        x = self.layer_norm2(queries)
        queries = queries + self.dropout2(
            self.cross_attn(x, memory + memory_pos, memory, query_rope, key_rope, key_mask))

        x = self.layer_norm3(queries)
        x = checkpoint_name(self.linear2(self.dropout(checkpoint_name(jax.nn.relu(self.linear1(x)), "mlp_hidden"))),
                            "mlp_out")
        return queries + self.dropout3(x)


class MemoryAttention(nnx.Module):
    """Conditions one scale of features on the memory bank (shared across scales).

    Parameters: ``layers`` (stacked, leading 'layers' axis) and ``layer_norm``.
    """

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.layers = create_stack(
            lambda r: MemoryAttentionLayer(config, rngs=r, dtype=dtype, param_dtype=param_dtype),
            config.num_layers, rngs)
        self.layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs, dtype, param_dtype)

    def __call__(self, features: jax.Array, memory: jax.Array, memory_pos: jax.Array,
                 memory_mask: jax.Array | None = None, *, query_pos: jax.Array | None = None,
                 scan: bool = True) -> jax.Array:
        """features [B, H, W, C]; memory [B, M, Cm]; memory_pos [B or 1, M, Cm];
        memory_mask [B or 1, M] bool (True = attend). ``query_pos`` [H*W, C] defaults to the
        2-D sine PE of the SAM2 neck (C/2 features per axis, normalised)."""
        batch, height, width, channels = features.shape
        if query_pos is None:
            query_pos = sine_position_embedding(height, width, channels // 2).reshape(height * width, channels)
        queries = features.reshape(batch, height * width, channels)
        queries = queries + self.config.query_pos_scale * query_pos.astype(queries.dtype)
        head_dim = self.config.hidden_size // (self.config.downsample_rate * self.config.num_heads)
        rope = axial_rope(height, width, head_dim, self.config.rope_theta)
        memory_pos = jnp.broadcast_to(memory_pos, memory.shape).astype(memory.dtype)

        def body(layer, carry, _):
            return constrain(layer(carry, memory, memory_pos, rope, memory_mask), TOKENS), None

        queries, _ = run_stack(self.layers, queries, body, scan=scan, remat=self.config.remat_policy)
        return constrain(self.layer_norm(queries).reshape(batch, height, width, channels), MAPS)


class DownSamplerLayer(nnx.Module):
    """conv3x3 stride 2 (channels x stride²), LayerNorm over channels (eps 1e-6), GELU."""

    def __init__(self, config: MemoryConfig, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = _conv(in_channels, out_channels, config.downsampler_kernel_size,
                          config.downsampler_stride, config.downsampler_padding, rngs, dtype, param_dtype)
        self.layer_norm = _layer_norm(out_channels, 1e-6, rngs, dtype, param_dtype)

    def __call__(self, x):
        return _gelu(self.layer_norm(self.conv(x)))


def _num_downsample_layers(total_stride: int, stride: int) -> int:
    # The official int(log2(total) // log2(stride)), exact for powers of the stride.
    layers = 0
    while stride ** (layers + 1) <= total_stride:
        layers += 1
    if stride ** layers != total_stride:
        raise ValueError(f"total stride {total_stride} is not a power of the downsampler stride {stride}")
    return layers


class DownSampler(nnx.Module):
    """SAM2 ``MaskDownSampler`` / ``FeatureDownSampler``: ``layers`` then a 1x1 ``final_conv``."""

    def __init__(self, config: MemoryConfig, in_channels: int, out_channels: int, total_stride: int,
                 *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        num = _num_downsample_layers(total_stride, config.downsampler_stride)
        factor = config.downsampler_stride ** 2
        layers = []
        channels = in_channels
        for _ in range(num):
            layers.append(DownSamplerLayer(config, channels, channels * factor, rngs=rngs, dtype=dtype,
                                           param_dtype=param_dtype))
            channels *= factor
        self.layers = nnx.List(layers)
        self.final_conv = _conv(channels, out_channels, 1, 1, 0, rngs, dtype, param_dtype)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final_conv(x)


class MemoryFuserBlock(nnx.Module):
    """ConvNeXt block: 7x7 depthwise, LayerNorm, pointwise MLP (GELU), layer scale, residual."""

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        dim = config.hidden_size
        self.depthwise_conv = _conv(dim, dim, config.fuser_kernel_size, 1, config.fuser_kernel_size // 2,
                                    rngs, dtype, param_dtype, groups=dim)
        self.layer_norm = _layer_norm(dim, 1e-6, rngs, dtype, param_dtype)
        self.pointwise_conv1 = _linear(dim, config.fuser_mlp_dim, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.pointwise_conv2 = _linear(config.fuser_mlp_dim, dim, ("mlp", "embed"), rngs, dtype, param_dtype)
        self.scale = nnx.Param(jnp.full((dim,), config.layer_scale_init, param_dtype),
                               out_sharding=("norm",))

    def __call__(self, x):
        y = self.layer_norm(self.depthwise_conv(x))
        y = self.pointwise_conv2(_gelu(self.pointwise_conv1(y)))
        return x + self.scale[...].astype(y.dtype) * y


class MemoryFuser(nnx.Module):
    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.layers = create_stack(
            lambda r: MemoryFuserBlock(config, rngs=r, dtype=dtype, param_dtype=param_dtype),
            config.fuser_num_layers, rngs)

    def __call__(self, x, *, scan: bool = True):
        x, _ = run_stack(self.layers, x, lambda layer, carry, _: (layer(carry), None), scan=scan)
        return x


def mask_guide(mask_logits: jax.Array, class_logits: jax.Array | None, *,
               use_class_guidance: bool = True) -> jax.Array:
    """sum_q w_q * sigmoid(mask_q), w = softmax over queries of (mask logits + log p_q).

    mask_logits [B, Q, H, W]; class_logits [B, Q, C+1] (background last). Returns [B, H, W]
    float32, as the official ``Sam2MemoryEncoder`` (class guidance) computes it.
    """
    mask_logits = mask_logits.astype(jnp.float32)
    if use_class_guidance:
        if class_logits is None:
            raise ValueError("mask_guide: class guidance needs class_logits [B, Q, C+1]")
        probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
        score_bias = jnp.log(jnp.maximum(probs.max(axis=-1), 1e-6))[..., None, None]
        weights = jax.nn.softmax(mask_logits + score_bias, axis=1)
    else:
        weights = jax.nn.softmax(mask_logits, axis=1)
    return (weights * jax.nn.sigmoid(mask_logits)).sum(axis=1)


class MemoryEncoder(nnx.Module):
    """Encodes one frame's pre-memory features of one scale plus its prediction into memory.

    Parameters: ``mask_downsampler.{layers.{j}.{conv,layer_norm}, final_conv}``,
    ``memory_fuser.layers.*`` (stacked), ``vision_downsampler.{s}.{layers.{j}, final_conv}``,
    ``projection``.
    """

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        hidden = config.hidden_size
        if config.use_mask_guidance:
            self.mask_downsampler = DownSampler(config, 1, hidden, config.mask_stride, rngs=rngs,
                                                dtype=dtype, param_dtype=param_dtype)
            self.memory_fuser = MemoryFuser(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.vision_downsampler = nnx.List([
            DownSampler(config, hidden, hidden, stride, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for stride in config.feature_strides])
        self.projection = _conv(hidden, config.memory_dim, 1, 1, 0, rngs, dtype, param_dtype)

    def __call__(self, features: jax.Array, class_logits: jax.Array | None,
                 mask_logits: jax.Array, scale_index: int) -> jax.Array:
        """features [B, h, w, C] of scale ``scale_index`` (static); mask_logits [B, Q, Hm, Wm].
        Returns the memory map [B, hm, wm, memory_dim]."""
        x = self.vision_downsampler[scale_index](features)
        if self.config.use_mask_guidance:
            guide = mask_guide(mask_logits, class_logits,
                               use_class_guidance=self.config.use_class_guidance)
            guide = guide * self.config.sigmoid_scale + self.config.sigmoid_bias
            guide = self.mask_downsampler(guide[..., None].astype(x.dtype))
            if guide.shape != x.shape:
                raise ValueError(f"MemoryEncoder: downsampled mask {guide.shape} does not match the "
                                 f"downsampled features {x.shape} of scale {scale_index}")
            x = self.memory_fuser(x + guide)
        return constrain(self.projection(x), MAPS)

    def position_embedding(self, height: int, width: int) -> jax.Array:
        """[height*width, memory_dim]: the 2-D sine PE of the memory map."""
        dim = self.config.memory_dim
        return sine_position_embedding(height, width, dim // 2).reshape(height * width, dim)


# ---------------------------------------------------------------------------------------------
# The bank and the loop over frames
# ---------------------------------------------------------------------------------------------

class MemoryBank(NamedTuple):
    """Fixed-shape FIFO ring buffer of the last K valid frames of every sample."""

    memory: tuple[jax.Array, ...]   # per scale [K, B, h*w, memory_dim]
    frame_index: jax.Array          # [K, B] int32, frame each slot holds
    valid: jax.Array                # [K, B] bool
    count: jax.Array                # [B] int32, frames written so far (the next slot is count % K)


def _write_back(modules, new_state: nnx.State) -> None:
    """Writes the scan's non-parameter state back into ``modules``.

    With active dropout everything is written (and NNX raises if the modules belong to an outer
    trace, as a dropout call would). Otherwise variables that cannot be written from this trace
    (e.g. RNG counters of modules merged from a state captured outside ``jax.grad``) are left
    alone: without random draws nothing in them changed.
    """
    active = any(isinstance(node, nnx.Dropout) and node.rate > 0 and node.deterministic is False
                 for _, node in nnx.iter_graph(modules))
    if not active:
        targets = dict(nnx.iter_graph(modules))
        flat = [(path, value) for path, value in nnx.to_flat_state(new_state)
                if getattr(targets.get(path), "_can_update", True)]
        new_state = nnx.State.from_flat_path(flat)
    nnx.update(modules, new_state)


def _module_cond(pred, module: nnx.Module, true_fn, false_fn, *operands):
    """``jax.lax.cond`` over ``fn(module, *operands)``; the module's state (e.g. dropout RNG
    counters) goes in and out of the branches explicitly, so updates are kept."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def branch(fn):
        def run(params, rest, *ops):
            inner = nnx.merge(graphdef, params, rest)
            out = fn(inner, *ops)
            return nnx.state(inner, nnx.Not(nnx.Param)), out
        return run

    rest, out = jax.lax.cond(pred, branch(true_fn), branch(false_fn), params, rest, *operands)
    nnx.update(module, rest)  # parameters are read-only here
    return out


PixelDecode = Callable[[Any, tuple, Any], tuple]
MaskDecode = Callable[[Any, tuple, jax.Array, Any], tuple]


class MaskMemory(nnx.Module):
    """Memory attention + memory encoder + ``no_memory_embedding`` and the per-frame loop.

    Flat parameter paths: ``memory_attention.*``, ``memory_encoder.*``, ``no_memory_embedding``
    (1x1xC), matching the official ``segmentor.{memory_attention, memory_encoder,
    no_memory_embedding}`` (``cross_attn`` is the official name of the memory cross-attention).
    """

    def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=None):
        """``dtype`` / ``param_dtype`` default to the config's."""
        dtype = jnp.dtype(dtype or config.dtype)
        param_dtype = jnp.dtype(param_dtype or config.param_dtype)
        if config.num_memory_frames < 1:
            raise ValueError(f"MemoryConfig.num_memory_frames must be >= 1, got {config.num_memory_frames}")
        self.config = config
        self.memory_attention = MemoryAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.memory_encoder = MemoryEncoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.truncated_normal(0.02)
        self.no_memory_embedding = nnx.Param(init(rngs.params(), (1, 1, config.hidden_size), param_dtype),
                                             out_sharding=(None, None, "norm"))

    # -- pieces of one frame -------------------------------------------------------------------

    def add_no_memory(self, level_features: Sequence[jax.Array], is_first: jax.Array) -> tuple:
        """Adds ``no_memory_embedding`` to every level when ``is_first`` (traced bool)."""
        embed = self.no_memory_embedding[...].reshape(-1)
        return tuple(f + jnp.where(is_first, embed, 0.0).astype(f.dtype) for f in level_features)

    def encode(self, features: Sequence[jax.Array], class_logits, mask_logits) -> tuple:
        """Per-scale memory tokens [B, hm*wm, memory_dim] from pre-memory features."""
        out = []
        for scale, feat in enumerate(features):
            memory = self.memory_encoder(feat, class_logits, mask_logits, scale)
            out.append(memory.reshape(memory.shape[0], -1, memory.shape[-1]))
        return tuple(out)

    def memory_map_sizes(self, features: Sequence[jax.Array]) -> tuple[tuple[int, int], ...]:
        """Static (h, w) of every scale's memory map (stride-2 padded convs round up)."""
        if len(features) != len(self.config.feature_strides):
            raise ValueError(f"MaskMemory: {len(features)} feature scales, but feature_strides="
                             f"{self.config.feature_strides} configures {len(self.config.feature_strides)}")
        return tuple((-(-f.shape[1] // s), -(-f.shape[2] // s))
                     for f, s in zip(features, self.config.feature_strides))

    def init_bank(self, batch: int, memory_lengths: Sequence[int], dtype=jnp.float32) -> MemoryBank:
        k = self.config.num_memory_frames
        return MemoryBank(
            memory=tuple(jnp.zeros((k, batch, n, self.config.memory_dim), dtype) for n in memory_lengths),
            frame_index=jnp.zeros((k, batch), jnp.int32),
            valid=jnp.zeros((k, batch), bool),
            count=jnp.zeros((batch,), jnp.int32))

    def push(self, bank: MemoryBank, frame: jax.Array, memories: Sequence[jax.Array],
             frame_valid: jax.Array | None = None) -> MemoryBank:
        """Writes each sample's memories of ``frame`` into its slot count % K (its oldest entry
        once full); samples whose frame is padding (``frame_valid`` [B] False) write nothing."""
        batch = bank.count.shape[0]
        write = jnp.ones((batch,), bool) if frame_valid is None else frame_valid.astype(bool)
        slot = bank.count % self.config.num_memory_frames                                   # [B]
        here = (jnp.arange(self.config.num_memory_frames)[:, None] == slot[None]) & write[None]   # [K, B]
        memory = tuple(jnp.where(here[:, :, None, None], m.astype(bank.memory[s].dtype)[None], bank.memory[s])
                       for s, m in enumerate(memories))
        return MemoryBank(memory=memory,
                          frame_index=jnp.where(here, frame, bank.frame_index),
                          valid=bank.valid | here,
                          count=bank.count + write.astype(jnp.int32))

    def attend(self, bank: MemoryBank, frame: jax.Array, features: Sequence[jax.Array],
               memory_sizes: Sequence[tuple[int, int]]) -> tuple:
        """Memory attention of every scale against the bank; features unchanged when the bank
        is empty (t = 0), as the official code skips the attention then."""
        k = self.config.num_memory_frames
        usable = (bank.valid & (bank.frame_index < frame)).T                               # [B, K]
        gap_pe = temporal_encoding(frame - bank.frame_index.T, self.config.memory_dim)       # [B, K, Cm]
        out = []
        for scale, feat in enumerate(features):
            memory = bank.memory[scale]                                                 # [K, B, N, Cm]
            batch, n = memory.shape[1], memory.shape[2]
            spatial = self.memory_encoder.position_embedding(*memory_sizes[scale])      # [N, Cm]
            pos = (spatial[None, None] + gap_pe[:, :, None]).reshape(batch, k * n, -1)
            tokens = memory.transpose(1, 0, 2, 3).reshape(batch, k * n, -1)
            mask = jnp.repeat(usable, n, axis=1)                                        # [B, K*N]
            attended = self.memory_attention(feat, tokens, pos, mask)
            out.append(jnp.where(usable.any(1)[:, None, None, None], attended.astype(feat.dtype), feat))
        return tuple(out)

    def attend_reference(self, entries: list[dict], frame: int, features: Sequence[jax.Array],
                         memory_sizes: Sequence[tuple[int, int]]) -> tuple:
        """The official list-based retrieval: concatenate the stored entries (oldest first)."""
        if not entries:
            return tuple(features)
        out = []
        for scale, feat in enumerate(features):
            spatial = self.memory_encoder.position_embedding(*memory_sizes[scale])
            tokens = jnp.concatenate([e["memory"][scale] for e in entries], axis=1)
            pos = jnp.concatenate([
                (spatial + temporal_encoding(jnp.asarray(frame - e["frame"]), self.config.memory_dim))[None]
                for e in entries], axis=1)
            out.append(self.memory_attention(feat, tokens, pos, None))
        return tuple(out)

    # -- the clip ------------------------------------------------------------------------------

    def run_video(self, decoders, pixel_decode: PixelDecode, mask_decode: MaskDecode,
                  level_features: Sequence[jax.Array], frame_inputs=None, *, frame_valid=None,
                  scan: bool = True, remat: str = "none", bank: MemoryBank | None = None,
                  first_frame=0, keep_bank: bool = False):
        """Runs the per-frame pipeline over a clip.

        Args:
          decoders: any pytree of NNX modules the two callbacks use (e.g. the segmentor);
            passed back to them as their first argument. Split/merged around the scan, so
            their non-parameter state (dropout RNG counters) advances correctly.
          pixel_decode: ``(decoders, level_features, frame_inputs) -> (mask_features [B, Hm,
            Wm, C], multi_scale_features)``, the latter a tuple of [B, h_s, w_s, C] in the
            memory-scale order of ``MemoryConfig.feature_strides`` (64², 128², 256²).
          mask_decode: ``(decoders, multi_scale_features, mask_features, frame_inputs) ->
            (outputs, mask_logits [B, Q, Hm', Wm'], class_logits [B, Q, C+1] or None)``; the
            last-layer logits feed the memory encoder; ``outputs`` (any pytree of arrays with
            a leading batch axis) are returned per frame.
          level_features: the SAM levels of every frame, each [B, T, H, W, C].
          frame_inputs: optional pytree of per-frame arrays [B, T, ...] (e.g. per-frame
            condition embeddings), sliced to [B, ...] for each frame.
          frame_valid: optional [B, T] bool; a padded frame (False) is decoded but never written
            to its sample's memory bank (default: every frame is real).
          scan: ``jax.lax.scan`` over frames (one compile for any T) or a Python loop with the
            official list-based FIFO (the reference path).
          remat: remat policy of the per-frame step (scan path only).
          bank, first_frame, keep_bank: a clip of a longer video (streaming, scan path only).
            ``bank`` is the memory entering the clip (None: empty) and ``first_frame`` (may be
            traced) the video's index of the clip's first frame: frame gaps, the first frame's
            ``no_memory_embedding`` and the FIFO run on video indices. With ``keep_bank`` every
            real frame is written, the last one too (the next clip reads it), and the bank
            leaving the clip is returned.
        Returns:
          outputs stacked per frame, [B, T, ...] for every leaf; with ``keep_bank`` (outputs, bank).
        """
        num_frames = level_features[0].shape[1]
        batch = level_features[0].shape[0]
        frames_first = lambda tree: jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), tree)  # noqa: E731
        xs_features = frames_first(tuple(level_features))
        xs_inputs = frames_first(frame_inputs)

        if not scan:
            if bank is not None or keep_bank:
                raise ValueError("run_video: bank / keep_bank need scan=True")
            return self._run_video_loop(decoders, pixel_decode, mask_decode, xs_features, xs_inputs,
                                        num_frames, frame_valid)
        if frame_valid is None:
            frame_valid = jnp.ones((batch, num_frames), bool)
        xs_valid = jnp.moveaxis(jnp.asarray(frame_valid, bool), 1, 0)                      # [T, B]

        graphdef, params, rest = nnx.split((self, decoders), nnx.Param, ...)

        def step(carry, xs):
            rest, bank = carry
            frame, features, inputs, valid = xs
            memory_module, decoder_modules = nnx.merge(graphdef, params, rest)
            features = memory_module.add_no_memory(features, frame == 0)
            mask_features, multi_scale = pixel_decode(decoder_modules, features, inputs)
            if not use_memory:  # a single frame never reads the bank: skip both memory modules
                outputs, _, _ = mask_decode(decoder_modules, tuple(multi_scale), mask_features, inputs)
                return (nnx.state((memory_module, decoder_modules), nnx.Not(nnx.Param)), bank), outputs
            sizes = memory_module.memory_map_sizes(multi_scale)
            # Real branches (lax.cond), so frame 0 pays no memory attention and the last frame
            # no memory encoder, as in the official loop (which skips the former and discards
            # the latter).
            refined = _module_cond(
                frame > 0, memory_module,
                lambda m, bank, ms: m.attend(bank, frame, ms, sizes),
                lambda m, bank, ms: tuple(ms), bank, tuple(multi_scale))
            outputs, mask_logits, class_logits = mask_decode(decoder_modules, refined, mask_features, inputs)
            bank = _module_cond(
                (frame < last_frame) | keep_bank, memory_module,
                lambda m, bank, ms, cls, masks: m.push(bank, frame, m.encode(ms, cls, masks), valid),
                lambda m, bank, ms, cls, masks: bank, bank, tuple(multi_scale), class_logits, mask_logits)
            new_rest = nnx.state((memory_module, decoder_modules), nnx.Not(nnx.Param))
            return (new_rest, bank), outputs

        if remat != "none":
            step = jax.checkpoint(step, policy=remat_policy(remat))

        use_memory = num_frames > 1 or keep_bank
        if bank is None and use_memory:
            bank = self._bank_for(decoders, pixel_decode, xs_features, xs_inputs, batch)
        frames = jnp.asarray(first_frame, jnp.int32) + jnp.arange(num_frames, dtype=jnp.int32)
        last_frame = frames[-1]
        (rest, bank), outputs = jax.lax.scan(step, (rest, bank), (frames, xs_features, xs_inputs, xs_valid))
        _write_back((self, decoders), rest)
        outputs = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs)
        return (outputs, bank) if keep_bank else outputs

    def _bank_for(self, decoders, pixel_decode, xs_features, xs_inputs, batch) -> MemoryBank:
        """An empty bank whose shapes follow from one abstract frame of the pixel decoder."""
        first = jax.tree.map(lambda a: a[0], (xs_features, xs_inputs))
        graphdef, state = nnx.split(decoders)

        def probe(state, features, inputs):
            return pixel_decode(nnx.merge(graphdef, state), features, inputs)

        mask_features, multi_scale = jax.eval_shape(probe, state, *first)
        sizes = self.memory_map_sizes(multi_scale)
        # The bank holds memories in the compute dtype (what the encoder produces and attention reads).
        return self.init_bank(batch, [h * w for h, w in sizes], jnp.dtype(self.config.dtype))

    def _run_video_loop(self, decoders, pixel_decode, mask_decode, xs_features, xs_inputs, num_frames,
                        frame_valid):
        try:
            all_valid = frame_valid is None or bool(jnp.all(frame_valid))
        except jax.errors.ConcretizationTypeError:
            all_valid = False
        if not all_valid:  # the official list-based bank is shared by the batch: no per-sample skips
            raise ValueError("run_video(scan=False) is the official reference loop and needs concrete, "
                             "all-True frame_valid; use scan=True for padded frames")
        entries: list[dict] = []
        outputs = []
        for t in range(num_frames):
            features, inputs = jax.tree.map(lambda a: a[t], (xs_features, xs_inputs))
            features = self.add_no_memory(features, jnp.asarray(t == 0))
            mask_features, multi_scale = pixel_decode(decoders, features, inputs)
            sizes = self.memory_map_sizes(multi_scale)
            refined = self.attend_reference(entries, t, multi_scale, sizes)
            frame_outputs, mask_logits, class_logits = mask_decode(decoders, refined, mask_features, inputs)
            memories = self.encode(multi_scale, class_logits, mask_logits)
            if len(entries) >= self.config.num_memory_frames:
                entries.pop(0)
            entries.append({"frame": t, "memory": memories})
            outputs.append(frame_outputs)
        return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outputs)
