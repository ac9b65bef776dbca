"""Stacked layers: created with ``nnx.vmap`` (a leading ``layers`` axis) and run with
``jax.lax.scan`` under ``jax.checkpoint`` with a named remat policy, or unrolled.

Scanned and unrolled runs use the same stacked parameters, so checkpoints do not depend on
the choice.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    "none": None,                                      # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,   # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all": jax.checkpoint_policies.everything_saveable,
}


def create_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` independent copies of ``make_layer(rngs)`` with parameters stacked on axis 0.

    The stacked axis carries the logical sharding name ``layers``.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return make_layer(r)

    return make(rngs)


def run_stack(stack: nnx.Module, carry, body: Callable, xs=None, *, scan: bool = True,
              remat: str = "none"):
    """Runs ``carry, y = body(layer_i, carry, xs[i])`` for every layer of ``stack``.

    ``xs`` is a pytree of per-layer inputs with a leading layer axis (or None). Returns
    ``(carry, ys)`` with ys stacked on axis 0. Non-parameter state that layers change (RNG
    counters, for dropout) is written back to ``stack``.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

    def step(carry, inputs):
        layer_params, layer_rest, x = inputs
        layer = nnx.merge(graphdef, layer_params, layer_rest)
        carry, y = body(layer, carry, x)
        return carry, (y, nnx.state(layer, nnx.Not(nnx.Param)))

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=not scan)

    if scan:
        carry, (ys, new_rest) = jax.lax.scan(step, carry, (params, rest, xs))
    else:
        num = jax.tree.leaves(params)[0].shape[0]
        outs = []
        for i in range(num):
            take = lambda t: jax.tree.map(lambda a: a[i], t)  # noqa: E731
            carry, out = step(carry, (take(params), take(rest), take(xs)))
            outs.append(out)
        ys, new_rest = jax.tree.map(lambda *a: jax.numpy.stack(a), *outs) if outs else (None, rest)
    if jax.tree.leaves(new_rest):  # nothing to write back for stacks without RNG/counter state
        nnx.update(stack, new_rest)
    return carry, ys
