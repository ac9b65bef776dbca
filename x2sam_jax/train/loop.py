"""The training loop: ``train(config, workdir)``, what ``train.py`` runs.

    distributed init -> mesh -> tokenizer -> model (born sharded, initialised from converted
    weights) -> trainable / frozen split -> optimizer -> Grain pipeline -> resume from the latest
    complete checkpoint -> loop over optimizer steps:
        agree the bucket shapes across micro-batches and hosts -> global arrays -> jitted step
        -> metrics (metrics.jsonl, TensorBoard, tqdm) -> checkpoint every N steps (async)
        -> evaluation every M steps -> SIGTERM: save at this step boundary and exit 0.

Run configs (``configs/*.py``) are ml_collections ConfigDicts; ``configs/x2sam_tiny_synthetic.py``
documents every field.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from x2sam_jax import runs
from x2sam_jax.conversion import flatten, unflatten
from x2sam_jax.data import synthetic
from x2sam_jax.data.batching import BucketConfig, Collator
from x2sam_jax.data.mixture import split_global_batch
from x2sam_jax.data.pipeline import (agree_batch_shapes, build_train_pipeline, default_feature_fn, optimizer_steps,
                                     padding_id)
from x2sam_jax.distributed import absolute_path, barrier, initialize_distributed  # noqa: F401 - re-exported
from x2sam_jax.model_checkpoint import load_flat_params
from x2sam_jax.runs import pixel_dtype
from x2sam_jax.sharding import compiler_options, create_sharded, make_mesh, place
from x2sam_jax.train import compile_plan
from x2sam_jax.train import flops as flops_lib
from x2sam_jax.train import losses as losses_lib
from x2sam_jax.train import optimizer as optimizer_lib
from x2sam_jax.train import step as step_lib
from x2sam_jax.train.run_checkpoint import TrainCheckpoints

logger = logging.getLogger("x2sam_jax.train")

NONFINITE_CHECK_LAG = 2

# model, tokenizer, mesh, output_dir, step -> {dataset: {metric: value}}: the in-loop evaluation.
EvaluateFn = Callable[[nnx.Module, Any, Any, Path, int], dict]


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


# ------------------------------------------------------------------------------------- set-up
def init_from_checkpoints(params, frozen, init, mesh=None) -> tuple:
    """Copies converted weights into the (trainable, frozen) parameter states, by path:
    ``init.qwen3_vl`` (convert_weights.qwen3_vl output) -> ``vlm.*``, ``init.sam2``
    (convert_weights.sam2) -> ``segmentor.encoder.*``, ``init.stage1`` (a stage-1 training
    workdir) -> ``segmentor.pixel_decoder.*`` and ``segmentor.decoder.*``. A shape mismatch or a
    source key the model lacks is an error naming it; parameters no source provides (LoRA, the
    head) keep their initialisation.

    Valid on every process of a multi-process run: the stage-1 model is restored onto ``mesh``
    (default: the mesh the parameters live on) and its arrays are moved into the state on the
    devices (resharded only where the layouts differ); converted weights, read on host by every
    process, become global arrays of which each process fills its own shards."""
    sources = []
    if init.get("qwen3_vl"):
        sources.append(("vlm.", load_flat_params(init.qwen3_vl), "", init.qwen3_vl))
    if init.get("sam2"):
        sources.append(("segmentor.encoder.", load_flat_params(init.sam2), "", init.sam2))
    if init.get("stage1"):
        mesh = mesh if mesh is not None else _mesh_of(params, frozen)
        model = runs.restore_model(init.stage1, mesh=mesh)
        flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        del model
        for part in ("segmentor.pixel_decoder.", "segmentor.decoder."):
            sources.append(("", {k: v for k, v in flat.items() if k.startswith(part)}, "", init.stage1))
    if not sources:
        return params, frozen
    out = []
    for state in (params, frozen):
        flat = flatten(nnx.to_pure_dict(state))
        shardings = {k: getattr(v, "sharding", None) for k, v in flat.items()}
        out.append((state, flat, shardings))
    filled = 0
    for prefix, values, _, origin in sources:
        for key, value in values.items():
            target = prefix + key
            entry = next(((flat, shardings) for _, flat, shardings in out if target in flat), None)
            if entry is None:
                raise KeyError(f"{origin}: parameter {key!r} has no counterpart {target!r} in the model")
            holder, shardings = entry
            if tuple(holder[target].shape) != tuple(value.shape):
                raise ValueError(f"{origin}: {key!r} has shape {tuple(value.shape)}, the model's {target!r} "
                                 f"{tuple(holder[target].shape)}")
            holder[target] = value if shardings[target] is None else place(value, shardings[target])
            filled += 1
    logger.info("initialised %d parameters from %s", filled, ", ".join(dict.fromkeys(str(s[3]) for s in sources)))
    result = []
    for state, flat, _ in out:
        nnx.replace_by_pure_dict(state, unflatten(flat))
        result.append(state)
    return tuple(result)


def build_loss_config(config) -> losses_lib.LossConfig:
    """``LossConfig`` (its defaults are X2SAM's) with the run config's ``loss`` section over them."""
    loss = dict(config.loss)
    if "shared_negatives" in loss:
        raise ValueError("config.loss.shared_negatives is now config.model.shared_negatives (it changes what the "
                         "model is given, not a loss): move it there")
    return losses_lib.LossConfig(**loss)


def _mesh_of(*trees):
    """The mesh the first NamedSharding-ed array of ``trees`` lives on."""
    for leaf in jax.tree.leaves(trees):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None:
            return mesh
    raise ValueError("init_from_checkpoints: no parameter is on a mesh; pass mesh=")


# ------------------------------------------------------------------------------------- data
def build_sources(config, workdir: Path) -> tuple[list, dict]:
    """Source objects / specs of the run: the built-in synthetic data (generated once into
    ``data.synthetic.root``, else ``WORKDIR/synthetic``, by process 0) and ``data.sources`` (dict specs of ``data.pipeline.materialize_source``),
    and ``data.repeats`` for them: factors named after synthetic sources the run leaves out are
    dropped, so a run over fewer of them keeps the main config's factors (any other unknown name
    still fails in the mixture plan)."""
    sources, left_out = [], set()
    synth = config.data.get("synthetic", None)
    if synth and synth.get("sources"):
        root = absolute_path(synth.get("root") or workdir / "synthetic")
        if jax.process_index() == 0:
            synthetic.ensure(str(root), **synthetic.generate_kwargs(synth))
        barrier("synthetic data")
        available = synthetic.sources(str(root), "train")
        for name in synth.sources:
            if name not in available:
                raise ValueError(f"data.synthetic.sources: unknown synthetic source {name!r}; "
                                 f"known: {sorted(available)}")
            sources.append(available[name])
        left_out = {source.name for key, source in available.items() if key not in synth.sources}
    root = config.data.get("root", "")
    for spec in config.data.get("sources", ()) or ():
        spec = dict(spec)
        if root and isinstance(spec.get("root"), str) and not os.path.isabs(spec["root"]):
            spec["root"] = os.path.join(root, spec["root"])
        sources.append(spec)
    if not sources:
        raise ValueError("the run has no data: set data.sources and/or data.synthetic.sources")
    repeats = {name: r for name, r in dict(config.data.get("repeats") or {}).items() if name not in left_out}
    return sources, repeats


def batch_split(config, devices: int) -> dict:
    """The recipe's global batch (``data.global_batch_images`` / ``global_batch_clips`` per
    optimizer step) on ``devices`` devices: per-device micro-batch and micro-steps for images and
    for clips (``mixture.split_global_batch``); no clips when ``global_batch_clips`` is 0."""
    data = config.data
    images, image_steps = split_global_batch(int(data.global_batch_images), int(data.images_per_device), devices,
                                             "images")
    clips, clip_steps = 1, 1
    if int(data.get("global_batch_clips", 0)):
        clips, clip_steps = split_global_batch(int(data.global_batch_clips), int(data.clips_per_device), devices,
                                               "clips")
    return dict(images_per_device=images, image_accumulate_steps=image_steps, clips_per_device=clips,
                video_accumulate_steps=clip_steps)


def bucket_config(config):
    return BucketConfig(**{k: tuple(v) for k, v in dict(config.data.buckets).items()})


def build_pipeline(config, workdir: Path, tokenizer, model_config, stage: int, mesh):
    data = config.data
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    split = batch_split(config, devices)
    sam_size = model_config.mask_encoder.image_size
    feature_kwargs = {"region_tokens": model_config.region_tokens, **dict(data.get("feature_kwargs", {}) or {})}
    if stage == 1:
        feature_kwargs.update(class_agnostic=True, max_instances=int(data.get("max_instances", 100)))
    feature_fn = default_feature_fn(tokenizer, train=True, sam_size=sam_size, **feature_kwargs)
    buckets = bucket_config(config)
    pad_id = padding_id(tokenizer)
    sources, repeats = build_sources(config, workdir)
    iterator = build_train_pipeline(
        sources, tokenizer=tokenizer, feature_fn=feature_fn,
        global_batch_images=split["images_per_device"] * devices, repeat_threshold=float(data.repeat_threshold),
        repeats=repeats, seed=int(config.seed), buckets=buckets, pad_token_id=pad_id, sam_size=sam_size,
        pixel_dtype=pixel_dtype(model_config), num_epochs=None, num_threads=int(data.num_threads),
        prefetch=int(data.prefetch), num_workers=int(data.num_workers), **split)
    if any(info.is_video for info in iterator.plan.sources) and not int(data.get("global_batch_clips", 0)):
        raise ValueError("data.global_batch_clips is 0 but the run has video sources: set the clips per optimizer step")
    logger.info("global batch: %d images = %d per device x %d devices x %d micro-steps; %d clips = %d x %d x %d",
                int(data.global_batch_images), split["images_per_device"], devices, split["image_accumulate_steps"],
                int(data.get("global_batch_clips", 0)), split["clips_per_device"], devices,
                split["video_accumulate_steps"])
    return iterator, pad_id


# ------------------------------------------------------------------------------------- logging
class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars, on process 0."""

    def __init__(self, workdir: Path, *, resume_step: int | None):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            # Lines past the checkpoint belong to the interrupted run, which this run repeats.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter   # here, not at the top: importing it takes ~1.4 s

        self.tb = SummaryWriter(str(workdir))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_value(v):
    v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, (np.generic,)) else v
    return float(v) if isinstance(v, float) else v


class Profile:
    """``config.profile_steps`` = "A,B": a ``jax.profiler`` trace of optimizer steps A..B (1-based,
    inclusive) in ``directory`` (TensorBoard's profile plugin or Perfetto read it); "" = none."""

    def __init__(self, steps: str, directory):
        self.first = self.last = None
        if steps:
            first, _, last = str(steps).partition(",")
            self.first, self.last = int(first), int(last or first)
            if not 1 <= self.first <= self.last:
                raise ValueError(f"profile_steps={steps!r}: expected A,B with 1 <= A <= B")
        self.directory, self.tracing = directory, False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, metrics) -> None:
        if step == self.last and self.tracing:
            jax.block_until_ready(metrics)
            self.close()
            logger.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. train() called from a worker thread)
            self._previous = None

    def _handle(self, signum, frame):
        logger.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.requested = True

    def agreed(self) -> bool:
        """Whether any host was asked to stop (all hosts stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
        return bool(np.asarray(flags).max())

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------- the loop
def train(config, workdir: str | os.PathLike, evaluate_fn: EvaluateFn | None = None) -> dict:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns a summary dict with the
    final step, the last logged metrics and how the run ended ("finished" / "preempted").

    ``evaluate_fn(model, tokenizer, mesh, output_dir, step) -> {dataset: {metric: value}}`` runs
    every ``config.eval_every`` steps on the current model (evaluation mode); ``train.py`` builds it
    from the run config (``x2sam_jax.eval.evaluator.from_run_config``). Its numeric results are
    logged as ``eval/<dataset>/<metric>``; its files go to WORKDIR/eval/step_N/."""
    initialize_distributed(config)
    workdir = absolute_path(workdir)   # local: absolute; gs://bucket/run: kept as it is
    stage = int(config.stage)
    finished = finished_step(config, workdir)
    if finished is not None:  # re-running a finished command: nothing to build, load or compile
        logger.info("%s already finished: checkpoint at step %d of %d, nothing to train", workdir, finished,
                    int(config.steps))
        return {"status": "finished", "workdir": str(workdir), "total_steps": int(config.steps),
                "resumed_from": finished, "step": finished, "already_finished": True}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    barrier("workdir")
    if config.get("compilation_cache", True) and not jax.config.jax_compilation_cache_dir:
        # Compiled programs persist in the workdir: a resumed run (and eval.py) skips recompiling.
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    mesh = make_mesh(**{k: int(v) for k, v in dict(config.mesh).items()})
    options = compiler_options(config.get("fast_compile", None))

    if config.get("eval_every") and evaluate_fn is None:
        raise ValueError("config.eval_every is set but train() was given no evaluate_fn (train.py builds it with "
                         "x2sam_jax.eval.evaluator.from_run_config); set eval_every=0 to train without evaluating")
    loss_config = build_loss_config(config)
    tokenizer = runs.build_tokenizer(config)
    if tokenizer is not None and jax.process_index() == 0 and not (workdir / "tokenizer").exists():
        tmp = workdir / ".tokenizer.tmp"
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(workdir / "tokenizer")
    model_config = runs.build_model_config(config, tokenizer)
    if jax.process_index() == 0:
        runs.write_model_config(workdir, model_config, stage)

    train_all = bool(config.model.get("train_all", False))
    is_trainable = runs.trainable_predicate(stage, train_all)
    task = step_lib.Task(stage=stage, is_trainable=is_trainable, num_queries=model_config.mask_decoder.num_queries,
                         shared_negatives=bool(config.model.get("shared_negatives", False)))
    t0 = time.perf_counter()
    model = create_sharded(lambda: runs.model_for_stage(model_config, stage, nnx.Rngs(int(config.seed))),
                           mesh, compiler_options=options)
    eval_graphdef = nnx.graphdef(model)
    graphdef, params, frozen, rest = runs.split_params(
        nnx.view(model, deterministic=False, raise_if_not_found=False), is_trainable)
    del model
    checkpoints = TrainCheckpoints(workdir, max_to_keep=int(config.keep_checkpoints) or None,
                                      async_save=bool(config.get("async_checkpoints", True)))
    resume_step = checkpoints.latest_step()
    if resume_step is None:  # a resumed run reads every parameter from the workdir instead
        params, frozen = init_from_checkpoints(params, frozen, config.model.get("init", {}), mesh)
    if config.model.get("frozen_dtype"):
        dtype = jnp.dtype(config.model.frozen_dtype)
        frozen = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, frozen)
    logger.info("model built in %.1fs: %d trainable / %d frozen parameters", time.perf_counter() - t0,
                sum(x.size for x in jax.tree.leaves(params)), sum(x.size for x in jax.tree.leaves(frozen)))

    iterator, pad_id = build_pipeline(config, workdir, tokenizer, model_config, stage, mesh)
    plan = iterator.plan
    total_steps = int(config.steps) or plan.steps_per_epoch * int(config.get("num_epochs", 1))
    opt = config.optimizer
    schedule = optimizer_lib.learning_rate_schedule(float(opt.lr), total_steps, float(opt.warmup_ratio))
    optimizer = optimizer_lib.build_optimizer(
        lr=float(opt.lr), total_steps=total_steps, warmup_ratio=float(opt.warmup_ratio), b1=float(opt.b1),
        b2=float(opt.b2), weight_decay=float(opt.weight_decay), grad_clip=float(opt.grad_clip),
        lr_multipliers=tuple((str(p), float(m)) for p, m in (opt.get("lr_multipliers", ()) or ())))
    state = step_lib.init_train_state(params, optimizer, int(config.seed), mesh)

    saved_frozen = runs.restore_frozen(workdir, frozen, mesh) if jax.tree.leaves(frozen) else None
    if saved_frozen is not None:
        frozen = saved_frozen
    elif jax.tree.leaves(frozen):
        if resume_step is not None:
            raise FileNotFoundError(f"{workdir} has checkpoints but no frozen parameters in {workdir / 'frozen'} "
                                    "(was model.train_all changed?)")
        runs.save_frozen(workdir, frozen)
    if resume_step is not None:
        state = checkpoints.restore(state, mesh, step=resume_step, iterator=iterator)
        logger.info("resumed from %s (step %d)", checkpoints.directory / str(resume_step), resume_step)

    step_fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, task, optimizer, schedule, loss_config),
                                      state, frozen, rest, mesh, compiler_options=options,
                                      partitioner_name=config.get("partitioner", "gspmd"))
    if int(state.step) < total_steps:
        compile_ahead(config, step_fn, state, frozen, rest, plan, task, model_config)
    throughput = Throughput(config, mesh) if int(state.step) < total_steps else None
    writer = MetricWriter(workdir, resume_step=resume_step)
    preemption = _Preemption()
    summary = {"status": "finished", "workdir": str(workdir), "total_steps": total_steps, "resumed_from": resume_step}
    step = int(state.step)
    progress = _progress(total_steps, step)
    window = {"samples": 0, "tokens": 0, "steps": 0, "flops": 0.0, "start": time.perf_counter(), "metrics": []}
    last_saved = resume_step
    # The non-finite guard reads a step's counter NONFINITE_CHECK_LAG steps later, when the device
    # is long past it: the host never waits for the step it just dispatched.
    unchecked = collections.deque()
    profile = Profile(config.get("profile_steps", ""), workdir / "profile")

    def check_finite(checked_step, nonfinite_run):
        if int(nonfinite_run) >= int(config.max_nonfinite_steps):
            raise NonFiniteLossError(
                f"{int(nonfinite_run)} optimizer steps in a row (up to step {checked_step}) had a non-finite "
                f"loss or gradient norm; their updates were skipped. Stopping: lower optimizer.lr, check the "
                f"data (see {workdir / 'metrics.jsonl'}), or resume from the last checkpoint ({last_saved}).")

    try:
        for group in optimizer_steps(iterator) if step < total_steps else ():
            group = agree_batch_shapes(group, pad_token_id=pad_id)
            batch = step_lib.global_batch(group, task.batch_keys, mesh)
            profile.before(step + 1)
            state, metrics = step_fn(state, frozen, rest, batch)
            step += 1
            profile.after(step, metrics)
            window["samples"] += sum(int(np.sum(b["sample_valid"])) for b in group) * jax.process_count()
            window["tokens"] += sum(int(np.sum(b["attention_mask"])) for b in group) * jax.process_count()
            window["steps"] += 1
            window["flops"] += step_fn.flops(batch)
            window["metrics"].append(metrics)
            progress.update(1)
            unchecked.append((step, metrics["nonfinite_run"]))
            if len(unchecked) > NONFINITE_CHECK_LAG:
                check_finite(*unchecked.popleft())
            if step % int(config.log_every) == 0 or step == total_steps:
                window["data"] = step_samples(group, iterator.plan)
                summary["metrics"] = _log(writer, step, window, iterator, progress, throughput)
            if config.checkpoint_every and (step % int(config.checkpoint_every) == 0 or step == total_steps):
                checkpoints.save(state, iterator)
                last_saved = step
            if config.get("eval_every") and step % int(config.eval_every) == 0:
                _evaluate(evaluate_fn, nnx.merge(eval_graphdef, state.params, frozen, rest), tokenizer, mesh,
                          workdir, step, writer)
            if preemption.agreed():
                if last_saved != step:
                    checkpoints.save(state, iterator)
                    last_saved = step
                summary["status"] = "preempted"
                break
            if step >= total_steps:
                break
        while unchecked:
            check_finite(*unchecked.popleft())
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        progress.close()
        profile.close()
        preemption.restore()
    summary["step"] = step
    summary["programs"] = step_fn.programs
    summary["skipped_samples"] = iterator.stats()["total"]
    return summary


def compile_ahead(config, step_fn, state, frozen, rest, plan, task, model_config) -> list:
    """The run's compile plan (``compile_plan.program_shapes``): logged, refused beyond
    ``config.max_programs``, and compiled before step 1 (``max_programs`` 0: on first use)."""
    buckets = bucket_config(config)
    clip_len = int(dict(config.data.get("feature_kwargs", {}) or {}).get("clip_len", 8))
    programs = compile_plan.program_shapes(plan, buckets, clip_len)
    limit = int(config.get("max_programs", 0) or 0)
    logger.info("compile plan: %d programs (the buckets alone allow %d per batch size)\n%s", len(programs),
                buckets.max_programs(), compile_plan.describe(programs))
    if limit and len(programs) > limit:
        raise ValueError(f"the bucket plan can make {len(programs)} programs, more than max_programs={limit}: "
                         f"tie or pin bucket dimensions (data.buckets) or raise max_programs; per source: "
                         f"{compile_plan.count_by_source(plan, buckets, clip_len)}")
    if not limit:
        return programs
    vision = model_config.vlm.vision
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    collator = Collator(buckets, sam_size=model_config.mask_encoder.image_size, patch_dim=patch_dim,
                        pixel_dtype=pixel_dtype(model_config))
    t0 = time.perf_counter()
    for shape in tqdm_programs(programs):
        step_fn.compile(state, frozen, rest, compile_plan.abstract_batch(shape, collator, task.batch_keys, patch_dim))
    logger.info("compiled %d programs in %.0fs", len(programs), time.perf_counter() - t0)
    return programs


def tqdm_programs(programs):
    return tqdm(programs, desc="compile", unit="program", disable=jax.process_index() != 0)


def finished_step(config, workdir: Path) -> int | None:
    """The latest complete checkpoint's step when it reaches ``config.steps`` (a run that already
    finished), else None. Epoch-based runs (``steps`` 0) learn their length from the data plan, so
    they go through the normal start-up (which then takes no step)."""
    if not int(config.steps) or not (workdir / "checkpoints").is_dir():
        return None
    import orbax.checkpoint as ocp   # here, not at the top: importing Orbax takes ~2 s

    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        latest = manager.latest_step()
    finally:
        manager.close()
    return latest if latest is not None and latest >= int(config.steps) else None


def _progress(total: int, initial: int):
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)


class Throughput:
    """The log's FLOPs and MFU. MFU = model FLOPs of the window's optimizer steps (each step's
    program counted once when compiled, ``CompiledStep.flops``, summed over the steps that ran)
    / (the window's time x devices x peak FLOP/s per device). The peak is
    ``config.peak_flops_per_device`` or, when 0, the device kind's dense bf16 peak from
    ``flops.PEAK_FLOPS``, or a measured float32 matmul peak (CPU, unknown kinds); logged once."""

    def __init__(self, config, mesh):
        self.devices = int(mesh.devices.size)
        self.peak, source = flops_lib.peak_flops_per_device(float(config.get("peak_flops_per_device", 0.0) or 0.0))
        logger.info("MFU against a peak of %.4g FLOP/s per device (%s), %d devices", self.peak, source, self.devices)

    def record(self, flops: float, steps: int, elapsed: float) -> dict:
        if flops <= 0 or steps <= 0 or elapsed <= 0:   # not counted: no FLOPs keys at all
            return {}
        per_device = flops / elapsed / self.devices
        return {"flops_per_step": flops / steps, "tflops_per_s_per_device": per_device / 1e12,
                "mfu": per_device / self.peak}


def _log(writer: MetricWriter, step: int, window: dict, iterator, progress, throughput: Throughput | None = None
         ) -> dict:
    metrics = jax.device_get(window["metrics"])
    elapsed = time.perf_counter() - window["start"]
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[-1]}
    last = {k: float(metrics[-1][k]) for k in ("lr", "skipped", "nonfinite_run")}
    stats = iterator.stats()
    record = {**mean, **last, "skipped_steps": last.pop("skipped"), "step_time_s": elapsed / max(window["steps"], 1),
              "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed,
              **(throughput.record(window["flops"], window["steps"], elapsed) if throughput else {}),
              "skipped_samples": int(stats["total"]), **window.get("data", {})}
    record.pop("skipped", None)
    record.pop("finite", None)
    writer.write(step, record)
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    window.update(samples=0, tokens=0, steps=0, flops=0.0, start=time.perf_counter(), metrics=[])
    return record


def step_samples(group: list[dict], plan) -> dict:
    """The last step's data, for the log: its source and a digest of the sample indices of the
    whole step (every process's rows, gathered) in any order: two runs that split the same global
    batch differently, over devices or processes, log the same digest. Called at log steps only
    (the gather is a collective every process joins)."""
    indices = np.concatenate([np.asarray(b["sample_index"]) for b in group]).astype(np.int64)
    if jax.process_count() > 1:
        indices = np.asarray(multihost_utils.process_allgather(indices)).reshape(-1).astype(np.int64)  # jax: int32
    return {"data_source": plan.sources[int(group[0]["source_index"])].name,
            "data_samples": zlib.crc32(np.sort(indices).tobytes())}


def _evaluate(evaluate_fn: EvaluateFn, model, tokenizer, mesh, workdir: Path, step: int, writer) -> dict:
    """Runs ``evaluate_fn`` on the current model (evaluation mode); results in
    WORKDIR/eval/step_N/ and, as ``eval/<dataset>/<metric>``, in metrics.jsonl and TensorBoard."""
    t0 = time.perf_counter()
    results = evaluate_fn(model, tokenizer, mesh, workdir / "eval" / f"step_{step}", step)
    flat = {f"eval/{dataset}/{metric}": value for dataset, metrics in results.items()
            for metric, value in metrics.items() if isinstance(value, (int, float)) and math.isfinite(value)}
    writer.write(step, flat)
    logger.info("step %d evaluation (%.0fs): %s", step, time.perf_counter() - t0,
                ", ".join(f"{k[5:]} {v:.3f}" for k, v in flat.items() if not k.endswith(("/samples", "/skipped", "/failed"))))
    return results
