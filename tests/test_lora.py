"""LoRA on the Qwen3 LLM: B=0 is the base model, merge == unmerged, gradients reach LoRA weights
only, PEFT import (W += alpha/r · B A), dropout only in train mode, logical names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from convert_weights.lora import load_peft_lora
from x2sam_jax.config import LoRAConfig, Qwen3TextConfig
from x2sam_jax.conversion import ConversionError
from x2sam_jax.models.lora import LORA_FILTER, lora_grad_filter, merge_lora
from x2sam_jax.models.qwen3_text import Qwen3TextModel

from _tolerance import assert_equal_up_to_reordering

TINY = Qwen3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, mrope_section=(4, 2, 2))
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
TARGETS = LORA.target_modules


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((2, 6, TINY.hidden_size)), jnp.float32)


def _base_and_lora(lora=LORA):
    base = Qwen3TextModel(TINY, None, rngs=nnx.Rngs(0))
    adapted = Qwen3TextModel(TINY, lora, rngs=nnx.Rngs(1))
    # same base weights in both
    nnx.update(adapted, nnx.state(base, nnx.Param))
    return base, adapted


def _randomize_b(model, seed=1):
    state = nnx.state(model, LORA_FILTER)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    nnx.update(model, state)


def test_fresh_lora_equals_the_base_model():
    base, adapted = _base_and_lora()
    x = _inputs()
    assert float(jnp.abs(base(x)[0] - adapted(x)[0]).max()) == 0.0
    lora_state = nnx.to_flat_state(nnx.state(adapted, LORA_FILTER))
    names = {".".join(map(str, p)) for p, _ in lora_state}
    for module in TARGETS:
        parent = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        assert f"layers.{parent}.{module}.lora_a" in names and f"layers.{parent}.{module}.lora_b" in names
    assert len(names) == 2 * len(TARGETS)  # nothing else is a LoRA weight


def test_merged_equals_unmerged():
    _, adapted = _base_and_lora()
    _randomize_b(adapted)
    x = _inputs()
    before = adapted(x)[0]
    kernel_before = np.asarray(adapted.layers.self_attn.q_proj.kernel[...])
    assert merge_lora(adapted) == len(TARGETS)
    after = adapted(x)[0]
    assert_equal_up_to_reordering(after, before, what="merged")  # W x + s B A x summed in another order
    assert float(jnp.abs(adapted.layers.mlp.up_proj.lora_b[...]).max()) == 0.0
    assert np.abs(np.asarray(adapted.layers.self_attn.q_proj.kernel[...]) - kernel_before).max() > 1e-3


def test_training_only_lora_moves_only_lora_weights():
    _, adapted = _base_and_lora()
    x = _inputs()

    def loss(model):
        return jnp.mean(model(x)[0] ** 2)

    grads = nnx.grad(loss, argnums=lora_grad_filter())(adapted)
    flat = nnx.to_flat_state(grads)
    assert flat and all(isinstance(v, nnx.LoRAParam) for _, v in flat)
    norms = {".".join(map(str, p)): float(jnp.abs(v[...]).max()) for p, v in flat}
    # with B = 0 only B receives gradient at first; every target's B does
    assert all(norms[k] > 0 for k in norms if k.endswith("lora_b")), norms

    frozen_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(adapted, nnx.Not(LORA_FILTER))))
    lora_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(adapted, LORA_FILTER)))
    optimizer = nnx.Optimizer(adapted, optax.sgd(0.5), wrt=LORA_FILTER)
    for _ in range(2):
        optimizer.update(adapted, nnx.grad(loss, argnums=lora_grad_filter())(adapted))
    frozen_after = nnx.to_pure_dict(nnx.state(adapted, nnx.Not(LORA_FILTER)))
    lora_after = nnx.to_pure_dict(nnx.state(adapted, LORA_FILTER))
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(b) - a).max()),
                                            frozen_before, frozen_after))) == 0.0
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(b) - a).max()),
                                            lora_before, lora_after))) > 0.0


def test_peft_import_matches_torch_merge_rule():
    """PEFT tensors (A [r, in], B [out, r]) -> our layout; merged kernel == (W + alpha/r · B A).T."""
    _, adapted = _base_and_lora()
    rng = np.random.default_rng(2)
    tensors, expected = [], {}
    prefix = "base_model.model.model.language_model.layers.{}.{}.{}.lora_{}.default.weight"
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}
    for layer in range(TINY.num_layers):
        for name, (n_in, n_out) in shapes.items():
            parent = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            a = rng.standard_normal((LORA.rank, n_in)).astype(np.float32)
            b = rng.standard_normal((n_out, LORA.rank)).astype(np.float32)
            tensors += [(prefix.format(layer, parent, name, "A"), a), (prefix.format(layer, parent, name, "B"), b)]
            kernel = np.asarray(getattr(getattr(adapted.layers, parent), name).kernel[...])[layer]
            expected[(layer, name)] = (kernel.T + LORA.scale * b @ a).T  # torch W [out, in] -> kernel
    tensors.append(("base_model.model.lm_head.weight", np.zeros((3, 3), np.float32)))
    skipped = load_peft_lora(adapted, tensors, skip=[r".*lm_head.*"])
    assert skipped == ["base_model.model.lm_head.weight"]
    merge_lora(adapted)
    for (layer, name), want in expected.items():
        parent = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        got = np.asarray(getattr(getattr(adapted.layers, parent), name).kernel[...])[layer]
        assert np.abs(got - want).max() <= 1e-4, (layer, name)
    with pytest.raises(ConversionError, match=r"missing keys:[\s\S]*layers\.1\.mlp\.down_proj\.lora_B"):
        load_peft_lora(adapted, tensors[:-3])


def test_target_modules_subset_and_logical_names():
    lora = dataclasses.replace(LORA, target_modules=("q_proj", "v_proj"))
    model = nnx.eval_shape(lambda: Qwen3TextModel(TINY, lora, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, LORA_FILTER))
    names = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
    assert set(names) == {"layers.self_attn.q_proj.lora_a", "layers.self_attn.q_proj.lora_b",
                          "layers.self_attn.v_proj.lora_a", "layers.self_attn.v_proj.lora_b"}
    assert names["layers.self_attn.q_proj.lora_a"] == ("layers", "embed", "lora_rank")
    assert names["layers.self_attn.q_proj.lora_b"] == ("layers", "lora_rank", "heads")


def test_dropout_acts_in_train_mode_only():
    lora = dataclasses.replace(LORA, dropout=0.5)
    _, adapted = _base_and_lora(lora)
    _randomize_b(adapted)
    x = _inputs()
    eval_a, eval_b = adapted(x)[0], adapted(x)[0]
    assert float(jnp.abs(eval_a - eval_b).max()) == 0.0
    adapted.train()
    train_a, train_b = adapted(x)[0], adapted(x)[0]
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-3
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3  # fresh masks every call
    adapted.eval()
    assert float(jnp.abs(adapted(x)[0] - eval_a).max()) == 0.0
