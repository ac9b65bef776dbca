"""Qwen3-VL: the ViT (``qwen3_vl_vision``) + the Qwen3 text model (``qwen3_text``) + lm_head.

``model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...,
pixel_values_videos=..., video_grid_thw=...)`` takes what ``transformers.Qwen3VLProcessor``
produces (numpy or jax arrays) and returns ``Qwen3VLOutput(logits, hidden_states, cache)``.

The steps, each exposed for X2SAM (which splices its own embeddings into the sequence):

1. ``encode_images(pixel_values, grid_thw)`` -> merged visual tokens + deepstack maps;
2. ``embed_tokens(input_ids)``, visual rows scattered at the image/video pad tokens;
3. ``position_ids(...)``: interleaved M-RoPE positions by transformers' ``get_rope_index`` rule
   (``position_mode="mrope"``) or plain 0..n-1 over the real tokens (``"sequential"``, what the
   released X2SAM uses); computed on the host with numpy, since they depend on the grid sizes;
4. ``language_model(inputs_embeds, attention_mask, position_ids, visual_pos_mask,
   deepstack_embeds, cache)`` -> (hidden states after the final norm, cache);
5. ``lm_logits(hidden)`` (tied: the embedding matrix; untied: ``lm_head``).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax.config import Qwen3VLConfig
from x2sam_jax.layers.pixels import normalize_patches
from x2sam_jax.models.lora import LoRALinear
from x2sam_jax.models.qwen3_text import Qwen3TextModel, scatter_rows
from x2sam_jax.models.qwen3_vl_vision import Qwen3VLVisionModel
from x2sam_jax.sharding import constrain, vocab_parallel_logits


class Qwen3VLOutput(NamedTuple):
    logits: jax.Array            # [B, L, V]
    hidden_states: jax.Array     # [B, L, D] last hidden states after the final norm
    cache: Any = None


class VisualInputs(NamedTuple):
    inputs_embeds: jax.Array               # [B, L, D], visual rows in place
    visual_pos_mask: jax.Array | None      # [B, L] bool
    deepstack_embeds: jax.Array | None     # [n, B, L, D] placed at the visual positions


def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None, *,
                   image_token_id: int, video_token_id: int, spatial_merge_size: int,
                   mm_token_type_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions [3, B, L] and the next free position per row [B] (numpy).

    Same rule as transformers' ``Qwen3VLModel.get_rope_index``: text runs count up by one on all
    three rows; an image (or each frame of a video, which is split into t single-frame grids)
    gets (t, h, w) grid coordinates offset by the running position, which then advances by
    max(h, w) / merge. Padding positions (attention_mask 0) are 0.
    """
    ids = np.asarray(input_ids)
    batch, length = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mm_token_type_ids is None:
        types = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
    else:
        types = np.asarray(mm_token_type_ids)
    grids = {1: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()),
             2: iter([] if video_grid_thw is None else
                     [[1, h, w] for t, h, w in np.asarray(video_grid_thw).tolist() for _ in range(t)])}
    positions = np.zeros((3, batch, length), np.int64)
    next_position = np.zeros((batch,), np.int64)
    for b in range(batch):
        keep = np.nonzero(mask[b])[0]
        chunks, current, offset = [], 0, 0
        for kind, group in itertools.groupby(types[b, keep].tolist()):
            size = len(list(group))
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(size) + current, (3, size)))
                current += size
            else:
                name = "image_grid_thw" if kind == 1 else "video_grid_thw"
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"row {b}: more {'image' if kind == 1 else 'video frame'} token groups "
                                     f"than entries in {name}")
                t, h, w = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
                if t * h * w != size:
                    raise ValueError(f"row {b}, tokens {offset}..{offset + size}: a group of {size} "
                                     f"{'image' if kind == 1 else 'video'} tokens does not match "
                                     f"{name} entry {grid} ({t * h * w} merged tokens)")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
                chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(grid[1], grid[2]) // spatial_merge_size
            offset += size
        if chunks:
            rows = np.concatenate(chunks, axis=1)
            positions[:, b, keep] = rows
            next_position[b] = rows.max() + 1
    for kind, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if next(grids[kind], None) is not None:
            raise ValueError(f"{name} has more entries than the input_ids have visual token groups")
    return positions, next_position


def sequential_position_ids(attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """1-D positions 0..n-1 over the real tokens of each row, broadcast to [3, B, L]; next [B]."""
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    return np.broadcast_to(positions[None], (3,) + mask.shape).copy(), mask.sum(1)


class Qwen3VLModel(nnx.Module):
    """Qwen3VLForConditionalGeneration in NNX. Parameter paths: ``visual.*``,
    ``language_model.{embed_tokens.embedding, layers.*, norm.weight}``, ``lm_head.kernel`` (untied)."""

    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = Qwen3VLVisionModel(config.vision, rngs=rngs) if config.vision is not None else None
        self.language_model = Qwen3TextModel(config.text, config.lora, rngs=rngs)
        t = config.text
        self.lm_head = (None if t.tie_word_embeddings else
                        LoRALinear(t.hidden_size, t.vocab_size, axes=("embed", "vocab"), rngs=rngs))

    # -- pieces ---------------------------------------------------------------------------------

    def embed_tokens(self, input_ids) -> jax.Array:
        ids = jnp.asarray(input_ids)
        return self.language_model.embed_tokens(ids).astype(jnp.dtype(self.config.text.dtype))

    def lm_logits(self, hidden_states, vocab_parallel: bool = False) -> jax.Array:
        """[..., D] -> [..., V] logits. ``vocab_parallel``: the vocabulary split over every device
        (``sharding.vocab_parallel_logits``; [..., V padded to the device count]), for the
        training loss on chunks of positions."""
        hidden_states = jnp.asarray(hidden_states)
        if self.lm_head is None:
            weight = self.language_model.embed_tokens.embedding[...].T             # [D, V]
        else:
            weight = self.lm_head.kernel[...]                                       # no bias, no adapter
        if vocab_parallel:
            return vocab_parallel_logits(hidden_states, weight.astype(hidden_states.dtype))
        # FSDP: the head's weight is gathered over fsdp (vocab stays over tensor) before the
        # product. Left to itself the partitioner contracts over the fsdp-sharded width and
        # all-reduces [B, L, V] logits, replicated on every device.
        weight = constrain(weight.astype(hidden_states.dtype), (None, "vocab"))
        logits = hidden_states @ weight
        return constrain(logits, ("batch", "vocab") if logits.ndim == 2 else ("batch", "length", "vocab"))

    def encode_images(self, pixel_values, grid_thw) -> tuple[jax.Array, jax.Array]:
        """(merged visual tokens [N/merge², D], deepstack maps [n, N/merge², D]) of packed patches:
        normalised floats (the processor's) or uint8 (``data.transforms``), normalised here first
        (``layers.pixels.normalize_patches``)."""
        if self.visual is None:
            raise ValueError("this Qwen3VLModel has no vision tower (config.vision is None)")
        dtype = jnp.dtype(self.config.vision.dtype)
        grid_thw = jnp.asarray(grid_thw, jnp.int32)
        pixels = normalize_patches(jnp.asarray(pixel_values), grid_thw, dtype, channels=self.config.vision.in_channels)
        return self.visual(pixels.astype(dtype), grid_thw)

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     mm_token_type_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Positions [3, B, L] by ``config.position_mode`` and the next position per row [B]."""
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        if self.config.position_mode == "sequential":
            return sequential_position_ids(mask)
        merge = self.config.vision.spatial_merge_size if self.config.vision is not None else 2
        return get_rope_index(ids, mask, image_grid_thw, video_grid_thw,
                              image_token_id=self.config.image_token_id,
                              video_token_id=self.config.video_token_id,
                              spatial_merge_size=merge, mm_token_type_ids=mm_token_type_ids)

    def prepare_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                       video_grid_thw=None) -> VisualInputs:
        """Token embeddings with the visual tokens scattered in, plus the deepstack maps."""
        ids = jnp.asarray(input_ids)
        embeds = self.embed_tokens(ids)
        visual_mask, deepstack = None, None
        for name, pixels, grid, token_id in (
                ("pixel_values", pixel_values, image_grid_thw, self.config.image_token_id),
                ("pixel_values_videos", pixel_values_videos, video_grid_thw, self.config.video_token_id)):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{name} given without its grid_thw")
            rows, stack = self.encode_images(pixels, grid)
            mask = ids == token_id
            embeds = scatter_rows(mask, rows, embeds)
            placed = jax.vmap(lambda r: scatter_rows(mask, r))(stack.astype(embeds.dtype))
            visual_mask = mask if visual_mask is None else visual_mask | mask
            deepstack = placed if deepstack is None else deepstack + placed
        return VisualInputs(embeds, visual_mask, deepstack)

    # -- full forward ---------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, position_ids=None,
                 mm_token_type_ids=None, cache=None, **unused) -> Qwen3VLOutput:
        """Logits of a processor batch (positions on the host, the rest in one jitted call).

        ``unused`` swallows other processor outputs. Inside an outer ``jit`` pass ``position_ids``
        (from :meth:`position_ids`), since M-RoPE positions need concrete ids and grids.
        """
        traced = isinstance(input_ids, jax.core.Tracer)
        ids = input_ids if traced else np.asarray(input_ids)
        mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if position_ids is None:
            if traced:
                raise ValueError("under jit, pass position_ids (see Qwen3VLModel.position_ids)")
            position_ids, _ = self.position_ids(ids, np.asarray(mask), image_grid_thw, video_grid_thw,
                                                mm_token_type_ids)
        if not traced:
            merge = self.config.vision.spatial_merge_size if self.config.vision is not None else 1
            for name, grid, token_id in (("image_grid_thw", image_grid_thw, self.config.image_token_id),
                                         ("video_grid_thw", video_grid_thw, self.config.video_token_id)):
                expected = 0 if grid is None else int(np.asarray(grid).prod(-1).sum()) // merge ** 2
                found = int((ids == token_id).sum())
                if expected != found:
                    raise ValueError(f"{name} describes {expected} merged visual tokens but input_ids hold "
                                     f"{found} placeholder tokens (id {token_id})")
        return _forward(self, jnp.asarray(ids), mask, jnp.asarray(position_ids), pixel_values, image_grid_thw,
                        pixel_values_videos, video_grid_thw, cache)

    def forward_arrays(self, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, cache=None) -> Qwen3VLOutput:
        """The traceable forward: every input an array, positions given."""
        inputs = self.prepare_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        hidden, cache = self.language_model(inputs.inputs_embeds, attention_mask, position_ids,
                                            inputs.visual_pos_mask, inputs.deepstack_embeds, cache)
        return Qwen3VLOutput(self.lm_logits(hidden), hidden, cache)


@nnx.jit
def _forward(model: Qwen3VLModel, *args) -> Qwen3VLOutput:
    return model.forward_arrays(*args)
