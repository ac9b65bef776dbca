"""LoRA for the Qwen3 LLM linears: y = x W (+ b) + (alpha / r) · dropout(x) A B.

A small module of our own rather than ``nnx.LoRA`` or qwix, because the LLM needs, all at once:
dropout on the LoRA branch only (PEFT semantics), the alpha/r scale, logical sharding names on
A and B ('lora_rank'), stable parameter paths (``q_proj.kernel`` / ``q_proj.lora_a`` /
``q_proj.lora_b``) inside the vmapped layer stack, and an in-place merge. LoRA weights are
``nnx.LoRAParam`` (a subclass of ``nnx.Param``), so ``nnx.LoRAParam`` is the filter that selects
exactly the trainable LoRA weights (see :data:`LORA_FILTER`, :func:`lora_grad_filter`).

Layouts: ``kernel`` [in, out], ``lora_a`` [in, r], ``lora_b`` [r, out]. PEFT stores
``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]; both are the transposes (LINEAR
transform; the PEFT conversion table and loader are ``convert_weights/lora.py``), and torch's
merge ``W += scale · B @ A`` is ``kernel += scale · lora_a @ lora_b`` here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from x2sam_jax.config import LoRAConfig

# Selects the LoRA weights (and nothing else): nnx.state(model, LORA_FILTER), nnx.DiffState(0, LORA_FILTER).
LORA_FILTER = nnx.LoRAParam


def lora_grad_filter():
    """``argnums`` for ``nnx.grad`` / ``nnx.value_and_grad`` that differentiates LoRA weights only."""
    return nnx.DiffState(0, LORA_FILTER)


def _lora_a_init(key, shape, dtype):
    # PEFT: kaiming_uniform_(a=sqrt(5)) on A [r, in] -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(nnx.Module):
    """A dense layer (torch ``nn.Linear`` semantics) with an optional LoRA branch."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 use_bias: bool = False, lora: LoRAConfig | None = None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        init = nnx.initializers.normal(0.02)  # HF initializer_range
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype),
                                out_sharding=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],))
                     if use_bias else None)
        self.lora_scale = None if lora is None else float(lora.scale)
        if lora is not None:
            self.lora_a = nnx.LoRAParam(_lora_a_init(rngs.params(), (in_features, lora.rank), param_dtype),
                                        out_sharding=(axes[0], "lora_rank"))
            # B = 0: a fresh adapter leaves the base model unchanged.
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), param_dtype),
                                        out_sharding=("lora_rank", axes[1]))
            # Inactive until model.train() (nnx sets deterministic=False); eval by default.
            self.lora_dropout = (nnx.Dropout(lora.dropout, deterministic=True, rngs=rngs)
                                 if lora.dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_scale is not None:
            h = self.lora_dropout(x) if self.lora_dropout is not None else x
            y = y + (h @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype) * self.lora_scale
        return y


def _lora_linears(model: nnx.Module):
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear) and module.lora_scale is not None:
            yield module


def merge_lora(model: nnx.Module) -> int:
    """Folds every LoRA branch into its base kernel in place (kernel += scale·A·B, then B = 0).

    Works on stacked layers (leading ``layers`` axis). The adapter stays in place with B = 0, so
    the merged model computes the same function and can keep training a fresh delta. Returns the
    number of (possibly stacked) linears merged.
    """
    count = 0
    for module in _lora_linears(model):
        a, b = module.lora_a[...], module.lora_b[...]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        kernel = module.kernel[...]
        module.kernel[...] = (kernel.astype(jnp.float32) + module.lora_scale * delta).astype(kernel.dtype)
        module.lora_b[...] = jnp.zeros_like(b)
        count += 1
    return count
