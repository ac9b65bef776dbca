"""Conversion table for the Qwen3-VL vision tower: HF ``model.visual.*`` <-> Qwen3VLVisionModel.

Used by ``convert_weights/qwen3_vl.py`` (full model CLI) and the X2SAM converter. The ViT blocks
are stacked on a leading ``layers`` axis, so ``{i}`` appears only in the source key.
"""

from __future__ import annotations

from x2sam_jax.conversion import CONV3D, IDENTITY, LINEAR, Rule

# HF keys under the visual prefix that are deliberately not converted (none: the rotary inverse
# frequencies are non-persistent buffers and never reach the state dict).
VISION_SKIP: tuple[str, ...] = ()


def _linear_and_norm(source: str, target: str, names: tuple[str, ...], norms: tuple[str, ...]) -> list[Rule]:
    rules = []
    for name in names:
        rules.append(Rule(f"{source}{name}.weight", f"{target}{name}.kernel", LINEAR))
        rules.append(Rule(f"{source}{name}.bias", f"{target}{name}.bias"))
    for name in norms:
        rules.append(Rule(f"{source}{name}.weight", f"{target}{name}.scale"))
        rules.append(Rule(f"{source}{name}.bias", f"{target}{name}.bias"))
    return rules


def vision_rules(prefix: str = "model.visual.", target_prefix: str = "") -> list[Rule]:
    """Rules from HF keys ``{prefix}...`` to flat Qwen3VLVisionModel paths ``{target_prefix}...``.

    ``target_prefix`` lets a parent model place the tower under its own attribute (e.g. "visual.").
    """
    p, t = prefix, target_prefix
    rules = [
        Rule(f"{p}patch_embed.proj.weight", f"{t}patch_embed.proj.kernel", CONV3D),
        Rule(f"{p}patch_embed.proj.bias", f"{t}patch_embed.proj.bias", IDENTITY),
        Rule(f"{p}pos_embed.weight", f"{t}pos_embed.embedding", IDENTITY),
    ]
    rules += _linear_and_norm(f"{p}blocks.{{i}}.", f"{t}blocks.",
                              ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"), ("norm1", "norm2"))
    rules += _linear_and_norm(f"{p}merger.", f"{t}merger.", ("linear_fc1", "linear_fc2"), ("norm",))
    rules += _linear_and_norm(f"{p}deepstack_merger_list.{{j}}.", f"{t}deepstack_merger_list.{{j}}.",
                              ("linear_fc1", "linear_fc2"), ("norm",))
    return rules
