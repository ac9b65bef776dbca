"""Jitted decoding for Qwen3-VL (and X2SAM's LLM): greedy or sampled (temperature / top-k /
top-p), a fixed-size KV cache, stop tokens, left- or right-padded batches.

One compiled program per (batch, prompt-length bucket, max_new_tokens, sampling settings): the
prompt is right-padded to its bucket (powers of two from 32 by default, ``prompt_buckets``) and
prefilled into a cache of ``bucket + max_new_tokens`` slots, then a ``lax.while_loop`` decodes
one token per step until every row has produced a stop token or the budget is spent.

Padding: the prompt's padding slots are marked invalid in the cache, so no query attends to
them; each row continues from its own last real token and its own next position. Left and right
padding therefore give the same tokens as running each row alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax.models.qwen3_text import init_cache


MIN_PROMPT_BUCKET = 32


def prompt_bucket(length: int, buckets: Sequence[int] | None = None) -> int:
    """The padded prompt length ``generate`` compiles for: the smallest of ``buckets`` >= ``length``
    (None: the next power of two, at least ``MIN_PROMPT_BUCKET``; empty: ``length`` itself, as for
    a prompt longer than every bucket)."""
    if buckets is None:
        return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
    return min((b for b in buckets if b >= length), default=length)


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B, max_new_tokens] int32; pad_token_id after a row's stop token
    lengths: jax.Array   # [B] tokens produced per row, the stop token included


def sample_logits(logits: jax.Array, key, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax when temperature == 0, else temperature,
    then top-k, then nucleus (top-p) filtering, then a categorical draw (HF's order)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the top token stays
        threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model, input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None,
             max_new_tokens: int = 32, stop_token_ids: int | Sequence[int] = (), pad_token_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng=None,
             prompt_buckets: Sequence[int] | None = None) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens per row of a processor batch.

    ``model`` is a :class:`x2sam_jax.models.qwen3_vl.Qwen3VLModel`. Positions follow its
    ``position_mode``. ``rng`` (a jax key) is needed only when sampling (temperature > 0).
    ``prompt_buckets``: the prompt lengths to compile for (see :func:`prompt_bucket`); padding
    slots are masked, so the tokens do not depend on the bucket.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids must be [B, L] with a matching attention_mask, got {ids.shape} / {mask.shape}")
    if (mask.sum(1) == 0).any():
        raise ValueError("attention_mask: every row needs at least one real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    stops = (stop_token_ids,) if isinstance(stop_token_ids, (int, np.integer)) else tuple(stop_token_ids)
    positions, next_position = model.position_ids(ids, mask, image_grid_thw, video_grid_thw, mm_token_type_ids)
    pad = prompt_bucket(ids.shape[1], prompt_buckets) - ids.shape[1]
    if pad:  # right padding up to the bucket: invalid cache slots that no query attends to
        ids = np.pad(ids, ((0, 0), (0, pad)))  # id 0: a real embedding row (the mask hides it)
        mask = np.pad(mask, ((0, 0), (0, pad)))
        positions = np.pad(np.asarray(positions), ((0, 0), (0, 0), (0, pad)))
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions, jnp.int32),
                     jnp.asarray(next_position, jnp.int32), pixel_values, image_grid_thw, pixel_values_videos,
                     video_grid_thw, rng, max_new_tokens=max_new_tokens, stop_token_ids=tuple(int(s) for s in stops),
                     pad_token_id=int(pad_token_id), temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p))


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "stop_token_ids", "pad_token_id", "temperature",
                                             "top_k", "top_p"))
def _generate(model, ids, mask, positions, next_position, pixel_values, image_grid_thw, pixel_values_videos,
              video_grid_thw, rng, *, max_new_tokens, stop_token_ids, pad_token_id, temperature, top_k, top_p):
    batch, length = ids.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_token_ids if stop_token_ids else (-1,), jnp.int32)

    # Prefill the prompt into a cache with room for every new token.
    cache = init_cache(model.config.text, batch, length + max_new_tokens)
    inputs = model.prepare_inputs(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    hidden, cache = model.language_model(inputs.inputs_embeds, mask, positions, inputs.visual_pos_mask,
                                         inputs.deepstack_embeds, cache)
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each row's last real token
    logits = model.lm_logits(hidden[jnp.arange(batch), last])
    rng, key = jax.random.split(rng)
    token = sample(logits, key)
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    finished = jnp.isin(token, stops)
    lengths = jnp.ones((batch,), jnp.int32)

    # The loop body rebuilds the model from its state, so nothing it traces leaks into `model`.
    graphdef, state = nnx.split(model)

    def cond(carry):
        step, _, _, _, finished, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, token, cache, position, finished, out, lengths, rng = carry
        m = nnx.merge(graphdef, state)
        embeds = m.embed_tokens(token[:, None])
        pos = jnp.broadcast_to(position[None, :, None], (3, batch, 1))
        hidden, cache = m.language_model(embeds, jnp.ones((batch, 1), jnp.int32), pos, cache=cache)
        rng, key = jax.random.split(rng)
        new = sample(m.lm_logits(hidden[:, 0]), key)
        new = jnp.where(finished, pad_token_id, new)
        out = out.at[:, step].set(new)
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(new, stops)
        return step + 1, new, cache, position + 1, finished, out, lengths, rng

    carry = (jnp.ones((), jnp.int32), token, cache, next_position, finished, out, lengths, rng)
    carry = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(carry[5], carry[6])
