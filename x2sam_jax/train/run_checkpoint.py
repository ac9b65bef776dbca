"""The step checkpoints of a training run: Orbax ``CheckpointManager``, kill-safe, resumable on any mesh.

They live in ``WORKDIR/checkpoints/<step>/`` beside the rest of the workdir (its layout, the frozen
parameters and ``restore_model``, which evaluation uses too: ``x2sam_jax.runs``). A model
directory of ``x2sam_jax.save`` / the converters is another format: ``x2sam_jax.model_checkpoint``.

Orbax writes a step into a temporary directory and renames it when every item (on every host)
is complete; a step cut off while being written (kill -9, preemption without grace) is
therefore never listed, and ``latest_step`` is the last complete one. Restores read into the
abstract state of the current mesh (``ShapeDtypeStruct`` with the new shardings), so a run
resumes on a different mesh shape. Every restore is verified against the checksums recorded
at save time (``x2sam_jax.storage.checksums.verify_restored``), so a corrupt or edited step is an
error naming the array, never a silently different run.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from x2sam_jax.distributed import absolute_path
from x2sam_jax.runs import verify_items, with_shardings
from x2sam_jax.sharding import global_array
from x2sam_jax.storage.checksums import tree_checksums
from x2sam_jax.train.step import TrainState, train_state_shardings


def _ocp():
    import orbax.checkpoint as ocp   # here, not at the top: importing Orbax takes ~2 s

    return ocp


class TrainCheckpoints:
    """The step checkpoints of a run (trainable parameters, optimizer, meta, data iterator)."""

    def __init__(self, workdir, *, max_to_keep: int | None = 2, async_save: bool = True):
        ocp = _ocp()
        self.directory = absolute_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state, iterator=None) -> None:
        """Starts an asynchronous save of ``state`` (a step.TrainState) at its step."""
        ocp = _ocp()
        step = int(state.step)
        meta = _meta(state)
        meta["checksums"] = {"params": tree_checksums(state.params), "opt_state": tree_checksums(state.opt_state)}
        items = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                     meta=ocp.args.JsonSave(meta))
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, state, mesh, *, step: int | None = None, iterator=None):
        """The saved state at ``step`` (default: the latest complete one) onto ``mesh``; the
        iterator (freshly built, same config) is moved to the saved position in place."""
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        shardings = train_state_shardings(state, mesh)
        items = dict(params=ocp.args.StandardRestore(with_shardings(state.params, shardings.params)),
                     opt_state=ocp.args.StandardRestore(with_shardings(state.opt_state, shardings.opt_state)),
                     meta=ocp.args.JsonRestore())
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        verify_items(restored, meta, ("params", "opt_state"), state, self.directory / str(step))
        # The counters and the key are recorded in the JSON meta (the same on every process):
        # global replicated arrays built from it, valid on a mesh spanning several processes.
        scalar = lambda v, s: global_array(np.asarray(v, np.int32), s)  # noqa: E731
        key = global_array(jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32),
                                                    impl=jax.random.key_impl(state.rng)), shardings.rng)
        return TrainState(step=scalar(meta["step"], shardings.step), updates=scalar(meta["updates"], shardings.updates),
                          params=restored["params"], opt_state=restored["opt_state"], rng=key,
                          nonfinite_run=scalar(meta["nonfinite_run"], shardings.nonfinite_run),
                          skipped=scalar(meta["skipped"], shardings.skipped))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _meta(state) -> dict:
    return {"step": int(state.step), "updates": int(state.updates), "nonfinite_run": int(state.nonfinite_run),
            "skipped": int(state.skipped), "rng": np.asarray(jax.random.key_data(state.rng)).tolist()}

