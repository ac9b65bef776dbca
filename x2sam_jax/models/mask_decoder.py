"""X2SAM mask decoder: Mask2Former masked-attention decoder + text cross-attention + cosine class head.

Per layer i (post-norm, as X2SAM's ``forward_post``):
  1. masked cross-attention of the queries to pixel-decoder level i % 3; a key is blocked where
     the previous prediction, bilinearly resized to the level, has sigmoid < 0.5 (a query whose
     whole row is blocked attends everywhere);
  2. cross-attention of the queries to the condition tokens (projected ``<p>...</p>`` span
     tokens, key-padding mask); its output projection starts at zero, so at initialisation the
     block only re-applies a LayerNorm;
  3. self-attention of the queries; 4. FFN (ReLU).
A shared LayerNorm + 3-layer MLP turns the queries into mask embeddings before the first layer
and after each layer (num_layers + 1 predictions); mask logits = <mask embedding, mask feature>.
The projected ``<SEG>`` embedding is added to every content query.

Class head: logits = exp(logit_scale) * cos(query, condition), clamped to +-50, with a learned
background embedding appended as the last class and padded condition slots at -1e6 (the
official ``ClassPredictor`` with ``head_cls_type="learn"``).

Parameter names follow transformers' / X2SAM's ``Mask2FormerTransformerModule`` (the conversion
table is ``convert_weights/mask_decoder.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from x2sam_jax.config import MaskDecoderConfig
from x2sam_jax.layers.attention import Attention
from x2sam_jax.layers.interpolate import resize
from x2sam_jax.layers.position import sine_position_embedding
from x2sam_jax.layers.scan import create_stack, remat_policy
from x2sam_jax.models.pixel_decoder import dense, dtypes, layer_norm, xavier, zeros
from x2sam_jax.sharding import QUERIES, constrain


def _attention(config: MaskDecoderConfig, *, packed: bool, zero_init_output: bool = False, rngs: nnx.Rngs,
               **dt) -> Attention:
    """torch ``nn.MultiheadAttention`` (``packed``: ``in_proj`` packs q/k/v, ``out_proj``) or
    Mask2FormerAttention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), batch-first."""
    d = config.hidden_size

    def linear(name, din, dout, axes):
        init = dict(kernel_init=zeros) if zero_init_output and name == "out_proj" else {}
        return dense(din, dout, axes, rngs=rngs, **init, **dt)

    return Attention(d, config.num_heads, d // config.num_heads, make_linear=linear,
                     packed_name="in_proj" if packed else None, out_name="out_proj",
                     implementation=config.attention_implementation, query_chunk=config.attention_query_chunk)


class MaskDecoderLayer(nnx.Module):
    def __init__(self, config: MaskDecoderConfig, *, rngs: nnx.Rngs):
        d, eps, dt = config.hidden_size, config.layer_norm_eps, dtypes(config)
        self.cross_attn = _attention(config, packed=True, rngs=rngs, **dt)
        self.cross_attn_layer_norm = layer_norm(d, eps, rngs=rngs, **dt)
        if config.use_text_cross_attn:
            self.text_cross_attn = _attention(config, packed=True, zero_init_output=config.zero_init_text_cross_attn,
                                              rngs=rngs, **dt)
            self.text_cross_attn_layer_norm = layer_norm(d, eps, rngs=rngs, **dt)
        self.self_attn = _attention(config, packed=False, rngs=rngs, **dt)
        self.self_attn_layer_norm = layer_norm(d, eps, rngs=rngs, **dt)
        self.fc1 = dense(d, config.ffn_dim, ("embed", "mlp"), rngs=rngs, **dt)
        self.fc2 = dense(config.ffn_dim, d, ("mlp", "embed"), rngs=rngs, **dt)
        self.final_layer_norm = layer_norm(d, eps, rngs=rngs, **dt)
        self.use_text_cross_attn = config.use_text_cross_attn

    def __call__(self, hidden, query_position, level_features, level_position, allowed,
                 cond_tokens=None, cond_token_mask=None):
        """hidden/query_position [B, Q, D]; level_features [B, HW, D]; level_position [HW, D];
        allowed [B, Q, HW] bool; cond_tokens [B, N, D] with cond_token_mask [B, N] (True = real)."""
        attended = self.cross_attn(hidden + query_position, level_features + level_position, level_features,
                                   mask=allowed[:, None])
        hidden = self.cross_attn_layer_norm(hidden + attended)
        if self.use_text_cross_attn and cond_tokens is not None:
            # A sample without condition tokens gets a zero update.
            attended = self.text_cross_attn(hidden + query_position, cond_tokens, cond_tokens,
                                            key_mask=cond_token_mask)
            hidden = self.text_cross_attn_layer_norm(hidden + attended)
        with_position = hidden + query_position      # q = k = hidden + position, v = hidden
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(with_position, with_position, hidden))
        ffn = checkpoint_name(self.fc2(checkpoint_name(jax.nn.relu(self.fc1(hidden)), "mlp_hidden")), "mlp_out")
        return self.final_layer_norm(hidden + ffn)


class ClassPredictor(nnx.Module):
    """Cosine-similarity class head with a learned temperature and a background class."""

    def __init__(self, config: MaskDecoderConfig, *, rngs: nnx.Rngs):
        self.logit_scale = nnx.Param(jnp.full((1,), config.logit_scale_init, jnp.float32), out_sharding=(None,))
        # torch nn.Embedding's default init, N(0, 1).
        self.bg_embeds = nnx.Param(jax.random.normal(rngs.params(), (1, config.hidden_size),
                                                     jnp.dtype(config.param_dtype)),
                                   out_sharding=(None, "embed"))
        self.clamp = config.logit_clamp
        self.padded_logit = config.padded_class_logit

    def __call__(self, queries: jnp.ndarray, cond_embeds: jnp.ndarray, cond_valid: jnp.ndarray) -> jnp.ndarray:
        """queries [..., B, Q, D]; cond_embeds [B, C, D]; cond_valid [B, C] -> logits [..., B, Q, C + 1]."""
        batch = cond_embeds.shape[0]
        background = jnp.broadcast_to(self.bg_embeds[...].astype(cond_embeds.dtype), (batch, 1, cond_embeds.shape[-1]))
        conditions = jnp.concatenate([cond_embeds, background], 1)
        valid = jnp.concatenate([cond_valid.astype(bool), jnp.ones((batch, 1), bool)], 1)

        def normalize(x):  # F.normalize: x / max(||x||, 1e-12)
            # written as rsqrt(max(|x|², 1e-24)) so the gradient at a zero (padded) condition is
            # 0 rather than NaN, which jnp.linalg.norm's gradient would give
            x = x.astype(jnp.float32)
            return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))

        cosine = jnp.einsum("...bqd,bcd->...bqc", normalize(queries), normalize(conditions))
        logits = jnp.clip(jnp.exp(self.logit_scale[...]) * cosine, -self.clamp, self.clamp)
        return jnp.where(valid[:, None, :], logits, self.padded_logit)


@dataclasses.dataclass
class MaskDecoderOutput:
    mask_logits: jnp.ndarray            # [P, B, Q, H, W]; only the last prediction ([1, ...]) without dense_masks
    class_logits: jnp.ndarray | None    # [P, B, Q, C + 1], None without conditions
    queries: jnp.ndarray                # [P, B, Q, D], after the shared LayerNorm
    mask_embeddings: jnp.ndarray        # [P, B, Q, mask_feature_size]: mask logits = <embedding, mask feature>


jax.tree_util.register_dataclass(MaskDecoderOutput,
                                 data_fields=["mask_logits", "class_logits", "queries", "mask_embeddings"],
                                 meta_fields=[])


class MaskDecoder(nnx.Module):
    def __init__(self, config: MaskDecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, dt = config.hidden_size, dtypes(config)
        embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("queries", "embed"))
        self.queries_embedder = nnx.Embed(config.num_queries, d, embedding_init=embed_init, rngs=rngs, **dt)
        self.queries_features = nnx.Embed(config.num_queries, d, embedding_init=embed_init, rngs=rngs, **dt)
        self.level_embed = nnx.Embed(config.num_levels, d, rngs=rngs, **dt, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02), (None, "embed")))
        if config.level_feature_size != d:
            self.input_projections = nnx.List([
                nnx.Conv(config.level_feature_size, d, (1, 1), padding="VALID", **dt,
                         kernel_init=nnx.with_partitioning(xavier, ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                         bias_init=nnx.with_partitioning(zeros, ("conv_out",)), rngs=rngs)
                for _ in range(config.num_levels)])
        self.layers = create_stack(lambda r: MaskDecoderLayer(config, rngs=r), config.num_layers, rngs)
        self.layernorm = layer_norm(d, config.layer_norm_eps, rngs=rngs, **dt)
        out_dims = (d, d, config.mask_feature_size)
        self.mask_embedder = nnx.List([dense(d, out, ("embed", "mlp" if i < 2 else "embed"), rngs=rngs, **dt)
                                       for i, out in enumerate(out_dims)])
        self.class_predictor = ClassPredictor(config, rngs=rngs)

    # -- pieces -------------------------------------------------------------------------------

    def predict(self, hidden: jnp.ndarray, mask_features: jnp.ndarray, target_size: tuple[int, int]):
        """Shared head: (normed queries, mask logits [B, Q, H, W], allowed keys [B, Q, h*w] at target_size)."""
        normed = self.layernorm(hidden)
        logits = constrain(self.mask_logits(normed, mask_features), ("batch", "queries", "height", "width"))
        small = resize(logits.transpose(0, 2, 3, 1), target_size, method="bilinear", align_corners=False)
        small = small.reshape(small.shape[0], -1, small.shape[-1]).transpose(0, 2, 1)
        blocked = jax.nn.sigmoid(small.astype(jnp.float32)) < 0.5
        # A query blocked from every key attends everywhere instead.
        blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)
        return normed, logits, jax.lax.stop_gradient(~blocked)

    def mask_embeddings(self, normed_queries: jnp.ndarray) -> jnp.ndarray:
        """The mask embedder MLP: LayerNorm-ed queries [..., Q, D] -> [..., Q, mask_feature_size]."""
        embed = normed_queries
        for i, linear in enumerate(self.mask_embedder):
            embed = linear(embed)
            if i < len(self.mask_embedder) - 1:
                embed = jax.nn.relu(embed)
        return embed

    def mask_logits(self, normed_queries: jnp.ndarray, mask_features: jnp.ndarray) -> jnp.ndarray:
        """Mask logits [B, Q, H, W] of LayerNorm-ed queries [B, Q, D] and mask features [B, H, W, C]."""
        return jnp.einsum("bqc,bhwc->bqhw", self.mask_embeddings(normed_queries), mask_features)

    def classify(self, queries, cond_embeds, cond_valid):
        return self.class_predictor(queries, cond_embeds, cond_valid)

    # -- forward ------------------------------------------------------------------------------

    def __call__(self, multi_scale_features: Sequence[jnp.ndarray], mask_features: jnp.ndarray, *,
                 seg_embed: jnp.ndarray | None = None, cond_tokens: jnp.ndarray | None = None,
                 cond_token_mask: jnp.ndarray | None = None, cond_embeds: jnp.ndarray | None = None,
                 cond_valid: jnp.ndarray | None = None, all_predictions: bool = True,
                 dense_masks: bool = True) -> MaskDecoderOutput:
        """Runs the decoder.

        Args:
          multi_scale_features: num_levels NHWC maps [B, h_i, w_i, D], lowest resolution first.
          mask_features: [B, H, W, mask_feature_size] (the pixel decoder's 1/4-scale map).
          seg_embed: [B, D] projected <SEG> state, added to every content query.
          cond_tokens / cond_token_mask: [B, N, D] / [B, N] (True = real token) for the text
            cross-attention; without them the block is skipped.
          cond_embeds / cond_valid: [B, C, D] / [B, C] conditions of the class head.
          all_predictions: return all num_layers + 1 predictions (training), else the last.
          dense_masks: with ``all_predictions``, also return every prediction's dense mask logits
            [P, B, Q, H, W]. False (training with point losses): only the last prediction's dense
            logits (the memory encoder reads them); the losses read the others as
            ``mask_embeddings`` x ``mask_features`` at their points, which never builds the
            [P, B, Q, H, W] tensor.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        features = tuple(jnp.asarray(x, dtype) for x in multi_scale_features)
        mask_features = jnp.asarray(mask_features, dtype)
        if cond_tokens is not None:
            cond_tokens = jnp.asarray(cond_tokens, dtype)
        if len(features) != cfg.num_levels:
            raise ValueError(f"MaskDecoder: expected {cfg.num_levels} feature levels, got {len(features)}")
        for i, x in enumerate(features):
            if x.ndim != 4 or x.shape[-1] != cfg.level_feature_size:
                raise ValueError(f"MaskDecoder: multi_scale_features[{i}] must be "
                                 f"[B, h, w, {cfg.level_feature_size}], got {x.shape}")
        if cfg.level_feature_size != cfg.hidden_size:
            features = tuple(proj(x) for proj, x in zip(self.input_projections, features))
        if mask_features.shape[-1] != cfg.mask_feature_size:
            raise ValueError(f"MaskDecoder: mask_features must end with {cfg.mask_feature_size} channels, "
                             f"got {mask_features.shape}")
        if (cond_tokens is None) != (cond_token_mask is None):
            raise ValueError("MaskDecoder: cond_tokens and cond_token_mask go together")
        if (cond_embeds is None) != (cond_valid is None):
            raise ValueError("MaskDecoder: cond_embeds and cond_valid go together")
        batch = mask_features.shape[0]
        sizes = tuple((x.shape[1], x.shape[2]) for x in features)
        level_embed = self.level_embed.embedding[...].astype(dtype)
        level_feats, level_pos = [], []
        for i, x in enumerate(features):
            h, w = sizes[i]
            level_feats.append(x.reshape(batch, h * w, -1) + level_embed[i].astype(x.dtype))
            level_pos.append(sine_position_embedding(h, w, cfg.hidden_size // 2, dtype=x.dtype).reshape(h * w, -1))

        query_position = jnp.broadcast_to(self.queries_embedder.embedding[...].astype(dtype)[None],
                                          (batch, cfg.num_queries, cfg.hidden_size))
        hidden = jnp.broadcast_to(self.queries_features.embedding[...].astype(dtype)[None], query_position.shape)
        if seg_embed is not None:
            hidden = hidden + seg_embed[:, None, :].astype(hidden.dtype)
        if cond_token_mask is not None:
            cond_token_mask = cond_token_mask.astype(bool)

        normed0, logits0, allowed = self.predict(hidden, mask_features, sizes[0])

        def run_layer(layer, level, hidden, allowed):
            hidden = constrain(layer(hidden, query_position, level_feats[level], level_pos[level], allowed,
                                     cond_tokens, cond_token_mask), QUERIES)
            normed, logits, allowed = self.predict(hidden, mask_features, sizes[(level + 1) % cfg.num_levels])
            return hidden, allowed, normed, logits

        graphdef, params = nnx.split(self.layers)
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        levels = cfg.num_levels
        if cfg.scan_layers and cfg.num_layers % levels == 0:
            # Scan over rounds of `levels` layers (one per level), so every step has static shapes.
            rounds = cfg.num_layers // levels
            by_round = jax.tree.map(lambda a: a.reshape(rounds, levels, *a.shape[1:]), params)

            def round_step(carry, round_params):
                hidden, allowed = carry
                normed_all, logits_all = [], []
                for level in range(levels):
                    layer = nnx.merge(graphdef, take(round_params, level))
                    hidden, allowed, normed, logits = run_layer(layer, level, hidden, allowed)
                    normed_all.append(normed)
                    logits_all.append(logits)
                ys = (jnp.stack(normed_all), jnp.stack(logits_all) if all_predictions and dense_masks else None)
                return (hidden, allowed), ys

            if cfg.remat_policy != "none":
                round_step = jax.checkpoint(round_step, policy=remat_policy(cfg.remat_policy))
            (_, _), (normed_ys, logits_ys) = jax.lax.scan(round_step, (hidden, allowed), by_round)
            normed_ys = normed_ys.reshape(-1, *normed_ys.shape[2:])
            if all_predictions and dense_masks:
                logits_ys = logits_ys.reshape(-1, *logits_ys.shape[2:])
        else:
            normed_list, logits_list = [], []
            for i in range(cfg.num_layers):
                layer = nnx.merge(graphdef, take(params, i))
                hidden, allowed, normed, logits = run_layer(layer, i % levels, hidden, allowed)
                normed_list.append(normed)
                logits_list.append(logits)
            normed_ys, logits_ys = jnp.stack(normed_list), jnp.stack(logits_list)

        if all_predictions:
            queries = jnp.concatenate([normed0[None], normed_ys], 0)
            if dense_masks:
                mask_logits = jnp.concatenate([logits0[None], logits_ys], 0)
            else:  # the last one only, recomputed from its queries (same ops as inside the scan)
                mask_logits = self.mask_logits(normed_ys[-1], mask_features)[None]
        else:
            # Only the last prediction; inside a scan it is recomputed from its queries (same ops).
            queries = normed_ys[-1:]
            mask_logits = self.mask_logits(normed_ys[-1], mask_features)[None]
        class_logits = None
        if cond_embeds is not None:
            class_logits = self.classify(queries, cond_embeds, cond_valid)
        return MaskDecoderOutput(mask_logits=mask_logits, class_logits=class_logits, queries=queries,
                                 mask_embeddings=self.mask_embeddings(queries))
