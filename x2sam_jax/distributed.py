"""Multi-process set-up shared by train.py and eval.py (neither package imports the other for it).

``initialize_distributed(config)`` starts ``jax.distributed`` from a run config's
``distributed`` section or the environment; ``barrier`` waits for every process;
``is_remote`` / ``absolute_path`` keep cloud paths (``gs://bucket/run``) as they are and make
local paths absolute.
"""

from __future__ import annotations

import collections
import logging
import os

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


def initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` from the config (--config.distributed.*) or the environment.

    An explicit coordinator address (config or ``JAX_COORDINATOR_ADDRESS``) with the process
    count and id starts a multi-process run; ``distributed.auto`` lets JAX detect the cluster
    (TPU pod slices, SLURM, Open MPI). Without either the run is single-process. A second call
    in a process that is already initialised does nothing.

    On CPU with several processes the persistent compilation cache is turned off: its keys hold
    each process's devices, so only process 0 (its only writer) ever hits, and it then enters a new
    program's collectives minutes before the others, past the 30 s in which the CPU collectives
    (gloo) must all meet: the run fails or hangs. TPU and GPU processes share their keys."""
    dist = config.get("distributed", None) or {}
    address = dist.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(dist.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
    pid = dist.get("process_id", -1)
    pid = int(os.environ.get("JAX_PROCESS_ID", -1)) if pid is None or int(pid) < 0 else int(pid)
    if not address and not dist.get("auto", False):
        return
    if _initialized():
        return
    if address:
        if num < 1 or pid < 0:
            raise ValueError(f"distributed: coordinator_address={address!r} needs num_processes and process_id "
                             f"(got {num}, {pid}); set --config.distributed.* or JAX_NUM_PROCESSES / JAX_PROCESS_ID")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize()
    if jax.process_count() > 1 and jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
        logger.info("%d CPU processes: the persistent compilation cache is off (each process would key "
                    "its own programs; see x2sam_jax.distributed.initialize_distributed)", jax.process_count())
        jax.config.update("jax_enable_compilation_cache", False)


def _client():
    """The coordination-service client of ``jax.distributed`` (None before initialize)."""
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):  # private API moved
        return None


def _initialized() -> bool:
    return _client() is not None


_BARRIER_CALLS: collections.Counter = collections.Counter()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Waits for every process (a no-op in a single-process run) at the coordination service, not
    through a device collective: a process that comes late (a long compile, a slow restore) does
    not run into the CPU collectives' 30 s rendezvous deadline. Every process must call the same
    barriers in the same order (each name is numbered by its calls)."""
    if jax.process_count() == 1:
        return
    _BARRIER_CALLS[name] += 1
    client = _client()
    if client is None:   # private API moved: a device collective does the same with a shorter deadline
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"x2sam_jax/{name}/{_BARRIER_CALLS[name]}", timeout_in_ms=int(timeout_s * 1000))


def is_remote(path) -> bool:
    """Whether ``path`` names a location with a scheme (gs://, s3://, ...), not a local file."""
    return "://" in os.fspath(path)


def absolute_path(path):
    """``path`` as an ``etils.epath.Path``: a cloud path (gs://bucket/run) keeps its scheme, a
    local one is made absolute (``pathlib.Path.absolute`` would turn gs://b into CWD/gs:/b)."""
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))
