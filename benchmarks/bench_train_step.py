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

``--x2sam-4b --run``: the same step on this machine's real devices (a GPU: benchmarks/gpu_check.sh)
with random weights born sharded, a random full batch of the recipe's shapes, warm-up then timed
steps: step time, samples/s, MFU (train/flops.py's FLOP count over the device kind's peak), peak
device memory, the attention kernels in the compiled HLO (cuDNN flash custom calls vs plain dots).
``--llm-layers N`` cuts the LLM when the full depth does not fit; ``--sam-size`` / ``--patches``
shrink the inputs, ``--model tiny`` runs the tiny preset through the same path (CPU checks). What
was changed from the full 4B step is listed in the output; a step that does not fit exits with a
one-line error (and what was measured before it).

    python benchmarks/bench_train_step.py --tiny --repeats 5
    python benchmarks/bench_train_step.py --x2sam-4b --devices 8 --mesh 1 8 1 --images-per-device 1
    python benchmarks/bench_train_step.py --x2sam-4b --devices 8 --mesh 1 8 1 --clip --settings preset
    python benchmarks/bench_train_step.py --x2sam-4b --run --images-per-device 1          # on a GPU
    python benchmarks/bench_train_step.py --x2sam-4b --run --model tiny --sam-size 128 --patches 64 --seq-len 256
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
    p.add_argument("--mesh", type=int, nargs=3, default=None, metavar=("DATA", "FSDP", "TENSOR"),
                   help="default 1 x devices x 1 (--run: every real device)")
    p.add_argument("--images-per-device", type=int, default=4)
    p.add_argument("--clip", action="store_true", help="one 8-frame clip per device instead of images")
    p.add_argument("--seq-len", type=int, default=None, help="text bucket (default 2048 images, 8192 clips)")
    p.add_argument("--dense-loss", action="store_true", help="--x2sam-4b: the dense-logit loss instead")
    p.add_argument("--topology", default="",
                   help="--x2sam-4b: compile for this TPU topology without TPU hardware (e.g. v5p:2x2x2, "
                        "v5e:2x4; needs libtpu: pip install 'jax[tpu]'), instead of simulated CPU devices")
    p.add_argument("--settings", choices=("config", "preset"), default="config",
                   help="--x2sam-4b: configs/x2sam_4b_stage3.py's remat and loss, or the preset's (before)")
    run = p.add_argument_group("--x2sam-4b --run: the step on this machine's real devices, random weights")
    run.add_argument("--run", action="store_true")
    run.add_argument("--llm-layers", type=int, default=None, help="cut the LLM to N layers (said in the output)")
    run.add_argument("--sam-size", type=int, default=None, help="SAM frame side (default 1024; smaller for CPU checks)")
    run.add_argument("--patches", type=int, default=None,
                     help="Qwen patches per sample (default 4096 images, 16384 clips; smaller for CPU checks)")
    run.add_argument("--model", choices=("x2sam_4b", "tiny"), default="x2sam_4b",
                     help="tiny: the tiny preset through the same path (a quick check of the script on CPU)")
    run.add_argument("--steps", type=int, default=5, help="timed steps")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    args = p.parse_args(argv)
    if args.run and not args.x2sam_4b:
        p.error("--run measures the 4B step: give it with --x2sam-4b")
    if args.run and args.dense_loss:
        p.error("--run takes the shipped loss (no --dense-loss)")
    for name in ("llm_layers", "sam_size", "patches", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.sam_size and args.sam_size % 32:
        p.error(f"--sam-size must be a multiple of 32 (Hiera's total stride), got {args.sam_size}")
    return args


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


def stage3_settings(settings: str):
    """(model config, loss config, remat label, shared negatives) of the stage-3 step: ``config`` as
    configs/x2sam_4b_stage3.py runs it, ``preset`` as the step ran before the config owned them."""
    from x2sam_jax.config import with_compute_dtype, x2sam_preset
    from x2sam_jax.runs import build_model_config
    from x2sam_jax.train import losses as losses_lib

    if settings == "config":
        from _config_files import config_module

        run = config_module("x2sam_4b_stage3").get_config()
        return (build_model_config(run, None), losses_lib.LossConfig(**run.loss), run.model.remat_policy,
                bool(run.model.shared_negatives))
    return (with_compute_dtype(x2sam_preset("x2sam_4b"), "bfloat16"),
            losses_lib.LossConfig(lm_chunk=0, matcher="device"), "preset", False)


def recipe_shape(batch_devices: int, images_per_device: int, clip: bool, seq_len: int | None,
                 patches: int | None = None) -> dict:
    """Bucket sizes of the recipe's global batch: ``images_per_device`` images, or one 8-frame clip,
    per device."""
    if clip:
        return dict(batch=batch_devices, frames=8, seq_len=seq_len or 8192, patches=patches or 16384, instances=16,
                    conditions=8, regions=8, seg_tokens=8)
    return dict(batch=images_per_device * batch_devices, frames=1, seq_len=seq_len or 2048, patches=patches or 4096,
                instances=64, conditions=32, regions=8, seg_tokens=8)


def bench_4b(mesh_shape, images_per_device: int, clip: bool, seq_len: int | None, dense: bool,
             settings: str = "config", topology: str = "") -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.models.x2sam import parameter_counts
    from x2sam_jax.sharding import compiler_options, make_mesh
    from x2sam_jax.train import optimizer as optimizer_lib
    from x2sam_jax.train import step as step_lib
    from x2sam_jax.runs import model_for_stage, split_params, trainable_predicate

    devices = topology_devices(topology) if topology else None
    mesh = make_mesh(*mesh_shape, devices=devices)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    config, loss, remat, shared_negatives = stage3_settings(settings)
    loss = dataclasses.replace(loss, dense_mask_logits=dense)
    abstract = nnx.eval_shape(lambda: model_for_stage(config, 3, nnx.Rngs(0)))
    counts = parameter_counts(abstract)["total"]
    task = step_lib.Task(stage=3, is_trainable=trainable_predicate(3), num_queries=config.mask_decoder.num_queries,
                         shared_negatives=shared_negatives)
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
    shape = recipe_shape(batch_devices, images_per_device, clip, seq_len)
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


# ------------------------------------------------------------------------------ 4B on real devices
class RunError(RuntimeError):
    """A one-line reason the --run step cannot be measured as asked (printed with what was measured
    before it, ``partial``; exit status 1)."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial or {}


def random_batch(config, shape: dict, rng, *, sam_size: int) -> dict:
    """A collated stage-3 batch [1, B, ...] of the bucket sizes ``shape`` (``recipe_shape``) with
    every sample real and full: random uint8 patches and frames (normalised on the device), the visual tokens, ``conditions``
    phrases (the first ``regions`` of them holding a region prompt), ``seg_tokens`` <SEG> tokens
    (labelled, with the text after them), ``instances`` box-shaped targets over the conditions."""
    import numpy as np

    from x2sam_jax.data.batching import Collator
    from x2sam_jax.data.tokenizer import IGNORE_LABEL

    B, T, L, P = shape["batch"], shape["frames"], shape["seq_len"], shape["patches"]
    N, C, R, G = shape["instances"], shape["conditions"], shape["regions"], shape["seg_tokens"]
    vision = config.vlm.vision
    temporal = 1 if T == 1 else max(1, T // vision.temporal_patch_size)
    side = int(round((P // temporal) ** 0.5))
    if temporal * side * side != P or side % vision.spatial_merge_size:
        raise RunError(f"patches={P} is not {temporal} x side² with side a multiple of {vision.spatial_merge_size}")
    visual = P // vision.spatial_merge_size ** 2
    per_region = config.region_tokens
    needed = 1 + visual + R * (per_region + 3) + (C - R) * 6 + 2 * G + 8
    if needed > L:
        raise RunError(f"seq_len={L} is too short for {visual} visual tokens, {C} conditions ({R} with a "
                         f"region of {per_region} tokens) and {G} <SEG> tokens: needs >= {needed}")
    collator = Collator(sam_size=sam_size)
    out = collator.empty(B, dict(seq_lengths=L, patch_counts=P, grids=1, frames=T, instances=N, conditions=C,
                                 regions=R, seg_tokens=G))
    S, Sm = sam_size, sam_size // 4
    out["input_ids"][:] = rng.integers(10, min(150000, config.vlm.text.vocab_size), size=(B, L))
    out["attention_mask"][:] = True
    out["pixel_values"][:] = rng.integers(0, 256, size=out["pixel_values"].shape, dtype=np.uint8)
    out["pixel_valid"][:] = True
    out["grid_thw"][:, 0] = (temporal, side, side)
    out["sam_pixel_values"][:] = rng.integers(0, 256, size=out["sam_pixel_values"].shape, dtype=np.uint8)
    out["sam_valid_hw"][:] = S
    out["frame_valid"][:] = True
    out["orig_hw"][:] = S
    out["task_id"][:] = 0
    out["num_frames"][:] = T
    out["sample_valid"][:] = True

    def box(size, low=8):
        y, x = rng.integers(0, size - size // 4, size=2)
        h, w = rng.integers(low, size // 4 + low, size=2)
        return slice(y, y + h), slice(x, x + w)

    for b in range(B):
        ids = out["input_ids"][b]
        ids[1:1 + visual] = config.vlm.image_token_id if T == 1 else config.vlm.video_token_id
        pos = 2 + visual
        for c in range(C):
            ids[pos] = config.p_start_token_id
            if c < R:
                ids[pos + 1:pos + 1 + per_region] = config.region_token_id
                out["region_masks"][(b, c, *box(S))] = True
                out["region_valid"][b, c] = True
                end = pos + 1 + per_region
            else:
                end = pos + 3
            ids[end] = config.p_end_token_id
            out["cond_spans"][b, c] = (pos, end)
            out["cond_valid"][b, c] = True
            pos = end + 2
        answer = pos
        for g in range(G):
            ids[pos] = config.seg_token_id
            out["seg_positions"][b, g] = pos
            out["seg_valid"][b, g] = True
            pos += 2
        answer_ids = ids[answer:pos + 4]   # the tiny preset's added ids lie beyond its vocabulary: unlabelled
        out["labels"][b, answer:pos + 4] = np.where(answer_ids < config.vlm.text.vocab_size, answer_ids, IGNORE_LABEL)
        for n in range(N):
            for t in range(T):
                out["gt_masks"][(b, t, n, *box(Sm, 2))] = True
        out["gt_classes"][b] = rng.integers(0, C, size=N)
        out["gt_frame_valid"][b] = out["gt_masks"][b].any((-1, -2))
        out["instance_valid"][b] = True
    return {k: v[None] for k, v in out.items()}


def _fits_error(e: Exception, where: str, partial: dict) -> RunError | None:
    """A one-line error for an out-of-memory failure, else None."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return RunError(f"the 4B step does not fit the device while {where} (try --llm-layers N to cut the LLM's "
                        f"depth, or fewer images): {text.splitlines()[0][:300]}", partial)
    return None


def _peak_gib(device) -> float | None:
    stats = device.memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None


def bench_4b_run(mesh_shape, images_per_device: int, clip: bool, seq_len: int | None, settings: str,
                 llm_layers: int | None, sam_size: int | None, patches: int | None, steps: int, warmup: int,
                 seed: int = 0, model: str = "x2sam_4b") -> dict:
    """The stage-3 step with random weights on the real devices: weights born sharded (bfloat16
    frozen, float32 trainable + Adam), a random full batch of the recipe's shapes, ``warmup``
    untimed then ``steps`` timed steps. Step time (median), samples/s, MFU (the step's FLOPs from
    ``flops.program_flops``, every scan iteration counted, over the devices' peak), peak device
    memory, and the attention kernels in the compiled HLO."""
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import hlo_kernels, loadavg
    from x2sam_jax.models.x2sam import parameter_counts
    from x2sam_jax.runs import model_for_stage, split_params, trainable_predicate
    from x2sam_jax.sharding import compiler_options, make_mesh, state_shardings
    from x2sam_jax.train import flops as flops_lib
    from x2sam_jax.train import optimizer as optimizer_lib
    from x2sam_jax.train import step as step_lib

    devices = jax.devices()
    mesh_shape = tuple(mesh_shape) if mesh_shape else (1, len(devices), 1)
    mesh = make_mesh(*mesh_shape, devices=devices[:int(np.prod(mesh_shape))])
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if model == "tiny":   # the same path at toy sizes: a check of this script, not a measurement
        from x2sam_jax.config import with_compute_dtype, x2sam_preset
        from x2sam_jax.train import losses as losses_lib

        config = with_compute_dtype(x2sam_preset("tiny"), "bfloat16")
        loss, remat, shared_negatives = losses_lib.LossConfig(num_points=128), "preset", False
    else:
        config, loss, remat, shared_negatives = stage3_settings(settings)
    changes = [] if model == "x2sam_4b" else ["the tiny preset instead of x2sam_4b (a check, not a measurement)"]
    if llm_layers:
        deepstack = len(config.vlm.vision.deepstack_visual_indexes)
        if llm_layers < deepstack:
            raise RunError(f"--llm-layers {llm_layers}: at least {deepstack} (the ViT's deepstack features enter "
                           f"the first {deepstack} LLM layers)")
        changes.append(f"LLM cut to {llm_layers} of {config.vlm.text.num_layers} layers")
        text = dataclasses.replace(config.vlm.text, num_layers=llm_layers)
        config = dataclasses.replace(config, vlm=dataclasses.replace(config.vlm, text=text))
    if sam_size:
        config = dataclasses.replace(config, mask_encoder=dataclasses.replace(config.mask_encoder, image_size=sam_size))
        changes.append(f"SAM frames {sam_size}² instead of 1024²")
    if patches:
        changes.append(f"{patches} Qwen patches per sample instead of the recipe's")
    sam_size = config.mask_encoder.image_size
    task = step_lib.Task(stage=3, is_trainable=trainable_predicate(3), num_queries=config.mask_decoder.num_queries,
                         shared_negatives=shared_negatives)

    # Weights born sharded: one jitted initialiser returns the trainable (float32), frozen
    # (cast to bfloat16 inside it, so the float32 copy never exists outside) and other states.
    def make():
        model = nnx.view(model_for_stage(config, 3, nnx.Rngs(seed)), deterministic=False, raise_if_not_found=False)
        _, params, frozen, rest = split_params(model, task.is_trainable)
        frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
        return params, frozen, rest

    abstract = nnx.view(nnx.eval_shape(lambda: model_for_stage(config, 3, nnx.Rngs(seed))), deterministic=False,
                        raise_if_not_found=False)
    counts = parameter_counts(abstract)["total"]
    graphdef, *abstract_states = split_params(abstract, task.is_trainable)
    shardings = tuple(state_shardings(x, mesh) for x in abstract_states)
    result = {"config": f"{model} stage 3, random weights, bfloat16 compute, float32 trainable + Adam, "
                        "bfloat16 frozen", "settings": settings if model == "x2sam_4b" else None, "remat": remat,
              "lm_chunk": loss.lm_chunk, "matcher": loss.matcher, "changed_from_4b": changes or "none (full model)",
              "mesh": dict(mesh.shape), "devices": [d.device_kind for d in mesh.devices.flat], "parameters": counts}
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            params, frozen, rest = jax.jit(make, out_shardings=shardings, compiler_options=compiler_options(None))()
        optimizer = optimizer_lib.build_optimizer(lr=1e-4, total_steps=1000,
                                                  lr_multipliers=(("segmentor.encoder", 0.1),))
        state = step_lib.init_train_state(params, optimizer, seed, mesh)
        jax.block_until_ready(state.params)
    except Exception as e:
        raise (_fits_error(e, "creating the weights", result) or e) from e
    result["init_s"] = round(time.perf_counter() - start, 1)
    # The allocator's high-water mark covers the process: the initialiser's own peak (every weight
    # in float32 before the frozen ones are cast) is noted, to tell it apart from the step's.
    result["peak_after_init_gib"] = _peak_gib(mesh.devices.flat[0])
    result["trainable_parameters"] = int(sum(x.size for x in jax.tree.leaves(state.params)))

    schedule = optimizer_lib.learning_rate_schedule(1e-4, 1000)
    train_step = step_lib.make_train_step(graphdef, task, optimizer, schedule, loss)
    jitted = step_lib.jit_train_step(train_step, state, frozen, rest, mesh, compiler_options=compiler_options(None))
    shape = recipe_shape(batch_devices, images_per_device, clip, seq_len, patches)
    host = random_batch(config, shape, np.random.default_rng(seed), sam_size=sam_size)
    batch = {k: jax.device_put(v, step_lib.batch_sharding(mesh)) for k, v in host.items()}
    result["batch"] = shape | {"samples_per_device": shape["batch"] // batch_devices, "sam_size": sam_size}
    start = time.perf_counter()
    try:
        compiled = jitted.compile(state, frozen, rest, batch)
    except Exception as e:
        raise (_fits_error(e, "compiling the step", result) or e) from e
    result["compile_s"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    result["compiled_memory_per_device"] = memory_dict(memory) if memory is not None else None
    result["hlo_kernels"] = hlo_kernels(compiled.as_text())
    limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
    if memory is not None and limit and result["compiled_memory_per_device"]["peak_estimate_mib"] * 2**20 > limit:
        raise RunError(f"the 4B step does not fit the device: the compiled step needs "
                       f"{result['compiled_memory_per_device']['peak_estimate_mib'] / 1024:.1f} GiB per device, "
                       f"the device has {limit / 2**30:.1f} GiB (try --llm-layers N, or fewer images)", result)

    times = []
    try:
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, rest, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except Exception as e:
        raise (_fits_error(e, "running the step", result) or e) from e
    step_s = statistics.median(times)
    flops = jitted.flops(batch)
    peak, peak_source = flops_lib.peak_flops_per_device()
    stats = mesh.devices.flat[0].memory_stats() or {}
    samples = shape["batch"]
    init_peak = result["peak_after_init_gib"]
    if init_peak is not None and init_peak >= _peak_gib(mesh.devices.flat[0]):
        result["peak_note"] = ("the initialiser set the peak: the step's own is below it "
                               "(see compiled_memory_per_device)")
    result.update(
        warmup_steps=warmup, timed_steps=steps, step_median_s=round(step_s, 4),
        step_times_s=[round(t, 4) for t in times],
        samples_per_s=round(samples / step_s, 3),
        flops_per_step=flops, peak_flops_per_device=peak, peak_source=peak_source,
        mfu=round(flops / step_s / mesh.devices.size / peak, 4) if flops else None,
        peak_bytes_in_use_gib=_peak_gib(mesh.devices.flat[0]) or "not reported by this platform",
        bytes_limit_gib=round(stats["bytes_limit"] / 2**30, 2) if "bytes_limit" in stats else None,
        metrics={k: float(v) for k, v in metrics.items() if getattr(v, "ndim", 1) == 0}, loadavg=loadavg())
    return result


def main(argv=None):
    args = _parse(argv)
    if args.x2sam_4b and not args.run:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    result = {"jax": jax.__version__, "platform": jax.devices()[0].platform}
    if args.tiny:
        result["tiny"] = bench_tiny(args.repeats, args.tiny_batch, args.tiny_frames)
    if args.x2sam_4b and args.run:
        try:
            result["x2sam_4b_run"] = bench_4b_run(args.mesh, args.images_per_device, args.clip, args.seq_len,
                                                  args.settings, args.llm_layers, args.sam_size, args.patches,
                                                  args.steps, args.warmup, model=args.model)
        except RunError as e:
            print(json.dumps(result | {"x2sam_4b_run": e.partial, "error": str(e)}, indent=1))
            sys.exit(f"bench_train_step --run: {e}")
    elif args.x2sam_4b:
        result["x2sam_4b"] = bench_4b(tuple(args.mesh or (1, args.devices, 1)), args.images_per_device, args.clip,
                                      args.seq_len, args.dense_loss, args.settings,
                                      args.topology)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
