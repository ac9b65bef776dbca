"""train.py end to end: kill -9 and resume exactly, SIGTERM, kill-safe checkpoints, restoring onto
another mesh, restore_model, the run configs, multi-process runs and the tiny run's progress."""

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _config_files import config_module

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- runs
STAGE1_CONFIG = textwrap.dedent("""
    from configs import x2sam_tiny_synthetic

    def get_config():
        c = x2sam_tiny_synthetic.get_config()
        c.stage = 1
        c.steps = 6
        c.log_every = 1
        c.checkpoint_every = 2
        c.fast_compile = True
        c.model.tokenizer = ""
        c.model.overrides = dict(mask_encoder=dict(blocks_per_stage=[1, 1, 1, 1], global_attention_blocks=[3]),
                                 pixel_decoder=dict(num_layers=1))
        c.data.synthetic.update(num_images=16, num_videos=2, frames=2, sources=("coco_panoptic",))
        c.data.global_batch_images = 2
        c.data.global_batch_clips = 0          # images only (the clip batch need not split over devices)
        c.data.buckets.update(seq_lengths=(1,), patch_counts=(1,), instances=(16,))
        c.loss.num_points = 128
        return c
""")


def _env(cache: Path, devices: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _command(config: Path, workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]


def _metrics(workdir: Path) -> dict[int, dict]:
    """step -> the last record logged for it."""
    out = {}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record
    return out


def _run(cmd, env, timeout=1500):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_for_step(proc, workdir: Path, step: int, timeout: float = 1500) -> None:
    start = time.time()
    while max(_metrics(workdir), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-5000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"no step {step} after {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """The uninterrupted reference run (its programs fill the compilation cache the others read)."""
    base = tmp_path_factory.mktemp("stage1")
    config = base / "config.py"
    config.write_text(STAGE1_CONFIG)
    synthetic = base / "synthetic"
    overrides = (f"--config.data.synthetic.root={synthetic}",)
    env = _env(base / "cache")
    summary = _run(_command(config, base / "reference", *overrides), env)
    assert summary["status"] == "finished" and summary["step"] == 6
    return dict(base=base, config=config, overrides=overrides, env=env, reference=_metrics(base / "reference"))


def test_kill_9_then_rerun_resumes_exactly(stage1_run):
    """kill -9 mid-run, the same command again: it resumes from the last complete checkpoint and
    every loss logged afterwards equals the uninterrupted run's (same data order, same RNG)."""
    r = stage1_run
    workdir = r["base"] / "killed"
    cmd = _command(r["config"], workdir, *r["overrides"])
    proc = subprocess.Popen(cmd, env=r["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _metrics(workdir)
    complete = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert complete and complete[-1] in (2, 4)
    summary = _run(cmd, r["env"])
    assert summary["resumed_from"] == complete[-1] and summary["step"] == 6
    after = _metrics(workdir)
    assert sorted(after) == list(range(1, 7))
    for step in range(1, 7):
        assert after[step]["loss"] == r["reference"][step]["loss"], step          # exact, not close
        assert after[step]["grad_norm"] == r["reference"][step]["grad_norm"], step
    for step in before:        # what the killed run logged before dying agrees too
        assert before[step]["loss"] == r["reference"][step]["loss"]
    assert r["reference"][6]["loss"] < r["reference"][1]["loss"] * 1.5       # sanity: finite, same scale


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_zero(stage1_run):
    r = stage1_run
    workdir = r["base"] / "preempted"
    cmd = _command(r["config"], workdir, *r["overrides"], "--config.checkpoint_every=100")
    proc = subprocess.Popen(cmd, env=r["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "preempted"
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [summary["step"]] and summary["step"] >= 3
    final = _run(cmd, r["env"])
    assert final["resumed_from"] == summary["step"] and final["status"] == "finished"
    metrics = _metrics(workdir)
    assert all(metrics[s]["loss"] == r["reference"][s]["loss"] for s in range(1, 7))


def test_restore_model_returns_the_trained_model(stage1_run):
    from flax import nnx

    from x2sam_jax.models.x2sam import ClassAgnosticSegmentor
    from x2sam_jax.runs import restore_model

    workdir = stage1_run["base"] / "reference"
    model = restore_model(workdir)
    assert isinstance(model, ClassAgnosticSegmentor)
    older = restore_model(workdir, step=4)
    flat = lambda m: {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    a, b = flat(model), flat(older)
    assert a.keys() == b.keys()
    changed = [k for k in a if not np.array_equal(a[k], b[k])]
    assert changed and all(k.startswith(("class_head.", "segmentor.pixel_decoder.", "segmentor.decoder.")) for k in changed)
    assert not any(k.startswith("segmentor.encoder.") for k in changed)   # frozen in stage 1
    assert (workdir / "config.json").exists() and (workdir / "model_config.json").exists()
    assert any(workdir.glob("events.out.tfevents.*"))
    record = _metrics(workdir)[6]
    for key in ("loss", "loss_cls", "loss_mask", "loss_dice", "lr", "grad_norm", "samples_per_s", "skipped_samples",
                "skipped_steps"):
        assert key in record, key
    # Throughput: one program, so every step has the same FLOPs; MFU against the measured CPU peak.
    records = _metrics(workdir)
    assert {records[s]["flops_per_step"] for s in range(1, 7)} == {record["flops_per_step"]}
    assert record["flops_per_step"] > 1e6 and record["tflops_per_s_per_device"] > 0
    assert all(0.0 < records[s]["mfu"] <= 1.0 for s in range(1, 7)), [records[s]["mfu"] for s in range(1, 7)]
    assert {"mfu", "flops_per_step", "tflops_per_s_per_device", "step_time_s", "samples_per_s",
            "tokens_per_s"} <= _tensorboard_tags(workdir)


def _tensorboard_tags(workdir: Path) -> set[str]:
    """The scalar tags of the run's TensorBoard event files (TFRecord framing: length, its CRC,
    the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in workdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


# ------------------------------------------------------------------------------------- checkpoints
def _toy_state(mesh, seed=0):
    from flax import nnx

    import x2sam_jax  # noqa: F401
    from x2sam_jax.runs import split_params
    from x2sam_jax.train.optimizer import build_optimizer
    from x2sam_jax.train.step import init_train_state

    class Toy(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(8, 16, rngs=rngs, kernel_init=nnx.with_partitioning(
                nnx.initializers.normal(1.0), ("embed", "mlp")))
            self.frozen = nnx.Linear(8, 8, rngs=rngs)

    model = Toy(nnx.Rngs(seed))
    _, params, frozen, _ = split_params(model, lambda p: p.startswith("dense."))
    optimizer = build_optimizer(lr=0.1, total_steps=10)
    state = init_train_state(params, optimizer, seed, mesh)
    grads = jax.tree.map(lambda p: p * 0 + 1.0, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state.params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    state.opt_state = opt_state
    state.step = state.step + 3
    return state


def _toy_pipeline():
    from _data_standins import SAM, ToySource, toy_features

    from x2sam_jax.data.batching import BucketConfig
    from x2sam_jax.data.pipeline import build_train_pipeline

    buckets = BucketConfig(seq_lengths=(64,), patch_counts=(32,), grids=(1,), frames=(1,), instances=(4,),
                           conditions=(4,), regions=(1,), seg_tokens=(1,))
    return build_train_pipeline([ToySource("imgs", 40)], global_batch_images=4, images_per_device=4, seed=1,
                                feature_fn=toy_features, buckets=buckets, sam_size=SAM, process_index=0,
                                process_count=1, num_threads=1)


def test_a_checkpoint_cut_off_while_written_is_never_the_latest(tmp_path):
    import shutil

    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints

    mesh = make_mesh(devices=jax.devices()[:1])
    state = _toy_state(mesh)
    iterator = _toy_pipeline()
    first = [next(iterator) for _ in range(3)]
    checkpoints = TrainCheckpoints(tmp_path, max_to_keep=3)
    checkpoints.save(state, iterator)
    checkpoints.wait()
    expected_next = next(iterator)
    # A later save killed half-way: Orbax writes into <step>.orbax-checkpoint-tmp-<t> and renames
    # it only when every item is complete, so what a kill leaves behind is a temporary directory.
    partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "checkpoints" / "3", partial)
    shutil.rmtree(partial / "opt_state")
    checkpoints.close()
    reopened = TrainCheckpoints(tmp_path, max_to_keep=3)
    assert reopened.latest_step() == 3
    fresh = _toy_pipeline()
    restored = reopened.restore(_toy_state(mesh, seed=1), mesh, iterator=fresh)
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored.rng)), np.asarray(jax.random.key_data(state.rng)))
    resumed = next(fresh)                                     # the data iterator resumes too
    for key in ("input_ids", "sam_pixel_values"):
        np.testing.assert_array_equal(resumed[key], expected_next[key])
    assert not np.array_equal(resumed["input_ids"], first[0]["input_ids"])
    reopened.close()


def test_a_step_whose_arrays_differ_from_their_checksums_is_refused(tmp_path):
    """Each step records the checksums of its params and optimizer state; a restore that reads
    other values (here: a recorded checksum edited, as a corrupt array would read) names it."""
    from x2sam_jax.storage.atomic import CheckpointError
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints

    mesh = make_mesh(devices=jax.devices()[:1])
    checkpoints = TrainCheckpoints(tmp_path, max_to_keep=3)
    checkpoints.save(_toy_state(mesh))
    checkpoints.wait()
    checkpoints.close()
    [meta_file] = [f for f in (tmp_path / "checkpoints" / "3" / "meta").rglob("*") if f.is_file()
                   and "checksums" in f.read_text()]
    meta = json.loads(meta_file.read_text())
    assert sorted(meta["checksums"]["params"]) == ["dense.bias.value", "dense.kernel.value"]
    assert TrainCheckpoints(tmp_path).restore(_toy_state(mesh, seed=1), mesh).step == 3   # intact: fine
    record = meta["checksums"]["params"]["dense.kernel.value"]
    record["checksum"] = "0" * 16
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="dense.kernel.value: checksum mismatch"):
        TrainCheckpoints(tmp_path).restore(_toy_state(mesh, seed=1), mesh)


MESH_CHANGE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from test_train_loop import _toy_state
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints
    saved_on = make_mesh(data=1, fsdp=4, tensor=2)
    state = _toy_state(saved_on)
    ckpt = TrainCheckpoints({tmp!r})
    ckpt.save(state)
    ckpt.wait()
    restored_on = make_mesh(data=2, fsdp=1, tensor=4)
    restored = ckpt.restore(_toy_state(restored_on, seed=5), restored_on)
    kernel = restored.params["dense"]["kernel"].get_value()
    mu = restored.opt_state[1].mu["dense"]["kernel"].get_value()
    assert kernel.sharding.mesh.shape == restored_on.shape, kernel.sharding
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), kernel.sharding.spec
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), mu.sharding.spec
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


def test_checkpoint_restores_onto_a_different_mesh_shape(tmp_path):
    code = MESH_CHANGE.format(here=str(HERE), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------- configs
def test_repeats_of_synthetic_sources_the_run_leaves_out_are_dropped(tmp_path):
    """The main config sets repeat factors for its five synthetic sources; a run over fewer of
    them keeps the factors of those it has, and a name that is no source still reaches the
    mixture plan, which refuses it."""
    from x2sam_jax.data.pipeline import build_train_pipeline
    from x2sam_jax.train.loop import build_sources

    config = config_module("x2sam_tiny_synthetic").get_config()
    config.data_root = str(tmp_path / "synthetic")
    config.data.synthetic.update(num_images=8, num_videos=2, frames=2, sources=("coco_panoptic", "ytvos"))
    assert set(config.data.repeats) >= {"coco_panoptic", "refcoco", "ytvos19"}
    sources, repeats = build_sources(config, tmp_path)
    assert [s.name for s in sources] == ["coco_panoptic", "ytvos19"]
    assert repeats == {"coco_panoptic": config.data.repeats.coco_panoptic, "ytvos19": config.data.repeats.ytvos19}

    config.data.repeats.update(cocopanoptic=2.0)
    sources, repeats = build_sources(config, tmp_path)
    assert repeats["cocopanoptic"] == 2.0
    with pytest.raises(ValueError, match=r"no source named \['cocopanoptic'\]"):
        build_train_pipeline(sources, tokenizer=None, feature_fn=lambda *a, **k: None, global_batch_images=2,
                             images_per_device=2, repeats=repeats)


# ------------------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_process_with_four_devices(stage1_run, tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices, each reading its own half of
    every batch, log the losses of one process with 4 devices."""
    import socket

    r = stage1_run
    steps = ("--config.steps=3", "--config.checkpoint_every=0", "--config.data.global_batch_images=4")
    single = _run(_command(r["config"], tmp_path / "one", *r["overrides"], *steps), _env(tmp_path / "c1", devices=4))
    assert single["step"] == 3
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        cmd = _command(r["config"], tmp_path / "two", *r["overrides"], *steps,
                       f"--config.distributed.coordinator_address=localhost:{port}",
                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}")
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path / f"c2{pid}", devices=2), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-5000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        # Same global batch, same program up to the device -> process layout: the float32 sums
        # over 4 shards may be ordered differently (~1e-7 relative per op).
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5)
        np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-4)


def _start_processes(config, workdir: Path, overrides, caches: Path, devices: int = 2, count: int = 2) -> list:
    """The same train.py command on ``count`` local processes (jax.distributed over localhost,
    ``devices`` CPU devices each)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(count):
        cmd = _command(config, workdir, *overrides, f"--config.distributed.coordinator_address=localhost:{port}",
                       f"--config.distributed.num_processes={count}", f"--config.distributed.process_id={pid}")
        procs.append(subprocess.Popen(cmd, env=_env(caches / f"c{pid}", devices=devices), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish_processes(procs, timeout: float = 1800) -> list[dict]:
    """Every process's summary (its last stdout line) with its stderr; each must exit 0."""
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-5000:]
        results.append({**json.loads(out.strip().splitlines()[-1]), "stderr": err})
    return results


def _run_processes(config, workdir: Path, overrides, caches: Path, devices: int = 2, count: int = 2) -> list[dict]:
    return _finish_processes(_start_processes(config, workdir, overrides, caches, devices, count))


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoints(stage1_run, tmp_path):
    """2 processes x 2 CPU devices, SIGTERM to both mid-run: they agree on a step, save and exit
    0; the same command again resumes on both (the counters and the key restored as global
    arrays over both processes' devices) and every loss equals an uninterrupted one-process run's
    on 4 devices; then more steps (--config.steps raised) resume from the final checkpoint."""
    r = stage1_run
    common = (*r["overrides"], "--config.data.global_batch_images=4", "--config.data.images_per_device=1",
              "--config.checkpoint_every=2")
    single = _run(_command(r["config"], tmp_path / "one", *common, "--config.steps=6"), _env(tmp_path / "c1", devices=4))
    assert single["step"] == 6
    workdir = tmp_path / "two"
    procs = _start_processes(r["config"], workdir, (*common, "--config.steps=6"), tmp_path / "c2")
    _wait_for_step(procs[0], workdir, 2)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    first = _finish_processes(procs)
    stopped = first[0]["step"]
    assert [(s["status"], s["step"]) for s in first] == [("preempted", stopped)] * 2 and 2 <= stopped < 6
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped
    resumed = _run_processes(r["config"], workdir, (*common, "--config.steps=6"), tmp_path / "c2")
    assert [(s["resumed_from"], s["step"], s["status"]) for s in resumed] == [(stopped, 6, "finished")] * 2
    one, two = _metrics(tmp_path / "one"), _metrics(workdir)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:     # the same global batches; float32 sums over 4 shards may be ordered differently
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=str(step))
        np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-4, err_msg=str(step))
        assert two[step]["data_samples"] == one[step]["data_samples"], step     # gathered over both processes
    # The command: the finished run asked for more steps resumes on both processes (the
    # learning-rate schedule then follows the new length, so no reference run to compare with).
    longer = _run_processes(r["config"], workdir, (*common, "--config.steps=8"), tmp_path / "c2")
    assert [(s["resumed_from"], s["step"], s["status"]) for s in longer] == [(6, 8, "finished")] * 2
    extended = _metrics(workdir)
    assert sorted(extended) == list(range(1, 9)) and all(np.isfinite(extended[s]["loss"]) for s in (7, 8))
    assert all(extended[s]["loss"] == two[s]["loss"] for s in range(1, 7))


STAGE3_FROM_STAGE1_CONFIG = textwrap.dedent("""
    from configs import x2sam_tiny_synthetic

    def get_config():
        c = x2sam_tiny_synthetic.get_config()
        c.steps = 1
        c.log_every = 1
        c.checkpoint_every = 1
        c.eval_every = 0
        c.fast_compile = True
        c.optimizer.lr = 0.0          # the saved step-1 parameters are the initial ones
        c.model.overrides = dict(mask_encoder=dict(blocks_per_stage=[1, 1, 1, 1], global_attention_blocks=[3]),
                                 pixel_decoder=dict(num_layers=1))
        c.data.synthetic.update(num_images=8, num_videos=2, frames=2, sources=("coco_panoptic",))
        c.data.global_batch_clips = 0
        c.data.images_per_device = 1
        c.loss.num_points = 128
        return c
""")


@pytest.mark.slow
def test_two_processes_initialise_stage3_from_a_stage1_workdir(stage1_run, tmp_path):
    """model.init.stage1 on 2 processes x 2 CPU devices: every process restores the stage-1
    model onto the run's mesh and copies its pixel decoder and mask decoder into the stage-3
    state; with lr 0 the step-1 checkpoint holds exactly the stage-1 values."""
    from flax import nnx

    from x2sam_jax.runs import restore_model

    stage1 = stage1_run["base"] / "reference"
    config = tmp_path / "stage3.py"
    config.write_text(STAGE3_FROM_STAGE1_CONFIG)
    workdir = tmp_path / "stage3"
    summaries = _run_processes(config, workdir, (f"--config.data_root={tmp_path / 'synthetic'}",
                                                 f"--config.model.init.stage1={stage1}"), tmp_path / "c")
    assert [s["step"] for s in summaries] == [1, 1]
    for s in summaries:
        assert "initialised" in s["stderr"] and str(stage1) in s["stderr"]
    flat = lambda m: {".".join(map(str, p)): np.asarray(v.get_value())  # noqa: E731
                      for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    before, after = flat(restore_model(stage1)), flat(restore_model(workdir))
    copied = [k for k in before if k.startswith(("segmentor.pixel_decoder.", "segmentor.decoder."))]
    assert copied
    for key in copied:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)

    # eval.py on the same 2 processes: jax.distributed from the config, the model restored onto
    # the mesh over both processes' devices, each process scoring its half of every batch.
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "eval"
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "eval.py"), f"--config={config}", f"--config.data_root={tmp_path / 'synthetic'}",
         "--config.eval.max_samples=2", "--config.eval.batch_size=4", f"--checkpoint={workdir}",
         "--tasks=coco_panoptic", f"--output={out}", f"--config.distributed.coordinator_address=localhost:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"],
        env=_env(tmp_path / f"e{pid}", devices=2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)]
    outputs = [proc.communicate(timeout=1800) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-5000:]
    assert "| coco_panoptic |" in outputs[0][0] and "coco_panoptic" not in outputs[1][0]   # process 0 prints
    results = json.loads((out / "results.json").read_text())["results"]
    # One row per process, gathered: both processes' samples are scored.
    assert results["coco_panoptic"]["samples"] == 2 and 0.0 <= results["coco_panoptic"]["PQ"] <= 1.0


# ------------------------------------------------------------------------------------- the tiny run
@pytest.mark.slow
def test_tiny_config_kill_loop_resumes_exactly(tmp_path):
    """The tiny config itself (stage 3, images and video clips) killed with -9 twice at random
    moments (sometimes while a checkpoint is being written): the final log equals an
    uninterrupted run's."""
    rng = np.random.default_rng(0)
    env = _env(tmp_path / "cache")
    config = ROOT / "configs" / "x2sam_tiny_synthetic.py"
    overrides = (f"--config.data.synthetic.root={tmp_path / 'synthetic'}", "--config.steps=12",
                 "--config.checkpoint_every=2", "--config.log_every=1", "--config.fast_compile=True",
                 "--config.data.synthetic.num_images=24", "--config.data.synthetic.num_videos=6",
                 "--config.data.global_batch_images=2", "--config.loss.num_points=256")
    _run(_command(config, tmp_path / "reference", *overrides), env, timeout=5400)
    reference = _metrics(tmp_path / "reference")
    workdir = tmp_path / "killed"
    cmd = _command(config, workdir, *overrides)
    for _ in range(2):
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_step(proc, workdir, max(_metrics(workdir), default=0) + 1, timeout=5400)
        time.sleep(float(rng.uniform(0, 3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _run(cmd, env, timeout=5400)
    after = _metrics(workdir)
    assert sorted(after) == list(range(1, 13))
    for step in after:
        assert after[step]["loss"] == reference[step]["loss"], step


@pytest.mark.slow
def test_tiny_config_training_lowers_the_loss_and_raises_train_iou(tmp_path):
    """A few hundred steps of the tiny config on CPU: the loss falls clearly and the mask IoU on
    training samples rises above the untrained model's."""
    from flax import nnx

    from _train_helpers import train_split_iou
    from x2sam_jax.data.tokenizer import load_tokenizer
    from x2sam_jax.sharding import create_sharded, make_mesh
    from x2sam_jax.runs import model_for_stage, read_model_config, restore_model

    workdir = tmp_path / "tiny"
    config = ROOT / "configs" / "x2sam_tiny_synthetic.py"
    data = tmp_path / "synthetic"
    _run(_command(config, workdir, "--config.steps=200", "--config.fast_compile=True", f"--config.data_root={data}"),
         _env(tmp_path / "cache"), timeout=10800)
    metrics = _metrics(workdir)
    first, last = metrics[min(metrics)]["loss"], np.mean([metrics[s]["loss"] for s in sorted(metrics)[-3:]])
    assert last < 0.75 * first, (first, last)
    model_config, stage = read_model_config(workdir)
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    mesh = make_mesh(devices=jax.devices()[:1])
    untrained = create_sharded(lambda: model_for_stage(model_config, stage, nnx.Rngs(0)), mesh)
    before = train_split_iou(untrained, tokenizer, model_config, data)
    after = train_split_iou(restore_model(workdir), tokenizer, model_config, data)
    print("train IoU before", before, "after", after)
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.05


def test_a_finished_run_is_recognised_before_anything_is_built(tmp_path):
    """Re-running a finished command (scripts/main.sh) returns at once: ``train`` sees the latest
    complete checkpoint at ``config.steps`` and builds no model, pipeline or program."""
    import ml_collections

    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints
    from x2sam_jax.train.loop import finished_step, train

    mesh = make_mesh(devices=jax.devices()[:1])
    checkpoints = TrainCheckpoints(tmp_path, max_to_keep=3)
    checkpoints.save(_toy_state(mesh))                                       # step 3
    checkpoints.wait()
    checkpoints.close()
    config = lambda steps: ml_collections.ConfigDict({"steps": steps, "stage": 3})  # noqa: E731
    assert finished_step(config(3), tmp_path) == 3
    assert finished_step(config(4), tmp_path) is None                        # more steps asked: resume
    assert finished_step(config(0), tmp_path) is None                        # epoch-based: the plan decides
    assert finished_step(config(3), tmp_path / "elsewhere") is None
    # The config has no model, data or mesh section: anything past the check would fail.
    summary = train(config(3), tmp_path)
    assert summary["already_finished"] and summary["step"] == 3 and summary["status"] == "finished"


@pytest.mark.slow
def test_evaluation_every_n_steps_logs_the_metrics(tmp_path):
    """``eval_every``: the loop runs ``x2sam_jax.eval.evaluate`` on ``eval_tasks`` (at most
    ``eval_max_samples`` each) and logs ``eval/<dataset>/<metric>`` at that step, with the
    results under WORKDIR/eval/step_N/."""
    config = ROOT / "configs" / "x2sam_tiny_synthetic.py"
    workdir = tmp_path / "run"
    overrides = (f"--config.data_root={tmp_path / 'synthetic'}", "--config.steps=2", "--config.eval_every=2",
                 "--config.eval_max_samples=2", "--config.eval_tasks=('refcoco',)", "--config.log_every=1",
                 "--config.fast_compile=True", "--config.data.synthetic.num_images=8",
                 "--config.data.synthetic.num_videos=4", "--config.data.synthetic.sources=('refcoco',)")
    _run(_command(config, workdir, *overrides), _env(tmp_path / "cache"), timeout=5400)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = {k: r[k] for r in records if r["step"] == 2 for k in r if k.startswith("eval/")}
    assert set(logged) >= {"eval/refcoco/cIoU", "eval/refcoco/gIoU", "eval/refcoco/samples"}, logged
    assert logged["eval/refcoco/samples"] == 2 and 0.0 <= logged["eval/refcoco/cIoU"] <= 1.0
    results = json.loads((workdir / "eval" / "step_2" / "results.json").read_text())["results"]
    assert list(results) == ["refcoco"] and results["refcoco"]["cIoU"] == logged["eval/refcoco/cIoU"]


def test_nonfinite_steps_stop_the_run_and_a_profile_is_written(stage1_run, tmp_path):
    """A learning rate that blows the weights up: every step after the first is non-finite and
    skipped; the guard (reading each step's counter two steps late) stops the run after
    max_nonfinite_steps of them, naming the step. --config.profile_steps=1,2 writes a trace."""
    r = stage1_run
    cmd = _command(r["config"], tmp_path / "run", *r["overrides"], "--config.optimizer.lr=1e30",
                   "--config.max_nonfinite_steps=2", "--config.profile_steps=1,2", "--config.checkpoint_every=0")
    proc = subprocess.run(cmd, env=r["env"], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]           # train.py's exit code for NonFiniteLossError
    assert re.search(r"2 optimizer steps in a row \(up to step \d\) had a non-finite loss", proc.stderr), \
        proc.stderr[-3000:]
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb")), "no profile trace"
    metrics = _metrics(tmp_path / "run")
    assert {"step_time_s", "samples_per_s", "tokens_per_s"} <= set(metrics[1])
