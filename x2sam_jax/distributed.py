"""Multi-process set-up shared by train.py and eval.py (neither package imports the other for it).

``initialize_distributed(config)`` starts ``jax.distributed`` from a run config's
``distributed`` section or the environment; ``is_remote`` / ``absolute_path`` keep cloud
paths (``gs://bucket/run``) as they are and make local paths absolute.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` from the config (--config.distributed.*) or the environment.

    An explicit coordinator address (config or ``JAX_COORDINATOR_ADDRESS``) with the process
    count and id starts a multi-process run; ``distributed.auto`` lets JAX detect the cluster
    (TPU pod slices, SLURM, Open MPI). Without either the run is single-process. A second call
    in a process that is already initialised does nothing."""
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


def _initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except (ImportError, AttributeError):  # private API moved: let initialize() decide
        return False


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_remote(path) -> bool:
    """Whether ``path`` names a location with a scheme (gs://, s3://, ...), not a local file."""
    return "://" in os.fspath(path)


def absolute_path(path):
    """``path`` as an ``etils.epath.Path``: a cloud path (gs://bucket/run) keeps its scheme, a
    local one is made absolute (``pathlib.Path.absolute`` would turn gs://b into CWD/gs:/b)."""
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))
