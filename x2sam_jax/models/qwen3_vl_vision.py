"""Qwen3-VL vision encoder (ViT + patch merger + deepstack mergers), as transformers'
``Qwen3VLVisionModel``.

Input is what ``Qwen3VLProcessor`` produces: ``pixel_values`` [N, C*Tp*P*P], one row per patch,
several images/videos concatenated, each laid out frame by frame and, inside a frame, in
spatial-merge-block order (m x m patches that merge into one LLM token are consecutive); and
``grid_thw`` [M, 3] = (frames / Tp, rows, cols of patches) per image or video.

Everything that depends on ``grid_thw`` (the interpolated learned position table, the 2-D rotary
ids, which patches attend to each other) is computed with array ops from the patch index, so one
compiled function serves any ``grid_thw`` with the same static N. Rows of ``pixel_values`` beyond
sum(t*h*w) and all-zero rows of ``grid_thw`` are padding: they never touch real rows, and their
merged outputs are zero (padding values must be finite, e.g. zeros: a NaN would survive the
0-weight in the attention matmul).

Attention is dense over the packed rows with a same-segment mask (the chunked form bounds its
memory); cross-segment scores are computed and discarded, which costs FLOPs for long packs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from x2sam_jax.config import Qwen3VLVisionConfig
from x2sam_jax.layers.attention import Attention
from x2sam_jax.layers.scan import create_stack, run_stack

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}

_INIT = nnx.initializers.normal(0.02)


def _linear(features_in: int, features_out: int, names: tuple[str, str], config: Qwen3VLVisionConfig,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(features_in, features_out, dtype=jnp.dtype(config.dtype),
                      param_dtype=jnp.dtype(config.param_dtype),
                      kernel_init=nnx.with_partitioning(_INIT, names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def _layer_norm(features: int, config: Qwen3VLVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch, not E[x^2] - mean^2 (poor in bf16).
    return nnx.LayerNorm(features, epsilon=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                         param_dtype=jnp.dtype(config.param_dtype), use_fast_variance=False,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
                         rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Patch geometry from grid_thw (no Python ints taken from arrays)
# ----------------------------------------------------------------------------------------------


def patch_layout(grid_thw: jax.Array, num_patches: int, merge: int) -> dict[str, jax.Array]:
    """Per-patch geometry of a packed batch of ``num_patches`` rows.

    Returns a dict of [num_patches] arrays: ``row``/``col`` (patch coordinates inside its frame,
    decoded from the spatial-merge-block order), ``height``/``width`` (its frame's grid),
    ``segment`` (one id per frame of every image/video: patches attend within their segment;
    padding rows get their own id) and ``valid`` (False for padding rows).
    """
    grid_thw = grid_thw.astype(jnp.int32)
    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]
    counts = t * h * w
    ends = jnp.cumsum(counts)
    starts = ends - counts
    index = jnp.arange(num_patches, dtype=jnp.int32)
    # Which image/video a patch belongs to; zero-count (padding) grid rows are never chosen.
    item = jnp.searchsorted(ends, index, side="right")
    valid = item < grid_thw.shape[0]
    item = jnp.minimum(item, grid_thw.shape[0] - 1)
    height, width = h[item], w[item]
    frame_size = jnp.maximum(height * width, 1)
    offset = index - starts[item]
    frame = offset // frame_size
    within = offset % frame_size
    blocks_w = jnp.maximum(width // merge, 1)
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    # Every frame of every item is one attention segment (transformers' cu_seqlens); padding = -1.
    frames_before = jnp.cumsum(t) - t
    segment = jnp.where(valid, frames_before[item] + frame, -1)
    return {"row": block_row * merge + in_row, "col": block_col * merge + in_col,
            "height": height, "width": width, "segment": segment, "valid": valid}


def interpolation_taps(row: jax.Array, col: jax.Array, height: jax.Array, width: jax.Array,
                       side: int) -> tuple[jax.Array, jax.Array]:
    """Bilinear (align_corners=True) taps into the flattened side x side position table.

    Same arithmetic as transformers' ``get_vision_interpolation_indices_and_weights`` (float32
    source coordinate index * (side - 1) / max(size - 1, 1), taps clamped at the border).
    Returns indices [N, 4] and weights [N, 4] ordered (top-left, top-right, bottom-left, bottom-right).
    """

    def axis(index, size):
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        frac = src - floor
        lo = floor.astype(jnp.int32)
        taps = jnp.clip(jnp.stack([lo, lo + 1], -1), 0, side - 1)
        return taps, jnp.stack([1.0 - frac, frac], -1)

    h_taps, h_weights = axis(row, height)
    w_taps, w_weights = axis(col, width)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


def rotary_cos_sin(row: jax.Array, col: jax.Array, head_dim: int, theta: float):
    """2-D axial rotary tables [N, head_dim]: first quarter of the frequencies rotate by the row,
    the second by the column, and the pair is repeated (rotate-half layout)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2)))
    freqs = jnp.concatenate([row.astype(jnp.float32)[:, None] * inv_freq[:quarter],
                             col.astype(jnp.float32)[:, None] * inv_freq[:quarter]], axis=-1)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Holds ``proj`` (the Conv3d with stride = kernel) and applies it as one matmul per patch."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.proj = Conv3dPatchProjection(config, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


class Conv3dPatchProjection(nnx.Module):
    """Conv3d(C -> D, kernel = stride = (Tp, P, P)) on pre-cut patches: kernel [Tp, P, P, C, D]
    (the torch Conv3d weight in CONV3D layout), bias [D]."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        c = config
        shape = (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels, c.hidden_size)
        names = ("kernel_t", "kernel_h", "kernel_w", "conv_in", "embed")
        self.kernel = nnx.Param(_INIT(rngs.params(), shape, jnp.dtype(c.param_dtype)), out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((c.hidden_size,), jnp.dtype(c.param_dtype)), out_sharding=("embed",))
        self.dtype = jnp.dtype(c.dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        kt, kh, kw, cin, dim = self.kernel.shape
        # Patch rows are laid out (C, Tp, P, P), as the processor flattens them.
        matrix = jnp.transpose(self.kernel[...], (3, 0, 1, 2, 4)).reshape(cin * kt * kh * kw, dim)
        if pixel_values.shape[-1] != matrix.shape[0]:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[-1]} values, expected "
                             f"C*Tp*P*P = {cin}*{kt}*{kh}*{kw} = {matrix.shape[0]}")
        out = pixel_values.astype(self.dtype) @ matrix.astype(self.dtype)
        return out + self.bias[...].astype(self.dtype)


class VisionAttention(Attention):
    """Multi-head self-attention with 2-D rotary, restricted to patches of the same segment.

    Parameters ``qkv`` (packed) and ``proj``, as transformers names them.
    """

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        super().__init__(d, config.num_heads, d // config.num_heads, packed_name="qkv", out_name="proj",
                         make_linear=lambda name, din, dout, axes: _linear(din, dout, axes, config, rngs),
                         implementation=config.attention_implementation,
                         query_chunk=config.attention_query_chunk)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array) -> jax.Array:
        q, k, v = self.project(x)                                # [N, heads, head_dim]
        # Rotary in float32, as transformers does, then back to the compute dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        rotate = lambda t: (t.astype(jnp.float32) * cos + _rotate_half(t.astype(jnp.float32)) * sin)  # noqa: E731
        q, k = rotate(q).astype(x.dtype), rotate(k).astype(x.dtype)
        # One packed sequence (batch 1); patches attend within their segment (image / frame).
        return self.attend(q[None], k[None], v[None], segment_ids=(segment[None], segment[None]))[0]


class VisionMLP(nnx.Module):
    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Qwen3VLVisionConfig.hidden_act={config.hidden_act!r}; "
                             f"supported: {sorted(ACTIVATIONS)}")
        self.act = config.hidden_act
        self.linear_fc1 = _linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), config, rngs)
        self.linear_fc2 = _linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = checkpoint_name(ACTIVATIONS[self.act](self.linear_fc1(x)), "mlp_hidden")
        return checkpoint_name(self.linear_fc2(hidden), "mlp_out")


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config.hidden_size, config, rngs)
        self.norm2 = _layer_norm(config.hidden_size, config, rngs)
        self.attn = VisionAttention(config, rngs=rngs)
        self.mlp = VisionMLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, segment):
        x = x + self.attn(self.norm1(x), cos, sin, segment)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm, then m*m neighbouring patches concatenated, Linear-GELU(erf)-Linear to the LLM width.

    ``use_postshuffle_norm`` (the deepstack mergers) normalises after concatenation instead.
    """

    def __init__(self, config: Qwen3VLVisionConfig, *, use_postshuffle_norm: bool, rngs: nnx.Rngs):
        self.merged_size = config.hidden_size * config.spatial_merge_size ** 2
        self.use_postshuffle_norm = use_postshuffle_norm
        self.norm = _layer_norm(self.merged_size if use_postshuffle_norm else config.hidden_size, config, rngs)
        self.linear_fc1 = _linear(self.merged_size, self.merged_size, ("embed", "mlp"), config, rngs)
        self.linear_fc2 = _linear(self.merged_size, config.out_hidden_size, ("mlp", "embed"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVisionModel(nnx.Module):
    """Qwen3-VL ViT. Parameters (flat paths)::

        patch_embed.proj.{kernel [Tp,P,P,C,D], bias}      pos_embed.embedding [num_pos, D]
        blocks.{norm1,norm2}.{scale,bias}                 (stacked: leading axis = depth)
        blocks.attn.{qkv,proj}.{kernel,bias}              blocks.mlp.{linear_fc1,linear_fc2}.{kernel,bias}
        merger.{norm,linear_fc1,linear_fc2}.*             deepstack_merger_list.{j}.{norm,linear_fc1,linear_fc2}.*
    """

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c, rngs=rngs)
        self.pos_embed = nnx.Embed(c.num_position_embeddings, c.hidden_size, dtype=jnp.dtype(c.dtype),
                                   param_dtype=jnp.dtype(c.param_dtype),
                                   embedding_init=nnx.with_partitioning(_INIT, ("position", "embed")),
                                   rngs=rngs)
        self.blocks = create_stack(lambda r: VisionBlock(c, rngs=r), c.depth, rngs)
        self.merger = PatchMerger(c, use_postshuffle_norm=False, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(c, use_postshuffle_norm=True, rngs=rngs) for _ in c.deepstack_visual_indexes])

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes packed patches.

        Args:
          pixel_values: [N, C*Tp*P*P] patch rows (processor order); N must be a multiple of merge^2.
          grid_thw: int [M, 3] (t, h, w) per image/video in patches; all-zero rows are padding.

        Returns:
          (embeds [N // merge^2, out_hidden_size], deepstack [len(deepstack_visual_indexes),
          N // merge^2, out_hidden_size]); rows of padding patches are zero.
        """
        c = self.config
        unit = c.spatial_merge_size ** 2
        n = pixel_values.shape[0]
        if pixel_values.ndim != 2 or n % unit:
            raise ValueError(f"pixel_values must be [N, C*Tp*P*P] with N a multiple of "
                             f"{unit} (spatial_merge_size^2), got shape {pixel_values.shape}")
        if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw must be [M, 3] (t, h, w) with M >= 1, got shape {grid_thw.shape}")

        layout = patch_layout(grid_thw, n, c.spatial_merge_size)
        side = round(c.num_position_embeddings ** 0.5)
        indices, weights = interpolation_taps(layout["row"], layout["col"], layout["height"],
                                              layout["width"], side)
        pos = jnp.einsum("nkd,nk->nd", self.pos_embed.embedding[...][indices].astype(jnp.float32), weights)
        cos, sin = rotary_cos_sin(layout["row"], layout["col"], c.hidden_size // c.num_heads, c.rope_theta)

        hidden = self.patch_embed(pixel_values)
        hidden = hidden + pos.astype(hidden.dtype)

        def body(block, x, _):
            x = block(x, cos, sin, layout["segment"])
            return x, x

        hidden, per_layer = run_stack(self.blocks, hidden, body, scan=c.scan_layers, remat=c.remat_policy)

        keep = layout["valid"].reshape(-1, unit)[:, 0:1]  # merge groups never straddle real/padding
        embeds = jnp.where(keep, self.merger(hidden), 0)
        deepstack = [jnp.where(keep, merger(per_layer[i]), 0)
                     for i, merger in zip(c.deepstack_visual_indexes, self.deepstack_merger_list)]
        if deepstack:
            deepstack = jnp.stack(deepstack)
        else:
            deepstack = jnp.zeros((0,) + embeds.shape, embeds.dtype)
        return embeds, deepstack
