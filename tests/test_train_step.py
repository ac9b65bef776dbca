"""The train step: frozen parameters untouched, learning-rate multipliers, gradient accumulation,
skipped non-finite steps, per-step randomness, and the same step on 8 devices (2x2x2, 1x4x2)."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import EPS32, GRADIENT_ULPS, assert_trees_equal_up_to_reordering
from _train_helpers import (FAST, LOSS, build, chat_batch, flat_values, random_module, reduced_config,
                            segmentation_batch, stage3_batch, to_device, without_frames)
from flax import nnx

from x2sam_jax.model_checkpoint import load, save
from x2sam_jax.rng import reseed_rngs
from x2sam_jax.sharding import make_mesh
from x2sam_jax.train import step as step_lib

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])


def _check_first_adam_step(before, after, lr, wd, multiplier):
    """AdamW's first update is -lr*m*(g/(|g|+eps) + wd*p): per parameter group (multiplier m),
    |update + lr*m*wd*p| / (lr*m) is at most 1 and 1 wherever the gradient is not tiny. A
    multiplier not applied (or applied twice) breaks one of the two bounds."""
    groups = {}
    for name, p0 in before.items():
        m = multiplier(name)
        ratio = np.abs(after[name] - p0 + lr * m * wd * p0) / (lr * m)
        groups.setdefault(m, []).append(ratio.ravel())
    for m, ratios in groups.items():
        ratios = np.concatenate(ratios)
        assert ratios.max() <= 1.0 + 1e-3, (m, ratios.max())
        assert np.mean(ratios > 0.99) > 0.05, (m, np.mean(ratios > 0.99))   # (zero-gradient rows: 0)


@pytest.mark.slow
def test_stage3_frozen_untouched_groups_train_and_lr_multipliers_act(mesh):
    """Two steps of X2SAM: frozen parameters (ViT blocks, LLM base) are bit-identical, every
    trainable group moved, and the first AdamW update of each parameter is lr x its module's
    multiplier (0.1 for the SAM2 encoder) times (sign of the gradient + weight decay)."""
    lr, wd = 1e-3, 0.05
    run = build(3, mesh, lr=lr, grad_clip=0.0)
    batch = to_device(stage3_batch(run["config"], np.random.default_rng(0)), mesh)
    frozen_before = flat_values(run["frozen"])
    params0 = flat_values(run["state"].params)
    assert any(k.startswith("vlm.visual.blocks.") for k in frozen_before)
    assert any(k.endswith(".q_proj.kernel") for k in frozen_before)
    assert not any(k.endswith((".lora_a", ".lora_b")) or k.startswith("segmentor.") for k in frozen_before)
    # No optimizer state for frozen leaves: Adam keeps two moments per trainable value only.
    moments = sum(x.size for x in jax.tree.leaves(run["state"].opt_state) if x.ndim > 0)
    assert moments == 2 * sum(v.size for v in params0.values())

    state, metrics = run["step"](run["state"], run["frozen"], run["rest"], batch)
    params1 = flat_values(state.params)
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss_lm"]))
    lr0 = float(metrics["lr"])
    np.testing.assert_allclose(lr0, lr, rtol=1e-6)
    _check_first_adam_step(params0, params1, lr0, wd, lambda name: 0.1 if name.startswith("segmentor.encoder.") else 1.0)
    for fragment in ("segmentor.encoder.", "segmentor.pixel_decoder.", "segmentor.decoder.", "lora_b",
                     "visual.merger.", "mlm_projector.", "extra_projector.", "embed_tokens"):
        moved = [k for k in params0 if fragment in k and np.abs(params1[k] - params0[k]).max() > 0]
        assert moved, fragment
    state, _ = run["step"](state, run["frozen"], run["rest"], batch)
    params2 = flat_values(state.params)
    # After two steps everything trainable has moved (LoRA A too, once B != 0), except the mask
    # memory, which an image batch (T=1) never runs: its zero-initialised biases stay zero.
    still = [k for k in params0 if np.abs(params2[k] - params0[k]).max() == 0]
    assert not [k for k in still if not k.startswith("segmentor.memory.")], [k for k in still if not k.startswith("segmentor.memory.")]
    for name, value in flat_values(run["frozen"]).items():
        np.testing.assert_array_equal(value, frozen_before[name], err_msg=name)


STAGE1_MULTIPLIERS = (("segmentor.pixel_decoder", 0.1),)


@pytest.fixture(scope="module")
def stage1(mesh):
    return build(1, mesh, multipliers=STAGE1_MULTIPLIERS, grad_clip=0.0)


def test_stage1_frozen_untouched_and_lr_multipliers_act(stage1, mesh):
    """Stage 1: the SAM2 encoder, the unused memory, text cross-attention and cosine class head
    are frozen (bit-identical, no optimizer state); everything else moves, the pixel decoder
    with its 0.1 learning-rate multiplier."""
    run = stage1
    frozen_before = flat_values(run["frozen"])
    assert {k.split(".")[1] for k in frozen_before} == {"encoder", "memory", "decoder"}
    assert all("text_cross_attn" in k or "class_predictor" in k for k in frozen_before if ".decoder." in k)
    params0 = flat_values(run["state"].params)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in params0 if k.startswith("segmentor.")} == {
        "segmentor.pixel_decoder", "segmentor.decoder"}
    batch = to_device(segmentation_batch(np.random.default_rng(4), accumulate=4, batch=1, frames=1), mesh)
    state, metrics = run["step"](jax.tree.map(jnp.copy, run["state"]), run["frozen"], run["rest"], batch)
    params1 = flat_values(state.params)
    _check_first_adam_step(params0, params1, float(metrics["lr"]), 0.05,
                           lambda name: 0.1 if name.startswith("segmentor.pixel_decoder.") else 1.0)
    moved = {k for k in params0 if np.abs(params1[k] - params0[k]).max() > 0}
    # Everything trainable moves, except what has no gradient yet at the Deformable-DETR init
    # (zero sampling-offset / attention-weight kernels ignore the level embedding at step 1).
    assert set(params0) - moved <= {"segmentor.pixel_decoder.level_embed"}, set(params0) - moved
    for name, value in flat_values(run["frozen"]).items():
        np.testing.assert_array_equal(value, frozen_before[name], err_msg=name)


def test_accumulated_step_is_one_update_with_the_step_normalised_gradient(stage1, mesh):
    """A step of 4 micro-batches (one clip each) makes one optimizer update with the sum of the
    micro-batch gradients, each loss normalised by the whole step's counts."""
    run = stage1
    batch = segmentation_batch(np.random.default_rng(1), accumulate=4, batch=1, frames=1)
    state0 = run["state"]
    params0 = flat_values(state0.params)
    grad_fn = jax.jit(step_lib.make_grad_fn(run["graphdef"], run["task"], LOSS), compiler_options=FAST)
    normalizers = step_lib.step_normalizers(run["task"], jax.tree.map(jnp.asarray, batch), LOSS)
    # 3 valid boxes per clip; 8 queries: 4 x (3 x 1 + 5 x 0.1) class weight.
    assert float(normalizers.num_masks) == 12.0 and abs(float(normalizers.class_weight) - 14.0) < 1e-5
    grads = []
    for i in range(4):
        micro = {k: v[i] for k, v in batch.items()}
        dropout_key, sample_key = step_lib.step_keys(state0.rng, state0.step, i)
        (_, _), g = grad_fn(state0.params, run["frozen"], run["rest"], micro, dropout_key, sample_key, i, normalizers)
        grads.append(g)
    total = flat_values(jax.tree.map(lambda *g: sum(g), *grads))

    state, metrics = run["step"](jax.tree.map(jnp.copy, state0), run["frozen"], run["rest"], to_device(batch, mesh))
    assert int(state.step) == 1 and int(state.updates) == 1
    # Adam's first moment after one update is (1 - b1) * g: linear in the gradient, so it shows
    # the gradient the step used. The step's program sums the gradient in another order than
    # separate micro-batch programs: reordering noise of the tree's largest entry (tests/_tolerance.py).
    mu = flat_values(state.opt_state[0].mu)
    assert_trees_equal_up_to_reordering({n: mu[n] for n in params0}, {n: 0.1 * total[n] for n in params0},
                                        ulps=GRADIENT_ULPS, what="accumulated gradient ")
    assert float(metrics["lr"]) > 0 and abs(float(metrics["grad_norm"]) - np.sqrt(
        sum(float((g ** 2).sum()) for g in total.values()))) <= 1e-4 * float(metrics["grad_norm"])
    assert float(metrics["num_masks"]) == 12.0


def test_any_split_of_a_step_gives_its_loss_and_gradient(mesh):
    """The same 4 samples as 1 x 4 and 4 x 1 (micro-steps x rows): the loss, the gradient
    norm and the update agree to float32 reordering noise (per-sample randomness, step-wide
    normalisation). The samples hold different numbers of targets, so a per-micro-batch
    normalisation would not agree. Uniform loss points: the uncertainty top-k could flip on
    reordering noise between the two programs."""
    run = build(1, mesh, multipliers=STAGE1_MULTIPLIERS, grad_clip=0.0,
                loss=dataclasses.replace(LOSS, importance_sample_ratio=0.0))
    whole = segmentation_batch(np.random.default_rng(2), accumulate=1, batch=4, frames=1)
    whole["instance_valid"][0, 1, 1:] = False                  # sample 1: one target, the others three
    whole["gt_frame_valid"] &= whole["instance_valid"][:, :, None, :]
    results = {}
    for accumulate in (1, 4):
        split = {k: v.reshape(accumulate, 4 // accumulate, *v.shape[2:]) for k, v in whole.items()}
        state, metrics = run["step"](jax.tree.map(jnp.copy, run["state"]), run["frozen"], run["rest"],
                                     to_device(split, mesh))
        results[accumulate] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                               flat_values(state.opt_state[0].mu))
    loss, norm, moment = results[1]
    for accumulate in (4,):
        np.testing.assert_allclose(results[accumulate][0], loss, rtol=1e-5, err_msg=str(accumulate))
        np.testing.assert_allclose(results[accumulate][1], norm, rtol=1e-4, err_msg=str(accumulate))
        # Adam's first moment (1 - b1) x g: the gradient the update used.
        assert_trees_equal_up_to_reordering(results[accumulate][2], moment, ulps=GRADIENT_ULPS,
                                            what=f"{accumulate} micro-steps ")


def test_non_finite_step_is_skipped_and_counted(stage1, mesh):
    run = stage1
    batch = segmentation_batch(np.random.default_rng(2), accumulate=4, batch=1, frames=1)
    bad = dict(batch, sam_pixel_values=batch["sam_pixel_values"].copy())
    bad["sam_pixel_values"][2, 0, 0, 0, 0, 0] = np.nan
    state0 = jax.tree.map(jnp.copy, run["state"])
    before = flat_values(state0.params)
    opt_before = [np.asarray(x) for x in jax.tree.leaves(state0.opt_state)]
    state, metrics = run["step"](state0, run["frozen"], run["rest"], to_device(bad, mesh))
    assert float(metrics["finite"]) == 0.0
    assert (int(state.step), int(state.updates), int(state.skipped), int(state.nonfinite_run)) == (1, 0, 1, 1)
    for name, value in flat_values(state.params).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    for a, b in zip(jax.tree.leaves(state.opt_state), opt_before):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = run["step"](state, run["frozen"], run["rest"], to_device(batch, mesh))
    assert (int(state.updates), int(state.skipped), int(state.nonfinite_run)) == (1, 1, 0)


def test_each_step_draws_fresh_reproducible_randomness(stage1, mesh):
    """The loss's random points come from (seed, step): the same step repeats exactly, the next
    step draws differently."""
    run = stage1
    batch = to_device(segmentation_batch(np.random.default_rng(3), accumulate=4, batch=1, frames=1), mesh)

    def loss_at(step):
        state = jax.tree.map(jnp.copy, run["state"])
        state.step = jax.device_put(jnp.asarray(step, jnp.int32), run["state"].step.sharding)
        return float(run["step"](state, run["frozen"], run["rest"], batch)[1]["loss"])

    first = loss_at(5)
    assert loss_at(5) == first
    assert loss_at(6) != first


class _Stacked(nnx.Module):
    def __init__(self, rngs):
        from x2sam_jax.layers.scan import create_stack

        self.layers = create_stack(lambda r: nnx.Dropout(0.5, rngs=r), 3, rngs)
        self.other = nnx.Dropout(0.5, rngs=rngs)
        self.dense = nnx.Linear(2, 2, rngs=rngs)


def _keys(state):
    return np.concatenate([np.asarray(jax.random.key_data(v.get_value())).reshape(-1, 2)
                           for _, v in nnx.to_flat_state(state)
                           if jax.dtypes.issubdtype(v.get_value().dtype, jax.dtypes.prng_key)])


def test_reseeded_streams_are_distinct_per_layer_and_step():
    model = _Stacked(nnx.Rngs(0))
    rng_state = nnx.state(model, nnx.RngState)
    a, b = reseed_rngs(rng_state, jax.random.key(1)), reseed_rngs(rng_state, jax.random.key(2))
    keys_a, keys_b = _keys(a), _keys(b)
    assert len(keys_a) == 4 and len(np.unique(keys_a, axis=0)) == 4      # 3 stacked layers + 1
    assert not np.any(np.all(keys_a[:, None] == keys_b[None], -1))         # a new step: all new keys
    np.testing.assert_array_equal(_keys(reseed_rngs(rng_state, jax.random.key(1))), keys_a)


def test_checkpoint_keeps_rng_state_and_fresh_loads_get_distinct_streams(tmp_path):
    from x2sam_jax.config import LoRAConfig, Qwen3TextConfig, Qwen3VLConfig
    from x2sam_jax.models.qwen3_vl import Qwen3VLModel

    text = Qwen3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                           num_kv_heads=1, head_dim=8, mrope_section=(2, 1, 1))
    model = Qwen3VLModel(Qwen3VLConfig(text=text, lora=LoRAConfig(rank=2, alpha=4.0, dropout=0.1)), rngs=nnx.Rngs(4))
    nnx.update(model, reseed_rngs(nnx.state(model, nnx.RngState), jax.random.key(9)))
    saved = _keys(nnx.state(model, nnx.RngState))
    save(tmp_path / "with_rng", model)
    np.testing.assert_array_equal(_keys(nnx.state(load(tmp_path / "with_rng"), nnx.RngState)), saved)
    # A checkpoint without RNG state (e.g. written by a converter) loads with distinct streams,
    # not key(0) everywhere (which gave identical LoRA dropout masks in all layers).
    import shutil

    shutil.rmtree(tmp_path / "with_rng" / "rng_state")
    fresh = _keys(nnx.state(load(tmp_path / "with_rng"), nnx.RngState))
    assert len(np.unique(fresh, axis=0)) == len(fresh) > 3


SHARDED = textwrap.dedent("""
    import dataclasses, os, re, sys, json
    sys.path.insert(0, {here!r})
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from _train_helpers import LOSS, build, flat_values, segmentation_batch, to_device
    from x2sam_jax.sharding import make_mesh
    from jax.sharding import PartitionSpec as P
    batch = segmentation_batch(np.random.default_rng(0), accumulate=2, batch=8, frames=1)
    out = {{}}
    for name, shape in [("single", None), ("2x2x2", (2, 2, 2)), ("1x4x2", (1, 4, 2))]:
        mesh = make_mesh(devices=jax.devices()[:1]) if shape is None else make_mesh(*shape)
        # Uniform points only: the uncertainty-ranked ones are a top-k of the logits, and a near
        # tie broken the other way by float noise swaps a point (a jump, not noise, in the loss).
        run = build(1, mesh, loss=dataclasses.replace(LOSS, importance_sample_ratio=0.0))
        device_batch = to_device(batch, mesh)
        state, metrics = run["step"](run["state"], run["frozen"], run["rest"], device_batch)
        # The host matcher's callbacks: the number of frames each one receives.
        hlo = run["step"].compile(state, run["frozen"], run["rest"], device_batch).as_text()
        callback_frames = sorted(set(re.findall(r"custom-call\\(.*operand_layout_constraints={{f32\\[(\\d+),", hlo)))
        flat = lambda tree: {{".".join(map(str, k)): str(v.get_value().sharding.spec)
                             for k, v in __import__("flax").nnx.to_flat_state(tree)}}
        specs, mu_specs = flat(state.params), flat(state.opt_state[1].mu)
        np.savez(os.path.join({tmp!r}, name + ".npz"), **{{k.replace(".", "/"): v for k, v in flat_values(state.params).items()}})
        np.savez(os.path.join({tmp!r}, name + "_mu.npz"), **{{k.replace(".", "/"): v for k, v in flat_values(state.opt_state[1].mu).items()}})
        out[name] = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                         specs={{k: specs[k] for k in {probe!r}}}, mu={{k: mu_specs[k] for k in {probe!r}}},
                         callback_frames=callback_frames)
    print("RESULT" + json.dumps(out))
""")

PROBE = ["segmentor.decoder.layers.fc1.kernel", "segmentor.pixel_decoder.encoder_layers.fc1.kernel",
         "class_head.kernel", "segmentor.decoder.queries_features.embedding"]


def test_sharded_step_equals_single_device_step(tmp_path):
    """One step of the stage-1 model on meshes 2x2x2 (activation constraints off) and 1x4x2 (on)
    of 8 CPU devices gives the single-device loss and parameters; parameters and Adam moments are
    sharded by the rules (an axis of size 1 dropped: test_foundation's logical-rule test). The
    host matcher (the default) runs per device where the step is lowered under the mesh (1x4x2:
    each callback gets 1 of a micro-batch's 8 frames) and as one callback with all 8 frames
    where it is not (2x2x2)."""
    code = SHARDED.format(here=HERE, tmp=str(tmp_path), probe=PROBE)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    out = json.loads(proc.stdout.split("RESULT")[-1])
    single = dict(np.load(tmp_path / "single.npz"))
    single_mu = dict(np.load(tmp_path / "single_mu.npz"))       # Adam's first moment: 0.1 x clipped gradient
    scale = max(np.abs(v).max() for v in single_mu.values())
    for name in ("2x2x2", "1x4x2"):
        # float32 sums over a batch split 8 ways / over sharded contractions differ from the
        # single-device order by ~1e-7 relative per op; a few dozen ops deep: <= 1e-5.
        np.testing.assert_allclose(out[name]["loss"], out["single"]["loss"], rtol=1e-5)
        np.testing.assert_allclose(out[name]["grad_norm"], out["single"]["grad_norm"], rtol=1e-5)
        other, other_mu = dict(np.load(tmp_path / f"{name}.npz")), dict(np.load(tmp_path / f"{name}_mu.npz"))
        # Adam's first moment sums the gradient over every position of the batch: its reordering
        # noise is set by the tree's largest magnitude (tests/_tolerance.py).
        assert_trees_equal_up_to_reordering(other_mu, single_mu, ulps=GRADIENT_ULPS, what=f"{name} mu ")
        for key, value in single.items():
            # Adam's first step is lr * g / (|g| + 1e-8) ~ lr * sign(g): where the gradient is within
            # its reordering noise of 0 (the key bias of softmax attention has an exactly-zero
            # gradient) the sign, hence the update, is noise too.
            real = np.abs(single_mu[key]) > 2 * GRADIENT_ULPS * EPS32 * scale
            np.testing.assert_allclose(other[key][real], value[real], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    # The rules: embed -> fsdp, mlp -> tensor.
    P = jax.sharding.PartitionSpec
    fc1 = "segmentor.decoder.layers.fc1.kernel"        # [layers, embed, mlp]
    assert out["2x2x2"]["specs"][fc1] == out["1x4x2"]["specs"][fc1] == str(P(None, "fsdp", "tensor"))
    assert out["2x2x2"]["specs"]["segmentor.decoder.queries_features.embedding"] == str(P(None, "fsdp"))
    assert out["2x2x2"]["mu"] == out["2x2x2"]["specs"]
    assert out["1x4x2"]["mu"] == out["1x4x2"]["specs"]
    assert LOSS.matcher == "host"
    assert out["single"]["callback_frames"] == ["8"] and out["2x2x2"]["callback_frames"] == ["8"], out
    assert out["1x4x2"]["callback_frames"] == ["1"], out["1x4x2"]["callback_frames"]


def test_shared_negatives_put_every_referring_phrase_in_every_class_head():
    from x2sam_jax.models.x2sam import share_conditions
    from x2sam_jax.train.losses import frame_targets

    embeds = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4)
    valid = jnp.array([[True, True], [True, False], [True, False]])
    shared = jnp.array([[True, True, False], [True, True, False], [False, False, False]])   # sample 2: not referring
    all_embeds, all_valid = share_conditions(embeds, valid, shared)
    np.testing.assert_array_equal(all_embeds[2], embeds.reshape(6, 4))
    np.testing.assert_array_equal(all_valid, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    batch = {"gt_masks": np.zeros((3, 1, 2, 4, 4), bool), "gt_classes": np.array([[0, 1], [0, -1], [0, -1]]),
             "frame_valid": np.ones((3, 1), bool), "instance_valid": np.array([[1, 1], [1, 0], [1, 0]], bool),
             "gt_frame_valid": np.ones((3, 1, 2), bool)}
    targets = frame_targets(batch, segmentation_samples=jnp.ones(3, bool), class_offsets=jnp.arange(3) * 2)
    np.testing.assert_array_equal(targets.classes, [[0, 1], [2, -1], [4, -1]])   # each sample's own columns


def test_init_from_converted_checkpoints(tmp_path):
    """The stage-3 start: Qwen3-VL (convert_weights.qwen3_vl output) -> vlm.*, SAM2
    (convert_weights.sam2 output) -> segmentor.encoder.*; LoRA and the head keep their init; a
    checkpoint of the wrong size is refused with the key named."""
    import dataclasses

    import ml_collections

    from x2sam_jax.models.hiera import Sam2VisionEncoder
    from x2sam_jax.models.qwen3_vl import Qwen3VLModel
    from x2sam_jax.runs import model_for_stage, split_params, trainable_predicate
    from x2sam_jax.train.loop import init_from_checkpoints

    config = reduced_config()
    qwen = random_module(lambda: Qwen3VLModel(dataclasses.replace(config.vlm, lora=None), rngs=nnx.Rngs(0)), 11)
    sam2 = random_module(lambda: Sam2VisionEncoder(config.mask_encoder, rngs=nnx.Rngs(0)), 12)
    save(tmp_path / "qwen", qwen)
    save(tmp_path / "sam2", sam2)
    model = random_module(lambda: model_for_stage(config, 3, nnx.Rngs(0)), 13)
    _, params, frozen, _ = split_params(model, trainable_predicate(3))
    lora_before = {k: v for k, v in flat_values(params).items() if k.endswith(("lora_a", "lora_b"))}
    init = ml_collections.ConfigDict(dict(qwen3_vl=str(tmp_path / "qwen"), sam2=str(tmp_path / "sam2"), stage1=""))
    params, frozen = init_from_checkpoints(params, frozen, init)
    values = {**flat_values(params), **flat_values(frozen)}
    for name, value in flat_values(nnx.state(qwen, nnx.Param)).items():
        np.testing.assert_array_equal(values["vlm." + name], value, err_msg=name)
    for name, value in flat_values(nnx.state(sam2, nnx.Param)).items():
        np.testing.assert_array_equal(values["segmentor.encoder." + name], value, err_msg=name)
    for name, value in lora_before.items():
        np.testing.assert_array_equal(values[name], value)
    assert "segmentor.decoder.queries_features.embedding" in values
    wrong = random_module(lambda: Sam2VisionEncoder(dataclasses.replace(config.mask_encoder, fpn_hidden_size=16),
                                                     rngs=nnx.Rngs(0)), 14)
    save(tmp_path / "wrong", wrong)
    init.sam2 = str(tmp_path / "wrong")
    with pytest.raises(ValueError, match="neck"):
        init_from_checkpoints(params, frozen, init)


def test_step_partitioner_and_constraints_avoid_the_three_axis_gradient_bug():
    """scripts/repro_three_axis_gradient.py on 2x2x2: three dense layers, kernels (fsdp, tensor),
    batch over (data, fsdp). The step's choice there (GSPMD, shardings propagated) gives the
    one-device gradient; the other variants are printed (an upstream fix shows there). Meshes with
    an axis of 1 keep the constraints (1x4x2 in test_sharded_step_equals_single_device_step)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "repro_three_axis_gradient.py"), "2x2x2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = {name: float(value) for name, value in (line.split() for line in proc.stdout.strip().splitlines())}
    print("2x2x2 relative gradient error:", errors)
    assert len(errors) == 4 and errors["gspmd_propagated"] < 1e-5, errors
    mesh_shape = lambda data, fsdp, tensor: types.SimpleNamespace(shape=dict(data=data, fsdp=fsdp, tensor=tensor))
    assert not step_lib.activation_constraints_safe(mesh_shape(2, 2, 2))
    assert all(step_lib.activation_constraints_safe(mesh_shape(*s)) for s in ((1, 4, 2), (2, 1, 4), (2, 4, 1)))


def test_chunked_lm_loss_step_equals_the_full_logits_step(mesh):
    """Stage 3: the step's LM loss on chunks of labelled positions (``LossConfig.lm_chunk``, no
    [B, L, V] logits) gives the loss and gradient of the full-logits path (lm_chunk=0) under the
    step's token normaliser (the one training passes: a larger step's count than the micro-batch's);
    every other loss term is bit-identical (same random streams)."""
    run = build(3, mesh)
    batch = jax.tree.map(jnp.asarray, stage3_batch(run["config"], np.random.default_rng(0)))
    micro = {k: v[0] for k, v in batch.items()}
    normalizers = step_lib.step_normalizers(run["task"], batch, LOSS)
    normalizers = normalizers._replace(lm_tokens=normalizers.lm_tokens + 5.0)     # a larger step's count
    dropout_key, sample_key = step_lib.step_keys(run["state"].rng, run["state"].step, 0)
    results = {}
    for chunk in (0, 4):
        config = dataclasses.replace(LOSS, lm_chunk=chunk)
        grad_fn = jax.jit(step_lib.make_grad_fn(run["graphdef"], run["task"], config), compiler_options=FAST)
        results[chunk] = grad_fn(run["state"].params, run["frozen"], run["rest"], micro, dropout_key, sample_key,
                                 0, normalizers)
    (ref_loss, ref_metrics), ref_grads = results[0]
    (loss, metrics), grads = results[4]
    assert float(metrics["lm_tokens"]) == float(ref_metrics["lm_tokens"]) > 0
    for name in ("loss_cls", "loss_mask", "loss_dice"):
        assert float(metrics[name]) == float(ref_metrics[name]), name
    np.testing.assert_allclose(float(metrics["loss_lm"]), float(ref_metrics["loss_lm"]), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_equal_up_to_reordering(flat_values(grads), flat_values(ref_grads), ulps=GRADIENT_ULPS,
                                        what="chunked LM gradient ")


# Source files of the segmentor and its losses: a program without masks lowers no op from them.
SEGMENTOR_FILES = ("models/hiera.py", "models/mask_decoder.py", "train/matcher.py")


def _segmentor_ops(lowered) -> dict:
    """How much of the segmentor a lowered program holds: its convolutions (SAM2's patch embedding,
    the pixel decoder; the Qwen ViT embeds patches with a matmul) and the op locations in the
    segmentor's source files."""
    text = lowered.as_text(debug_info=True)
    counts = {"convolution": text.count("stablehlo.convolution")}
    counts.update({name: text.count(name) for name in SEGMENTOR_FILES})
    return counts


def test_chat_batch_compiles_the_llm_alone_with_the_full_programs_loss_and_gradient(mesh):
    """Stage 3: a chat batch without frames (``Task.language_only``) lowers a step with no
    segmentor op (no convolution, nothing from SAM2, the mask decoder or the matcher), where the
    same batch with a padded frame lowers all of them; both steps' outputs have one structure
    (the metrics' keys too, which the loop averages over steps of both kinds). Run from one state
    (two micro-steps, the configs' chunked LM loss), the LLM-only step gives the full program's LM
    loss, gradient norm and Adam moments: a chat sample's loss does not depend on the segmentor."""
    run = build(3, mesh)
    full = chat_batch(run["config"], np.random.default_rng(1), accumulate=2)
    chat = without_frames(full)
    assert chat["sam_pixel_values"].shape[2] == 0 and chat["gt_masks"].size == 0
    assert run["task"].language_only(chat) and not run["task"].language_only(full)
    args = (run["state"], run["frozen"], run["rest"])
    lowered_chat = run["step"].jitted.lower(*args, chat)          # first: no trace cached from the full one
    lowered_full = run["step"].jitted.lower(*args, full)
    without, with_ = _segmentor_ops(lowered_chat), _segmentor_ops(lowered_full)
    assert all(with_[name] > 0 for name in with_), with_
    assert all(without[name] == 0 for name in without), without
    assert jax.tree.structure(lowered_chat.out_info) == jax.tree.structure(lowered_full.out_info)

    copy = jax.tree.map(jnp.copy, run["state"])                   # the step donates its state
    full_state, full_metrics = run["step"](copy, run["frozen"], run["rest"], to_device(full, mesh))
    state, metrics = run["step"](*args, to_device(chat, mesh))
    assert run["step"].programs == 2 and int(state.updates) == 1 and float(metrics["finite"]) == 1.0
    for name in ("loss_cls", "loss_mask", "loss_dice", "loss_seg"):
        assert float(metrics[name]) == float(full_metrics[name]) == 0.0, name
    assert float(metrics["num_masks"]) == 1.0 and float(metrics["lm_tokens"]) == float(full_metrics["lm_tokens"]) > 0
    assert float(metrics["loss"]) == float(metrics["loss_lm"]) > 0
    for name in ("loss_lm", "loss", "grad_norm"):
        np.testing.assert_allclose(float(metrics[name]), float(full_metrics[name]), rtol=1e-5, err_msg=name)
    mu, ref_mu = flat_values(state.opt_state[1].mu), flat_values(full_state.opt_state[1].mu)
    assert sum(np.abs(v).sum() for k, v in ref_mu.items() if not k.startswith("segmentor.")) > 0
    for name, ref in ref_mu.items():
        np.testing.assert_allclose(mu[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max() + 1e-12, err_msg=name)
