"""Qwen3 decoder of Qwen3-VL: RMSNorm, GQA with per-head q/k RMSNorm, SwiGLU, interleaved M-RoPE,
deepstack visual maps added after the first layers, and a fixed-size KV cache.

Layers are created stacked (``create_stack``) and run with ``run_stack`` (lax.scan or unrolled,
under the remat policy named in the config). The KV cache is a plain pytree of arrays
(:func:`init_cache`) passed in and returned, never hidden module state:

    cache = {"k": [layers, B, S, kv_heads, head_dim], "v": same,
             "valid": [B, S] bool (slots holding a real token), "index": int32 (next free slot)}

Every call writes its L tokens into slots ``index .. index+L-1`` (the same slots for every row;
padding tokens are written but marked invalid), so left- and right-padded batches both work: a
query at slot s sees the valid keys at slots <= s.

Positions are always [3, B, L] (temporal, height, width). Sequential 1-D positions are the case
where the three rows are equal, which makes interleaved M-RoPE identical to plain RoPE.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from x2sam_jax.config import LoRAConfig, Qwen3TextConfig
from x2sam_jax.layers import attention
from x2sam_jax.layers.scan import create_stack, run_stack
from x2sam_jax.sharding import constrain
from x2sam_jax.models.lora import LoRALinear

Cache = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """torch Qwen3VLTextRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, axis_name: str = "norm", param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def mrope_axis_of_frequency(head_dim: int, mrope_section) -> np.ndarray:
    """For each of the head_dim/2 frequencies, which position row (0=T, 1=H, 2=W) drives it.

    Interleaved layout: frequency j belongs to H when j % 3 == 1 and j < 3·section[1], to W when
    j % 3 == 2 and j < 3·section[2], else to T.
    """
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def rotary_cos_sin(position_ids: jax.Array, config: Qwen3TextConfig, dtype):
    """cos, sin [B, L, head_dim] for positions [3, B, L] (interleaved M-RoPE)."""
    if sum(config.mrope_section) != config.head_dim // 2:
        raise ValueError(f"mrope_section {config.mrope_section} must sum to head_dim/2 = {config.head_dim // 2}")
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, hd/2]
    axis = jnp.asarray(mrope_axis_of_frequency(config.head_dim, config.mrope_section))
    freqs = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))  # [B, L, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x [B, L, heads, hd]; cos/sin [B, L, hd]."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class Attention(attention.Attention):
    """GQA self-attention with per-head q/k RMSNorm, M-RoPE and an optional KV cache.

    Parameters ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (LoRALinear), ``q_norm``, ``k_norm``.
    """

    def __init__(self, config: Qwen3TextConfig, lora: LoRAConfig | None, *, rngs: nnx.Rngs):
        c = config

        def linear(name, n_in, n_out, axes):
            return LoRALinear(n_in, n_out, axes=axes, use_bias=c.attention_bias and name != "o_proj",
                              lora=lora if lora is not None and name in lora.target_modules else None,
                              rngs=rngs)

        super().__init__(c.hidden_size, c.num_heads, c.head_dim, num_kv_heads=c.num_kv_heads, make_linear=linear,
                         kv_axis="kv_heads", implementation=c.attention_implementation,
                         query_chunk=c.attention_query_chunk)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim")
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim")

    def __call__(self, x, cos, sin, key_valid, query_offset, kv_cache=None):
        """x [B, L, D]; key_valid [B, S] (S = L, or the cache size); query_offset: the cache slot of
        the first query (a query at slot s sees the valid keys at slots <= s)."""
        q, k, v = self.project(x)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        new_cache = None
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, query_offset, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            new_cache = (k, v)
        out = self.attend(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, query_offset=query_offset,
                          key_mask=key_valid)
        return out, new_cache


class MLP(nnx.Module):
    def __init__(self, config: Qwen3TextConfig, lora: LoRAConfig | None, *, rngs: nnx.Rngs):
        c = config

        def linear(name, n_in, n_out, axes):
            return LoRALinear(n_in, n_out, axes=axes,
                              lora=lora if lora is not None and name in lora.target_modules else None,
                              rngs=rngs)

        self.gate_proj = linear("gate_proj", c.hidden_size, c.intermediate_size, ("embed", "mlp"))
        self.up_proj = linear("up_proj", c.hidden_size, c.intermediate_size, ("embed", "mlp"))
        self.down_proj = linear("down_proj", c.intermediate_size, c.hidden_size, ("mlp", "embed"))

    def __call__(self, x):
        hidden = checkpoint_name(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), "mlp_hidden")
        return checkpoint_name(self.down_proj(hidden), "mlp_out")


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3TextConfig, lora: LoRAConfig | None, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, lora, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, lora, rngs=rngs)

    def __call__(self, x, cos, sin, key_valid, query_offset, kv_cache=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, query_offset, kv_cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "embed")), new_cache


# ----------------------------------------------------------------------------------------------
# Cache and visual scatter helpers
# ----------------------------------------------------------------------------------------------


def init_cache(config: Qwen3TextConfig, batch: int, max_length: int, dtype=None) -> Cache:
    """An empty fixed-size KV cache for ``max_length`` slots."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_length), bool), "index": jnp.zeros((), jnp.int32)}


def scatter_rows(mask: jax.Array, rows: jax.Array, base: jax.Array | None = None) -> jax.Array:
    """Places ``rows`` [N, D] at the True positions of ``mask`` [B, L] (row-major order), like
    torch ``masked_scatter``; other positions keep ``base`` (zeros when None). Shapes are static."""
    flat = mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, max(rows.shape[0] - 1, 0))
    gathered = rows[index].reshape(*mask.shape, rows.shape[-1])
    if base is None:
        base = jnp.zeros_like(gathered)
    return jnp.where(mask[..., None], gathered.astype(base.dtype), base)


def normalize_position_ids(position_ids, batch: int, length: int) -> jax.Array:
    """[L], [B, L] or [3, B, L] -> [3, B, L] int32."""
    position_ids = jnp.asarray(position_ids, jnp.int32)
    if position_ids.ndim == 1:
        position_ids = jnp.broadcast_to(position_ids, (batch, length))
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3, batch, length))
    if position_ids.shape != (3, batch, length):
        raise ValueError(f"position_ids: expected [L], [B, L] or [3, B, L] for B={batch}, L={length}, "
                         f"got {tuple(position_ids.shape)}")
    return position_ids


# ----------------------------------------------------------------------------------------------
# The text model
# ----------------------------------------------------------------------------------------------


class Qwen3TextModel(nnx.Module):
    """Token embedding + stacked decoder layers + final norm (HF ``model.language_model``)."""

    def __init__(self, config: Qwen3TextConfig, lora: LoRAConfig | None = None, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs)
        self.layers = create_stack(lambda r: DecoderLayer(config, lora, rngs=r), config.num_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, visual_pos_mask=None,
                 deepstack_embeds=None, cache: Cache | None = None):
        """Runs the decoder.

        Args:
          inputs_embeds: [B, L, D].
          attention_mask: [B, L] (1 = real token); None = all real.
          position_ids: [L], [B, L] or [3, B, L]; None = (cache index +) 0..L-1.
          visual_pos_mask: [B, L] bool, where the deepstack maps are added.
          deepstack_embeds: [n, N_visual, D] (rows for the True positions of visual_pos_mask, in
            order) or [n, B, L, D] (already placed); added after layers 0..n-1.
          cache: from :func:`init_cache`, or None for a cache-free forward.

        Returns:
          (hidden states after the final norm [B, L, D], updated cache or None).
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = jnp.asarray(inputs_embeds).astype(dtype)
        batch, length, _ = x.shape
        mask = (jnp.ones((batch, length), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        # Without a cache the queries start at slot 0 (a static offset, which the fused kernels need).
        start = cache["index"] if cache is not None else 0
        if position_ids is None:
            position_ids = start + jnp.arange(length, dtype=jnp.int32)
        position_ids = normalize_position_ids(position_ids, batch, length)
        cos, sin = rotary_cos_sin(position_ids, c, dtype)
        x = constrain(x, ("batch", "length", "embed"))

        deepstack = None
        if deepstack_embeds is not None:
            deepstack = jnp.asarray(deepstack_embeds).astype(dtype)
            if visual_pos_mask is None:
                raise ValueError("deepstack_embeds given without visual_pos_mask")
            vis = jnp.asarray(visual_pos_mask).astype(bool)
            if deepstack.ndim == 3:  # compact rows -> placed at the visual positions
                deepstack = jax.vmap(lambda rows: scatter_rows(vis, rows))(deepstack)
            else:
                deepstack = jnp.where(vis[None, :, :, None], deepstack, 0)
            if deepstack.shape[0] > c.num_layers:
                raise ValueError(f"{deepstack.shape[0]} deepstack maps for {c.num_layers} layers")

        if cache is not None:
            valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, start))
            key_valid = valid
            xs = (jnp.arange(c.num_layers), (cache["k"], cache["v"]))
        else:
            key_valid = mask
            xs = (jnp.arange(c.num_layers), None)

        def body(layer, h, inputs):
            index, kv = inputs
            h, new_kv = layer(h, cos, sin, key_valid, start, kv)
            if deepstack is not None:
                n = deepstack.shape[0]
                add = deepstack[jnp.minimum(index, n - 1)]
                h = h + jnp.where(index < n, add, jnp.zeros_like(add))
            return h, new_kv

        x, new_kv = run_stack(self.layers, x, body, xs, scan=c.scan_layers, remat=c.remat_policy)
        x = constrain(self.norm(x), ("batch", "length", "embed"))
        if cache is None:
            return x, None
        new_cache = {"k": new_kv[0], "v": new_kv[1], "valid": key_valid, "index": start + length}
        return x, new_cache
