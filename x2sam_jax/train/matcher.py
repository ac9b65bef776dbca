"""Hungarian matching of queries to (padded) targets, inside ``jit``
(docs/architecture.md#losses-and-matcher).

The cost of query q for target n is Mask2Former's, on the same random points for every pair:

    class_weight * (-p_q[class_n]) + mask_weight * BCE(q, n) + dice_weight * dice(q, n)

(``transformers``' ``Mask2FormerHungarianMatcher``). The assignment runs where
``hungarian_match``'s ``method`` says (``LossConfig.matcher``):
  * "device": ``optax.assignment.hungarian_algorithm`` in the program, vmapped over the
    independent problems (one per frame of every sample);
  * "host": scipy's ``linear_sum_assignment`` (C++, a shortest augmenting path solver) through
    one ``jax.pure_callback`` per call with all the problems: the program waits for the host,
    and under a multi-device mesh the callback's operands are gathered to one device.
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


def hungarian_match(cost: jax.Array, target_valid: jax.Array, method: str = "device") -> jax.Array:
    """Optimal query for every real target.

    Args:
      cost: [..., Q, N] (query, target) costs; padded columns may hold anything.
      target_valid: [..., N] bool, False for padded target slots.
      method: "device" (optax, in the program) or "host" (scipy, one callback): module docstring.
    Returns:
      [..., N] int32: the query matched to each target, -1 for padded (or unmatched, when there
      are more real targets than queries) slots.
    """
    if method not in MATCHERS:
        raise ValueError(f"matcher {method!r}: expected one of {MATCHERS}")
    *lead, num_queries, num_targets = cost.shape
    flat_cost = neutral_padding(cost, target_valid).reshape(-1, num_queries, num_targets)
    if method == "host":
        result = jax.ShapeDtypeStruct(flat_cost.shape[:-2] + (num_targets,), jnp.int32)
        query_of_target = jax.pure_callback(_host_assignments, result, jax.lax.stop_gradient(flat_cost),
                                            vmap_method="expand_dims")
        return jnp.where(target_valid, query_of_target.reshape(*lead, num_targets), -1)

    def one(c):
        rows, cols = optax.assignment.hungarian_algorithm(c)       # min(Q, N) (query, target) pairs
        return jnp.full((num_targets,), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))

    query_of_target = jax.vmap(one)(jax.lax.stop_gradient(flat_cost)).reshape(*lead, num_targets)
    return jnp.where(target_valid, query_of_target, -1)
