"""Conversion table for the X2SAM pixel decoder: transformers ``Mask2FormerPixelDecoder`` keys <->
the flat parameter paths of ``x2sam_jax.models.pixel_decoder.PixelDecoder``.

Used by the X2SAM converter (``convert_weights/x2sam.py``). The encoder layers are stacked on a
leading ``layers`` axis, so ``{n}`` appears only in the source key.
"""

from __future__ import annotations

from x2sam_jax.config import PixelDecoderConfig
from x2sam_jax.conversion import CONV2D, IDENTITY, LINEAR, Rule


def pixel_decoder_rules(config: PixelDecoderConfig, prefix: str = "") -> list[Rule]:
    """torch (transformers ``Mask2FormerPixelDecoder``) key -> flat parameter path of ``PixelDecoder``.

    ``prefix`` is prepended to the torch keys, e.g. ``"segmentor.pixel_decoder."`` for X2SAM.
    """
    p = prefix
    rules = [Rule(f"{p}level_embed", "level_embed"),
             Rule(f"{p}input_projections.{{i}}.0.weight", "input_projections.{i}.conv.kernel", CONV2D),
             Rule(f"{p}input_projections.{{i}}.0.bias", "input_projections.{i}.conv.bias"),
             Rule(f"{p}input_projections.{{i}}.1.weight", "input_projections.{i}.norm.scale"),
             Rule(f"{p}input_projections.{{i}}.1.bias", "input_projections.{i}.norm.bias"),
             Rule(f"{p}mask_projection.weight", "mask_projection.kernel", CONV2D),
             Rule(f"{p}mask_projection.bias", "mask_projection.bias")]
    layer = f"{p}encoder.layers.{{n}}."
    for name in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                 "self_attn.output_proj", "fc1", "fc2"):
        rules += [Rule(f"{layer}{name}.weight", f"encoder_layers.{name}.kernel", LINEAR),
                  Rule(f"{layer}{name}.bias", f"encoder_layers.{name}.bias")]
    for name in ("self_attn_layer_norm", "final_layer_norm"):
        rules += [Rule(f"{layer}{name}.weight", f"encoder_layers.{name}.scale"),
                  Rule(f"{layer}{name}.bias", f"encoder_layers.{name}.bias")]
    for j in range(1, config.num_fpn_levels + 1):
        for block in (f"adapter_{j}", f"layer_{j}"):
            rules += [Rule(f"{p}{block}.0.weight", f"{block}.conv.kernel", CONV2D),
                      Rule(f"{p}{block}.1.weight", f"{block}.norm.scale", IDENTITY),
                      Rule(f"{p}{block}.1.bias", f"{block}.norm.bias", IDENTITY)]
    return rules
