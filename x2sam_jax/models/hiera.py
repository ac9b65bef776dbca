"""SAM2 / SAM2.1 image encoder: Hiera trunk + FPN neck, channels-last (NHWC).

Numerically follows transformers' ``Sam2VisionModel`` (= the official ``ImageEncoder`` with
``scalp=1``):

  pixels [B,H,W,3] -> 7x7/4 patch conv -> + windowed absolute position embedding
    (background table bicubically resized to the token grid, plus a tiled window table)
  -> blocks: pre-norm (windowed or global) multi-head attention + GELU MLP; the first block of
     stages 1..3 max-pools its queries 2x2 (and the projected shortcut) to halve the resolution
  -> 4 stage outputs (strides 4, 8, 16, 32)
  -> FPN neck: 1x1 lateral convs to 256 ch; levels in ``fpn_top_down_levels`` add the 2x nearest
     upsampled coarser level; the ``num_feature_levels`` finest levels are returned, finest first,
     each with its 2-D sine position encoding.

Parameter paths mirror the transformers names (``backbone.blocks.{i}.attn.qkv.kernel``,
``neck.convs.{i}.kernel``) so the converter table reads like a dictionary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from x2sam_jax.config import HieraConfig
from x2sam_jax.layers.attention import IMPLEMENTATIONS, Attention
from x2sam_jax.layers.interpolate import resize
from x2sam_jax.layers.pixels import normalize_frames
from x2sam_jax.layers.position import sine_position_embedding
from x2sam_jax.layers.scan import remat_policy
from x2sam_jax.sharding import MAPS, constrain

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@struct.dataclass
class Sam2VisionEncoderOutput:
    """Encoder outputs, NHWC.

    fpn_hidden_states: the ``num_feature_levels`` FPN maps, highest resolution first (for 1024
      input and 3 levels: 256^2, 128^2, 64^2, each ``fpn_hidden_size`` channels).
    fpn_position_encoding: their sine position encodings, same order and shapes.
    trunk_hidden_states: the four Hiera stage outputs (strides 4, 8, 16, 32); index 2 is the
      stage-3 map X2SAM's extra projector reads.
    """

    fpn_hidden_states: tuple[jax.Array, ...]
    fpn_position_encoding: tuple[jax.Array, ...]
    trunk_hidden_states: tuple[jax.Array, ...]

    @property
    def last_hidden_state(self) -> jax.Array:
        return self.trunk_hidden_states[-1]


def _linear(din, dout, names, config: HieraConfig, rngs):
    return nnx.Linear(din, dout, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
                      rngs=rngs)


def _layer_norm(dim, config: HieraConfig, rngs):
    return nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                         param_dtype=jnp.dtype(config.param_dtype),
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
                         rngs=rngs)


def _conv(din, dout, kernel, stride, padding, config: HieraConfig, rngs):
    return nnx.Conv(din, dout, kernel_size=tuple(kernel), strides=tuple(stride),
                    padding=tuple((p, p) for p in padding), dtype=jnp.dtype(config.dtype),
                    param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                      ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
                    rngs=rngs)


def max_pool(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """torch ``max_pool2d(kernel=stride, stride=stride, ceil_mode=False)`` on [N, H, W, C]."""
    n, h, w, c = x.shape
    sh, sw = stride
    x = x[:, : h // sh * sh, : w // sw * sw]
    return x.reshape(n, h // sh, sh, w // sw, sw, c).max(axis=(2, 4))


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, H, W, C] -> [B * nH * nW, window, window, C], zero-padding H and W up to the window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`, dropping the padding."""
    hp, wp = padded_hw
    h, w = hw
    nh, nw = hp // window, wp // window
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w]


class Sam2PatchEmbeddings(nnx.Module):
    def __init__(self, config: HieraConfig, *, rngs: nnx.Rngs):
        self.projection = _conv(config.num_channels, config.hidden_size, config.patch_kernel_size,
                                config.patch_stride, config.patch_padding, config, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.projection(pixel_values)


class Sam2MultiScaleAttention(Attention):
    """Multi-head attention whose queries may be max-pooled (resolution change at stage starts).

    Parameters ``qkv`` (packed) and ``proj``, as transformers names them.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, query_stride, config: HieraConfig,
                 *, rngs: nnx.Rngs):
        super().__init__(dim, num_heads, dim_out // num_heads, out_dim=dim_out, packed_name="qkv", out_name="proj",
                         make_linear=lambda name, din, dout, axes: _linear(din, dout, axes, config, rngs),
                         implementation=config.attention_implementation,
                         query_chunk=config.attention_query_chunk)
        self.query_stride = query_stride

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, _ = x.shape
        query, key, value = self.project(x)                      # [N, h, w, heads, head_dim]
        if self.query_stride is not None:
            query = max_pool(query.reshape(n, h, w, -1), self.query_stride)
            h, w = query.shape[1:3]
        flat = lambda t: t.reshape(n, -1, self.num_heads, self.head_dim)  # noqa: E731
        return self.attend(flat(query), flat(key), flat(value)).reshape(n, h, w, -1)


class Sam2FeedForward(nnx.Module):
    def __init__(self, dim: int, hidden: int, config: HieraConfig, *, rngs: nnx.Rngs):
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"HieraConfig.hidden_act: unsupported {config.hidden_act!r}; "
                             f"choose one of {sorted(_ACTIVATIONS)}")
        self.act = config.hidden_act
        self.proj_in = _linear(dim, hidden, ("embed", "mlp"), config, rngs)
        self.proj_out = _linear(hidden, dim, ("mlp", "embed"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = checkpoint_name(_ACTIVATIONS[self.act](self.proj_in(x)), "mlp_hidden")
        return checkpoint_name(self.proj_out(hidden), "mlp_out")


class Sam2MultiScaleBlock(nnx.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int, query_stride,
                 config: HieraConfig, *, rngs: nnx.Rngs):
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size          # 0 = global attention
        self.query_stride = query_stride        # None or (sh, sw)
        self.layer_norm1 = _layer_norm(dim, config, rngs)
        self.attn = Sam2MultiScaleAttention(dim, dim_out, num_heads, query_stride, config, rngs=rngs)
        self.layer_norm2 = _layer_norm(dim_out, config, rngs)
        self.mlp = Sam2FeedForward(dim_out, int(dim_out * config.mlp_ratio), config, rngs=rngs)
        if dim != dim_out:
            self.proj = _linear(dim, dim_out, ("embed", "embed"), config, rngs)

    def signature(self) -> tuple:
        """Blocks with equal signatures have identical shapes and code (scannable together)."""
        return (self.dim, self.dim_out, self.attn.num_heads, self.window_size, self.query_stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.layer_norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.query_stride is not None:
                shortcut = max_pool(shortcut, self.query_stride)

        window = self.window_size
        height, width = x.shape[1:3]
        if window > 0:
            # Padding is zeros after the norm: padded tokens are keys of the window, as in torch.
            x, padded_hw = window_partition(x, window)
        x = self.attn(x)
        if self.query_stride is not None:
            window = self.window_size // self.query_stride[0]
            height, width = shortcut.shape[1:3]
            if window > 0:
                padded_hw = (height + (-height) % window, width + (-width) % window)
        if self.window_size > 0:
            x = window_unpartition(x, window, padded_hw, (height, width))

        x = shortcut + x
        return x + self.mlp(self.layer_norm2(x))


class Sam2HieraDetModel(nnx.Module):
    """The Hiera trunk: returns the four stage outputs, NHWC."""

    def __init__(self, config: HieraConfig, *, rngs: nnx.Rngs):
        _validate(config)
        self.config = config
        self.patch_embed = Sam2PatchEmbeddings(config, rngs=rngs)
        param_dtype = jnp.dtype(config.param_dtype)
        bkg_h, bkg_w = config.window_positional_embedding_background_size
        window0 = config.window_size_per_stage[0]
        # Stored channels-last: torch's [1, C, h, w] -> [h, w, C]. Truncated N(0, 0.02) as Hiera
        # initialises them: with zeros, a zero-padded input region gives constant tokens whose
        # LayerNorm gradient is scaled by 1/sqrt(eps) per block (exploding from scratch).
        pos_init = nnx.initializers.truncated_normal(0.02)
        self.pos_embed = nnx.Param(pos_init(rngs.params(), (bkg_h, bkg_w, config.hidden_size), param_dtype),
                                   out_sharding=("position", "position", "embed"))
        self.pos_embed_window = nnx.Param(pos_init(rngs.params(), (window0, window0, config.hidden_size),
                                                   param_dtype),
                                          out_sharding=("position", "position", "embed"))
        blocks = []
        total = 0
        for stage, depth in enumerate(config.blocks_per_stage):
            for index in range(depth):
                first_of_later_stage = stage > 0 and index == 0
                dim = config.embed_dim_per_stage[stage - 1 if first_of_later_stage else stage]
                window = config.window_size_per_stage[stage - 1 if first_of_later_stage else stage]
                if total in config.global_attention_blocks:
                    window = 0
                pools = 0 < stage <= config.num_query_pool_stages and index == 0
                blocks.append(Sam2MultiScaleBlock(
                    dim, config.embed_dim_per_stage[stage], config.num_attention_heads_per_stage[stage],
                    window, tuple(config.query_stride) if pools else None, config, rngs=rngs))
                total += 1
        self.blocks = nnx.List(blocks)
        ends, acc = [], 0
        for depth in config.blocks_per_stage:
            acc += depth
            ends.append(acc - 1)
        self.stage_ends = tuple(ends)

    def position_embedding(self, height: int, width: int) -> jax.Array:
        """Background table resized (bicubic, as torch) to the grid plus the tiled window table."""
        window = self.pos_embed_window.shape[0]
        if height % window or width % window:
            raise ValueError(f"Hiera: token grid {height}x{width} is not a multiple of the first window "
                             f"size {window}; use an input size that is a multiple of "
                             f"{window * self.config.patch_stride[0]}")
        background = resize(self.pos_embed[...], (height, width), method="bicubic")
        tiled = jnp.tile(self.pos_embed_window[...], (height // window, width // window, 1))
        return background + tiled

    def _runs(self) -> list[list[int]]:
        """Consecutive block indices grouped into maximal runs of equal signature, split at stage ends."""
        runs: list[list[int]] = []
        for i, block in enumerate(self.blocks):
            if runs and (i - 1) not in self.stage_ends and \
                    self.blocks[runs[-1][-1]].signature() == block.signature():
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
        dtype = jnp.dtype(self.config.dtype)
        x = self.patch_embed(pixel_values.astype(dtype))
        x = constrain(x + self.position_embedding(*x.shape[1:3]).astype(x.dtype)[None], MAPS)
        stages = []
        runs = self._runs() if self.config.scan_layers else [[i] for i in range(len(self.blocks))]
        for run in runs:
            x = self._run_blocks(run, x)
            if run[-1] in self.stage_ends:
                stages.append(x)
        return tuple(stages)

    def _run_blocks(self, run: list[int], x: jax.Array) -> jax.Array:
        """The blocks of ``run`` (scanned when more than one), each under the remat policy."""
        graphdef, _ = nnx.split(self.blocks[run[0]])
        states = [nnx.state(self.blocks[i]) for i in run]

        def step(carry, state):
            return constrain(nnx.merge(graphdef, state)(carry), MAPS), None

        if self.config.remat_policy != "none":
            step = jax.checkpoint(step, policy=remat_policy(self.config.remat_policy))
        if len(run) == 1:
            return step(x, states[0])[0]
        # Stack the run's parameters (a cheap copy inside jit) and scan one traced block over them.
        x, _ = jax.lax.scan(step, x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))
        return x


class Sam2VisionNeck(nnx.Module):
    """FPN: lateral 1x1 convs to ``fpn_hidden_size`` and top-down nearest-2x fusion."""

    def __init__(self, config: HieraConfig, *, rngs: nnx.Rngs):
        self.config = config
        # convs[j] takes trunk stage (n - j): the deepest stage first, as in transformers.
        self.convs = nnx.List([_conv(channels, config.fpn_hidden_size, (1, 1), (1, 1), (0, 0), config, rngs)
                               for channels in config.backbone_channel_list])

    def __call__(self, stages: tuple[jax.Array, ...]):
        n = len(self.convs) - 1
        features, encodings = [], []
        previous = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](stages[i])
            if i in self.config.fpn_top_down_levels and i != n:
                height, width = previous.shape[1:3]
                upsampled = resize(previous.astype(jnp.float32), (2 * height, 2 * width), method="nearest")
                previous = lateral + upsampled.astype(lateral.dtype)
            else:
                previous = lateral
            previous = constrain(previous, MAPS)
            b, h, w, c = previous.shape
            encoding = sine_position_embedding(h, w, c // 2, dtype=previous.dtype)
            features.append(previous)
            encodings.append(jnp.broadcast_to(encoding[None], (b, h, w, c)))
        return tuple(features), tuple(encodings)


class Sam2VisionEncoder(nnx.Module):
    """SAM2 image encoder. ``__call__(pixel_values [B, H, W, 3], valid_hw=None)`` ->
    :class:`Sam2VisionEncoderOutput`.

    ``pixel_values`` are ImageNet-normalised floats, or uint8 frames zero-padded bottom/right with
    ``valid_hw`` [B, 2] their sizes before padding (normalised here first, padding 0.0:
    ``layers.pixels.normalize_frames``). H and W are multiples of 32 (1024 for the released
    models; the position embedding is resized to any such grid).
    """

    def __init__(self, config: HieraConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Sam2HieraDetModel(config, rngs=rngs)
        self.neck = Sam2VisionNeck(config, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, valid_hw: jax.Array | None = None) -> Sam2VisionEncoderOutput:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(f"Sam2VisionEncoder: expected pixel_values [B, H, W, {self.config.num_channels}] "
                             f"(NHWC), got shape {pixel_values.shape}")
        multiple = self.config.patch_stride[0] * self.config.query_stride[0] ** self.config.num_query_pool_stages
        if pixel_values.shape[1] % multiple or pixel_values.shape[2] % multiple:
            raise ValueError(f"Sam2VisionEncoder: input size {pixel_values.shape[1]}x{pixel_values.shape[2]} "
                             f"must be a multiple of {multiple} (patch stride x query-pool strides)")
        pixel_values = normalize_frames(pixel_values, valid_hw, self.config.dtype)
        stages = self.backbone(pixel_values)
        features, encodings = self.neck(stages)
        keep = self.config.num_feature_levels
        # Neck order is coarsest first; keep the finest `keep` levels, finest first.
        return Sam2VisionEncoderOutput(fpn_hidden_states=tuple(reversed(features[-keep:])),
                                       fpn_position_encoding=tuple(reversed(encodings[-keep:])),
                                       trunk_hidden_states=stages)


def _validate(config: HieraConfig) -> None:
    stages = len(config.blocks_per_stage)
    for field in ("embed_dim_per_stage", "num_attention_heads_per_stage", "window_size_per_stage"):
        if len(getattr(config, field)) != stages:
            raise ValueError(f"HieraConfig.{field} has {len(getattr(config, field))} entries, "
                             f"blocks_per_stage has {stages}")
    if config.embed_dim_per_stage[0] != config.hidden_size:
        raise ValueError(f"HieraConfig: embed_dim_per_stage[0]={config.embed_dim_per_stage[0]} must equal "
                         f"hidden_size={config.hidden_size}")
    for dim, heads in zip(config.embed_dim_per_stage, config.num_attention_heads_per_stage):
        if dim % heads:
            raise ValueError(f"HieraConfig: width {dim} is not divisible by {heads} heads")
    if not 0 <= config.num_query_pool_stages < stages:
        raise ValueError(f"HieraConfig.num_query_pool_stages={config.num_query_pool_stages} must be in "
                         f"[0, {stages - 1}]")
    if not 1 <= config.num_feature_levels <= stages:
        raise ValueError(f"HieraConfig.num_feature_levels={config.num_feature_levels} must be in [1, {stages}]")
    if config.attention_implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"HieraConfig.attention_implementation={config.attention_implementation!r}; "
                         f"choose None (auto) or one of {IMPLEMENTATIONS}")
    remat_policy(config.remat_policy, field="HieraConfig.remat_policy")
    if config.fpn_hidden_size % 4:
        raise ValueError(f"HieraConfig.fpn_hidden_size={config.fpn_hidden_size} must be a multiple of 4")
