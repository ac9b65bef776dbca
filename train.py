"""Train X2SAM: a thin CLI over ``x2sam_jax.train.loop.train``.

    python train.py --config configs/x2sam_tiny_synthetic.py --workdir runs/tiny \\
        [--config.steps=300] [--config.checkpoint_every=50] [--config.seed=0] [--config.log_every=1] \\
        [--config.mesh.data=1 --config.mesh.fsdp=8] [--config.data.global_batch_images=128] ...

Re-running the same command resumes from the latest complete checkpoint in WORKDIR. SIGTERM saves
a checkpoint at the next step boundary and exits 0. Multi-host: start the same command on every
host with --config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment, or --config.distributed.auto=True on TPU pods and SLURM).
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from x2sam_jax.cli import cli_errors, parse_flags
from x2sam_jax.eval.evaluator import from_run_config
from x2sam_jax.train.loop import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory of the run (checkpoints, metrics, TensorBoard)")
flags.mark_flags_as_required(["config", "workdir"])


@cli_errors
def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every save at INFO
    config = _CONFIG.value
    try:   # the in-loop evaluation is built here, from the run config: the loop never imports x2sam_jax.eval
        summary = train(config, _WORKDIR.value, evaluate_fn=from_run_config(config))
    except NonFiniteLossError as err:
        logging.getLogger("x2sam_jax.train").error("%s", err)
        return 3
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
