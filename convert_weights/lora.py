"""PEFT LoRA weights <-> the ``lora_a`` / ``lora_b`` parameters of ``x2sam_jax.models.lora.LoRALinear``.

PEFT stores ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]; ``lora_a`` [in, r] and
``lora_b`` [r, out] are their transposes (LINEAR transform). Used by the X2SAM converter
(``convert_weights/x2sam.py``) and to load a PEFT adapter into a Qwen3-VL / Qwen3 text model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax.config import LoRAConfig
from x2sam_jax.conversion import LINEAR, Rule, flatten, load_tensors, unflatten
from x2sam_jax.models.lora import LORA_FILTER


def peft_lora_rules(source_prefix: str = "base_model.model.model.language_model.layers.{i}.",
                    target_prefix: str = "language_model.layers.",
                    target_modules=LoRAConfig().target_modules):
    """Conversion rules for PEFT LoRA tensors (``...q_proj.lora_A.default.weight`` etc.).

    The default source prefix is how PEFT names a wrapped ``Qwen3VLForConditionalGeneration``;
    X2SAM's release nests it under ``vlm.`` (pass ``"vlm." + default``).
    """
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    rules = []
    for name in target_modules:
        src = f"{source_prefix}{parent[name]}.{name}"
        dst = f"{target_prefix}{parent[name]}.{name}"
        rules.append(Rule(f"{src}.lora_A.default.weight", f"{dst}.lora_a", LINEAR))
        rules.append(Rule(f"{src}.lora_B.default.weight", f"{dst}.lora_b", LINEAR))
    return rules


def load_peft_lora(model: nnx.Module, tensors, rules=None, skip=()) -> list[str]:
    """Fills the model's LoRA weights from PEFT-format (key, array) pairs, strictly.

    ``model`` is a Qwen3VLModel or a Qwen3TextModel (default rules: :func:`peft_lora_rules`).

    Every LoRA weight of ``model`` must be provided, with the right shape; other source keys must
    match ``skip`` regexes. Returns the skipped keys. Raises ``ConversionError`` otherwise.
    """
    if rules is None:  # a full Qwen3VLModel nests the LLM under language_model; a Qwen3TextModel does not
        rules = peft_lora_rules(target_prefix="language_model.layers." if hasattr(model, "language_model")
                                else "layers.")
    state = nnx.state(model, LORA_FILTER)
    flat = flatten(nnx.to_pure_dict(state))
    targets = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}
    values, skipped = load_tensors(targets, tensors, rules, skip)
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in values.items()}))
    nnx.update(model, state)
    return skipped
