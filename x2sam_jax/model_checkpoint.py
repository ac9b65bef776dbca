"""Model directories: Orbax checkpoints of NNX models, with the architecture in ``config.json``.

What ``x2sam_jax.save`` / ``x2sam_jax.load`` and the ``convert_weights`` CLIs write and read (a
training run's checkpoints are ``x2sam_jax.train.run_checkpoint``).

A checkpoint directory holds::

    config.json     {"model_type": ..., "config": {...}, "format_version": 1}
    params/         Orbax (StandardCheckpointer) tree of every non-RNG variable, stacked layers
                    stored with their leading ``layers`` axis
    checksums.json  shape, dtype and checksum of every array in params/, written with it
    rng_state/      Orbax tree of the RNG streams (key data, uint32) and their counters
    ...             anything else a converter copies in (tokenizer files, ...)

Writes are atomic (``x2sam_jax.storage.atomic``): a failed or killed write never leaves a directory
that looks complete, and ``overwrite`` replaces only an x2sam_jax checkpoint. Reads are verified:
every stored array is compared with the model built from ``config.json`` (names, shapes, kinds of
dtype) before it is read and with its checksum after (``x2sam_jax.storage.checksums``), so an
edited config or a corrupt file is an error naming the parameter, never a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax import config as config_lib
from x2sam_jax.models.hiera import Sam2VisionEncoder
from x2sam_jax.models.qwen3_vl import Qwen3VLModel
from x2sam_jax.models.x2sam import X2SAM
from x2sam_jax.rng import is_key, key_data, reseed_rngs
from x2sam_jax.sharding import place, state_shardings
from x2sam_jax.storage.atomic import CheckpointError, atomic_directory, read_json
from x2sam_jax.storage.checksums import (CHECKSUM_ALGORITHM, flat_tree, layout_problems, raise_problems,
                                         tree_checksums, verify_restored)

FORMAT_VERSION = 1
CHECKSUMS_FILE = "checksums.json"

logger = logging.getLogger("x2sam_jax.checkpoint")


def _ocp():
    import orbax.checkpoint as ocp   # here, not at the top: importing Orbax takes ~2 s (import x2sam_jax)

    return ocp


# model_type (recorded in config.json) -> (the NNX model, its config dataclass). Every model class
# is built as Class(config, rngs=nnx.Rngs(...)).
MODEL_TYPES: dict[str, tuple[type, type]] = {
    "sam2_hiera": (Sam2VisionEncoder, config_lib.HieraConfig),
    "qwen3_vl": (Qwen3VLModel, config_lib.Qwen3VLConfig),
    "x2sam": (X2SAM, config_lib.X2SAMConfig),
}


def model_type_of(config) -> str:
    for model_type, (_, config_cls) in MODEL_TYPES.items():
        if type(config) is config_cls:
            return model_type
    raise ValueError(f"no registered model type uses config class {type(config).__name__}")


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0]


def config_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][1]


def read_checksums(directory: str | Path) -> dict[str, dict] | None:
    """The recorded checksums of ``directory/params`` (None for checkpoints written before them)."""
    file = Path(directory) / CHECKSUMS_FILE
    if not file.exists():
        return None
    meta = read_json(file)
    if meta.get("algorithm") != CHECKSUM_ALGORITHM or not isinstance(meta.get("arrays"), dict):
        raise CheckpointError(f"{file}: expected {{'algorithm': {CHECKSUM_ALGORITHM!r}, 'arrays': {{...}}}}")
    return meta["arrays"]


def stored_arrays(directory: str | Path) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every array in ``directory/params``, from Orbax's metadata (no data read)."""
    ocp = _ocp()
    params = Path(directory) / "params"
    if not params.is_dir():
        raise CheckpointError(f"{params}: not found (an x2sam_jax checkpoint holds its arrays there)")
    try:
        tree = ocp.StandardCheckpointer().metadata(params).item_metadata.tree
    except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many types for a damaged tree
        raise CheckpointError(f"{params}: cannot read the Orbax metadata ({error})") from error
    return {path: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype) for path, leaf in flat_tree(tree).items()}


def restore_params(directory: str | Path, target) -> Any:
    """Restores ``directory/params`` into ``target`` and verifies it.

    ``target`` is a tree of ShapeDtypeStructs (the abstract model); leaves with a sharding are
    restored into it, the others onto the default device (jax Arrays, never numpy). Names and
    shapes are compared with the stored metadata before any data is read; after the read, every
    array is checked against checksums.json. Arrays come back in the target's dtypes.
    """
    ocp = _ocp()
    directory = Path(directory)
    stored = stored_arrays(directory)
    problems = layout_problems(flat_tree(target), stored)
    if problems:
        raise_problems(directory, "the stored arrays do not match the model built from its config.json", problems)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])   # this process's, on any process
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = list(flat_tree(target))
    request = treedef.unflatten([
        jax.ShapeDtypeStruct(leaf.shape, stored[path].dtype, sharding=getattr(leaf, "sharding", None) or device)
        for path, (_, leaf) in zip(paths, leaves)])
    try:
        restored = ocp.StandardCheckpointer().restore(directory / "params", request)
    except Exception as error:  # noqa: BLE001 - name the checkpoint whatever TensorStore raises
        raise CheckpointError(f"{directory / 'params'}: cannot be read ({error})") from error
    checksums = read_checksums(directory)
    if checksums is None:
        logger.warning("%s: no %s (written before checksums were recorded); contents not verified",
                       directory, CHECKSUMS_FILE)
    verify_restored(request, restored, checksums, where=directory)
    return jax.tree.map(lambda a, t: a if a.dtype == t.dtype else a.astype(t.dtype), restored, target)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _saveable_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.Not(nnx.RngState))


def write_params(directory: Path, params: dict) -> None:
    """Writes a nested dict of arrays as an Orbax tree under ``directory / 'params'``, and their
    checksums to ``directory / 'checksums.json'``."""
    ocp = _ocp()
    checksums = tree_checksums(params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute() / "params", params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (Path(directory) / CHECKSUMS_FILE).write_text(
            json.dumps({"algorithm": CHECKSUM_ALGORITHM, "arrays": checksums}, indent=1))


def write_config(directory: Path, config, extra: dict[str, Any] | None = None) -> None:
    meta = {"model_type": model_type_of(config), "format_version": FORMAT_VERSION,
            "config": config_lib.to_dict(config), **(extra or {})}
    (Path(directory) / "config.json").write_text(json.dumps(meta, indent=2))


def save(path: str | Path, model: nnx.Module, config=None, *, overwrite: bool = False,
         extra_files: dict[str, str | Path] | None = None) -> Path:
    """Saves ``model`` (all variables, RNG streams included) and its config to ``path`` atomically.

    ``overwrite`` replaces an existing x2sam_jax checkpoint at ``path`` (nothing else).
    """
    config = config if config is not None else model.config
    params = nnx.to_pure_dict(_saveable_state(model))
    rng_state = key_data(nnx.to_pure_dict(nnx.state(model, nnx.RngState)))
    with atomic_directory(path, overwrite) as tmp:
        write_params(tmp, params)
        if jax.tree.leaves(rng_state):
            _write_tree(tmp / "rng_state", rng_state)
        write_config(tmp, config)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
    return Path(path)


def _missing_fields(cls, data: dict, prefix: str = "") -> list[str]:
    """Fields of the (nested) config dataclass ``cls`` that ``data`` does not set."""
    hints = typing.get_type_hints(cls)
    missing = []
    for field in dataclasses.fields(cls):
        if field.name not in data:
            missing.append(prefix + field.name)
            continue
        hint, value = hints[field.name], data[field.name]
        candidates = [hint, *typing.get_args(hint)]
        nested = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
        if nested is not None and isinstance(value, dict):
            missing += _missing_fields(nested, value, f"{prefix}{field.name}.")
    return missing


def read_config(path: str | Path):
    """The config dataclass recorded in ``path/config.json``."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {path} is neither an x2sam_jax model directory (config.json) "
                                "nor a training workdir (model_config.json, checkpoints/)")
    meta = read_json(file)
    if "model_type" not in meta or "config" not in meta:
        raise CheckpointError(f"{file}: expected keys 'model_type' and 'config' (a model directory's config.json; "
                              "a training workdir also holds model_config.json and checkpoints/)")
    try:
        cls = config_class(meta["model_type"])
        config = config_lib.from_dict(cls, meta["config"])
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{file}: {error}") from None
    missing = _missing_fields(cls, meta["config"])
    if missing:  # a checkpoint from before these fields existed (or an edited file): say so
        logger.warning("%s: fields not set, defaults used: %s", file, ", ".join(missing))
    return config


def abstract_model(config, **overrides):
    """The model of ``config`` with ShapeDtypeStruct leaves (no memory, no compute)."""
    if overrides:
        config = dataclasses.replace(config, **overrides)
    cls = model_class(model_type_of(config))
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def _write_tree(directory: Path, tree) -> None:
    ocp = _ocp()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute(), tree)
    checkpointer.wait_until_finished()


def _materialize_rng_state(state: nnx.State, saved: dict | None) -> nnx.State:
    """The saved streams when the checkpoint has them, else distinct fresh ones (seed 0)."""
    if saved is None:
        return reseed_rngs(state, jax.random.key(0))
    restored = jax.tree.map(lambda a, s: jax.random.wrap_key_data(s) if is_key(a) else jnp.asarray(s, a.dtype),
                            nnx.to_pure_dict(state), saved)
    nnx.replace_by_pure_dict(state, restored)
    return state


def is_training_workdir(path: str | Path) -> bool:
    """Whether ``path`` is a training workdir (``model_config.json`` + ``checkpoints/``, as
    ``train.py`` writes), not a model directory (``config.json`` with ``model_type``)."""
    from x2sam_jax.distributed import absolute_path   # keeps gs://bucket/run as it is

    directory = absolute_path(path)
    return (directory / "model_config.json").is_file() or (directory / "checkpoints").is_dir()


def load(path: str | Path, *, mesh=None, dtype=None, step: int | None = None, **config_overrides) -> nnx.Module:
    """Loads a checkpoint written by :func:`save` or a ``convert_weights`` CLI, or the latest
    complete step of a training workdir (``x2sam_jax.runs.restore_model``).

    Every array is verified against the model built from ``config.json`` and against its
    recorded checksum (:func:`restore_params`); a mismatch is a :class:`CheckpointError`.

    Args:
      path: the checkpoint directory, or a training workdir (``train.py --workdir``).
      mesh: optional ``jax.sharding.Mesh``; parameters are restored directly into their
        sharded layout (logical names -> ``x2sam_jax.sharding`` rules). Without one they go to
        the default device.
      dtype: optional floating dtype to cast parameters to (e.g. ``jnp.bfloat16``).
      step: a training workdir's checkpoint step (default: its latest complete one).
      **config_overrides: config fields that do not change parameter shapes (e.g. ``scan_layers``);
        model directories only.
    """
    if is_training_workdir(path):
        if config_overrides:
            raise ValueError(f"{path} is a training workdir: its architecture is the run's; config overrides "
                             f"({', '.join(sorted(config_overrides))}) apply to model directories only")
        from x2sam_jax.runs import restore_model   # runs imports this module

        model = restore_model(path, step=step, mesh=mesh)
        if dtype is not None:
            params = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(
                lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params))
        return model
    if step is not None:
        raise ValueError(f"{path} is a model directory (one set of parameters): step={step} applies to training "
                         "workdirs only")
    path = Path(path).absolute()
    config = read_config(path)
    abstract = abstract_model(config, **config_overrides)
    graphdef, params, rng_state = nnx.split(abstract, nnx.Not(nnx.RngState), ...)
    if mesh is not None:
        shardings = state_shardings(params, mesh)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, shardings)
    restored = restore_params(path, nnx.to_pure_dict(params))
    if dtype is not None:
        restored = jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, restored)
    nnx.replace_by_pure_dict(params, restored)
    saved_rngs = None
    if (path / "rng_state").exists():
        ocp = _ocp()
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                              jax.eval_shape(key_data, nnx.to_pure_dict(rng_state)))
        saved_rngs = ocp.StandardCheckpointer().restore(path / "rng_state", target)
    rng_state = _materialize_rng_state(rng_state, saved_rngs)
    if mesh is not None:  # on the mesh too, so the model's inputs to jit match a freshly built one's
        # place: valid on a mesh spanning several processes
        rng_state = jax.tree.map(place, rng_state, state_shardings(rng_state, mesh))
    return nnx.merge(graphdef, params, rng_state)


def load_flat_params(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of a checkpoint as ``{"a.b.0.c": numpy array}`` in their stored dtypes
    (for exporters), verified against the recorded checksums."""
    ocp = _ocp()
    path = Path(path).absolute()
    stored = stored_arrays(path)
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params")
    except Exception as error:  # noqa: BLE001 - name the checkpoint whatever TensorStore raises
        raise CheckpointError(f"{path / 'params'}: cannot be read ({error})") from error
    flat = {k: np.asarray(v) for k, v in flat_tree(restored).items()}
    verify_restored(stored, flat, read_checksums(path), where=path)
    return flat
