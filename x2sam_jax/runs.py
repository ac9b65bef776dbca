"""A training run as training and evaluation both see it: the model a run config builds, and the
model a run's workdir holds.

``x2sam_jax.train`` (which writes workdirs) and ``x2sam_jax.eval`` (which reads them) both import
this module and never each other. From a run config (``configs/*.py``):

    tokenizer = build_tokenizer(config)
    model_config = build_model_config(config, tokenizer)      # the only way from a run config
    model = model_for_stage(model_config, stage, nnx.Rngs(seed))
    graphdef, trainable, frozen, rest = split_params(model, trainable_predicate(stage))

From a workdir: ``restore_model(workdir)``. A training workdir holds::

    config.json          the resolved run config (ml_collections)
    model_config.json    the model's architecture (x2sam_jax.config dataclass, as model_checkpoint writes)
    tokenizer/           the tokenizer (save_pretrained)
    frozen/0/            the frozen parameters (params, meta: their checksums), written once
    checkpoints/<step>/  params (trainable), opt_state, meta (step, updates, RNG key, counters, the
                         checksums of params and opt_state), data (the Grain iterator state, one
                         JSON per process): x2sam_jax.train.run_checkpoint
    metrics.jsonl, events.out.tfevents.*

Why frozen parameters are stored apart: they are the bulk of the model (the ViT, the LLM base)
and never change, so writing them into every step would multiply the checkpoint size by ~10
for nothing; they are written once, to a one-step Orbax checkpoint of their own with the same
finalisation guarantees, and stay in the workdir, so a workdir restores without the init
checkpoints it started from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from x2sam_jax import config as config_lib
from x2sam_jax.data.tokenizer import SpecialIds, build_tiny_tokenizer, load_tokenizer
from x2sam_jax.distributed import absolute_path
from x2sam_jax.model_checkpoint import config_class, model_type_of
from x2sam_jax.models.x2sam import X2SAM, ClassAgnosticSegmentor, is_trainable_stage1
from x2sam_jax.models.x2sam import is_trainable as is_trainable_stage3   # a name the filters below take
from x2sam_jax.rng import reseed_rngs
from x2sam_jax.sharding import make_mesh, state_shardings
from x2sam_jax.storage.checksums import tree_checksums, verify_restored

MODEL_CONFIG = "model_config.json"


def _ocp():
    import orbax.checkpoint as ocp   # here, not at the top: importing Orbax takes ~2 s

    return ocp


def pixel_dtype(model_config) -> str:
    """The dtype pixels travel to the devices in: the encoders' compute dtype where the ViT and
    Hiera share it (each casts its pixels to it first), else float32."""
    dtypes = {str(model_config.vlm.vision.dtype), str(model_config.mask_encoder.dtype)}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


# ------------------------------------------------------------------------------------- model config
def build_tokenizer(config):
    """``config.model.tokenizer``: "tiny" (the built-in test tokenizer), a directory, or "" (none)."""
    name = config.model.tokenizer
    if name == "tiny":
        return build_tiny_tokenizer()
    if not name:
        return None
    return load_tokenizer(name)


def preset_model_config(preset: str, tokenizer=None) -> config_lib.X2SAMConfig:
    """The X2SAM preset with the tokenizer's special-token ids; the ``tiny`` preset's vocabulary is
    sized to the tokenizer (a round number of 128-row blocks that covers it; the extra rows are
    never used), a released preset's must already cover it (checked)."""
    config = config_lib.x2sam_preset(preset)
    if tokenizer is None:
        return config
    text = config.vlm.text
    if preset == "tiny":
        text = dataclasses.replace(text, vocab_size=128 * math.ceil(len(tokenizer) / 128))
    elif text.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size {text.vocab_size} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    ids = SpecialIds.from_tokenizer(tokenizer)
    vlm = dataclasses.replace(config.vlm, text=text, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                              vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    return dataclasses.replace(config, vlm=vlm, seg_token_id=ids.seg, p_start_token_id=ids.p_start,
                               p_end_token_id=ids.p_end, region_token_id=ids.region)


def build_model_config(config, tokenizer) -> config_lib.X2SAMConfig:
    """The architecture of a run config: ``model.preset`` with the tokenizer's ids
    (:func:`preset_model_config`), then ``model.overrides`` (nested fields), ``model.compute_dtype``
    (``config.with_compute_dtype``) and ``model.remat_policy`` (``config.with_remat_policy``)."""
    model_config = preset_model_config(config.model.preset, tokenizer)
    overrides = config.model.get("overrides", None)
    if overrides:
        model_config = _replace_nested(model_config, overrides.to_dict() if hasattr(overrides, "to_dict")
                                       else dict(overrides))
    if config.model.get("compute_dtype"):
        model_config = config_lib.with_compute_dtype(model_config, config.model.compute_dtype)
    if config.model.get("remat_policy", "none") != "none":
        model_config = config_lib.with_remat_policy(model_config, config.model.remat_policy)
    return model_config


def _replace_nested(obj, overrides: dict):
    """dataclasses.replace, recursively: {"mask_decoder": {"num_queries": 8}}."""
    kwargs = {}
    for key, value in overrides.items():
        if not hasattr(obj, key):
            raise ValueError(f"model.overrides: {type(obj).__name__} has no field {key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _replace_nested(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return dataclasses.replace(obj, **kwargs)


# ------------------------------------------------------------------------------------- model
def model_for_stage(model_config, stage: int, rngs: nnx.Rngs):
    """Stage 1 trains the class-agnostic segmentor alone; stage 3 the whole X2SAM."""
    return ClassAgnosticSegmentor(model_config, rngs=rngs) if stage == 1 else X2SAM(model_config, rngs=rngs)


def trainable_predicate(stage: int, train_all: bool = False) -> Callable[[str], bool]:
    """Whether a parameter (dotted path) is trained at ``stage``; ``train_all``: every one."""
    if train_all:
        return lambda path: True
    return is_trainable_stage1 if stage == 1 else is_trainable_stage3


def path_name(path) -> str:
    """'a.b.0.c' for an NNX filter path or a ``jax.tree_util`` key path of an NNX state."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):      # a Variable's value
            continue
        key = getattr(entry, "key", getattr(entry, "idx", entry))
        parts.append(str(key))
    return ".".join(parts)


def trainable_filter(is_trainable: Callable[[str], bool]):
    """NNX filter selecting the parameters whose dotted path ``is_trainable`` accepts."""
    return lambda path, value: isinstance(value, nnx.Param) and is_trainable(path_name(path))


def frozen_filter(is_trainable: Callable[[str], bool]):
    return lambda path, value: isinstance(value, nnx.Param) and not is_trainable(path_name(path))


def split_params(model: nnx.Module, is_trainable: Callable[[str], bool]):
    """(graphdef, trainable params, frozen params, other state: RNG streams...)."""
    return nnx.split(model, trainable_filter(is_trainable), frozen_filter(is_trainable), ...)


# ------------------------------------------------------------------------------------- workdir
def write_model_config(workdir, model_config, stage: int) -> None:
    meta = {"model_type": model_type_of(model_config), "stage": int(stage),
            "config": config_lib.to_dict(model_config)}
    path = absolute_path(workdir) / MODEL_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


def read_model_config(workdir):
    """(model config dataclass, stage) recorded in a training workdir."""
    path = absolute_path(workdir) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not an x2sam_jax training workdir")
    meta = json.loads(path.read_text())
    return config_lib.from_dict(config_class(meta["model_type"]), meta["config"]), int(meta.get("stage", 3))


def with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restores reshard onto any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def verify_items(restored, meta: dict, names, target, where) -> None:
    """Checks the restored items against the checksums saved with them (none in older steps)."""
    recorded = meta.get("checksums")
    for name in names:
        verify_restored(getattr(target, name) if not isinstance(target, dict) else target[name], restored[name],
                        None if recorded is None else recorded[name], where=where / name)


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
        meta = {"checksums": {"params": tree_checksums(frozen)}}
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(frozen), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()
    manager.close()


def restore_frozen(workdir, frozen, mesh):
    """The frozen parameters of a workdir onto ``mesh`` (None if they were never written); Orbax
    reads each process's shards straight into the global arrays."""
    ocp = _ocp()
    manager = _frozen_manager(workdir)
    try:
        if manager.latest_step() is None:
            return None
        shardings = state_shardings(frozen, mesh)
        restored = manager.restore(0, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_shardings(frozen, shardings)), meta=ocp.args.JsonRestore()))
        verify_items(restored, restored["meta"], ("params",), {"params": frozen},
                     absolute_path(workdir) / "frozen" / "0")
        return restored["params"]
    finally:
        manager.close()


def restore_model(workdir, *, step: int | None = None, mesh=None, train_all: bool | None = None):
    """The model of a training workdir at ``step`` (default: the latest complete checkpoint).

    Returns an ``X2SAM`` (stage 3) or a ``ClassAgnosticSegmentor`` (stage 1) in evaluation mode,
    its parameters restored straight onto ``mesh`` (default: this process's first device), its
    RNG streams distinct (``rng.reseed_rngs``). On a mesh spanning several processes every
    process calls it; Orbax reads each process's shards into the global arrays."""
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
        params=ocp.args.StandardRestore(with_shardings(params, state_shardings(params, mesh))),
        meta=ocp.args.JsonRestore()))
    manager.close()
    verify_items(restored, restored["meta"], ("params",), {"params": params}, workdir / "checkpoints" / str(step))
    frozen_values = restore_frozen(workdir, frozen, mesh) if jax.tree.leaves(frozen) else frozen
    if frozen_values is None:
        raise FileNotFoundError(f"{workdir / 'frozen'} holds no frozen parameters")
    # Built by a jitted initialiser with the mesh's shardings (no device_put of host values onto
    # devices that may belong to other processes).
    rest = jax.jit(lambda: reseed_rngs(rest, jax.random.key(0)), out_shardings=state_shardings(rest, mesh))()
    return nnx.merge(graphdef, restored["params"], frozen_values, rest)
