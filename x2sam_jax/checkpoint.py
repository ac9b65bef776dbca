"""Orbax checkpoints of NNX models, with the architecture recorded in ``config.json``.

A checkpoint directory holds::

    config.json   {"model_type": ..., "config": {...}, "format_version": 1}
    params/       Orbax (StandardCheckpointer) tree of every non-RNG variable, stacked layers
                  stored with their leading ``layers`` axis
    rng_state/    Orbax tree of the RNG streams (key data, uint32) and their counters
    ...           anything else a converter copies in (tokenizer files, ...)

Writes are atomic: everything goes to a temporary sibling directory renamed at the end, so a
failed write never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax import config as config_lib

FORMAT_VERSION = 1

# model_type -> ("module:Class" of the NNX model, "Class" of its config in x2sam_jax.config).
# Every model class is built as Class(config, rngs=nnx.Rngs(...)).
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "sam2_hiera": ("x2sam_jax.models.hiera:Sam2VisionEncoder", "HieraConfig"),
    "qwen3_vl": ("x2sam_jax.models.qwen3_vl:Qwen3VLModel", "Qwen3VLConfig"),
    "x2sam": ("x2sam_jax.models.x2sam:X2SAM", "X2SAMConfig"),
}


def model_type_of(config) -> str:
    name = type(config).__name__
    for model_type, (_, config_name) in MODEL_TYPES.items():
        if config_name == name:
            return model_type
    raise ValueError(f"no registered model type uses config class {name}")


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    module, cls = MODEL_TYPES[model_type][0].split(":")
    return getattr(importlib.import_module(module), cls)


def config_class(model_type: str):
    return getattr(config_lib, MODEL_TYPES[model_type][1])


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``dst`` only if the block succeeds."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _saveable_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.Not(nnx.RngState))


def write_params(directory: Path, params: dict) -> None:
    """Writes a nested dict of arrays as an Orbax tree under ``directory / 'params'``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute() / "params", params)
    checkpointer.wait_until_finished()


def write_config(directory: Path, config, extra: dict[str, Any] | None = None) -> None:
    meta = {"model_type": model_type_of(config), "format_version": FORMAT_VERSION,
            "config": config_lib.to_dict(config), **(extra or {})}
    (Path(directory) / "config.json").write_text(json.dumps(meta, indent=2))


def save(path: str | Path, model: nnx.Module, config=None, *, overwrite: bool = False,
         extra_files: dict[str, str | Path] | None = None) -> Path:
    """Saves ``model`` (all variables, RNG streams included) and its config to ``path`` atomically."""
    config = config if config is not None else model.config
    params = nnx.to_pure_dict(_saveable_state(model))
    rng_state = _rng_key_data(nnx.to_pure_dict(nnx.state(model, nnx.RngState)))
    with atomic_directory(path, overwrite) as tmp:
        write_params(tmp, params)
        if jax.tree.leaves(rng_state):
            _write_tree(tmp / "rng_state", rng_state)
        write_config(tmp, config)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
    return Path(path)


def read_config(path: str | Path):
    """The config dataclass recorded in ``path/config.json``."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {path} is not an x2sam_jax checkpoint")
    meta = json.loads(file.read_text())
    if "model_type" not in meta or "config" not in meta:
        raise ValueError(f"{file}: expected keys 'model_type' and 'config'")
    return config_lib.from_dict(config_class(meta["model_type"]), meta["config"])


def abstract_model(config, **overrides):
    """The model of ``config`` with ShapeDtypeStruct leaves (no memory, no compute)."""
    if overrides:
        config = dataclasses.replace(config, **overrides)
    cls = model_class(model_type_of(config))
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _rng_key_data(tree):
    """Typed PRNG keys -> their uint32 key data (what Orbax stores)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _write_tree(directory: Path, tree) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute(), tree)
    checkpointer.wait_until_finished()


def reseed_rngs(rng_state: nnx.State, key: jax.Array) -> nnx.State:
    """Fresh RNG streams: every key variable gets its own key, derived from ``key`` and its path
    (split along the leading axes of stacked layers, so every layer draws differently), and every
    counter restarts at 0. Jittable; training calls it with a new key every step."""
    def fresh(path, value):
        if _is_key(value):
            name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            return k if value.shape == () else jax.random.split(k, value.shape)
        return jnp.zeros(value.shape, value.dtype)

    return jax.tree_util.tree_map_with_path(fresh, rng_state)


def _materialize_rng_state(state: nnx.State, saved: dict | None) -> nnx.State:
    """The saved streams when the checkpoint has them, else distinct fresh ones (seed 0)."""
    if saved is None:
        return reseed_rngs(state, jax.random.key(0))
    restored = jax.tree.map(lambda a, s: jax.random.wrap_key_data(s) if _is_key(a) else jnp.asarray(s, a.dtype),
                            nnx.to_pure_dict(state), saved)
    nnx.replace_by_pure_dict(state, restored)
    return state


def load(path: str | Path, *, mesh=None, dtype=None, **config_overrides) -> nnx.Module:
    """Loads a checkpoint written by :func:`save` or a ``convert_weights`` CLI.

    Args:
      path: the checkpoint directory.
      mesh: optional ``jax.sharding.Mesh``; parameters are restored directly into their
        sharded layout (logical names -> ``x2sam_jax.sharding`` rules).
      dtype: optional floating dtype to cast parameters to (e.g. ``jnp.bfloat16``).
      **config_overrides: config fields that do not change parameter shapes (e.g. ``scan_layers``).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    config = read_config(path)
    abstract = abstract_model(config, **config_overrides)
    graphdef, params, rng_state = nnx.split(abstract, nnx.Not(nnx.RngState), ...)
    if mesh is not None:
        from x2sam_jax.sharding import state_shardings

        shardings = state_shardings(params, mesh)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, shardings)
    target = nnx.to_pure_dict(params)
    restored = ocp.StandardCheckpointer().restore(path / "params", target)
    if dtype is not None:
        restored = jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, restored)
    nnx.replace_by_pure_dict(params, restored)
    saved_rngs = None
    if (path / "rng_state").exists():
        target = jax.eval_shape(_rng_key_data, nnx.to_pure_dict(rng_state))
        saved_rngs = ocp.StandardCheckpointer().restore(path / "rng_state", target)
    rng_state = _materialize_rng_state(rng_state, saved_rngs)
    if mesh is not None:  # on the mesh too, so the model's inputs to jit match a freshly built one's
        rng_state = jax.device_put(rng_state, state_shardings(rng_state, mesh))
    return nnx.merge(graphdef, params, rng_state)


def load_flat_params(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of a checkpoint as ``{"a.b.0.c": numpy array}`` (for exporters)."""
    import orbax.checkpoint as ocp

    from x2sam_jax.conversion import flatten

    restored = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params")
    return {k: np.asarray(v) for k, v in flatten(restored).items()}
