"""Stacked layers: created with ``nnx.vmap`` (a leading ``layers`` axis) and run with
``jax.lax.scan`` under ``jax.checkpoint`` with a named remat policy (:func:`remat_policy`), or
unrolled.

Scanned and unrolled runs use the same stacked parameters, so checkpoints do not depend on
the choice.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

# Activations the layers tag with jax.ad_checkpoint.checkpoint_name (MaxText's style), so a
# policy can keep, recompute or offload each of them by name.
CHECKPOINT_NAMES = (
    "qkv_proj",       # q, k, v right after their projection (x2sam_jax.layers.attention)
    "attention",      # the attention output before the output projection
    "attention_out",  # after the output projection
    "mlp_hidden",     # the MLP's hidden activation (after the nonlinearity / gating)
    "mlp_out",        # the MLP's output
)

_save = jax.checkpoint_policies.save_only_these_names

REMAT_POLICIES: dict[str, Any] = {
    "none": None,                                      # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,   # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all": jax.checkpoint_policies.everything_saveable,
    # By name: keep what is named, recompute the rest.
    "save_qkv_proj": _save("qkv_proj"),
    "save_attention": _save("qkv_proj", "attention"),     # recompute only the MLP and norms
    "save_out_proj": _save("attention_out", "mlp_out"),   # keep each sublayer's output
    "save_attention_mlp_hidden": _save("qkv_proj", "attention", "mlp_hidden"),
}


def remat_policy(spec: str, field: str = "remat_policy"):
    """The jax.checkpoint policy named by ``spec`` (None for "none").

    ``spec`` is a key of ``REMAT_POLICIES`` or ``"names:NAME=ACTION,..."`` over ``CHECKPOINT_NAMES``
    with ACTION ``save`` (keep on device) or ``offload`` (to pinned host memory); unnamed
    activations are recomputed, e.g. ``"names:attention=save,mlp_out=offload"``.
    """
    if spec in REMAT_POLICIES:
        return REMAT_POLICIES[spec]
    if not isinstance(spec, str) or not spec.startswith("names:"):
        raise ValueError(f"{field}={spec!r}: choose one of {sorted(REMAT_POLICIES)} or 'names:NAME=save|offload,...'")
    save, offload = [], []
    for item in filter(None, spec[len("names:"):].split(",")):
        name, _, action = item.partition("=")
        if name not in CHECKPOINT_NAMES or action not in ("save", "offload"):
            raise ValueError(f"{field}={spec!r}: bad entry {item!r}; expected NAME=save or NAME=offload with NAME "
                             f"one of {CHECKPOINT_NAMES}")
        (save if action == "save" else offload).append(name)
    if not offload:
        return _save(*save)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=save, names_which_can_be_offloaded=offload,
        offload_src="device", offload_dst="pinned_host")


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
    policy = remat_policy(remat)
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

    def step(carry, inputs):
        layer_params, layer_rest, x = inputs
        layer = nnx.merge(graphdef, layer_params, layer_rest)
        carry, y = body(layer, carry, x)
        return carry, (y, nnx.state(layer, nnx.Not(nnx.Param)))

    if remat != "none":
        step = jax.checkpoint(step, policy=policy, prevent_cse=not scan)

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
