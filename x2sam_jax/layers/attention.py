"""One attention for every model: :func:`dot_product_attention` and the projection module
:class:`Attention` around it (Hiera, the Qwen3-VL ViT and LLM, the mask decoder, the memory).

Shapes are ``query [B, Lq, H, D]``, ``key``/``value`` ``[B, Lk, KV, D]`` with ``H`` a multiple of
``KV`` (grouped-query attention; no key/value head is ever repeated in memory). Masks combine:

* ``causal``: query ``i`` sees key ``j <= i + query_offset`` (``query_offset`` = the query
  block's first slot in a KV cache; an int, or a traced scalar);
* ``key_mask [B or 1, Lk]`` bool: False keys are padding;
* ``segment_ids = (query_ids [B, Lq], key_ids [B, Lk])``: attention stays inside equal ids
  (packed ViT sequences);
* ``mask``: bool broadcastable to ``[B, H, Lq, Lk]`` (masked cross-attention).

A query row that no key may attend to returns zeros (torch would give NaN); callers that want
Mask2Former's rule (a fully blocked row attends everywhere) unblock such rows in the mask.
The QK product is accumulated in float32 and the softmax runs in float32 whatever the compute
dtype; the probabilities are cast to the value dtype for the PV product (accumulated in float32).

Backends (``implementation``; None chooses by platform and shape, :func:`choose_implementation`):

* ``"xla"``: the whole [Lq, Lk] logits at once; XLA fuses mask, exp and sums around two matmuls.
* ``"query_chunked"``: the same math over blocks of queries in a ``lax.scan``, each block over
  tiles of keys with an online softmax (flash attention written in XLA: memory O(chunk * tile)
  forward; each query block is rematerialised in the backward pass, so training memory stays
  O(chunk * Lk)). On CPU it is also the fast form once the logits outgrow the cache.
  Normalisation is applied to the [chunk, D] output instead of the [chunk, Lk] weights.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on NVIDIA
  GPUs; bf16/fp16, head_dim a multiple of 8; chosen automatically up to 128, which every GPU
  generation supports).
* ``"splash"``: the Pallas TPU splash-attention kernel (causal with a static offset, key padding
  and segment ids; no dense mask); ``splash_interpret=True`` runs it on CPU for testing.

Inputs and output carry logical sharding constraints (batch over data x fsdp, heads over tensor),
a no-op without an active mesh. Checkpoint names (for remat policies, x2sam_jax.layers.scan):
``qkv_proj`` (projected q/k/v), ``attention`` (the attention output before the output
projection), ``attention_out`` (after it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from x2sam_jax.sharding import activation_spec, constrain

IMPLEMENTATIONS = ("xla", "query_chunked", "cudnn", "splash")

# CPU: queries per block of the chunked form, as (heads x queries) logit rows, and keys per tile:
# 2048 rows x 256 keys (2 MiB of float32 logits, the L2 of the two cores) kept a tile's logits in
# cache with matmuls big enough to run well; measured ~2x faster than torch's SDPA for Hiera's
# 4096-token global attention and ~5x faster than whole rows of keys (1-2 MiB tiles were within
# noise of each other on a loaded 2-core machine; 4 MiB tiles were 2x slower).
CPU_BLOCK_ROWS = 2048
CPU_KEY_TILE = 256
# Elsewhere (fp32 on GPU, dense masks on TPU): chunk so that one block's float32 logits stay
# under this many bytes, and use the one-shot form below it.
LOGITS_BUDGET_BYTES = 256 << 20
_MASKED = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------------------------
# The function
# ----------------------------------------------------------------------------------------------


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float | None = None,
                          causal: bool = False, query_offset: int | jax.Array = 0,
                          key_mask: jax.Array | None = None,
                          segment_ids: tuple[jax.Array, jax.Array] | None = None,
                          mask: jax.Array | None = None, dropout_rate: float = 0.0, dropout_key=None,
                          implementation: str | None = None, query_chunk: int = 0, key_chunk: int = 0,
                          splash_interpret: bool = False) -> jax.Array:
    """Softmax attention; returns ``[B, Lq, H, D]`` in the value dtype (see the module docstring).

    ``scale`` defaults to ``D ** -0.5``. ``dropout_rate`` > 0 with a ``dropout_key`` drops
    attention weights (training). ``query_chunk`` / ``key_chunk``: block sizes of the chunked
    form (0 = automatic).
    """
    batch, q_len, heads, head_dim = query.shape
    if key.ndim != 4 or value.shape != key.shape or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"attention: query {query.shape} needs key/value [B, Lk, KV, {head_dim}] with B={batch}, "
                         f"got key {key.shape}, value {value.shape}")
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.ndim != 4:
            raise ValueError(f"attention: mask must be bool [B|1, H|1, Lq|1, Lk], got {mask.dtype} {mask.shape}")
        for got, full, name in zip(mask.shape, (batch, heads, q_len, kv_len), "BHQK"):
            if got not in (1, full):
                raise ValueError(f"attention: mask dim {name}={got} must be 1 or {full} (mask {mask.shape})")
    if key_mask is not None and (key_mask.ndim != 2 or key_mask.shape[1] != kv_len):
        raise ValueError(f"attention: key_mask must be [B|1, {kv_len}], got {key_mask.shape}")
    scale = float(head_dim ** -0.5 if scale is None else scale)
    dropout = dropout_rate > 0 and dropout_key is not None
    if implementation is None:
        implementation = choose_implementation(query.shape, key.shape, query.dtype, dense_mask=mask is not None,
                                               dropout=dropout, static_offset=_is_static(query_offset),
                                               query_chunk=query_chunk)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation {implementation!r}; choose None (auto) or one of "
                         f"{IMPLEMENTATIONS}")

    query = constrain(query, ("batch", "length", "heads", "head_dim"))
    key = constrain(key, ("batch", "length", "kv_heads", "head_dim"))
    value = constrain(value, ("batch", "length", "kv_heads", "head_dim"))
    if implementation in ("cudnn", "splash") and dropout:
        raise ValueError(f"attention: the {implementation} kernel takes no dropout; use implementation=None")
    if implementation == "cudnn":
        out = _cudnn(query, key, value, scale, causal, query_offset, key_mask, segment_ids, mask)
    elif implementation == "splash":
        if mask is not None or not _is_static(query_offset):
            raise ValueError("attention: the splash kernel takes no dense mask and only a static query_offset; "
                             "use implementation=None to fall back automatically")
        out = _splash(query, key, value, scale, causal, int(query_offset), key_mask, segment_ids,
                      splash_interpret)
    else:
        if implementation == "xla":
            chunk, key_chunk = q_len, kv_len
        else:
            chunk = query_chunk or default_query_chunk(query.shape, key.shape)
            key_chunk = key_chunk or (CPU_KEY_TILE if jax.default_backend() == "cpu" else kv_len)
        out = _chunked(query, key, value, scale, causal, query_offset, key_mask, segment_ids, mask,
                       dropout_rate if dropout else 0.0, dropout_key, min(chunk, q_len), key_chunk)
    return constrain(out, ("batch", "length", "heads", "head_dim"))


def choose_implementation(query_shape, key_shape, dtype, *, dense_mask: bool = False, dropout: bool = False,
                          static_offset: bool = True, query_chunk: int = 0, platform: str | None = None) -> str:
    """The backend ``dot_product_attention`` uses when ``implementation`` is None.

    GPU: cuDNN where it supports the dtype and head size; TPU: splash where it supports the masks
    and the lengths are whole 128-blocks. Otherwise the XLA forms: the chunked one when a
    ``query_chunk`` smaller than the queries is asked for; on CPU once one example's logits
    outgrow a tile (heads x queries x keys beyond ``CPU_BLOCK_ROWS x CPU_KEY_TILE``: Hiera's
    global attention, long prompts; 1.5-2x faster there than the one-shot form, whose logits
    leave the cache), the one-shot form below (windows, decode steps: no loop overhead);
    elsewhere the one-shot form while its float32 logits fit in ``LOGITS_BUDGET_BYTES``.
    """
    platform = platform or jax.default_backend()
    batch, q_len, heads, head_dim = query_shape
    kv_len = key_shape[1]
    if platform == "gpu" and not dropout and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and not dropout and not dense_mask and static_offset \
            and q_len % 128 == 0 and kv_len % 128 == 0:
        return "splash"
    if 0 < query_chunk < q_len:
        return "query_chunked"
    if platform == "cpu":
        return "query_chunked" if heads * q_len * kv_len > CPU_BLOCK_ROWS * CPU_KEY_TILE else "xla"
    return "xla" if 4 * batch * heads * q_len * kv_len <= LOGITS_BUDGET_BYTES else "query_chunked"


def default_query_chunk(query_shape, key_shape, platform: str | None = None) -> int:
    """Queries per block of the chunked form (see ``CPU_BLOCK_ROWS`` / ``LOGITS_BUDGET_BYTES``)."""
    batch, q_len, heads, _ = query_shape
    if (platform or jax.default_backend()) == "cpu":
        return min(q_len, max(32, CPU_BLOCK_ROWS // heads))
    rows = LOGITS_BUDGET_BYTES // max(4 * batch * heads * key_shape[1], 1)
    return int(min(q_len, max(128, 1 << max(int(rows).bit_length() - 1, 0))))


def _is_static(x) -> bool:
    return isinstance(x, (int, np.integer))


# ----------------------------------------------------------------------------------------------
# XLA forms (one shot = one block)
# ----------------------------------------------------------------------------------------------


def _allowed(q_pos, k_pos, causal, query_offset, key_mask, q_seg, k_seg, mask_rows):
    """The bool mask of one block, broadcastable to [B, KV, G, C, Lk] (None = all allowed)."""
    parts = []
    if causal:
        parts.append((k_pos[None, :] <= q_pos[:, None] + query_offset)[None, None, None])
    if key_mask is not None:
        parts.append(key_mask.astype(bool)[:, None, None, None, :])
    if q_seg is not None:
        parts.append((q_seg[:, :, None] == k_seg[:, None, :])[:, None, None])
    if mask_rows is not None:
        parts.append(mask_rows)
    if not parts:
        return None
    return functools.reduce(jnp.logical_and, parts)


def _einsum_f32(spec, a, b):
    """einsum accumulated in float32. XLA:CPU has no bf16 x bf16 -> f32 dot: there the operands
    are widened instead (exact: bf16 values are float32 values)."""
    if a.dtype == b.dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    if jax.default_backend() == "cpu":
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _tile(q, key_t, value_t, allowed, scale, dropout_rate, dropout_key, state=None):
    """One block of queries q [B, KV, G, C, D] against one tile of keys key_t [B, KV, D, S] /
    value_t [B, KV, S, D], as an online softmax over tiles: ``state`` = (running max m, running
    sum l [B, KV, G, C], unnormalised output acc [B, KV, G, C, D]) of the tiles before, None for
    the first. The max is a constant to differentiation (softmax does not depend on it)."""
    logits = _einsum_f32("bkgcd,bkds->bkgcs", q, key_t)
    if allowed is not None:
        logits = jnp.where(allowed, logits, _MASKED)
    peak = jax.lax.stop_gradient(logits.max(axis=-1))
    if state is not None:
        peak = jnp.maximum(peak, state[0])
    # exp((s - max s) * scale): the scale is applied in float32 inside the exp's fused loop.
    weights = jnp.exp((logits - peak[..., None]) * scale)
    total = weights.sum(axis=-1)
    if dropout_rate:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    acc = _einsum_f32("bkgcs,bksd->bkgcd", weights.astype(value_t.dtype), value_t)
    if state is not None:
        correction = jnp.exp((state[0] - peak) * scale)
        total = total + state[1] * correction
        acc = acc + state[2] * correction[..., None]
    return peak, total, acc


def _chunked(query, key, value, scale, causal, query_offset, key_mask, segment_ids, mask, dropout_rate,
             dropout_key, chunk, key_chunk):
    """Blocks of ``chunk`` queries (scanned, each rematerialised in the backward pass), each over
    tiles of ``key_chunk`` keys (scanned, online softmax) when the keys do not fit in one."""
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    dtype = value.dtype
    query = query.astype(dtype).reshape(batch, q_len, kv_heads, groups, head_dim)
    q_seg, k_seg = (None, None) if segment_ids is None else (jnp.asarray(segment_ids[0]),
                                                               jnp.asarray(segment_ids[1]))
    if mask is not None:  # [B|1, H|1, Lq|1, Lk] -> [B|1, KV|1, G|1, Lq|1, Lk]
        mask = (mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[2:]) if mask.shape[1] == heads
                else mask[:, :, None])
    can_be_empty = key_mask is not None or segment_ids is not None or mask is not None

    def blocks_of(x, axis, size, count, fill=0):
        """x split along ``axis`` into ``count`` blocks of ``size`` (padded), block axis first."""
        if x is None:
            return None
        pad = count * size - x.shape[axis]
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, pad)
            x = jnp.pad(x, widths, constant_values=fill)
        x = x.reshape(*x.shape[:axis], count, size, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    # Keys: one tile, or tiles of key_chunk (padded keys are masked out).
    tiles = 1 if key_chunk >= kv_len else -(-kv_len // key_chunk)
    size = kv_len if tiles == 1 else key_chunk
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    if tiles > 1 and tiles * size > kv_len:
        key_mask = jnp.ones((1, kv_len), bool) if key_mask is None else key_mask
    kv = dict(key_t=blocks_of(key.astype(dtype), 1, size, tiles).transpose(0, 1, 3, 4, 2),   # [T, B, KV, D, S]
              value_t=blocks_of(value, 1, size, tiles).transpose(0, 1, 3, 2, 4),          # [T, B, KV, S, D]
              pos=blocks_of(k_pos, 0, size, tiles),
              key_mask=blocks_of(key_mask, 1, size, tiles, False), seg=blocks_of(k_seg, 1, size, tiles, -2),
              index=jnp.arange(tiles))

    def one_block(inputs):
        """Output [B, C, KV, G, D] of one block of queries (and its dense mask rows)."""
        rows = inputs.get("mask", mask)
        block_key = None if not dropout_rate else jax.random.fold_in(dropout_key, inputs["index"])
        q = jnp.moveaxis(inputs["q"], 1, 3)       # [B, KV, G, C, D], the layout of every tile's matmul

        tile_xs = dict(kv, rows=None if rows is None else blocks_of(rows, rows.ndim - 1, size, tiles, False))

        def step(carry, tile):
            state, nonempty = carry
            allowed = _allowed(inputs["pos"], tile["pos"], causal, query_offset, tile["key_mask"], inputs["seg"],
                               tile["seg"], tile["rows"])
            tile_key = None
            if dropout_rate:
                tile_key = block_key if tiles == 1 else jax.random.fold_in(block_key, tile["index"])
            attend = lambda state: _tile(q, tile["key_t"], tile["value_t"], allowed, scale,  # noqa: E731
                                         dropout_rate, tile_key, state)
            if state is None or allowed is None:
                state = attend(state)
            else:  # skip tiles nothing attends to: above the causal diagonal, padding, other segments
                state = jax.lax.cond(allowed.any(), attend, lambda state: state, state)
            if can_be_empty and allowed is not None:  # rows with no allowed key are zeroed below
                nonempty = allowed.any(axis=-1) if nonempty is None else nonempty | allowed.any(axis=-1)
            return (state, nonempty), None

        # The first tile outside the loop initialises the running state with its shapes.
        (state, nonempty), _ = step((None, None), jax.tree.map(lambda a: a[0], tile_xs))
        if tiles > 1:
            (state, nonempty), _ = jax.lax.scan(step, (state, nonempty), jax.tree.map(lambda a: a[1:], tile_xs))
        _, total, acc = state
        out = acc / total[..., None]                                   # [B, KV, G, C, D]
        if nonempty is not None:
            out = jnp.where(jnp.broadcast_to(nonempty, total.shape)[..., None], out, 0.0)
        return jnp.moveaxis(out, 3, 1).astype(dtype)                   # [B, C, KV, G, D]

    q_pos = jnp.arange(q_len, dtype=jnp.int32)
    if chunk >= q_len:
        out = one_block(dict(q=query, pos=q_pos, seg=q_seg, index=jnp.int32(0)))
        return out.reshape(batch, q_len, heads, head_dim)

    # Pad the queries to whole blocks; padded rows are computed and dropped.
    count = -(-q_len // chunk)
    xs = dict(q=blocks_of(query, 1, chunk, count), pos=blocks_of(q_pos, 0, chunk, count),
              seg=blocks_of(q_seg, 1, chunk, count, -1), index=jnp.arange(count))
    if mask is not None and mask.shape[3] > 1:
        xs["mask"] = blocks_of(mask, 3, chunk, count, False)
    # Recompute a block in the backward pass instead of storing its weights.
    block = jax.checkpoint(one_block)
    _, out = jax.lax.scan(lambda carry, inputs: (carry, block(inputs)), None, xs)  # [count, B, C, KV, G, D]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, count * chunk, heads, head_dim)
    return out[:, :q_len]


# ----------------------------------------------------------------------------------------------
# Fused kernels (GPU: cuDNN, TPU: Pallas splash)
# ----------------------------------------------------------------------------------------------


def _cudnn(query, key, value, scale, causal, query_offset, key_mask, segment_ids, mask):
    batch, q_len, heads, _ = query.shape
    kv_len = key.shape[1]
    plain_causal = causal and _is_static(query_offset) and int(query_offset) == 0 and q_len == kv_len
    dense = _allowed(jnp.arange(q_len, dtype=jnp.int32), jnp.arange(kv_len, dtype=jnp.int32),
                     causal and not plain_causal, query_offset, key_mask,
                     None if segment_ids is None else segment_ids[0],
                     None if segment_ids is None else segment_ids[1],
                     None if mask is None else mask[:, :, None])
    has_key = None
    if dense is not None:   # [B|1, 1|H, 1, Lq|1, Lk] -> [B, H|1, Lq, Lk]
        dense = dense.reshape(dense.shape[0], -1, *dense.shape[3:])
        dense = jnp.broadcast_to(dense, (batch, dense.shape[1], q_len, kv_len))
        if plain_causal:
            dense = dense & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])
        has_key = dense.any(axis=-1)                       # [B, H|1, Lq]
        dense = dense | ~has_key[..., None]                # an empty row attends everywhere, then is zeroed
    out = jax.nn.dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype), mask=dense,
                                       scale=scale, is_causal=plain_causal and dense is None,
                                       implementation="cudnn")
    if has_key is not None:
        out = jnp.where(jnp.moveaxis(has_key, 1, 2)[..., None], out, 0)
    return out.astype(value.dtype)


def _splash(query, key, value, scale, causal, query_offset, key_mask, segment_ids, interpret):
    """The Pallas kernel runs per device: under a mesh, inside ``shard_map`` over batch (data x
    fsdp) and heads (tensor), as the constraints above lay the inputs out."""
    mesh = jax.sharding.get_abstract_mesh()
    kernel = functools.partial(_splash_local, scale=scale, causal=causal, query_offset=query_offset,
                               interpret=interpret)
    if mesh.empty:
        return kernel(query, key, value, key_mask, segment_ids)
    batch, q_len, heads, head_dim = query.shape
    q_spec = activation_spec(query.shape, ("batch", "length", "heads", "head_dim"), mesh)
    kv_spec = activation_spec(key.shape, ("batch", "length", "kv_heads", "head_dim"), mesh)
    if q_spec[2] != kv_spec[2]:   # heads and kv heads split alike, or neither
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    rows = P(q_spec[0], None)
    mask_spec = None if key_mask is None else P(q_spec[0] if key_mask.shape[0] == batch else None, None)
    segment_spec = None if segment_ids is None else (rows, rows)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, segment_spec),
                         out_specs=q_spec, check_vma=False)(query, key, value, key_mask, segment_ids)


def _splash_local(query, key, value, key_mask, segment_ids, *, scale, causal, query_offset, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    base = (masks.CausalMask((q_len, kv_len), offset=query_offset) if causal else masks.FullMask((q_len, kv_len)))
    kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([base] * groups), interpret=interpret)

    # Key padding becomes a segment: padded keys get an id no query has.
    q_seg = jnp.zeros((batch, q_len), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids[0], jnp.int32)
    k_seg = jnp.zeros((batch, kv_len), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids[1], jnp.int32)
    has_key = None
    if key_mask is not None or segment_ids is not None:
        if key_mask is not None:
            padding = jnp.minimum(q_seg.min(), k_seg.min()) - 1
            k_seg = jnp.where(jnp.broadcast_to(key_mask, k_seg.shape), k_seg, padding)
        allowed = q_seg[:, :, None] == k_seg[:, None, :]
        if causal:
            allowed &= jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + query_offset
        has_key = allowed.any(-1)                           # [B, Lq]

    # [B, Lq, H, D] -> [B, KV, G, Lq, D]; keys [B, KV, Lk, D]. The kernel does not scale.
    q = (query * jnp.asarray(scale, query.dtype)).reshape(batch, q_len, kv_heads, groups, head_dim)
    q = q.transpose(0, 2, 3, 1, 4)
    k = key.astype(query.dtype).transpose(0, 2, 1, 3)
    v = value.astype(query.dtype).transpose(0, 2, 1, 3)

    def per_example(q, k, v, q_seg, k_seg):
        ids = splash.SegmentIds(q=q_seg, kv=k_seg)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(per_example)(q, k, v, q_seg, k_seg)      # [B, KV, G, Lq, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)
    if has_key is not None:
        out = jnp.where(has_key[:, :, None, None], out, 0)
    return out.astype(value.dtype)


# ----------------------------------------------------------------------------------------------
# The projection module
# ----------------------------------------------------------------------------------------------

# make_linear(name, in_features, out_features, logical_axes) -> a linear module with .kernel [in, out]
LinearFactory = Callable[[str, int, int, tuple[str, str]], nnx.Module]


class Attention(nnx.Module):
    """Projections around :func:`dot_product_attention`: ``project`` -> [rotary etc. by the caller]
    -> ``attend`` (attention + output projection). ``__call__`` does both.

    Parameter names are each model's torch names, so converters and checkpoints are unchanged:
    separate ``q_proj``/``k_proj``/``v_proj``, or one packed projection whose output is (q, k, v)
    stacked (``packed_name``: Hiera and the Qwen ViT's ``qkv``, torch ``nn.MultiheadAttention``'s
    ``in_proj``; applied once to a shared input, sliced for distinct inputs), and the output
    projection ``out_name`` (``o_proj`` / ``out_proj`` / ``proj``). ``make_linear`` builds each
    linear with the model's dtypes, initialisers and LoRA.
    """

    def __init__(self, query_dim: int, num_heads: int, head_dim: int, *, make_linear: LinearFactory,
                 kv_dim: int | None = None, num_kv_heads: int | None = None, out_dim: int | None = None,
                 packed_name: str | None = None, out_name: str = "o_proj", kv_axis: str = "heads",
                 implementation: str | None = None, query_chunk: int = 0):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.packed_name, self.out_name = packed_name, out_name
        self.implementation, self.query_chunk = implementation, query_chunk
        kv_dim = kv_dim or query_dim
        q_width, kv_width = num_heads * head_dim, self.num_kv_heads * head_dim
        if packed_name is not None:
            if kv_dim != query_dim:
                raise ValueError(f"Attention: a packed projection needs kv_dim == query_dim, "
                                 f"got {kv_dim} != {query_dim}")
            setattr(self, packed_name, make_linear(packed_name, query_dim, q_width + 2 * kv_width, ("embed", "heads")))
        else:
            self.q_proj = make_linear("q_proj", query_dim, q_width, ("embed", "heads"))
            self.k_proj = make_linear("k_proj", kv_dim, kv_width, ("embed", kv_axis))
            self.v_proj = make_linear("v_proj", kv_dim, kv_width, ("embed", kv_axis))
        setattr(self, out_name, make_linear(out_name, q_width, out_dim or query_dim, ("heads", "embed")))

    def project(self, query_input: jax.Array, key_input: jax.Array | None = None,
                value_input: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [..., H, D], k and v [..., KV, D]; keys default to the query input, values to the keys."""
        key_input = query_input if key_input is None else key_input
        value_input = key_input if value_input is None else value_input
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.packed_name is None:
            q, k, v = self.q_proj(query_input), self.k_proj(key_input), self.v_proj(value_input)
        elif key_input is query_input and value_input is query_input:
            qkv = getattr(self, self.packed_name)(query_input)
            q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
        else:
            linear = getattr(self, self.packed_name)
            dtype = linear.dtype or jnp.result_type(query_input, linear.kernel[...])
            kernel = linear.kernel[...].astype(dtype)
            bias = None if linear.bias is None else linear.bias[...].astype(dtype)
            cuts = ((0, q_width), (q_width, q_width + kv_width), (q_width + kv_width, q_width + 2 * kv_width))
            outs = []
            for x, (lo, hi) in zip((query_input, key_input, value_input), cuts):
                y = x.astype(dtype) @ kernel[:, lo:hi]
                outs.append(y if bias is None else y + bias[lo:hi])
            q, k, v = outs
        q = q.reshape(*q.shape[:-1], self.num_heads, self.head_dim)
        k = k.reshape(*k.shape[:-1], self.num_kv_heads, self.head_dim)
        v = v.reshape(*v.shape[:-1], self.num_kv_heads, self.head_dim)
        return checkpoint_name(q, "qkv_proj"), checkpoint_name(k, "qkv_proj"), checkpoint_name(v, "qkv_proj")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, **attention_kwargs) -> jax.Array:
        """dot_product_attention(q [B, Lq, H, D], k, v, **attention_kwargs) then the output projection
        -> [B, Lq, out_dim]."""
        attention_kwargs.setdefault("implementation", self.implementation)
        attention_kwargs.setdefault("query_chunk", self.query_chunk)
        out = dot_product_attention(q, k, v, **attention_kwargs)
        out = checkpoint_name(out, "attention")
        out = getattr(self, self.out_name)(out.reshape(*out.shape[:-2], -1))
        return checkpoint_name(out, "attention_out")

    def __call__(self, query_input: jax.Array, key_input: jax.Array | None = None,
                 value_input: jax.Array | None = None, **attention_kwargs) -> jax.Array:
        return self.attend(*self.project(query_input, key_input, value_input), **attention_kwargs)
