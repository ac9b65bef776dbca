"""Multi-process helpers: workdir paths keep their scheme, host values become global arrays on
any mesh, and a training checkpoint saved by two processes restores on both (jax.distributed on
localhost, 2 processes x 2 CPU devices), and a process that comes late meets the others at a barrier."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from x2sam_jax.distributed import absolute_path, initialize_distributed, is_remote

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("path", ["gs://bucket/run", "gs://bucket/run/", "s3://b/x/y"])
def test_cloud_workdirs_keep_their_scheme(path):
    p = absolute_path(path)
    assert is_remote(p)
    assert str(p) == path.rstrip("/")
    assert str(p / "checkpoints") == path.rstrip("/") + "/checkpoints"
    assert str(absolute_path(p)) == str(p)                     # idempotent


def test_local_workdirs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = absolute_path("runs/tiny")
    assert not is_remote(p) and p.is_absolute() and str(p) == str(tmp_path / "runs" / "tiny")
    assert str(absolute_path(Path("runs") / "tiny")) == str(p)
    (p / "checkpoints").mkdir(parents=True)                    # an ordinary local directory
    assert (tmp_path / "runs" / "tiny" / "checkpoints").is_dir()


def test_train_checkpoints_and_the_loop_take_the_normalised_workdir(tmp_path, monkeypatch):
    from x2sam_jax.train import loop
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints

    assert loop.initialize_distributed is initialize_distributed   # re-exported for old callers
    monkeypatch.chdir(tmp_path)
    checkpoints = TrainCheckpoints("run", max_to_keep=1)
    assert str(checkpoints.directory) == str(tmp_path / "run" / "checkpoints")
    checkpoints.close()


def test_initialize_distributed_without_a_coordinator_is_a_no_op(monkeypatch):
    import ml_collections

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    initialize_distributed(ml_collections.ConfigDict({"distributed": {"coordinator_address": "",
                                                                      "num_processes": 0, "process_id": -1}}))
    initialize_distributed(ml_collections.ConfigDict({}))
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        initialize_distributed(ml_collections.ConfigDict({"distributed": {"coordinator_address": "localhost:1"}}))


def test_global_array_and_place_give_the_target_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from x2sam_jax.sharding import global_array, make_mesh, place

    mesh = make_mesh(data=-1)
    rep = NamedSharding(mesh, P())
    step = global_array(np.asarray(7, np.int32), rep)
    assert step.sharding == rep and step.dtype == np.int32 and int(step) == 7
    key = jax.random.key(3)
    placed = global_array(key, rep)
    assert placed.sharding == rep and jax.dtypes.issubdtype(placed.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(placed), jax.random.key_data(key))
    host = np.arange(12, dtype=np.float32).reshape(4, 3)
    split = NamedSharding(mesh, P("data"))
    array = place(host, split)
    assert array.sharding == split
    np.testing.assert_array_equal(np.asarray(array), host)
    assert place(array, split) is array                        # already laid out: untouched
    again = place(array, rep)
    assert again.sharding == rep
    np.testing.assert_array_equal(np.asarray(again), host)


# ------------------------------------------------------------------------------------- 2 processes
TWO_PROCESS_RESTORE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    jax.distributed.initialize(coordinator_address={address!r}, num_processes=2, process_id={pid})
    from test_train_loop import _toy_state
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.run_checkpoint import TrainCheckpoints
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = make_mesh(data=2, fsdp=2)                   # spans both processes' devices
    hybrid = make_mesh(data=2, fsdp=2, dcn_data=2)     # GPU hosts: a data row per process
    assert [{{d.process_index for d in row.flat}} for row in hybrid.devices] == [{{0}}, {{1}}]
    state = _toy_state(mesh)
    ckpt = TrainCheckpoints({tmp!r})
    ckpt.save(state)
    ckpt.wait()
    ckpt.close()
    restored = TrainCheckpoints({tmp!r}).restore(_toy_state(mesh, seed=5), mesh)
    assert int(restored.step) == 3 and int(restored.updates) == int(state.updates)
    for name in ("step", "updates", "rng", "nonfinite_run", "skipped"):
        assert getattr(restored, name).sharding == getattr(state, name).sharding, name
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored.rng)),
                                  np.asarray(jax.random.key_data(state.rng)))
    from jax.experimental import multihost_utils
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(multihost_utils.process_allgather(a, tiled=True),
                                      multihost_utils.process_allgather(b, tiled=True))
    print("OK", {pid})
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_save_and_restore_a_training_checkpoint(tmp_path):
    """The counters and the key of a restored state are global replicated arrays on a mesh
    spanning both processes (device_put would refuse their sharding on either process)."""
    _run_two(TWO_PROCESS_RESTORE, 600, here=str(HERE), tmp=str(tmp_path))


LATE_PROCESS = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from x2sam_jax.distributed import barrier, initialize_distributed
    initialize_distributed({{"distributed": {{"coordinator_address": {address!r}, "num_processes": 2,
                                            "process_id": {pid}}}}})
    assert not jax.config.jax_enable_compilation_cache     # 2 CPU processes: no persistent cache
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.make_array_from_callback((8,), NamedSharding(mesh, P("data")), lambda i: np.arange(8.0)[i])
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    if {pid} == 1:
        time.sleep({delay})                                # a long compile on one process
    start = time.monotonic()
    barrier("late")
    waited = time.monotonic() - start
    assert float(total(x).addressable_shards[0].data) == 28.0
    barrier("late")                                        # a name can be used again
    print("OK", {pid}, round(waited, 1))
""")


def _run_two(script: str, timeout: float, **fields) -> list[str]:
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", script.format(address=address, pid=pid, **fields)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    lines = []
    for pid, proc in enumerate(procs):
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0 and f"OK {pid}" in out, err[-4000:]
        lines.append(out.strip().splitlines()[-1])
    return lines


@pytest.mark.parametrize("delay", [3, pytest.param(40, marks=pytest.mark.slow)])
def test_a_late_process_meets_the_others_at_the_barrier_not_at_a_collective(tmp_path, delay):
    """2 CPU processes: initialize_distributed turns the persistent compilation cache off (only
    process 0 would hit it and enter the collectives alone), and `barrier` waits at the
    coordination service, so a process 40 s late (past the 30 s in which gloo's processes must
    meet) still runs the next cross-process program."""
    lines = _run_two(LATE_PROCESS, 300, cache=str(tmp_path / "cache"), delay=delay)
    waited = float(lines[0].split()[-1])
    assert delay - 1 <= waited, lines                      # process 0 waited for process 1
