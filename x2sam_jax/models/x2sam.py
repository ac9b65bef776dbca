"""X2SAM: the full model, readable top-down as the data flow of
docs/architecture.md#the-model-at-a-glance.

    text + <image>/<video> + <p><region></p> ...                 frames [B, T, S, S, 3]
        Qwen3-VL ViT -> visual tokens (+ deepstack maps)          SAM2 Hiera + FPN, per frame
        region sampler <- extra_projector(stage-3 map of the prompt frame)
        LLM (LoRA) over the spliced sequence
        mlm_projector -> <SEG> embed, <p>..</p> span means (conditions), span tokens
        segmentor, scanned over frames: pixel decoder -> memory attention -> mask decoder
                                        -> memory encoder -> FIFO bank

A batch without masks (chat) takes ``X2SAM.language_only``: the ViT and the LLM, nothing of SAM2.

Parameter paths follow the official checkpoint (docs/architecture.md#released-checkpoint-layout):
``vlm.*`` (Qwen3-VL), ``segmentor.{encoder, pixel_decoder, decoder, memory}.*``,
``mlm_projector.*``, ``extra_projector.*``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from x2sam_jax.config import X2SAMConfig
from x2sam_jax.models.hiera import Sam2VisionEncoder
from x2sam_jax.models.mask_decoder import MaskDecoder
from x2sam_jax.models.mask_memory import MaskMemory
from x2sam_jax.models.pixel_decoder import PixelDecoder
from x2sam_jax.models.projectors import ExtraProjector, MLMProjector
from x2sam_jax.models.qwen3_vl import Qwen3VLModel
from x2sam_jax.models.region_sampler import region_tokens
from x2sam_jax.sharding import TOKENS, constrain


@dataclasses.dataclass
class X2SAMOutput:
    """Model outputs. With ``all_predictions`` the predictions of every decoder layer come too:
    dense (``all_mask_logits``) or, with ``dense_masks=False`` (training), factored as
    ``all_mask_embeddings`` and ``mask_features`` (logits = their product over channels), which
    the losses sample at their points without building the dense maps. :meth:`X2SAM.language_only`
    (a batch without masks) fills the text fields only; the segmentation fields are None."""

    text_logits: jax.Array | None          # [B, L, V] (None with lm_logits=False)
    mask_logits: jax.Array | None          # [B, T, Q, S/4, S/4], the last prediction (None: dense_masks=False)
    class_logits: jax.Array                # [B, T, Q, C + 1], background last
    all_mask_logits: jax.Array | None      # [P, B, T, Q, S/4, S/4] (P = decoder layers + 1) in training
    all_class_logits: jax.Array | None     # [P, B, T, Q, C + 1]
    cond_valid: jax.Array                  # [B, C], which condition slots are real
    all_mask_embeddings: jax.Array | None = None   # [P, B, T, Q, Cm] with dense_masks=False
    mask_features: jax.Array | None = None         # [B, T, S/4, S/4, Cm] with dense_masks=False
    text_hidden: jax.Array | None = None           # [B, L, D] final hidden states with lm_logits=False


jax.tree_util.register_dataclass(
    X2SAMOutput, data_fields=["text_logits", "mask_logits", "class_logits", "all_mask_logits",
                              "all_class_logits", "cond_valid", "all_mask_embeddings", "mask_features",
                              "text_hidden"],
    meta_fields=[])


def _model_outputs(masks, classes, *, all_predictions: bool, dense_masks: bool, text_logits, cond_valid,
                   embeddings=None, mask_features=None, text_hidden=None) -> X2SAMOutput:
    """X2SAMOutput from per-prediction stacks [P, B, T, ...]; ``masks`` is None without dense_masks."""
    factored = all_predictions and not dense_masks
    return X2SAMOutput(text_logits=text_logits, mask_logits=None if factored else masks[-1],
                       class_logits=classes[-1],
                       all_mask_logits=masks if all_predictions and dense_masks else None,
                       all_class_logits=classes if all_predictions else None, cond_valid=cond_valid,
                       all_mask_embeddings=embeddings if factored else None,
                       mask_features=mask_features if factored else None, text_hidden=text_hidden)


def place_rows(mask: jax.Array, rows: jax.Array, base: jax.Array) -> jax.Array:
    """Per sample, writes ``rows[b, k]`` at the k-th True position of ``mask[b]``.

    mask [B, L] bool, rows [B, N, D], base [B, L, D]. Jittable (static shapes); positions past
    the available rows keep their clipped row, which the caller avoids by construction.
    """
    index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, rows.shape[1] - 1)
    gathered = jnp.take_along_axis(rows, index[..., None], axis=1)
    return jnp.where(mask[..., None], gathered.astype(base.dtype), base)


def share_conditions(cond_embeds, cond_valid, shared):
    """Every sample's condition list becomes the whole batch's (cond_embeds [B, C, d] ->
    [B, B*C, d]); sample b sees sample b' 's conditions where shared[b, b'] (and always its own)."""
    batch, num, dim = cond_embeds.shape
    visible = shared.astype(bool) | jnp.eye(batch, dtype=bool)                      # [B, B']
    valid = visible[:, :, None] & cond_valid.astype(bool)[None]                      # [B, B', C]
    embeds = jnp.broadcast_to(cond_embeds.reshape(1, batch * num, dim), (batch, batch * num, dim))
    return embeds, valid.reshape(batch, batch * num)


def _frames_flat(valid_hw):
    """[B, T, 2] -> [B*T, 2] (None stays None)."""
    return None if valid_hw is None else valid_hw.reshape(-1, valid_hw.shape[-1])


def _dtypes(config) -> dict:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class Segmentor(nnx.Module):
    """SAM2 mask encoder + pixel decoder + mask decoder (with class head) + mask memory."""

    def __init__(self, config: X2SAMConfig, *, rngs: nnx.Rngs):
        self.encoder = Sam2VisionEncoder(config.mask_encoder, rngs=rngs)
        self.pixel_decoder = PixelDecoder(config.pixel_decoder, rngs=rngs)
        self.decoder = MaskDecoder(config.mask_decoder, rngs=rngs)
        self.memory = MaskMemory(config.memory, rngs=rngs)

    def __call__(self, levels, *, seg_embed, cond_tokens, cond_token_mask, cond_embeds, cond_valid,
                 all_predictions: bool, frame_valid=None, scan: bool = True, remat: str = "none",
                 dense_masks: bool = True, bank=None, first_frame=0, keep_bank: bool = False):
        """levels: the three SAM2 FPN maps, each [B, T, h, w, C], highest resolution first;
        frame_valid [B, T]: padded frames (False) are not written to the memory bank; ``bank``,
        ``first_frame``, ``keep_bank``: a clip of a longer video (``MaskMemory.run_video``; then
        the bank leaving the clip comes last in the returned tuple).

        Returns (mask logits [B, T, P, Q, h0, w0], class logits [B, T, P, Q, C + 1]); with
        ``all_predictions and not dense_masks`` (mask embeddings [B, T, P, Q, Cm], class logits,
        mask features [B, T, h0, w0, Cm]) instead.
        """
        factored = all_predictions and not dense_masks

        def pixel_decode(decoders, features, _):
            pixel_decoder, _ = decoders
            out = pixel_decoder(features)
            return out.mask_features, tuple(out.multi_scale_features)

        def mask_decode(decoders, multi_scale, mask_features, _):
            _, decoder = decoders
            out = decoder(multi_scale, mask_features, seg_embed=seg_embed, cond_tokens=cond_tokens,
                          cond_token_mask=cond_token_mask, cond_embeds=cond_embeds, cond_valid=cond_valid,
                          all_predictions=all_predictions, dense_masks=dense_masks)
            if factored:
                per_frame = (jnp.moveaxis(out.mask_embeddings, 0, 1), jnp.moveaxis(out.class_logits, 0, 1),
                             mask_features)
            else:
                per_frame = (jnp.moveaxis(out.mask_logits, 0, 1), jnp.moveaxis(out.class_logits, 0, 1))
            return per_frame, out.mask_logits[-1], out.class_logits[-1]

        return self.memory.run_video((self.pixel_decoder, self.decoder), pixel_decode, mask_decode,
                                     levels, frame_valid=frame_valid, scan=scan, remat=remat, bank=bank,
                                     first_frame=first_frame, keep_bank=keep_bank)


class X2SAM(nnx.Module):
    def __init__(self, config: X2SAMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vlm = Qwen3VLModel(config.vlm, rngs=rngs)
        self.segmentor = Segmentor(config, rngs=rngs)
        self.mlm_projector = MLMProjector(config.projector, rngs=rngs, **_dtypes(config.projector))
        self.extra_projector = ExtraProjector(config.projector, rngs=rngs, **_dtypes(config.projector))

    # -- the forward pass, in data-flow order ------------------------------------------------------

    def __call__(self, input_ids, attention_mask, pixel_values, grid_thw, sam_pixel_values, *,
                 cond_spans, cond_valid, seg_positions, sam_valid_hw=None, region_masks=None, region_valid=None,
                 region_frame=None, position_ids=None, region_key=None, frame_valid=None,
                 shared_conditions=None, all_predictions: bool = False, dense_masks: bool = True,
                 lm_logits: bool = True) -> X2SAMOutput:
        """One teacher-forced forward over a padded batch (its model inputs: :func:`model_inputs`).

        Args:
          input_ids, attention_mask: [B, L].
          pixel_values [B, P, 3*2*16*16], grid_thw [B, M, 3]: Qwen3-VL patches per sample
            (rows beyond the grids' patches / zero grid rows are padding), uint8 as the
            collator gives them or already normalised floats.
          sam_pixel_values: [B, T, S, S, 3] frames for the mask encoder, uint8 zero-padded
            bottom/right, or already normalised floats.
          sam_valid_hw: [B, T, 2] each frame's size before padding (needed with uint8 frames).
          cond_spans [B, C, 2] (inclusive token start/end of each <p>..</p>), cond_valid [B, C].
          seg_positions: [B, G] token index of each <SEG>; the first one conditions the queries.
          region_masks [B, R, S, S], region_valid [B, R], region_frame [B, R]: visual prompts.
          position_ids: [B, L] or [3, B, L]; default 0..L-1 (``position_mode="sequential"``).
          region_key: PRNG key of the region sampler's point draw (default: a fixed key), or one
            key per sample [B] (typed key array) for draws independent of the batch layout;
            training passes a fresh key every step.
          frame_valid: [B, T] bool, False for padded frames (never written to the memory bank).
          shared_conditions: [B, B] bool; sample b's class head also scores the conditions of
            every sample b' with shared_conditions[b, b'] (referring phrases of a micro-batch as
            shared negatives, docs/architecture.md#departures-from-the-official-code). The class
            logits then have B*C + 1 columns, sample b' 's condition c at column b'*C + c.
            None: each sample's own conditions only.
          all_predictions: also return the predictions of every decoder layer (training).
          dense_masks: with ``all_predictions``, return them as dense logits (True) or as mask
            embeddings and mask features (False: what the point-sampled losses read; no
            [P, B, T, Q, S/4, S/4] tensor is built).
          lm_logits: return the [B, L, V] text logits (True) or, instead, the final hidden
            states ``text_hidden`` [B, L, D] (False: training, whose LM loss runs the head on
            the labelled positions only, ``losses.chunked_lm_loss``).
        """
        levels, prompt_maps = self.encode_frames(sam_pixel_values, sam_valid_hw)
        hidden, conditions = self.read_prompt(
            prompt_maps, input_ids, attention_mask, pixel_values, grid_thw, cond_spans=cond_spans,
            cond_valid=cond_valid, seg_positions=seg_positions, region_masks=region_masks, region_valid=region_valid,
            region_frame=region_frame, position_ids=position_ids, region_key=region_key,
            shared_conditions=shared_conditions)
        text_logits = self.vlm.lm_logits(hidden) if lm_logits else None
        segmented = self.segmentor(
            levels, **conditions, all_predictions=all_predictions, frame_valid=frame_valid,
            scan=self.config.scan_frames, remat=self.config.frame_remat_policy, dense_masks=dense_masks)
        embeddings = mask_features = None
        if all_predictions and not dense_masks:
            (embeddings, classes, mask_features), masks = segmented, None
            embeddings = jnp.moveaxis(embeddings, 2, 0)
        else:
            masks, classes = segmented
            masks = jnp.moveaxis(masks, 2, 0)
        classes = jnp.moveaxis(classes, 2, 0)                      # [B, T, P, ...] -> [P, B, T, ...]
        return _model_outputs(masks, classes, all_predictions=all_predictions, dense_masks=dense_masks,
                              text_logits=text_logits, cond_valid=cond_valid.astype(bool),
                              embeddings=embeddings, mask_features=mask_features,
                              text_hidden=None if lm_logits else hidden)

    def language_only(self, input_ids, attention_mask, pixel_values, grid_thw, *, position_ids=None,
                      lm_logits: bool = True) -> X2SAMOutput:
        """The LLM-only forward of a batch without masks (chat): Qwen3-VL's ViT and the LLM, no
        SAM2 encoder, no decoders. The text logits (or, with ``lm_logits=False``, the final hidden
        states) are those of :meth:`__call__` on the same text and images when the text holds no
        region tokens (chat never does); every segmentation field of the output is None."""
        hidden = self.language(input_ids, attention_mask, pixel_values, grid_thw, position_ids=position_ids)
        return X2SAMOutput(text_logits=self.vlm.lm_logits(hidden) if lm_logits else None, mask_logits=None,
                           class_logits=None, all_mask_logits=None, all_class_logits=None, cond_valid=None,
                           text_hidden=None if lm_logits else hidden)

    # -- the pieces --------------------------------------------------------------------------------

    def read_prompt(self, prompt_maps, input_ids, attention_mask, pixel_values, grid_thw, *, cond_spans, cond_valid,
                    seg_positions, region_masks=None, region_valid=None, region_frame=None, position_ids=None,
                    region_key=None, shared_conditions=None):
        """The LLM's reading of the prompt: (final hidden states [B, L, D], the segmentor's
        condition arguments: ``seg_embed``, ``cond_tokens``, ``cond_token_mask``, ``cond_embeds``
        and ``cond_valid`` (with ``shared_conditions``, the whole batch's)). ``prompt_maps``: the
        stage-3 maps of :meth:`encode_frames`, which the region sampler reads; the other
        arguments as :meth:`__call__`'s. A long video reads its prompt once and segments clip
        after clip with the same conditions (``x2sam_jax.streaming``)."""
        regions = None
        if region_masks is not None:
            regions = self.region_embeddings(prompt_maps, region_masks, region_valid, region_frame, region_key)
            regions = regions.reshape(input_ids.shape[0], -1, regions.shape[-1])
        hidden = self.language(input_ids, attention_mask, pixel_values, grid_thw, regions=regions,
                               position_ids=position_ids)
        seg_embed, cond_tokens, cond_token_mask, cond_embeds = self.conditions(hidden, cond_spans, cond_valid,
                                                                               seg_positions)
        if shared_conditions is not None:
            cond_embeds, cond_valid = share_conditions(cond_embeds, cond_valid, shared_conditions)
        return hidden, dict(seg_embed=seg_embed, cond_tokens=cond_tokens, cond_token_mask=cond_token_mask,
                            cond_embeds=cond_embeds, cond_valid=cond_valid)

    def language(self, input_ids, attention_mask, pixel_values, grid_thw, *, regions=None, position_ids=None):
        """The LLM's final hidden states [B, L, D] over the text with the visual tokens (and
        deepstack features) of the ViT and, where given, the region tokens ``regions`` [B, n, D]
        spliced in at the image/video and <region> placeholders."""
        visual_tokens, deepstack = self.encode_visual(pixel_values, grid_thw)
        embeds = self.vlm.embed_tokens(jnp.clip(input_ids, 0, self.config.vlm.text.vocab_size - 1))
        visual_mask = (input_ids == self.config.vlm.image_token_id) | (input_ids == self.config.vlm.video_token_id)
        embeds = place_rows(visual_mask, visual_tokens, embeds)
        if regions is not None:
            embeds = place_rows(input_ids == self.config.region_token_id, regions, embeds)
        embeds = constrain(embeds, TOKENS)
        placed_deepstack = jax.vmap(lambda maps: place_rows(visual_mask, maps, jnp.zeros_like(embeds)))(deepstack)
        placed_deepstack = constrain(placed_deepstack, (None, *TOKENS))
        if position_ids is None:
            if self.config.vlm.position_mode != "sequential":
                raise ValueError("position_mode='mrope' needs explicit position_ids (Qwen3VLModel.position_ids)")
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        hidden, _ = self.vlm.language_model(embeds, attention_mask, position_ids, visual_mask, placed_deepstack)
        return hidden

    def encode_visual(self, pixel_values, grid_thw):
        """Qwen3-VL ViT per sample: (tokens [B, P/merge², D], deepstack [n, B, P/merge², D])."""

        @nnx.vmap(in_axes=(None, 0, 0), out_axes=(0, 1))
        def per_sample(vlm, pixels, grid):
            return vlm.encode_images(pixels, grid)

        tokens, deepstack = per_sample(self.vlm, pixel_values, grid_thw)
        return constrain(tokens, TOKENS), constrain(deepstack, (None, *TOKENS))

    def encode_frames(self, sam_pixel_values, sam_valid_hw=None):
        """SAM2 features of every frame [B, T, S, S, 3] (uint8 with ``sam_valid_hw`` [B, T, 2],
        or normalised floats): (three FPN levels [B, T, h, w, C], highest resolution first;
        stage-3 trunk maps [B, T, h3, w3, C3] for the region sampler)."""
        batch, frames = sam_pixel_values.shape[:2]
        out = self.segmentor.encoder(sam_pixel_values.reshape(batch * frames, *sam_pixel_values.shape[2:]),
                                     _frames_flat(sam_valid_hw))
        unflat = lambda x: x.reshape(batch, frames, *x.shape[1:])  # noqa: E731
        return tuple(unflat(x) for x in out.fpn_hidden_states), unflat(out.trunk_hidden_states[2])

    def region_embeddings(self, prompt_maps, region_masks, region_valid, region_frame, key):
        """64 LLM-width tokens per region [B, R, 64, D], sampled from the frame it was drawn on.

        The extra projector runs once per frame (not per region), then each region reads its frame.
        """
        batch, frames, h3, w3 = prompt_maps.shape[:4]
        num_regions = region_masks.shape[1]
        projected = self.extra_projector(prompt_maps.reshape(batch * frames, h3, w3, -1))  # [B*T, n, D]
        projected = projected.reshape(batch, frames, *self._projected_hw(h3, w3), projected.shape[-1])
        frame = jnp.zeros((batch, num_regions), jnp.int32) if region_frame is None else region_frame
        maps = jnp.take_along_axis(projected, frame[:, :, None, None, None], axis=1)        # [B, R, h, w, D]
        if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
            # One key per sample: region r of sample b draws with fold_in(key[b], r), so its points
            # do not depend on the batch size, the row or the padded region count (evaluation).
            keys = jax.vmap(lambda k: jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(num_regions)))(key)
            valid = jnp.ones((batch, num_regions), bool) if region_valid is None else region_valid.astype(bool)

            def one_region(feature_map, mask, ok, k):
                tokens, _ = region_tokens(feature_map[None], mask[None, None], k, region_valid=ok[None, None],
                                          num_points=self.config.projector.region_num_points,
                                          pool_kernel=self.config.projector.region_pool_kernel)
                return tokens[0, 0]

            flat = lambda x: x.reshape(batch * num_regions, *x.shape[2:])  # noqa: E731
            tokens = jax.vmap(one_region)(flat(maps), flat(region_masks), flat(valid), flat(keys))
            return tokens.reshape(batch, num_regions, *tokens.shape[1:])
        tokens, _ = region_tokens(
            maps.reshape(batch * num_regions, *maps.shape[2:]),
            region_masks.reshape(batch * num_regions, 1, *region_masks.shape[2:]),
            jax.random.key(0) if key is None else key,
            region_valid=None if region_valid is None else region_valid.reshape(batch * num_regions, 1),
            num_points=self.config.projector.region_num_points,
            pool_kernel=self.config.projector.region_pool_kernel)
        return tokens.reshape(batch, num_regions, tokens.shape[2], tokens.shape[3])

    def _projected_hw(self, h3: int, w3: int) -> tuple[int, int]:
        ratio = self.config.projector.downsample_ratio
        return round(h3 * ratio), round(w3 * ratio)

    def conditions(self, hidden, cond_spans, cond_valid, seg_positions):
        """Projected LLM states -> (<SEG> embed [B, d], span tokens [B, L, d] with their mask
        [B, L], span means [B, C, d]). The span tokens are the whole projected sequence with a
        key mask selecting the positions inside any valid <p>..</p> span."""
        projected = constrain(self.mlm_projector(hidden), TOKENS)                     # [B, L, d]
        seg_embed = jnp.take_along_axis(projected, seg_positions[:, :1, None], axis=1)[:, 0]
        position = jnp.arange(hidden.shape[1])
        in_span = ((position[None, None] >= cond_spans[..., :1]) & (position[None, None] <= cond_spans[..., 1:])
                   & cond_valid[..., None].astype(bool))                              # [B, C, L]
        weights = in_span.astype(projected.dtype)
        cond_embeds = jnp.einsum("bcl,bld->bcd", weights, projected) / jnp.maximum(weights.sum(-1, keepdims=True), 1)
        return seg_embed, projected, in_span.any(1), cond_embeds


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a collated x2sam_jax.data batch that :meth:`X2SAM.__call__` takes (the
    others, ``labels``, ``gt_masks``..., are targets for the losses and the metrics)."""
    names = list(inspect.signature(X2SAM.__call__).parameters)[1:]
    return {name: batch[name] for name in names if name in batch}


class ClassAgnosticSegmentor(nnx.Module):
    """Stage 1 (docs/recipe.md#stage-1-the-class-agnostic-segmentor): the segmentor alone,
    without the LLM, as a class-agnostic segmentor with one class ("object"), trained on SA-1B masks.

    As the official stage-1 model (``head_cls_type="linear"``, ``num_labels=1``,
    ``use_memory=False``): every frame is an independent image (no memory bank), the decoder's
    queries get no ``<SEG>`` embedding and no condition tokens, and a linear head scores
    [object, background]. Parameter paths under ``segmentor.`` are X2SAM's, so a stage-1
    checkpoint initialises stage 3's pixel decoder and mask decoder by path.
    """

    def __init__(self, config: X2SAMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.segmentor = Segmentor(config, rngs=rngs)
        self.class_head = nnx.Linear(
            config.mask_decoder.hidden_size, 2, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

    def __call__(self, sam_pixel_values, *, sam_valid_hw=None, all_predictions: bool = False,
                 dense_masks: bool = True) -> X2SAMOutput:
        """sam_pixel_values [B, T, S, S, 3] (uint8 with ``sam_valid_hw`` [B, T, 2], or normalised
        floats) -> mask logits [B, T, Q, S/4, S/4] and class logits [B, T, Q, 2] ([object,
        background]); all decoder predictions with ``all_predictions`` (factored as in
        :class:`X2SAMOutput` with ``dense_masks=False``)."""
        batch, frames = sam_pixel_values.shape[:2]
        images = sam_pixel_values.reshape(batch * frames, *sam_pixel_values.shape[2:])
        levels = self.segmentor.encoder(images, _frames_flat(sam_valid_hw)).fpn_hidden_states
        pixels = self.segmentor.pixel_decoder(tuple(levels))
        out = self.segmentor.decoder(tuple(pixels.multi_scale_features), pixels.mask_features,
                                     all_predictions=all_predictions, dense_masks=dense_masks)
        classes = self.class_head(out.queries).astype(jnp.float32)                  # [P, B*T, Q, 2]
        unflat = lambda x: x.reshape(x.shape[0], batch, frames, *x.shape[2:])       # noqa: E731
        return _model_outputs(unflat(out.mask_logits), unflat(classes), all_predictions=all_predictions,
                              dense_masks=dense_masks, text_logits=None, cond_valid=jnp.ones((batch, 1), bool),
                              embeddings=unflat(out.mask_embeddings),
                              mask_features=pixels.mask_features.reshape(batch, frames,
                                                                         *pixels.mask_features.shape[1:]))


def is_trainable_stage1(path: str) -> bool:
    """Stage 1 trains the pixel decoder, the mask decoder (without the text cross-attention and
    the cosine class head, which it never runs) and the linear class head; SAM2 and the unused
    memory are frozen."""
    if path.startswith("class_head."):
        return True
    if path.startswith("segmentor.pixel_decoder."):
        return True
    if path.startswith("segmentor.decoder."):
        return not path.startswith(("segmentor.decoder.class_predictor.", "segmentor.decoder.layers.text_cross_attn"))
    return False


# -- which parameters train (docs/architecture.md#lora-and-trainable-parameters) ---------------------

def is_trainable(path: str) -> bool:
    """Joint training updates LoRA, embed_tokens, lm_head, the ViT merger and deepstack mergers,
    the projectors and the whole segmentor; the ViT blocks and the LLM base weights are frozen."""
    if path.startswith("vlm.visual."):
        return path.startswith(("vlm.visual.merger.", "vlm.visual.deepstack_merger_list."))
    if path.startswith("vlm.language_model."):
        return path.startswith("vlm.language_model.embed_tokens.") or path.endswith((".lora_a", ".lora_b"))
    return True


COMPONENTS = (("vlm.visual", "Qwen3-VL vision encoder"), ("vlm.language_model", "Qwen3 LLM"),
              ("vlm.lm_head", "LM head"), ("segmentor.encoder", "SAM2 mask encoder"),
              ("segmentor.pixel_decoder", "pixel decoder"), ("segmentor.decoder", "mask decoder"),
              ("segmentor.memory", "mask memory"), ("mlm_projector", "mlm projector"),
              ("extra_projector", "extra projector"))


def parameter_counts(model_or_state) -> dict[str, dict[str, int]]:
    """{component: {"trainable": n, "frozen": n}} plus a "total" row; works on abstract models."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    flat = {".".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}
    counts = {name: {"trainable": 0, "frozen": 0} for _, name in COMPONENTS}
    counts["total"] = {"trainable": 0, "frozen": 0}
    for path, leaf in flat.items():
        size = int(jnp.size(leaf)) if not hasattr(leaf, "shape") else int(jnp.prod(jnp.array(leaf.shape)))
        kind = "trainable" if is_trainable(path) else "frozen"
        name = next((n for prefix, n in COMPONENTS if path.startswith(prefix + ".")), None)
        if name is None:
            raise ValueError(f"parameter {path} belongs to no component of X2SAM")
        counts[name][kind] += size
        counts["total"][kind] += size
    return counts
