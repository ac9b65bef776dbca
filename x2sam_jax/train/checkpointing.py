"""Training checkpoints: Orbax ``CheckpointManager``, kill-safe, resumable on any mesh.

A training workdir holds::

    config.json          the resolved run config (ml_collections)
    model_config.json    the model's architecture (x2sam_jax.config dataclass, as checkpoint.py writes)
    tokenizer/           the tokenizer (save_pretrained)
    frozen/0/            the frozen parameters (params, meta: their checksums), written once
    checkpoints/<step>/  params (trainable), opt_state, meta (step, updates, RNG key, counters, the
                         checksums of params and opt_state), data (the Grain iterator state, one
                         JSON per process)
    metrics.jsonl, events.out.tfevents.*

Why frozen parameters are stored apart: they are the bulk of the model (the ViT, the LLM base)
and never change, so writing them into every step would multiply the checkpoint size by ~10
for nothing; they are written once, to a one-step Orbax checkpoint of their own with the same
finalisation guarantees, and stay in the workdir, so a workdir restores without the init
checkpoints it started from.

Orbax writes a step into a temporary directory and renames it when every item (on every host)
is complete; a step cut off while being written (kill -9, preemption without grace) is
therefore never listed, and ``latest_step`` is the last complete one. Restores read into the
abstract state of the current mesh (``ShapeDtypeStruct`` with the new shardings), so a run
resumes on a different mesh shape. Every restore is verified against the checksums recorded
at save time (``x2sam_jax.checkpoint.verify_restored``), so a corrupt or edited step is an error
naming the array, never a silently different run.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax import config as config_lib
from x2sam_jax.distributed import absolute_path
from x2sam_jax.sharding import global_array

logger = logging.getLogger("x2sam_jax.train")

MODEL_CONFIG = "model_config.json"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restores reshard onto any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


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
        import grain

        ocp = _ocp()
        step = int(state.step)
        from x2sam_jax.checkpoint import tree_checksums

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
        import grain

        from x2sam_jax.train.step import train_state_shardings

        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        shardings = train_state_shardings(state, mesh)
        items = dict(params=ocp.args.StandardRestore(_abstract(state.params, shardings.params)),
                     opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
                     meta=ocp.args.JsonRestore())
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        _verify(restored, meta, ("params", "opt_state"), state, self.directory / str(step))
        from x2sam_jax.train.step import TrainState

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


def _verify(restored, meta: dict, names, target, where) -> None:
    """Checks the restored items against the checksums saved with them (none in older steps)."""
    from x2sam_jax.checkpoint import verify_restored

    recorded = meta.get("checksums")
    for name in names:
        verify_restored(getattr(target, name) if not isinstance(target, dict) else target[name], restored[name],
                        None if recorded is None else recorded[name], where=where / name)


def _meta(state) -> dict:
    return {"step": int(state.step), "updates": int(state.updates), "nonfinite_run": int(state.nonfinite_run),
            "skipped": int(state.skipped), "rng": np.asarray(jax.random.key_data(state.rng)).tolist()}


# ------------------------------------------------------------------------------------- frozen
def _frozen_manager(workdir):
    ocp = _ocp()
    return ocp.CheckpointManager(absolute_path(workdir) / "frozen",
                                 options=ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                                                      enable_async_checkpointing=False))


def save_frozen(workdir, frozen) -> None:
    """Writes the frozen parameters once (a one-step Orbax checkpoint, finalised atomically)."""
    ocp = _ocp()
    manager = _frozen_manager(workdir)
    if manager.latest_step() is None:
        from x2sam_jax.checkpoint import tree_checksums

        meta = {"checksums": {"params": tree_checksums(frozen)}}
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(frozen), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()
    manager.close()


def restore_frozen(workdir, frozen, mesh):
    """The frozen parameters of a workdir onto ``mesh`` (None if they were never written); Orbax
    reads each process's shards straight into the global arrays."""
    from x2sam_jax.sharding import state_shardings

    ocp = _ocp()
    manager = _frozen_manager(workdir)
    try:
        if manager.latest_step() is None:
            return None
        shardings = state_shardings(frozen, mesh)
        restored = manager.restore(0, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(frozen, shardings)), meta=ocp.args.JsonRestore()))
        _verify(restored, restored["meta"], ("params",), {"params": frozen}, absolute_path(workdir) / "frozen" / "0")
        return restored["params"]
    finally:
        manager.close()


# ------------------------------------------------------------------------------------- model
def write_model_config(workdir, model_config, stage: int) -> None:
    from x2sam_jax.checkpoint import model_type_of

    meta = {"model_type": model_type_of(model_config), "stage": int(stage),
            "config": config_lib.to_dict(model_config)}
    path = absolute_path(workdir) / MODEL_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


def read_model_config(workdir):
    """(model config dataclass, stage) recorded in a training workdir."""
    from x2sam_jax.checkpoint import config_class

    path = absolute_path(workdir) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not an x2sam_jax training workdir")
    meta = json.loads(path.read_text())
    return config_lib.from_dict(config_class(meta["model_type"]), meta["config"]), int(meta.get("stage", 3))


def model_for_stage(model_config, stage: int, rngs: nnx.Rngs):
    from x2sam_jax.models.x2sam import X2SAM, ClassAgnosticSegmentor

    return ClassAgnosticSegmentor(model_config, rngs=rngs) if stage == 1 else X2SAM(model_config, rngs=rngs)


def trainable_predicate(stage: int, train_all: bool = False):
    from x2sam_jax.models.x2sam import is_trainable, is_trainable_stage1

    if train_all:
        return lambda path: True
    return is_trainable_stage1 if stage == 1 else is_trainable


def restore_model(workdir, *, step: int | None = None, mesh=None, train_all: bool | None = None):
    """The model of a training workdir at ``step`` (default: the latest complete checkpoint).

    Returns an ``X2SAM`` (stage 3) or a ``ClassAgnosticSegmentor`` (stage 1) in evaluation mode,
    its parameters restored straight onto ``mesh`` (default: this process's first device), its
    RNG streams distinct (``checkpoint.reseed_rngs``). On a mesh spanning several processes every
    process calls it; Orbax reads each process's shards into the global arrays."""
    from x2sam_jax.checkpoint import reseed_rngs
    from x2sam_jax.sharding import make_mesh, state_shardings
    from x2sam_jax.train.optimizer import split_params

    workdir = absolute_path(workdir)
    model_config, stage = read_model_config(workdir)
    run = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").exists() else {}
    if train_all is None:
        train_all = bool(run.get("model", {}).get("train_all", False))
    mesh = mesh if mesh is not None else make_mesh(data=1, fsdp=1, tensor=1, devices=jax.local_devices()[:1])
    abstract = nnx.eval_shape(lambda: model_for_stage(model_config, stage, nnx.Rngs(0)))
    graphdef, params, frozen, rest = split_params(abstract, trainable_predicate(stage, train_all))
    frozen_dtype = run.get("model", {}).get("frozen_dtype")
    if frozen_dtype:   # the run stored its frozen base in this dtype (config.model.frozen_dtype)
        frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(frozen_dtype))
                              if jnp.issubdtype(a.dtype, jnp.floating) else a, frozen)
    ocp = _ocp()
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {workdir / 'checkpoints'}")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params, state_shardings(params, mesh))),
        meta=ocp.args.JsonRestore()))
    manager.close()
    _verify(restored, restored["meta"], ("params",), {"params": params}, workdir / "checkpoints" / str(step))
    frozen_values = restore_frozen(workdir, frozen, mesh) if jax.tree.leaves(frozen) else frozen
    if frozen_values is None:
        raise FileNotFoundError(f"{workdir / 'frozen'} holds no frozen parameters")
    # Built by a jitted initialiser with the mesh's shardings (no device_put of host values onto
    # devices that may belong to other processes).
    rest = jax.jit(lambda: reseed_rngs(rest, jax.random.key(0)), out_shardings=state_shardings(rest, mesh))()
    return nnx.merge(graphdef, restored["params"], frozen_values, rest)
