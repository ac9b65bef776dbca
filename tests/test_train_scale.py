"""Training at scale (issue 10): point-sampled mask losses from mask features x mask embeddings,
activation and parameter shardings of the compiled train step on 8 simulated devices, and mixed
precision."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _train_helpers import FAST, reduced_config, stage3_batch
from x2sam_jax.models.x2sam import X2SAM
from x2sam_jax.train import losses as losses_lib
from x2sam_jax.train import step as step_lib


# ------------------------------------------------------------------------------ point-sampled loss
def test_point_logits_from_features_equal_dense_sampling():
    """Both ways of reading a prediction at points, on random maps: shared points (the matcher)
    and per-query points (uncertainty sampling, losses)."""
    rng = np.random.default_rng(0)
    frames, queries, channels, size = 2, 6, 16, 24
    embeddings = jnp.asarray(rng.normal(size=(frames, queries, channels)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(frames, size, size, channels)), jnp.float32)
    dense = jnp.einsum("fqc,fhwc->fqhw", embeddings, features)
    factored = losses_lib.FactoredMasks(embeddings, features)
    shared = jnp.asarray(rng.uniform(-0.05, 1.05, size=(frames, 50, 2)), jnp.float32)   # incl. zero padding
    per_query = jnp.asarray(rng.uniform(size=(frames, 3, 40, 2)), jnp.float32)
    chosen = jnp.asarray([[5, 0, 2], [1, 1, 4]], jnp.int32)
    # |logit| <= sum_c |e_c m_c| ~ 16 here; float32 sums of 16 products in two orders differ by
    # a few ulp of that (~1e-6 relative): 1e-5 absolute.
    np.testing.assert_allclose(losses_lib.mask_point_logits(factored, shared),
                               losses_lib.mask_point_logits(dense, shared), rtol=0, atol=1e-5)
    np.testing.assert_allclose(losses_lib.mask_point_logits(factored, per_query, chosen),
                               losses_lib.mask_point_logits(dense, per_query, chosen), rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_point_sampled_losses_equal_dense_logit_losses_on_the_model(frames):
    """The stage-3 model's training outputs read both ways (dense_masks True / False), the same
    points: the matches and every loss agree, and no dense per-prediction logits come out of the
    factored forward."""
    config = reduced_config()
    model = X2SAM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(frames)
    batch = {k: jnp.asarray(v[0]) for k, v in stage3_batch(config, rng, frames=frames).items()}
    task = step_lib.Task(stage=3, is_trainable=lambda _: True, num_queries=config.mask_decoder.num_queries)
    loss_config = losses_lib.LossConfig(num_points=96)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=FAST)   # one program, both paths: compile time only
    def both(state, batch):
        model = nnx.merge(graphdef, state)
        out = {}
        for dense in (True, False):
            result, segmentation, offsets = task.forward(model, batch, jax.random.key(1), dense_masks=dense)
            targets = losses_lib.frame_targets(batch, segmentation_samples=segmentation, class_offsets=offsets)
            masks = step_lib.mask_predictions(result, dense)
            out[dense] = (losses_lib.segmentation_losses(masks, step_lib._frames_first(result.all_class_logits),
                                                         targets, jax.random.key(2), loss_config),
                          result.all_mask_logits, result.mask_logits)
        return out

    out = both(state, batch)
    dense, factored = out[True][0], out[False][0]
    assert out[False][1] is None and out[False][2] is None
    assert out[True][1].shape[:3] == (config.mask_decoder.num_layers + 1, 2, frames)
    assert float(dense["num_masks"]) > 0 and float(dense["loss_mask"]) > 0
    # Losses are means over points of BCE/dice of logits that differ by float32 rounding only
    # (~1e-6 relative, see above), summed over 4 predictions: relative 1e-5. A different
    # Hungarian assignment or uncertain-point choice would move them by O(1e-1).
    for name in ("loss_cls", "loss_mask", "loss_dice", "loss_seg"):
        np.testing.assert_allclose(factored[name], dense[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ sharding, 8 devices
HERE = os.path.dirname(os.path.abspath(__file__))

SHARDED_STEP = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from _train_helpers import build, stage3_batch, to_device
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train import losses as losses_lib, optimizer as optimizer_lib, step as step_lib

    seen = {{}}

    class Probe(step_lib.Task):
        # Reads the partitioner's sharding of the model's outputs inside the compiled train step.
        def forward(self, model, batch, region_key, dense_masks=False, lm_logits=True):
            out, segmentation, offsets = super().forward(model, batch, region_key, dense_masks, lm_logits)
            for name in ("text_hidden", "mask_features", "all_mask_embeddings", "all_class_logits"):
                value = getattr(out, name)
                jax.debug.inspect_array_sharding(
                    value, callback=lambda s, n=name, shape=value.shape: seen.__setitem__(
                        n, (shape, [list(a) if isinstance(a, tuple) else a for a in s.spec])))
            return out, segmentation, offsets

    result = {{}}
    for shape in {meshes!r}:
        mesh = make_mesh(*shape)
        b = build(3, mesh)
        rng = np.random.default_rng(0)
        parts = [stage3_batch(b["config"], rng) for _ in range(4)]                 # global batch 8
        batch = to_device({{k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}}, mesh)
        task = Probe(stage=3, is_trainable=b["task"].is_trainable, num_queries=b["task"].num_queries)
        schedule = optimizer_lib.learning_rate_schedule(1e-3, 10, 0.0)
        loss_config = losses_lib.LossConfig(num_points=64)
        train_step = step_lib.make_train_step(b["graphdef"], task, b["optimizer"], schedule, loss_config)
        step = step_lib.jit_train_step(train_step, b["state"], b["frozen"], b["rest"], mesh,
                                       compiler_options={{"xla_backend_optimization_level": 0}})
        seen.clear()
        compiled = step.compile(b["state"], b["frozen"], b["rest"], batch)
        hlo = compiled.as_text()
        vocab = b["config"].vlm.text.vocab_size
        length = batch["input_ids"].shape[-1]
        chunk = min(loss_config.lm_chunk, length - 1)
        result["x".join(map(str, shape))] = dict(
            seen=dict(seen),
            # per-device HLO: the LM loss's logits are built one chunk of labelled positions at a
            # time (losses.chunked_lm_loss) with the vocabulary split over all 8 devices
            # ([B, chunk, V / 8], sharding.vocab_parallel_logits); an array of the global
            # chunk-logit shape means replicated logits, and no [., L, V] array exists at all
            full_logits=len(re.findall(rf"f32\\[8,{{chunk}},{{vocab}}\\]", hlo)),
            local_logits=len(re.findall(rf"f32\\[8,{{chunk}},{{vocab // 8}}\\]", hlo)),
            sequence_logits=len(re.findall(rf"\\[\\d+,{{length}},{{vocab // shape[2]}}\\]", hlo)))
    print("RESULT" + json.dumps(result))
""")


def _run_sharded(meshes):
    code = SHARDED_STEP.format(here=HERE, meshes=meshes)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT")[-1])


def _assert_batch_split(result, batch_axes, local_logits=True):
    """Every probed output has its batch dimension split over ``batch_axes`` (all 8 ways for
    fsdp=8, data x fsdp = 4 ways on 2x2x2, the rest of the devices on tensor), and (with
    ``local_logits``) the text logits exist per device only as every position's V / 8 vocabulary
    columns (no replicated [8, chunk, V] copy, no [., L, V] at all)."""
    seen = result["seen"]
    assert set(seen) == {"text_hidden", "mask_features", "all_mask_embeddings", "all_class_logits"}
    for name, (shape, spec) in seen.items():
        batch_dim = 1 if name.startswith("all_") else 0
        assert shape[batch_dim] == 8
        got = spec[batch_dim] if len(spec) > batch_dim else None
        got = (got,) if isinstance(got, str) else tuple(got or ())
        assert got == batch_axes, (name, spec)
    assert result["sequence_logits"] == 0, result                 # training never builds [B, L, V]
    if local_logits:
        assert result["full_logits"] == 0 and result["local_logits"] > 0, result


def test_compiled_train_step_splits_the_batch_over_fsdp():
    """Mesh data=1 x fsdp=8: the batch of 8 is split 8 ways in the compiled step."""
    _assert_batch_split(_run_sharded([(1, 8, 1)])["1x8x1"], ("fsdp",))


@pytest.mark.slow
def test_compiled_train_step_splits_the_batch_on_a_2x2x2_mesh():
    """data x fsdp x tensor = 2x2x2: the step is lowered without the activation constraints
    (``step.activation_constraints_safe``: GSPMD's gradients are wrong there under the mesh); the
    outputs still come out split 4 ways by batch from the inputs' shardings."""
    _assert_batch_split(_run_sharded([(2, 2, 2)])["2x2x2"], ("data", "fsdp"), local_logits=False)


STATE_4B = textwrap.dedent("""
    import json
    import jax
    from flax import nnx
    from x2sam_jax.config import x2sam_preset
    from x2sam_jax.sharding import make_mesh, replicated_report, state_shardings
    from x2sam_jax.train import optimizer as optimizer_lib, step as step_lib
    from x2sam_jax.runs import model_for_stage, split_params, trainable_predicate

    abstract = nnx.eval_shape(lambda: model_for_stage(x2sam_preset("x2sam_4b"), 3, nnx.Rngs(0)))
    _, params, frozen, _ = split_params(abstract, trainable_predicate(3))
    optimizer = optimizer_lib.build_optimizer(lr=1e-4, total_steps=10)
    out = {}
    for shape in [(1, 8, 1), (2, 2, 2)]:
        mesh = make_mesh(*shape)
        state = jax.eval_shape(lambda p: step_lib.TrainState(
            step=0, updates=0, params=p, opt_state=optimizer.init(p), rng=jax.random.key(0), nonfinite_run=0,
            skipped=0), params)
        shardings = step_lib.train_state_shardings(state, mesh)
        warnings = []
        found = {kind: replicated_report(tree, state_shardings(tree, mesh), label=kind,
                                         log=lambda *a: warnings.append(a))
                 for kind, tree in (("params", params), ("frozen", frozen))}
        lora_b = "vlm.language_model.layers.mlp.up_proj.lora_b"
        flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state_shardings(params, mesh))}
        adam_mu = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(shardings.opt_state[1].mu)}
        out["x".join(map(str, shape))] = dict(
            found={k: [list(map(str, r)) for r in v] for k, v in found.items()}, warnings=len(warnings),
            lora_b=str(flat[lora_b].get_value().spec), lora_b_mu=str(adam_mu[lora_b].get_value().spec),
            conv=str(flat["segmentor.memory.memory_encoder.vision_downsampler.2.layers.1.conv.kernel"]
                     .get_value().spec))
    # a rule that replicates is reported, with its name, shape and size
    from x2sam_jax.sharding import LOGICAL_AXIS_RULES
    former = {"lora_rank": None, "conv_out": "tensor"}
    rules = tuple((k, former.get(k, v)) for k, v in LOGICAL_AXIS_RULES)
    mesh = make_mesh(1, 8, 1)
    warnings = []
    found = replicated_report(params, state_shardings(params, mesh, rules), log=lambda *a: warnings.append(a))
    out["old_rules"] = dict(found=[list(map(str, r)) for r in found], warnings=len(warnings))
    print("RESULT" + json.dumps(out))
""")


def test_no_trainable_tensor_above_1mib_is_replicated_in_the_4b_state():
    """x2sam_4b stage 3, abstract (no weights), 8 simulated devices: under fsdp=8 and 2x2x2 no
    parameter above 1 MiB is replicated (trainable or frozen); with the former rules (LoRA rank
    unsharded, conv outputs over tensor only) the report names the LoRA and memory-encoder tensors."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", STATE_4B], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    for mesh in ("1x8x1", "2x2x2"):
        assert out[mesh]["found"] == {"params": [], "frozen": []} and out[mesh]["warnings"] == 0, out[mesh]
    P = jax.sharding.PartitionSpec
    assert out["1x8x1"]["lora_b"] == str(P(None, "fsdp", None))
    assert out["2x2x2"]["lora_b"] == str(P(None, "fsdp", "tensor"))
    assert out["1x8x1"]["lora_b_mu"] == out["1x8x1"]["lora_b"]           # Adam moments follow
    assert out["1x8x1"]["conv"] == str(P(None, None, None, "fsdp"))
    assert out["2x2x2"]["conv"] == str(P(None, None, None, ("tensor", "fsdp")))
    old = {name: (shape, int(size)) for name, shape, size in out["old_rules"]["found"]}
    assert out["old_rules"]["warnings"] == len(old)
    assert old["vlm.language_model.layers.mlp.up_proj.lora_b"] == ("(36, 128, 9728)", 36 * 128 * 9728 * 4)
    assert "segmentor.memory.memory_encoder.vision_downsampler.2.layers.1.conv.kernel" in old


# ------------------------------------------------------------------------------ mixed precision
@pytest.mark.slow
def test_bfloat16_compute_runs_an_8_frame_clip_with_float32_master_weights():
    """One compute dtype (bfloat16) through every module, the memory bank and the frame scan
    included, on an 8-frame clip: the loss matches the float32 model's, the parameters and their
    gradients stay float32."""
    from x2sam_jax.config import with_compute_dtype

    config = reduced_config()
    config16 = with_compute_dtype(config, "bfloat16")
    assert config16.memory.dtype == config16.pixel_decoder.dtype == config16.vlm.text.dtype == "bfloat16"
    model16 = X2SAM(config16, rngs=nnx.Rngs(0))
    params = nnx.state(model16, nnx.Param)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}
    model32 = X2SAM(config, rngs=nnx.Rngs(1))
    nnx.update(model32, params)                                    # the same float32 weights
    batch = {k: jnp.asarray(v[0]) for k, v in stage3_batch(config, np.random.default_rng(0), frames=8).items()}
    task = step_lib.Task(stage=3, is_trainable=lambda _: True, num_queries=config.mask_decoder.num_queries)
    loss_config = losses_lib.LossConfig(num_points=96)

    def loss_of(model):
        graphdef, state = nnx.split(model)

        def fn(params, rest, batch):
            return step_lib.micro_batch_loss(nnx.merge(graphdef, params, rest), task, batch, jax.random.key(0),
                                             loss_config)
        return graphdef, fn

    _, fn16 = loss_of(model16)
    (loss16, metrics16), grads = jax.jit(jax.value_and_grad(fn16, has_aux=True), compiler_options=FAST)(
        params, nnx.state(model16, nnx.Not(nnx.Param)), batch)
    _, fn32 = loss_of(model32)
    loss32, metrics32 = jax.jit(fn32, compiler_options=FAST)(params, nnx.state(model32, nnx.Not(nnx.Param)), batch)
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(metrics16["num_masks"]) == float(metrics32["num_masks"]) > 0
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); softmax, norms,
    # losses and the attention logits are float32, so the error is a few such roundings through a
    # few dozen layers and 8 frames (~1e-2 relative). A wrong dtype in the scan or the bank
    # (a cast that drops the memory, a bfloat16 softmax over 200 queries) moves it far more.
    for name in ("loss", "loss_lm", "loss_seg"):
        np.testing.assert_allclose(metrics16[name], metrics32[name], rtol=3e-2, err_msg=name)
