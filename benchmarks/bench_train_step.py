"""The train step at two scales, printed as JSON.

``--tiny``: the reduced tiny X2SAM (tests/_train_helpers.py) on this machine's CPU, stage 3, one
device: step time and samples/s of the step with the point-sampled losses (mask embeddings x mask
features, the default) and with the dense-logit reference path, interleaved (median of
``--repeats`` rounds, the load average of each round reported), and both steps' compiled
temporary memory.

``--x2sam-4b``: the full ``x2sam_4b`` stage-3 step (bfloat16 compute, float32 trainable master
weights, bfloat16 frozen base) compiled for ``--devices`` simulated CPU devices on mesh ``--mesh``
from abstract inputs (no weights, nothing runs): compile time, FLOPs per step from the compiled
cost analysis, and the per-device memory analysis, for 1024² frames and either
``--images-per-device`` images or one 8-frame clip per device (``--clip``). ``--settings``:
``config`` (default) runs it as ``configs/x2sam_4b_stage3.py`` does: the config's remat policy and
loss (``config.loss``: the LM loss on chunks of labelled positions, the matcher, the loss
points); ``preset`` as the step ran before the config owned them: the preset's remat policies,
the full [B, L, V] logits, the device matcher.

    python benchmarks/bench_train_step.py --tiny --repeats 5
    python benchmarks/bench_train_step.py --x2sam-4b --devices 8 --mesh 1 8 1 --images-per-device 1
    python benchmarks/bench_train_step.py --x2sam-4b --devices 8 --mesh 1 8 1 --clip --settings preset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))     # _train_helpers: the tiny model and its batches


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny-batch", type=int, default=2, help="samples per tiny step (multiple of 2)")
    p.add_argument("--tiny-frames", type=int, default=1)
    p.add_argument("--x2sam-4b", action="store_true")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices for --x2sam-4b")
    p.add_argument("--mesh", type=int, nargs=3, default=(1, 8, 1), metavar=("DATA", "FSDP", "TENSOR"))
    p.add_argument("--images-per-device", type=int, default=4)
    p.add_argument("--clip", action="store_true", help="one 8-frame clip per device instead of images")
    p.add_argument("--seq-len", type=int, default=None, help="text bucket (default 2048 images, 8192 clips)")
    p.add_argument("--dense-loss", action="store_true", help="--x2sam-4b: the dense-logit loss instead")
    p.add_argument("--topology", default="",
                   help="--x2sam-4b: compile for this TPU topology without TPU hardware (e.g. v5p:2x2x2, "
                        "v5e:2x4; needs libtpu: pip install 'jax[tpu]'), instead of simulated CPU devices")
    p.add_argument("--settings", choices=("config", "preset"), default="config",
                   help="--x2sam-4b: configs/x2sam_4b_stage3.py's remat and loss, or the preset's (before)")
    return p.parse_args(argv)


def _mib(x) -> float:
    return round(x / 2**20, 1)


def memory_dict(memory) -> dict:
    return {"arguments_mib": _mib(memory.argument_size_in_bytes), "outputs_mib": _mib(memory.output_size_in_bytes),
            "aliased_mib": _mib(memory.alias_size_in_bytes), "temp_mib": _mib(memory.temp_size_in_bytes),
            "generated_code_mib": _mib(memory.generated_code_size_in_bytes),
            "peak_estimate_mib": _mib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)}


# ------------------------------------------------------------------------------------------ tiny
def bench_tiny(repeats: int, batch_size: int, frames: int) -> dict:
    import jax
    import numpy as np

    from _train_helpers import FAST, build, stage3_batch, to_device
    from benchmarks.common import interleaved_medians, loadavg, speed
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train import losses as losses_lib
    from x2sam_jax.train import optimizer as optimizer_lib
    from x2sam_jax.train import step as step_lib

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    b = build(3, mesh)
    rng = np.random.default_rng(0)
    parts = [stage3_batch(b["config"], rng, frames=frames) for _ in range(max(1, batch_size // 2))]
    batch = to_device({k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}, mesh)
    schedule = optimizer_lib.learning_rate_schedule(1e-3, 10, 0.0)
    sides, states, out = {}, {}, {}
    for name, dense in (("points", False), ("dense", True)):
        loss = losses_lib.LossConfig(num_points=1024, dense_mask_logits=dense)
        train_step = step_lib.make_train_step(b["graphdef"], b["task"], b["optimizer"], schedule, loss)
        jitted = step_lib.jit_train_step(train_step, b["state"], b["frozen"], b["rest"], mesh, compiler_options=FAST)
        states[name] = jax.tree.map(lambda x: x.copy(), b["state"])
        start = time.perf_counter()
        compiled = jitted.compile(states[name], b["frozen"], b["rest"], batch)
        out[name] = {"compile_s": round(time.perf_counter() - start, 1),
                     "memory": memory_dict(compiled.memory_analysis())}

        def run(name=name, compiled=compiled):
            states[name], metrics = compiled(states[name], b["frozen"], b["rest"], batch)
            jax.block_until_ready(metrics["loss"])
        sides[name] = run
    timing = interleaved_medians(sides, repeats)
    samples = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
    for name in sides:
        out[name].update(step_median_s=round(timing[name]["median_s"], 4), times_s=timing[name]["times_s"],
                         samples_per_s=speed(samples / timing[name]["median_s"], timing, 2))
    return {"config": "reduced tiny X2SAM, stage 3, 1 CPU device, fast-compile backend", "samples_per_step": samples,
            "frames": frames, "loss_points": 1024, "repeats": repeats,
            "loadavg_1min_during": timing["loadavg_1min_during"], "loaded": timing["loaded"], "loadavg_end": loadavg(),
            **out,
            "temp_ratio_dense_over_points": round(out["dense"]["memory"]["temp_mib"]
                                                  / max(out["points"]["memory"]["temp_mib"], 1e-9), 2)}


# ------------------------------------------------------------------------------------------- 4B
def abstract_batch(config, *, accumulate, batch, frames, seq_len, patches, instances, conditions, regions,
                   seg_tokens, sharding):
    """ShapeDtypeStructs of a collated stage-3 batch [A, B, ...] of the given bucket sizes."""
    import jax

    from x2sam_jax.data.batching import BucketConfig, Collator
    from x2sam_jax.train import step as step_lib

    buckets = BucketConfig(seq_lengths=(seq_len,), patch_counts=(patches,), grids=(1,), frames=(frames,),
                           instances=(instances,), conditions=(conditions,), regions=(regions,),
                           seg_tokens=(seg_tokens,))
    one = Collator(buckets, sam_size=config.mask_encoder.image_size)([], batch_size=1)
    keys = step_lib.MODEL_KEYS + step_lib.TARGET_KEYS
    return {k: jax.ShapeDtypeStruct((accumulate, batch, *one[k].shape[1:]), one[k].dtype, sharding=sharding)
            for k in keys}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology, for an ahead-of-time compile on a host without TPUs (the
    compiler is libtpu's, so the memory analysis is the TPU's: bfloat16 buffers stay bfloat16,
    where XLA:CPU widens many of them to float32)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")     # no metadata server to ask
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


def bench_4b(mesh_shape, images_per_device: int, clip: bool, seq_len: int | None, dense: bool,
             settings: str = "config", topology: str = "") -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.config import with_compute_dtype, x2sam_preset
    from x2sam_jax.models.x2sam import parameter_counts
    from x2sam_jax.sharding import compiler_options, make_mesh
    from x2sam_jax.train import losses as losses_lib
    from x2sam_jax.train import optimizer as optimizer_lib
    from x2sam_jax.train import step as step_lib
    from x2sam_jax.runs import build_model_config, model_for_stage, split_params, trainable_predicate

    devices = topology_devices(topology) if topology else None
    mesh = make_mesh(*mesh_shape, devices=devices)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if settings == "config":
        from _config_files import config_module

        run = config_module("x2sam_4b_stage3").get_config()
        config = build_model_config(run, None)
        loss = losses_lib.LossConfig(**run.loss)
        remat = run.model.remat_policy
    else:
        config = with_compute_dtype(x2sam_preset("x2sam_4b"), "bfloat16")
        loss = losses_lib.LossConfig(lm_chunk=0, matcher="device")
        remat = "preset"
    loss = dataclasses.replace(loss, dense_mask_logits=dense)
    abstract = nnx.eval_shape(lambda: model_for_stage(config, 3, nnx.Rngs(0)))
    counts = parameter_counts(abstract)["total"]
    task = step_lib.Task(stage=3, is_trainable=trainable_predicate(3), num_queries=config.mask_decoder.num_queries,
                         shared_negatives=settings == "config" and bool(run.model.shared_negatives))
    graphdef, params, frozen, rest = split_params(nnx.view(abstract, deterministic=False, raise_if_not_found=False),
                                                  task.is_trainable)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    optimizer = optimizer_lib.build_optimizer(lr=1e-4, total_steps=1000, lr_multipliers=(("segmentor.encoder", 0.1),))
    schedule = optimizer_lib.learning_rate_schedule(1e-4, 1000)
    state = jax.eval_shape(lambda p: step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
        rng=jax.random.key(0), nonfinite_run=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32)), params)
    train_step = step_lib.make_train_step(graphdef, task, optimizer, schedule, loss)
    options = None if topology else compiler_options(None)
    jitted = step_lib.jit_train_step(train_step, state, frozen, rest, mesh, compiler_options=options)
    if clip:
        shape = dict(batch=batch_devices, frames=8, seq_len=seq_len or 8192, patches=16384, instances=16,
                     conditions=8, regions=8, seg_tokens=8)
    else:
        shape = dict(batch=images_per_device * batch_devices, frames=1, seq_len=seq_len or 2048, patches=4096,
                     instances=64, conditions=32, regions=8, seg_tokens=8)
    batch = abstract_batch(config, accumulate=1, sharding=step_lib.batch_sharding(mesh), **shape)
    start = time.perf_counter()
    compiled = jitted.compile(state, frozen, rest, batch)        # lowered under the mesh where safe
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable = sum(x.size for x in jax.tree.leaves(params))
    return {"config": "x2sam_4b stage 3, bfloat16 compute, float32 trainable + Adam, bfloat16 frozen",
            "settings": settings, "remat": remat, "lm_chunk": loss.lm_chunk, "matcher": loss.matcher,
            "mesh": dict(mesh.shape), "devices": mesh.devices.size,
            "compiled_for": f"{mesh.devices.flat[0].device_kind} ({topology})" if topology
            else f"{len(jax.devices())} simulated CPU devices",
            "batch": shape | {"samples_per_device": shape["batch"] // batch_devices},
            "loss": "dense" if dense else "points",
            "parameters": counts, "trainable_parameters": int(trainable),
            "activation_constraints": jitted.mesh is not None, "lower_and_compile_s": round(compile_s, 1),
            "compiler_options": options,
            # XLA's cost analysis counts a while-loop body once (not times its trip count): the
            # scanned stacks, the frame scan and the loss's map over predictions are undercounted.
            "flops_per_device_per_step_xla_loop_bodies_once": cost.get("flops"),
            "bytes_accessed_per_device": cost.get("bytes accessed"),
            "memory_per_device": memory_dict(compiled.memory_analysis())}


def main(argv=None):
    args = _parse(argv)
    if args.x2sam_4b:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    result = {"jax": jax.__version__, "platform": jax.devices()[0].platform}
    if args.tiny:
        result["tiny"] = bench_tiny(args.repeats, args.tiny_batch, args.tiny_frames)
    if args.x2sam_4b:
        result["x2sam_4b"] = bench_4b(tuple(args.mesh), args.images_per_device, args.clip, args.seq_len,
                                      args.dense_loss, args.settings, args.topology)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
