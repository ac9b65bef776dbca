"""Hungarian matching of queries to (padded) targets, inside ``jit``
(docs/architecture.md#losses-and-matcher).

The cost of query q for target n is Mask2Former's, on the same random points for every pair:

    class_weight * (-p_q[class_n]) + mask_weight * BCE(q, n) + dice_weight * dice(q, n)

(``transformers``' ``Mask2FormerHungarianMatcher``). The assignment runs where
``hungarian_match``'s ``method`` says (``LossConfig.matcher``):
  * "host" (the default): scipy's ``linear_sum_assignment`` (C++, a shortest augmenting path
    solver, what the official X2SAM runs) through ``jax.pure_callback``. Under an active mesh
    (``jax.set_mesh``, as the train step lowers) the problems are split over the devices with
    ``jax.shard_map``, the frames over the batch axes as the step shards them
    (:func:`problem_axes`), so every device's callback solves its own frames; without a mesh one
    callback gets them all (on a mesh XLA would then gather every frame's costs onto one device);
  * "device": ``optax.assignment.hungarian_algorithm`` in the program, vmapped over the
    independent problems (one per frame of every sample): thousands of small sequential
    operations per problem.
``benchmarks/bench_matcher.py`` times both at the recipe's sizes (200 queries; 16, 64, 128
targets; 10 decoder predictions; 4 images or one 8-frame clip per device) on one CPU device and
on 8 simulated ones: the host matcher was the faster at every size, increasingly so with the
targets. Not measured on an accelerator yet, where the device matcher's sequential operations
each cost a kernel launch.
Simulated CPU devices (``--xla_force_host_platform_device_count``): a callback's operands go to
CPU device 0 on the CPU client's thread pool (asynchronously above 100 KiB), the pool that also
runs the devices' programs; when every pool thread runs a device blocked in its callback, the
step hangs. Set ``PJRT_NPROC`` above the device count there (benchmarks/bench_matcher.py does).
Both are exact; they can differ only where the optimum is not unique (the padded slots, which
both report as -1, or exactly tied real costs).

Padding. Every problem has Q queries and N target slots, some of them padding. A padded slot
costs the same constant M for every query, with M larger than every real cost. This cannot change
which queries the real targets get:
  * N <= Q: every slot is assigned, so the total cost is (cost of the real targets' assignment)
    + (number of padded slots) * M. Any injective assignment of the real targets extends to all
    slots (Q - N_real >= N - N_real queries remain free), so the real part is minimised over
    exactly the feasible set of the unpadded problem;
  * N > Q: only Q slots are assigned. Exchanging an assigned padded slot for an unassigned real
    target lowers the cost (real cost < M), so real targets are all assigned while min(N_real, Q)
    allows; if N_real >= Q no padded slot is used and the problem is the unpadded one, otherwise
    the first case's argument applies to the real targets.
Non-finite real costs are replaced by M too (matched only when nothing else is left, as
transformers' nan_to_num with the float maximum does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from x2sam_jax.sharding import logical_to_mesh

MATCHERS = ("device", "host")


def pairwise_sigmoid_ce(point_logits: jax.Array, point_labels: jax.Array) -> jax.Array:
    """Mean BCE-with-logits over the points for every (query, target) pair.

    point_logits [..., Q, K], point_labels [..., N, K] (in [0, 1]) -> [..., Q, N].
    """
    num_points = point_logits.shape[-1]
    positive = jax.nn.softplus(-point_logits) / num_points      # BCE against label 1
    negative = jax.nn.softplus(point_logits) / num_points       # BCE against label 0
    return (jnp.einsum("...qk,...nk->...qn", positive, point_labels)
            + jnp.einsum("...qk,...nk->...qn", negative, 1.0 - point_labels))


def pairwise_dice(point_logits: jax.Array, point_labels: jax.Array) -> jax.Array:
    """1 - (2 |p ∩ y| + 1) / (|p| + |y| + 1) for every pair: [..., Q, K], [..., N, K] -> [..., Q, N]."""
    probs = jax.nn.sigmoid(point_logits)
    numerator = 2.0 * jnp.einsum("...qk,...nk->...qn", probs, point_labels)
    denominator = probs.sum(-1)[..., :, None] + point_labels.sum(-1)[..., None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def class_cost(class_logits: jax.Array, target_classes: jax.Array) -> jax.Array:
    """-softmax(class logits)[target class]: [..., Q, C + 1], [..., N] -> [..., Q, N]."""
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    index = jnp.clip(target_classes, 0, class_logits.shape[-1] - 1)
    return -jnp.take_along_axis(probs, index[..., None, :], axis=-1)


def neutral_padding(cost: jax.Array, target_valid: jax.Array) -> jax.Array:
    """Gives every padded target column (and every non-finite real cost) one constant larger
    than all real costs, which leaves the real targets' optimal assignment unchanged (module
    docstring). cost [..., Q, N], target_valid [..., N]."""
    real = target_valid[..., None, :] & jnp.isfinite(cost)
    largest = jnp.max(jnp.where(real, cost, -jnp.inf), axis=(-2, -1), keepdims=True)
    constant = jnp.where(jnp.isfinite(largest), largest, 0.0) + 1.0
    return jnp.where(real, cost, constant)


def _host_assignments(costs: np.ndarray) -> np.ndarray:
    """[..., Q, N] finite costs -> [..., N] int32 query of each target (-1: unassigned), scipy."""
    from scipy.optimize import linear_sum_assignment

    costs = np.asarray(costs)
    *lead, _, num_targets = costs.shape
    flat = costs.reshape(-1, *costs.shape[-2:])
    out = np.full((flat.shape[0], num_targets), -1, np.int32)
    for index, problem in enumerate(flat):
        rows, cols = linear_sum_assignment(problem)
        out[index, cols] = rows
    return out.reshape(*lead, num_targets)


def _host_match(cost: jax.Array) -> jax.Array:
    """[F, Q, N] finite costs -> [F, N] int32 through one callback to scipy (no gradient)."""
    result = jax.ShapeDtypeStruct(cost.shape[:-2] + cost.shape[-1:], jnp.int32)
    return jax.pure_callback(_host_assignments, result, jax.lax.stop_gradient(cost), vmap_method="expand_dims")


def problem_axes(num_problems: int) -> tuple[str, ...]:
    """The mesh axes the host matcher splits the ``num_problems`` problems over, under the active
    mesh (``jax.set_mesh``): the batch axes of the sharding rules (the train step shards frames
    over them), then the other mesh axes as far as they divide what is left (so no two devices
    solve the same problems). () without a mesh or on one device: one callback sees them all."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    spec = logical_to_mesh(("batch",), mesh)[0]
    batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if num_problems % shards:
        raise ValueError(f"host matcher: {num_problems} matching problems (frames) do not split over the "
                         f"batch mesh axes {dict((a, mesh.shape[a]) for a in batch_axes)}; the batch must "
                         f"be a multiple of {shards}")
    axes = batch_axes
    for axis in mesh.axis_names:
        if axis not in axes and mesh.shape[axis] > 1 and (num_problems // shards) % mesh.shape[axis] == 0:
            axes, shards = axes + (axis,), shards * mesh.shape[axis]
    return axes


def hungarian_match(cost: jax.Array, target_valid: jax.Array, method: str = "host") -> jax.Array:
    """Optimal query for every real target.

    Args:
      cost: [..., Q, N] (query, target) costs; padded columns may hold anything.
      target_valid: [..., N] bool, False for padded target slots.
      method: "host" (scipy through a callback; one per device, each with its own problems, under
        an active mesh) or "device" (optax, in the program): module docstring.
    Returns:
      [..., N] int32: the query matched to each target, -1 for padded (or unmatched, when there
      are more real targets than queries) slots.
    """
    if method not in MATCHERS:
        raise ValueError(f"matcher {method!r}: expected one of {MATCHERS}")
    *lead, num_queries, num_targets = cost.shape
    flat_cost = neutral_padding(cost, target_valid).reshape(-1, num_queries, num_targets)
    if method == "host":
        axes = problem_axes(flat_cost.shape[0])
        if axes:   # each device's callback gets its own problems (else XLA gathers them to one device)
            spec = jax.sharding.PartitionSpec(axes)
            query_of_target = jax.shard_map(_host_match, in_specs=spec, out_specs=spec)(flat_cost)
        else:
            query_of_target = _host_match(flat_cost)
        return jnp.where(target_valid, query_of_target.reshape(*lead, num_targets), -1)

    def one(c):
        rows, cols = optax.assignment.hungarian_algorithm(c)       # min(Q, N) (query, target) pairs
        return jnp.full((num_targets,), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))

    query_of_target = jax.vmap(one)(jax.lax.stop_gradient(flat_cost)).reshape(*lead, num_targets)
    return jnp.where(target_valid, query_of_target, -1)
