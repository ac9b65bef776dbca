"""Conversion table for the X2SAM mask decoder: transformers' / X2SAM's
``Mask2FormerTransformerModule`` (and ``ClassPredictor``) keys <-> the flat parameter paths of
``x2sam_jax.models.mask_decoder.MaskDecoder``.

Used by the X2SAM converter (``convert_weights/x2sam.py``). The decoder layers are stacked on a
leading ``layers`` axis, so ``{n}`` appears only in the source key.
"""

from __future__ import annotations

from x2sam_jax.config import MaskDecoderConfig
from x2sam_jax.conversion import CONV2D, IDENTITY, LINEAR, Rule


def mask_decoder_rules(config: MaskDecoderConfig, prefix: str = "", *, class_predictor_prefix: str | None = None,
                       bg_embeds_key: str | None = None) -> list[Rule]:
    """torch key -> flat parameter path of ``MaskDecoder``.

    ``prefix`` is the torch prefix of ``Mask2FormerTransformerModule`` (X2SAM:
    ``"segmentor.decoder."``). The class head's rules are added when its keys are given (X2SAM:
    ``class_predictor_prefix="segmentor.class_predictor."``, ``bg_embeds_key="bg_embeds.weight"``).
    """
    p = prefix
    rules = [Rule(f"{p}queries_embedder.weight", "queries_embedder.embedding"),
             Rule(f"{p}queries_features.weight", "queries_features.embedding"),
             Rule(f"{p}level_embed.weight", "level_embed.embedding"),
             Rule(f"{p}decoder.layernorm.weight", "layernorm.scale"),
             Rule(f"{p}decoder.layernorm.bias", "layernorm.bias")]
    if config.level_feature_size != config.hidden_size:
        rules += [Rule(f"{p}input_projections.{{i}}.weight", "input_projections.{i}.kernel", CONV2D),
                  Rule(f"{p}input_projections.{{i}}.bias", "input_projections.{i}.bias")]
    for i in range(3):
        rules += [Rule(f"{p}decoder.mask_predictor.mask_embedder.{i}.0.weight", f"mask_embedder.{i}.kernel", LINEAR),
                  Rule(f"{p}decoder.mask_predictor.mask_embedder.{i}.0.bias", f"mask_embedder.{i}.bias")]
    layer = f"{p}decoder.layers.{{n}}."
    packed = ["cross_attn"] + (["text_cross_attn"] if config.use_text_cross_attn else [])
    for name in packed:
        rules += [Rule(f"{layer}{name}.in_proj_weight", f"layers.{name}.in_proj.kernel", LINEAR),
                  Rule(f"{layer}{name}.in_proj_bias", f"layers.{name}.in_proj.bias"),
                  Rule(f"{layer}{name}.out_proj.weight", f"layers.{name}.out_proj.kernel", LINEAR),
                  Rule(f"{layer}{name}.out_proj.bias", f"layers.{name}.out_proj.bias")]
    linears = [f"self_attn.{n}_proj" for n in ("q", "k", "v", "out")] + ["fc1", "fc2"]
    for name in linears:
        rules += [Rule(f"{layer}{name}.weight", f"layers.{name}.kernel", LINEAR),
                  Rule(f"{layer}{name}.bias", f"layers.{name}.bias")]
    norms = ["cross_attn_layer_norm", "self_attn_layer_norm", "final_layer_norm"]
    norms += ["text_cross_attn_layer_norm"] if config.use_text_cross_attn else []
    for name in norms:
        rules += [Rule(f"{layer}{name}.weight", f"layers.{name}.scale"),
                  Rule(f"{layer}{name}.bias", f"layers.{name}.bias")]
    if class_predictor_prefix is not None:
        rules.append(Rule(f"{class_predictor_prefix}logit_scale", "class_predictor.logit_scale", IDENTITY))
    if bg_embeds_key is not None:
        rules.append(Rule(bg_embeds_key, "class_predictor.bg_embeds", IDENTITY))
    return rules
