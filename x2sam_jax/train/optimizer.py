"""AdamW with warmup + cosine, global-norm clipping and per-module learning rates
(docs/recipe.md#both-stages).

Frozen parameters are not in the optimizer at all: the train step splits the model's parameters
into a trainable and a frozen state (``x2sam_jax.runs.split_params``), differentiates only the trainable one
and gives only it to the optimizer, so frozen weights get no gradient, no update and no moments.

The update is torch's ``AdamW`` with mmengine's param-wise ``lr_mult`` (a module's learning rate
scales its Adam step and its weight decay alike):

    g <- clip_by_global_norm(g, grad_clip)                  (over all trainable parameters)
    u  = lr(t) * mult(path) * (adam(g) + weight_decay * p)
    p <- p - u

lr(t): linear warmup from ``lr * warmup_start_factor`` to ``lr`` over the first
``warmup_ratio * total_steps`` steps (mmengine ``LinearLR``), then cosine to 0 (``CosineAnnealingLR``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import optax

from x2sam_jax.runs import path_name


def lr_multiplier(name: str, multipliers: Sequence[tuple[str, float]]) -> float:
    """The first multiplier whose prefix starts ``name`` (dotted path), else 1."""
    for prefix, mult in multipliers:
        if name == prefix or name.startswith(prefix + "."):
            return float(mult)
    return 1.0


def scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each update by its module's learning-rate multiplier (stateless)."""
    multipliers = tuple((str(p), float(m)) for p, m in multipliers)

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * lr_multiplier(path_name(path), multipliers) if u is not None else None, updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def learning_rate_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.03,
                           warmup_start_factor: float = 1e-5) -> optax.Schedule:
    warmup = int(round(warmup_ratio * total_steps))
    cosine = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1), alpha=0.0)
    if warmup == 0:
        return cosine
    ramp = optax.linear_schedule(lr * warmup_start_factor, lr, transition_steps=warmup)
    return optax.join_schedules([ramp, cosine], boundaries=[warmup])


def build_optimizer(*, lr: float, total_steps: int, warmup_ratio: float = 0.03, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.05, grad_clip: float = 1.0,
                    lr_multipliers: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
    """AdamW (torch semantics) with clipping and per-module multipliers, for the trainable state."""
    schedule = learning_rate_schedule(lr, total_steps, warmup_ratio)
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay),
              optax.scale_by_learning_rate(schedule)]
    if lr_multipliers:
        parts.append(scale_by_path(lr_multipliers))
    return optax.chain(*parts)
