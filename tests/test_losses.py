"""Training losses: the Hungarian matcher against scipy, the set losses against transformers'
Mask2FormerLoss on the same points, the LM loss against torch cross-entropy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from _tolerance import assert_equal_up_to_reordering

from x2sam_jax.train import losses as L
from x2sam_jax.train.matcher import hungarian_match


# ------------------------------------------------------------------------------------- matcher
def _assignment_cost(cost, rows, cols):
    return float(np.sum(cost[rows, cols]))


MATCHERS = ("device", "host")


@pytest.mark.parametrize("method", MATCHERS)
@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (4, 9)])
def test_matcher_equals_scipy_on_random_costs(shape, method):
    rng = np.random.default_rng(sum(shape))
    costs = rng.normal(size=(6, *shape)).astype(np.float32)
    valid = np.ones((6, shape[1]), bool)
    got = np.asarray(jax.jit(functools.partial(hungarian_match, method=method))(costs, valid))
    for cost, query_of_target in zip(costs, got):
        rows, cols = linear_sum_assignment(cost)
        ours = [(q, n) for n, q in enumerate(query_of_target) if q >= 0]
        assert len(ours) == min(shape)
        assert len({q for q, _ in ours}) == len(ours)                 # one target per query
        # Random continuous costs have a unique optimum: the same pairs as scipy.
        assert sorted(ours) == sorted(zip(rows.tolist(), cols.tolist()))


@pytest.mark.parametrize("method", MATCHERS)
@pytest.mark.parametrize("queries,slots,real", [(8, 5, 3), (4, 10, 6), (4, 10, 3), (5, 5, 0)])
def test_padded_targets_do_not_change_the_real_assignment(queries, slots, real, method):
    """Padded slots may hold any cost (here: very attractive ones); the real targets get
    scipy's optimal assignment of the unpadded problem."""
    rng = np.random.default_rng(queries * 100 + slots * 10 + real)
    trials = 5
    costs = rng.normal(size=(trials, queries, slots)).astype(np.float32) * 3
    valid = np.zeros((trials, slots), bool)
    for t in range(trials):
        valid[t, rng.choice(slots, size=real, replace=False)] = True
    costs = np.where(valid[:, None, :], costs, -1e3 * rng.random(costs.shape)).astype(np.float32)  # garbage
    got_all = np.asarray(jax.jit(functools.partial(hungarian_match, method=method))(costs, valid))
    for cost, ok, got in zip(costs, valid, got_all):
        assert np.all(got[~ok] == -1)
        if real == 0:
            continue
        real_slots = np.flatnonzero(ok)
        rows, cols = linear_sum_assignment(cost[:, real_slots])
        matched = [(int(got[s]), j) for j, s in enumerate(real_slots) if got[s] >= 0]
        assert len(matched) == min(real, queries)
        assert len({q for q, _ in matched}) == len(matched)
        # Same optimal cost as scipy (and the same pairs: random costs have a unique optimum).
        np.testing.assert_allclose(sum(cost[q, real_slots[j]] for q, j in matched),
                                   _assignment_cost(cost[:, real_slots], rows, cols), rtol=1e-5)
        assert sorted(matched) == sorted(zip(rows.tolist(), cols.tolist()))


@pytest.mark.parametrize("method", MATCHERS)
def test_non_finite_costs_are_matched_last(method):
    cost = np.array([[np.nan, 1.0], [0.5, np.inf], [2.0, 3.0]], np.float32)
    got = np.asarray(hungarian_match(cost, np.ones(2, bool), method))
    assert got.tolist() == [1, 0]


def _assert_optimal(costs, valid, assignment, what=""):
    """Every problem's real assignment is a matching of min(real, Q) real targets (each query
    once, padded slots -1) whose cost equals scipy's optimum of the unpadded problem, non-finite
    entries counting as the largest finite real cost + 1 (the neutral constant)."""
    for index in np.ndindex(valid.shape[:-1]):
        real = np.flatnonzero(valid[index])
        cost = costs[index][:, real]
        finite = np.isfinite(cost)
        neutral = (cost[finite].max() + 1.0) if finite.any() else 1.0
        cost = np.where(finite, cost, neutral).astype(np.float64)
        ours = assignment[index]
        assert np.all(ours[~valid[index]] == -1), (what, index)
        pairs = [(int(ours[s]), j) for j, s in enumerate(real) if ours[s] >= 0]
        assert len(pairs) == min(len(real), cost.shape[0]), (what, index)
        assert len({q for q, _ in pairs}) == len(pairs), (what, index)
        if len(real):
            rows, cols = linear_sum_assignment(cost)
            np.testing.assert_allclose(sum(cost[q, j] for q, j in pairs), cost[rows, cols].sum(), rtol=1e-5,
                                       err_msg=f"{what} {index}")


@pytest.mark.parametrize("queries,slots", [(20, 6), (6, 20), (12, 12), (3, 9)])
def test_both_matchers_reach_scipys_optimal_cost_with_padding_and_non_finite_costs(queries, slots):
    """[2, 3] leading frames, random padded slots, NaN/inf in real entries, some frames without
    targets: both matchers reach scipy's optimum (``_assert_optimal``) and agree with each other
    on every slot."""
    rng = np.random.default_rng(queries * 31 + slots)
    costs = (rng.normal(size=(2, 3, queries, slots)) * 2).astype(np.float32)
    valid = rng.random((2, 3, slots)) < 0.7
    valid[0, 0] = False                                                  # a frame without targets
    valid[1, 2] = True                                                   # a frame without padding
    costs[rng.random(costs.shape) < 0.05] = np.nan
    costs[rng.random(costs.shape) < 0.05] = np.inf
    got = {m: np.asarray(jax.jit(functools.partial(hungarian_match, method=m))(costs, valid)) for m in MATCHERS}
    np.testing.assert_array_equal(got["device"], got["host"])
    for method, assignment in got.items():
        _assert_optimal(costs, valid, assignment, method)


def _tied_problems(rng, frames, queries, slots):
    """Costs in {0, 1, 2} (many optima) with random padded slots."""
    costs = rng.integers(0, 3, size=(frames, queries, slots)).astype(np.float32)
    valid = rng.random((frames, slots)) < 0.75
    return costs, valid


@pytest.mark.parametrize("method", MATCHERS)
def test_matchers_reach_scipys_optimal_cost_on_tied_costs(method):
    """Exactly tied costs, 6 queries for 8 slots (some frames with more real targets than
    queries, some with fewer): the assignment may differ from scipy's, its cost may not."""
    costs, valid = _tied_problems(np.random.default_rng(3), 12, 6, 8)
    assert (valid.sum(-1) > 6).any() and (valid.sum(-1) < 6).any()
    _assert_optimal(costs, valid, np.asarray(jax.jit(functools.partial(hungarian_match, method=method))(costs, valid)),
                    method)


PER_SHARD = """
import functools, json, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from x2sam_jax.sharding import make_mesh
from x2sam_jax.train.matcher import hungarian_match

problems = {k: np.load(sys.argv[1])[k] for k in np.load(sys.argv[1]).files}
out = {}
for shape in [(2, 2, 2), (1, 2, 4)]:
    mesh = make_mesh(*shape)
    batch = ("data", "fsdp")                                        # the train step's batch axes
    for name in ("random", "tied"):
        costs = jax.device_put(problems[f"{name}_costs"], NamedSharding(mesh, P(None, batch)))
        valid = jax.device_put(problems[f"{name}_valid"], NamedSharding(mesh, P(batch)))
        # [P, F, Q, N]: predictions one after another, as segmentation_losses runs them.
        run = jax.jit(lambda c, v: jax.lax.map(lambda x: hungarian_match(x, v, "host"), c))
        with jax.set_mesh(mesh):
            compiled = run.lower(costs, valid).compile().as_text()
            assignment = np.asarray(run(costs, valid))
        # No active mesh: one callback (compiled only, not run).
        gathered = run.lower(costs, valid).compile().as_text() if name == "random" else ""
        operands = lambda text: re.findall(r"operand_layout_constraints={f32\\[(\\d+),", text)
        out[f"{shape}_{name}"] = dict(assignment=assignment.tolist(), per_shard=operands(compiled),
                                      gathered=operands(gathered))
# On the last mesh, under grad (no gradient flows through the assignment), remat and vmap.
def loss(c, v):
    match = jax.vmap(lambda x: hungarian_match(x, v, "host"))(jax.checkpoint(lambda y: 2 * y)(c))
    return jnp.sum(c * jax.nn.one_hot(match, c.shape[-2], axis=-2)), match
with jax.set_mesh(mesh):
    (_, match), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(costs, valid)
    try:
        jax.jit(lambda c: hungarian_match(c, jnp.ones(c.shape[::2], bool), "host"))(jnp.zeros((5, 5, 5)))
        error = ""
    except ValueError as e:
        error = str(e)
out["grad"] = dict(assignment=np.asarray(match).tolist(), grad=np.asarray(grad).tolist(), error=error)
print("RESULT" + json.dumps(out))
"""


def test_host_matcher_runs_per_shard_on_a_mesh(tmp_path):
    """Under an active mesh of 8 CPU devices (2x2x2; 1x2x4) the host matcher gives every
    device's callback its own frames (the frames split over the batch axes, then over tensor): the
    callback's operand holds F / 8 problems, where without a mesh XLA gathers all F for one callback.
    Inside lax.map, under grad, remat and vmap, it returns scipy's assignment (the single-device
    host matcher's, bit for bit, ties included) and passes no gradient; frames that do not split
    over the batch axes are refused."""
    import json
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    costs, valid = _tied_problems(rng, 8, 5, 9)                   # ties; more slots than queries
    problems = {"tied_costs": np.stack([costs, costs[::-1], 2 - costs]), "tied_valid": valid,
                "random_costs": rng.normal(size=(3, 8, 12, 6)).astype(np.float32),
                "random_valid": rng.random((8, 6)) < 0.75}
    np.savez(tmp_path / "problems.npz", **problems)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", PER_SHARD, str(tmp_path / "problems.npz")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    for shape in ("(2, 2, 2)", "(1, 2, 4)"):
        for name in ("random", "tied"):
            costs, valid = problems[f"{name}_costs"], problems[f"{name}_valid"]
            got = np.asarray(out[f"{shape}_{name}"]["assignment"])
            single = np.asarray(jax.vmap(lambda c: hungarian_match(c, valid, "host"))(costs))
            np.testing.assert_array_equal(got, single, err_msg=f"{shape} {name}")
            _assert_optimal(costs, np.broadcast_to(valid, costs.shape[:2] + valid.shape[-1:]), got, f"{shape} {name}")
            assert out[f"{shape}_{name}"]["per_shard"] == ["1"], (shape, name, out[f"{shape}_{name}"])
        assert out[f"{shape}_random"]["gathered"] == ["8"], (shape, out[f"{shape}_random"])
    grad = out["grad"]
    costs, valid = problems["tied_costs"], problems["tied_valid"]
    np.testing.assert_array_equal(grad["assignment"], jax.vmap(lambda c: hungarian_match(c, valid, "host"))(costs))
    one_hot = np.asarray(jax.nn.one_hot(np.asarray(grad["assignment"]), costs.shape[-2], axis=-2))
    np.testing.assert_array_equal(grad["grad"], one_hot)       # d(sum c * onehot)/dc: nothing through the match
    assert "5 matching problems" in grad["error"] and "multiple of 2" in grad["error"], grad["error"]


def test_host_matcher_gives_the_device_matchers_losses_and_gradients():
    """The set losses with LossConfig.matcher="host" (inside lax.map over predictions, under
    grad) are bit-identical to "device": the same assignment, so the same losses."""
    rng = np.random.default_rng(0)
    mask_logits, class_logits, targets, _ = _problem(rng)
    out = {}
    for method in MATCHERS:
        config = L.LossConfig(num_points=100, matcher=method)

        def total(m, c, config=config):
            return L.segmentation_losses(m, c, targets, jax.random.key(3), config)["loss_seg"]

        out[method] = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(jnp.asarray(mask_logits),
                                                                           jnp.asarray(class_logits))
    assert float(out["host"][0]) == float(out["device"][0])
    for g, r in zip(out["host"][1], out["device"][1]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    with pytest.raises(ValueError, match="matcher"):
        hungarian_match(jnp.zeros((2, 2)), jnp.ones(2, bool), "gpu")


# ------------------------------------------------------------------------------------- set losses
class _RandQueue:
    """Replaces torch.rand inside transformers' loss: returns pre-drawn points in call order."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def __call__(self, *shape, device=None, dtype=None, **_):
        expected = self.tensors.pop(0)
        assert tuple(expected.shape) == tuple(shape), (expected.shape, shape)
        return expected


def _problem(rng, frames=4, queries=6, targets=5, conditions=4, size=24, predictions=3):
    """Random predictions + padded targets; frame 3 is padding (takes no part), frame 2 has no
    target but takes part in the class loss; padded condition columns carry -1e6 logits."""
    mask_logits = rng.normal(scale=3, size=(predictions, frames, queries, size, size)).astype(np.float32)
    class_logits = rng.normal(size=(predictions, frames, queries, conditions + 1)).astype(np.float32)
    real_conditions = [4, 2, 3, 4]
    for f, c in enumerate(real_conditions):
        class_logits[:, f, :, c:conditions] = -1e6
    masks = rng.random((frames, targets, size, size)) < 0.3
    valid = np.zeros((frames, targets), bool)
    valid[0, [0, 2, 3]] = True
    valid[1, [1, 4]] = True
    valid[3, [0]] = True            # a target on a padded frame: ignored
    classes = np.stack([rng.integers(0, c, size=targets) for c in real_conditions]).astype(np.int32)
    frame_weight = np.array([True, True, True, False])
    valid &= frame_weight[:, None]
    targets_ = L.FrameTargets(masks=jnp.asarray(masks), classes=jnp.asarray(classes), valid=jnp.asarray(valid),
                              frame_weight=jnp.asarray(frame_weight))
    return mask_logits, class_logits, targets_, real_conditions


def _reference_losses(mask_logits, class_logits, targets, points, config, conditions, monkeypatch):
    """transformers' Mask2FormerLoss (+ auxiliary predictions) on the participating frames, fed
    our points. Returns the unweighted sums over predictions."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former import modeling_mask2former as m2f

    masks, classes, valid, frame_weight = (np.asarray(x) for x in targets)
    frames = np.flatnonzero(frame_weight)
    num_labels = class_logits.shape[-1] - 1
    cfg = Mask2FormerConfig(num_labels=num_labels, train_num_points=config.num_points,
                            oversample_ratio=config.oversample_ratio,
                            importance_sample_ratio=config.importance_sample_ratio,
                            no_object_weight=config.no_object_weight, class_weight=config.class_weight,
                            mask_weight=config.mask_weight, dice_weight=config.dice_weight)
    criterion = m2f.Mask2FormerLoss(cfg, weight_dict={})
    mask_labels = [torch.tensor(masks[f][valid[f]], dtype=torch.float32) for f in frames]
    class_labels = [torch.tensor(classes[f][valid[f]], dtype=torch.int64) for f in frames]
    slots = [np.flatnonzero(valid[f]) for f in frames]

    # torch draws, per prediction (last first, then the auxiliary ones in order): the matcher's
    # points per frame, then the candidates and uniform points per matched pair, pairs ordered by
    # (frame, query). The pairs come from our matching (equal to scipy's, tested above).
    order = [len(mask_logits) - 1] + list(range(len(mask_logits) - 1))
    match = jax.jit(lambda m, c, t, p: L.match(m, c, t, p, config))
    draws = []
    for p in order:
        query_of_target = np.asarray(match(mask_logits[p], class_logits[p], targets, points.match[p]))
        draws += [torch.tensor(np.asarray(points.match[p][f])[None]) for f in frames]
        pairs = sorted((i, int(query_of_target[f, n]), n) for i, f in enumerate(frames) for n in slots[i])
        cand = np.stack([np.asarray(points.candidates[p][frames[i], n]) for i, _, n in pairs])
        unif = np.stack([np.asarray(points.uniform[p][frames[i], n]) for i, _, n in pairs])
        draws += [torch.tensor(cand), torch.tensor(unif)]
    monkeypatch.setattr(m2f.torch, "rand", _RandQueue(draws))
    as_torch = lambda x: torch.tensor(np.asarray(x)[frames])  # noqa: E731
    aux = [{"masks_queries_logits": as_torch(mask_logits[p]), "class_queries_logits": as_torch(class_logits[p])}
           for p in range(len(mask_logits) - 1)]
    out = criterion(as_torch(mask_logits[-1]), as_torch(class_logits[-1]), mask_labels, class_labels,
                    auxiliary_predictions=aux)
    sums = {"loss_cls": 0.0, "loss_mask": 0.0, "loss_dice": 0.0}
    for key, value in out.items():
        base = "loss_cls" if key.startswith("loss_cross_entropy") else key.rsplit("_", 1)[0] if key[-1].isdigit() else key
        sums[base] += float(value)
    return sums


def test_set_losses_equal_transformers_mask2former_loss(monkeypatch):
    rng = np.random.default_rng(0)
    mask_logits, class_logits, targets, conditions = _problem(rng)
    config = L.LossConfig(num_points=300)
    points = jax.vmap(lambda k: L.draw_points(k, 4, 5, config))(jax.random.split(jax.random.key(1), 3))
    ours = jax.jit(lambda m, c, t, p: L.segmentation_losses(m, c, t, None, config, points=p))(
        mask_logits, class_logits, targets, points)
    ref = _reference_losses(mask_logits, class_logits, targets, points, config, conditions, monkeypatch)
    # float32 sums over 300 points, ~16 pairs and 3 predictions; losses are O(1): 1e-5 relative
    # is a few ulps of summation-order difference times the term count.
    for name in ("loss_cls", "loss_mask", "loss_dice"):
        np.testing.assert_allclose(float(ours[name]), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(ours["num_masks"]) == 5.0
    np.testing.assert_allclose(float(ours["loss_seg"]),
                               2 * ref["loss_cls"] + 5 * ref["loss_mask"] + 5 * ref["loss_dice"], rtol=1e-5)


def test_losses_are_finite_and_differentiable_with_no_targets():
    rng = np.random.default_rng(1)
    mask_logits, class_logits, targets, _ = _problem(rng)
    empty = targets._replace(valid=jnp.zeros_like(targets.valid))
    config = L.LossConfig(num_points=50)

    def total(m):
        return L.segmentation_losses(m, class_logits, empty, jax.random.key(0), config)["loss_seg"]

    value, grad = jax.value_and_grad(total)(jnp.asarray(mask_logits))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad).max()) == 0.0     # no matched pair: no mask gradient


def test_point_sample_matches_torch_grid_sample():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(2, 3, 9, 7)).astype(np.float32)
    shared = rng.random((2, 11, 2)).astype(np.float32) * 1.2 - 0.1        # some points outside
    per_map = rng.random((2, 3, 11, 2)).astype(np.float32)
    from transformers.models.mask2former.modeling_mask2former import sample_point

    ref_shared = sample_point(torch.tensor(maps), torch.tensor(shared), align_corners=False).numpy()
    # Four-term bilinear sums, rounded in another order than torch's grid_sample (and with or
    # without FMA, by machine): a few ulp of the maps' magnitude.
    assert_equal_up_to_reordering(L.point_sample(maps, shared), ref_shared, what="shared points")
    ref_per_map = np.stack([sample_point(torch.tensor(maps[f][:, None]), torch.tensor(per_map[f]),
                                         align_corners=False).numpy()[:, 0] for f in range(2)])
    assert_equal_up_to_reordering(L.point_sample(maps, per_map), ref_per_map, what="per-map points")


def test_lm_loss_equals_torch_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 10, 17)).astype(np.float32)
    labels = rng.integers(0, 17, size=(3, 10)).astype(np.int32)
    labels[rng.random((3, 10)) < 0.4] = -100
    labels[2] = -100                                                     # a sample without answer tokens
    ours, count = L.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 17),
                                            torch.tensor(labels[:, 1:]).reshape(-1).long(), ignore_index=-100)
    assert_equal_up_to_reordering(float(ours), float(ref), what="LM loss")    # a mean of log-sum-exps
    assert int(count) == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("length,chunk,normaliser", [(33, 8, None), (33, 5, 40.0), (12, 256, None), (20, 4, 7.0)])
def test_chunked_lm_loss_equals_lm_loss_and_its_gradient(length, chunk, normaliser):
    """The head on chunks of labelled positions (no [B, L, V] logits) = lm_loss on the full
    logits: value and gradients (hidden states and head weight) up to float32 reordering, with
    and without the step's token normaliser; rows with no labels, all labels, scattered labels,
    and chunk counts that do not divide the sequence."""
    rng = np.random.default_rng(length * 10 + chunk)
    batch, width, vocab = 3, 6, 50
    hidden = jnp.asarray(rng.normal(size=(batch, length, width)).astype(np.float32))
    weight = jnp.asarray(rng.normal(size=(width, vocab)).astype(np.float32))
    labels = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    labels[0, rng.random(length) < 0.7] = -100                           # scattered answer tokens
    labels[1] = -100                                                      # no answer tokens
    labels[2, : length // 3] = -100                                       # answer at the end
    labels = jnp.asarray(labels)
    num_tokens = None if normaliser is None else jnp.float32(normaliser)

    def full(h, w):
        return L.lm_loss(h @ w, labels, num_tokens)

    def chunked(h, w):
        return L.chunked_lm_loss(lambda x: x @ w, h, labels, num_tokens, chunk=chunk)

    (ref, ref_count), ref_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(hidden, weight)
    (got, count), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, weight)
    assert int(count) == int(ref_count) == int((np.asarray(labels)[:, 1:] != -100).sum())
    assert_equal_up_to_reordering(float(got), float(ref), what="chunked LM loss")
    for name, g, r in zip(("hidden", "head"), grads, ref_grads):
        assert_equal_up_to_reordering(g, r, ulps=256, what=f"gradient of the {name}")
    assert not np.any(np.asarray(grads[0])[1])                           # an unlabelled row gets no gradient


def test_chunked_lm_loss_gradient_program_holds_no_sequence_of_logits():
    """The compiled gradient's temporary memory is that of a few [B, chunk, V] chunks, far below
    one [B, L, V] f32 array (which lm_loss's gradient holds several of); it grew with the chunk
    count when the head weight was a per-chunk residual (stacked [chunks, D, V])."""
    batch, length, width, vocab, chunk = 2, 512, 16, 8192, 16
    hidden = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
    weight = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, weight, labels).compile() \
            .memory_analysis().temp_size_in_bytes

    logits_bytes = batch * length * vocab * 4
    full = temp_bytes(lambda h, w, y: L.lm_loss(h @ w, y)[0])
    chunked = temp_bytes(lambda h, w, y: L.chunked_lm_loss(lambda x: x @ w, h, y, chunk=chunk)[0])
    assert full >= logits_bytes
    assert chunked <= 8 * batch * chunk * vocab * 4 + 4 * batch * length * width * 4, (chunked, full)


def test_chunked_lm_loss_skips_chunks_past_the_labels():
    """Only ceil(max labelled / chunk) chunks run the head: a head that counts its calls (a
    callback per call) sees one call for 3 answer tokens in a 64-position row of 8-chunks."""
    calls = []

    def head(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 1.0

    labels = np.full((2, 65), -100, np.int32)
    labels[0, [10, 40, 60]] = [1, 2, 3]
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 65, 5)).astype(np.float32))
    loss, count = jax.jit(lambda h: L.chunked_lm_loss(head, h, jnp.asarray(labels), chunk=8))(hidden)
    jax.effects_barrier()
    assert int(count) == 3 and len(calls) == 1
    ref, _ = L.lm_loss(hidden, jnp.asarray(labels))
    assert_equal_up_to_reordering(float(loss), float(ref), what="LM loss")


def _pairwise_reference(class_logits, query_of_target, masks, classes, valid, frame_weight):
    """Loops over frames, queries and conditions: BCE of (condition - background) logits, target
    1 where the query's matched target is the same object as a target of the condition."""
    total, count = 0.0, 0
    frames, queries, width = class_logits.shape
    for f in range(frames):
        if not frame_weight[f]:
            continue
        for q in range(queries):
            mine = [n for n in range(len(classes[f])) if valid[f, n] and query_of_target[f, n] == q]
            for c in range(width - 1):
                if class_logits[f, q, c] <= -1e5:          # padded condition
                    continue
                answers = any(valid[f, m] and classes[f, m] == c and np.array_equal(masks[f, n], masks[f, m])
                              for n in mine for m in range(len(classes[f])))
                x = float(class_logits[f, q, c]) - float(class_logits[f, q, -1])
                total += np.logaddexp(0.0, x) - x * answers
                count += 1
    return total / max(count, 1)


def test_pairwise_class_loss_equals_a_loop_with_several_expressions_of_one_object():
    rng = np.random.default_rng(5)
    frames, queries, conditions, slots = 3, 6, 4, 5
    objects = rng.random((frames, 3, 8, 8)) > 0.5
    # Targets 0 and 1 of every frame are two expressions of object 0 (equal masks, classes 0 and 1).
    which = np.array([[0, 0, 1, 2, 1]] * frames)
    masks = np.stack([objects[f, which[f]] for f in range(frames)]).astype(np.float32)
    classes = np.array([[0, 1, 2, 3, 2], [0, 1, 2, 3, -1], [0, 1, 2, 2, 3]], np.int32)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    query_of_target = np.array([[4, 1, 0, 2, -1], [3, 5, 2, 0, -1], [1, 0, 4, 2, 3]], np.int32)
    frame_weight = np.array([True, True, False])
    logits = rng.normal(size=(frames, queries, conditions + 1)).astype(np.float32) * 3
    logits[1, :, 3] = -1e6                                     # a padded condition slot
    targets = L.FrameTargets(jnp.asarray(masks), jnp.asarray(classes), jnp.asarray(valid), jnp.asarray(frame_weight))
    got = float(jax.jit(L.pairwise_class_loss)(jnp.asarray(logits), jnp.asarray(query_of_target), targets))
    expected = _pairwise_reference(logits, query_of_target, masks, classes, valid, frame_weight)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The query matched to expression 0 answers expression 1 too: its loss falls as that margin grows.
    raised = logits.copy()
    raised[0, 4, 1] += 5.0
    assert float(L.pairwise_class_loss(jnp.asarray(raised), jnp.asarray(query_of_target), targets)) < got

    # In the set losses it is "loss_pair", weighted into loss_seg, and absent at weight 0.
    mask_logits, class_logits, set_targets, _ = _problem(rng)
    base = L.LossConfig(num_points=50)
    weighted = L.LossConfig(num_points=50, pairwise_class_weight=3.0)
    off = L.segmentation_losses(mask_logits, class_logits, set_targets, jax.random.key(0), base)
    on = L.segmentation_losses(mask_logits, class_logits, set_targets, jax.random.key(0), weighted)
    assert "loss_pair" not in off and float(on["loss_pair"]) > 0
    np.testing.assert_allclose(float(on["loss_seg"]), float(off["loss_seg"]) + 3.0 * float(on["loss_pair"]),
                               rtol=1e-6)


VOCAB_PARALLEL = """
import json, sys
sys.path.insert(0, {here!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from x2sam_jax.sharding import make_mesh, vocab_parallel_logits
from x2sam_jax.train import losses as L

rng = np.random.default_rng(0)
hidden = rng.normal(size=(8, 21, 8)).astype(np.float32)
weight = rng.normal(size=(8, 50)).astype(np.float32)          # 50 columns: padded to 56 on 8 devices
labels = rng.integers(0, 50, size=(8, 21)).astype(np.int32)
labels[:, :12] = -100
labels[3] = -100
labels[5, 20] = 49                                              # the last real column

def chunked(h, w, y):
    return L.chunked_lm_loss(lambda x: vocab_parallel_logits(x, w), h, y, chunk=4)[0]

grad = jax.value_and_grad(chunked, argnums=(0, 1))
ref = jax.jit(grad)(hidden, weight, labels)
mesh = make_mesh(1, 4, 2)
with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = (jax.device_put(hidden, batch), jax.device_put(weight, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(labels, batch))
    compiled = jax.jit(grad).lower(*args).compile()
    got = compiled(*args)
hlo = compiled.as_text()
print("RESULT" + json.dumps(dict(
    loss=[float(ref[0]), float(got[0])],
    grad_error=[float(np.max(np.abs(np.asarray(g) - np.asarray(r))) / np.max(np.abs(np.asarray(r))))
                for g, r in zip(got[1], ref[1])],
    split_logits=hlo.count("f32[8,4,7]"), whole_logits=hlo.count("f32[8,4,56]") + hlo.count("f32[1,4,56]"))))
"""


def test_vocab_parallel_chunked_lm_loss_on_8_devices_equals_one_device():
    """The training LM head with the vocabulary split over all 8 devices of a 1x4x2 mesh (V = 50
    padded to 56: 7 columns per device) gives one device's loss and gradients up to float32
    reordering, and the compiled program holds chunk logits only as [B, chunk, 7] pieces."""
    import json, os, subprocess, sys

    code = VOCAB_PARALLEL.format(here=os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    ref, got = result["loss"]
    assert abs(got - ref) <= 1e-5 * abs(ref), result
    assert max(result["grad_error"]) < 1e-5, result
    assert result["split_logits"] > 0 and result["whole_logits"] == 0, result
