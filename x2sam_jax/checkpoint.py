"""Orbax checkpoints of NNX models, with the architecture recorded in ``config.json``.

A checkpoint directory holds::

    config.json     {"model_type": ..., "config": {...}, "format_version": 1}
    params/         Orbax (StandardCheckpointer) tree of every non-RNG variable, stacked layers
                    stored with their leading ``layers`` axis
    checksums.json  shape, dtype and checksum of every array in params/, written with it
    rng_state/      Orbax tree of the RNG streams (key data, uint32) and their counters
    ...             anything else a converter copies in (tokenizer files, ...)

Writes are atomic: everything goes to a temporary sibling directory (``.NAME.tmp-PID-XXXXXXXX``)
that replaces the destination in one step at the end, so a failed or killed write never leaves
a directory that looks complete, and ``overwrite`` replaces only an x2sam_jax checkpoint.
Reads are verified: every stored array is compared with the model built from ``config.json``
(names, shapes, kinds of dtype) before it is read and with its checksum after, so an edited
config or a corrupt file is an error naming the parameter, never a silently different model.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import importlib
import json
import logging
import os
import re
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax import config as config_lib

FORMAT_VERSION = 1
CHECKSUMS_FILE = "checksums.json"
CHECKSUM_ALGORITHM = "fmix32-sum-x2"

logger = logging.getLogger("x2sam_jax.checkpoint")

# model_type -> ("module:Class" of the NNX model, "Class" of its config in x2sam_jax.config).
# Every model class is built as Class(config, rngs=nnx.Rngs(...)).
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "sam2_hiera": ("x2sam_jax.models.hiera:Sam2VisionEncoder", "HieraConfig"),
    "qwen3_vl": ("x2sam_jax.models.qwen3_vl:Qwen3VLModel", "Qwen3VLConfig"),
    "x2sam": ("x2sam_jax.models.x2sam:X2SAM", "X2SAMConfig"),
}


class CheckpointError(ValueError):
    """A checkpoint that is not the model it claims to hold, or a destination that must not be written."""


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
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return getattr(config_lib, MODEL_TYPES[model_type][1])


def read_json(file: str | Path) -> dict:
    """A JSON object from ``file``; a missing, unreadable or malformed file is an error naming it."""
    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not a JSON text file ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, found a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Destinations: checks before anything is read, atomic replacement, clean-up of killed runs
# ----------------------------------------------------------------------------------------------


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save` or a converter (the only kind of
    directory ``overwrite`` may replace)."""
    path = Path(path)
    try:
        meta = read_json(path / "config.json")
    except (OSError, ValueError):
        return False
    return "model_type" in meta and "format_version" in meta and (path / "params").is_dir()


def check_destination(dst: str | Path, *, overwrite: bool = False, sources: Sequence[str | Path] = (),
                      replaceable: Callable[[Path], bool] = is_checkpoint,
                      what: str = "an x2sam_jax checkpoint", directory: bool = True) -> Path:
    """Refuses a destination that must not be written, before any work is done.

    ``dst`` must not be, contain or lie inside one of ``sources``; an existing ``dst`` needs
    ``overwrite``, must be a directory (a file when ``directory=False``) and must be empty or
    satisfy ``replaceable`` (by default: an x2sam_jax checkpoint), so nothing else of the user's
    is replaced.
    Returns ``dst`` as an absolute path.
    """
    dst = Path(dst).absolute()
    target = dst.resolve()
    for source in sources:
        resolved = Path(source).resolve()
        if resolved == target:
            raise CheckpointError(f"destination {dst} is the source {source}: writing it would destroy the input")
        if resolved in target.parents:
            raise CheckpointError(f"destination {dst} lies inside the source {source}")
        if target in resolved.parents:
            raise CheckpointError(f"the source {source} lies inside the destination {dst}")
    if os.path.lexists(dst):
        kind = "directory" if directory else "file"
        if dst.is_dir() != directory:
            raise FileExistsError(f"destination {dst} exists and is not a {kind}")
        if not overwrite:
            raise FileExistsError(f"destination {dst} already exists (pass overwrite=True / --overwrite to replace it)")
        if not (replaceable(dst) or (directory and not any(dst.iterdir()))):
            raise CheckpointError(f"--overwrite replaces only {what}, and {dst} is not one; "
                                  "move it away or choose another destination")
    return dst


def _scratch_name(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _scratch_pattern(dst: Path) -> re.Pattern:
    # .NAME.tmp-PID-XXXXXXXX (a write in progress, or an old copy being deleted) and .NAME.old-...
    # (the old copy during a two-step swap); .NAME.tmp-XXXXXXXX is what earlier versions wrote.
    return re.compile(rf"\.{re.escape(dst.name)}\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{{8}}\Z")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_scratch(dst: str | Path) -> list[Path]:
    """Cleans up after earlier writes to ``dst`` that were killed: deletes their ``.tmp-`` folders
    and, when a kill fell between the two renames of a non-atomic swap (``dst`` missing), puts
    the old copy back. Only names of exactly our pattern whose process is gone are touched.
    Returns what was removed or restored."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return []
    pattern = _scratch_pattern(dst)
    touched = []
    for entry in sorted(dst.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or (match["pid"] and _alive(int(match["pid"]))):
            continue
        if match["kind"] == "old" and not os.path.lexists(dst):
            entry.rename(dst)
            logger.warning("restored %s from %s (an interrupted overwrite)", dst, entry.name)
        else:
            _remove(entry)
        touched.append(entry)
    return touched


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_atomically(new: Path, dst: Path) -> None:
    """Moves ``new`` to ``dst``. An existing ``dst`` is swapped with ``new`` in one step (so a
    kill at any moment leaves the old or the new one at ``dst``) and then deleted; where the
    filesystem cannot swap, it is renamed aside first and :func:`remove_stale_scratch` restores
    it if a kill falls between the two renames."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if _exchange(new, dst):
        _remove(new)             # ``new`` now names the old copy
        return
    aside = new.with_name(new.name.replace(".tmp-", ".old-", 1))
    os.rename(dst, aside)
    os.rename(new, dst)
    _remove(aside)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p ``directory``; returns the directories it created, deepest last."""
    missing = []
    for parent in [directory, *directory.parents]:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False, *, sources: Sequence[str | Path] = (),
                     replaceable: Callable[[Path], bool] = is_checkpoint,
                     what: str = "an x2sam_jax checkpoint") -> Iterator[Path]:
    """Yields a temporary directory that replaces ``dst`` only if the block succeeds.

    Enter it before reading any input: the destination is checked first (see
    :func:`check_destination`), stale scratch of killed runs is cleaned, and creating the
    temporary directory proves the location writable. On failure nothing is left behind (not
    even parent directories it created); on success the swap is atomic (:func:`replace_atomically`).
    """
    dst = check_destination(dst, overwrite=overwrite, sources=sources, replaceable=replaceable, what=what)
    remove_stale_scratch(dst)
    created = []
    tmp = _scratch_name(dst, "tmp")
    try:
        created = _make_parents(dst.parent)
        tmp.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise type(error)(error.errno, f"cannot write the destination {dst}: {error.strerror}") from None
    try:
        yield tmp
        if os.path.lexists(dst):  # it may have appeared while we worked
            check_destination(dst, overwrite=overwrite, replaceable=replaceable, what=what)
        replace_atomically(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | Path, overwrite: bool = False, *, sources: Sequence[str | Path] = (),
                replaceable: Callable[[Path], bool] = lambda path: False, what: str = "a file") -> Iterator[Path]:
    """:func:`atomic_directory` for a single file: yields a temporary path renamed onto ``dst``
    (``os.replace``, atomic) when the block succeeds."""
    dst = check_destination(dst, overwrite=overwrite, sources=sources, replaceable=replaceable, what=what,
                            directory=False)
    remove_stale_scratch(dst)
    created = []
    tmp = _scratch_name(dst, "tmp")
    try:
        created = _make_parents(dst.parent)
        tmp.touch()
    except OSError as error:
        _remove_empty(created)
        raise type(error)(error.errno, f"cannot write the destination {dst}: {error.strerror}") from None
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            tmp.unlink()
        _remove_empty(created)
        raise


def _remove_empty(directories: list[Path]) -> None:
    for path in reversed(directories):
        with contextlib.suppress(OSError):
            path.rmdir()


# ----------------------------------------------------------------------------------------------
# Checksums and verification of restored arrays (model checkpoints here; training checkpoints
# store tree_checksums(state) beside their state and call verify_restored after a restore)
# ----------------------------------------------------------------------------------------------

_CHUNK, _SMALL_CHUNK = 1 << 20, 1 << 12
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(x):
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit over the word."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _mixed_sums(words, index, count):
    """Two independent sums (mod 2^32) of fmix32(word ^ fmix32(position ^ seed)) over the first
    ``count`` entries. Sums do not depend on the order (shards, chunks); any change of one word
    changes each sum, two changes cancel with probability ~2^-32 per sum."""
    valid = jnp.arange(words.shape[0]) < count
    sums = [jnp.where(valid, _fmix32(words ^ _fmix32(index ^ jnp.uint32(seed))), jnp.uint32(0)).sum(dtype=jnp.uint32)
            for seed in _SEEDS]
    return jnp.stack(sums)


@jax.jit
def _digest_range(words, start, count):        # positions start, start + 1, ... (made on device)
    return _mixed_sums(words, start + jnp.arange(words.shape[0], dtype=jnp.uint32), count)


@jax.jit
def _digest_indexed(words, index, count):      # positions given (a shard of a larger array)
    return _mixed_sums(words, index, count)


def _words(array: np.ndarray) -> np.ndarray:
    """The bytes of ``array`` (C order) as 1-D unsigned words of its item size (8-byte items as two
    32-bit words)."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}.get(array.dtype.itemsize)
    if width is None:
        raise TypeError(f"no checksum for arrays of dtype {array.dtype}")
    return array.reshape(-1).view(width)


def _digest(words: np.ndarray, index: np.ndarray | None = None) -> tuple[int, int]:
    """(sum0, sum1) of :func:`_mixed_sums` over all words; ``index`` = each word's position in the
    whole array (default: 0, 1, 2, ...)."""
    totals = [0, 0]
    for start in range(0, max(words.size, 1), _CHUNK):
        count = min(_CHUNK, words.size - start)
        size = _SMALL_CHUNK if count <= _SMALL_CHUNK else _CHUNK   # two compiled programs in all
        chunk = np.zeros(size, np.uint32)
        chunk[:count] = words[start:start + count]
        if index is None:
            sums = np.asarray(_digest_range(chunk, np.uint32(start % 2**32), count))
        else:
            positions = np.zeros(size, np.uint32)
            positions[:count] = index[start:start + count]
            sums = np.asarray(_digest_indexed(chunk, positions, count))
        totals = [(t + int(s)) % 2**32 for t, s in zip(totals, sums)]
    return totals[0], totals[1]


def _sharded_digest(array: jax.Array) -> tuple[int, int]:
    """:func:`_digest` of an array spread over processes: each process sums the shards it holds
    (one replica of each), with every word's position in the whole array, then sums are added
    across processes."""
    from jax.experimental import multihost_utils

    totals = [0, 0]
    strides = np.cumprod((array.shape[1:] + (1,))[::-1])[::-1]       # elements, C order
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        block = np.asarray(shard.data)
        index = np.zeros(block.shape, np.uint32)
        for axis, (part, stride) in enumerate(zip(shard.index, strides)):
            offset = (np.arange(block.shape[axis], dtype=np.uint64) + (part.start or 0)) * np.uint64(stride)
            shape = [1] * block.ndim
            shape[axis] = -1
            index = index + (offset % 2**32).astype(np.uint32).reshape(shape)
        words = _words(block)
        per_item = words.size // max(block.size, 1)
        index = (index.reshape(-1, 1) * np.uint32(per_item) + np.arange(per_item, dtype=np.uint32)).reshape(-1)
        for t, s in enumerate(_digest(words, index)):
            totals[t] = (totals[t] + s) % 2**32
    gathered = multihost_utils.process_allgather(np.asarray(totals, np.uint32))
    return tuple(int(np.asarray(gathered, np.uint64).reshape(-1, 2)[:, t].sum() % 2**32) for t in range(2))


def _checksum_dtype(array) -> tuple[Any, str]:
    """(array with plain dtype, dtype name); PRNG key arrays are checksummed through their data."""
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(array), str(array.dtype)
    return array, str(np.dtype(array.dtype))


def array_checksum(array) -> str:
    """A 64-bit checksum (16 hex digits) of an array's shape-free contents in its own dtype.

    The same for a numpy array and a jax.Array of any sharding, on one process or many.
    """
    array, _ = _checksum_dtype(array)
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        sums = _sharded_digest(array)
    else:
        sums = _digest(_words(np.asarray(array)))
    return f"{sums[0]:08x}{sums[1]:08x}"


def _flat(tree) -> dict[str, Any]:
    """{"a.b.0.c": leaf} of a pytree (nested dicts, nnx.State, ...)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): leaf
            for path, leaf in leaves}


def tree_checksums(tree) -> dict[str, dict[str, Any]]:
    """{"a.b.0.c": {"shape": [...], "dtype": "float32", "checksum": "..."}} for every array of
    ``tree``: what :func:`verify_restored` checks a restored copy against."""
    out = {}
    for path, leaf in sorted(_flat(tree).items()):
        _, dtype = _checksum_dtype(leaf)
        out[path] = {"shape": list(leaf.shape), "dtype": dtype, "checksum": array_checksum(leaf)}
    return out


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def layout_problems(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Differences between two flat {path: array-like} trees: missing and unexpected entries,
    other shapes, a float where an integer is expected or the other way round."""
    problems = [f"{path}: missing (the model has {tuple(expected[path].shape)})"
                for path in sorted(set(expected) - set(found))]
    problems += [f"{path}: not a parameter of the model (stored {tuple(found[path].shape)})"
                 for path in sorted(set(found) - set(expected))]
    for path in sorted(set(expected) & set(found)):
        want, got = expected[path], found[path]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{path}: stored shape {tuple(got.shape)}, the model has {tuple(want.shape)}")
        elif _is_float(want.dtype) != _is_float(got.dtype):
            problems.append(f"{path}: stored dtype {got.dtype}, the model has {want.dtype}")
    return problems


def _raise(where, headline: str, problems: list[str], limit: int = 20):
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    raise CheckpointError(f"{where}: {headline}:\n  " + "\n  ".join(shown))


def verify_restored(target, restored, checksums: dict[str, dict] | None, *, where: str | Path = "checkpoint") -> None:
    """Checks a restored tree before it is used.

    Args:
      target: the tree it must match (e.g. the abstract model's state, ShapeDtypeStruct leaves):
        the same paths, shapes and kinds of dtype (float vs. integer).
      restored: the restored arrays.
      checksums: :func:`tree_checksums` of the tree as it was saved, or None (nothing recorded):
        every restored array must have the recorded dtype and checksum. Entries for arrays that
        were not restored are ignored (a partial restore).
      where: named in the error (the checkpoint directory).

    Raises:
      CheckpointError naming every parameter that differs.
    """
    found = _flat(restored)
    problems = layout_problems(_flat(target), found)
    if checksums is not None:
        for path, array in sorted(found.items()):
            record = checksums.get(path)
            _, dtype = _checksum_dtype(array)
            if record is None:
                problems.append(f"{path}: no checksum was recorded for it")
            elif dtype != record["dtype"] or list(array.shape) != list(record["shape"]):
                problems.append(f"{path}: restored as {dtype}{tuple(array.shape)}, saved as "
                                f"{record['dtype']}{tuple(record['shape'])}")
            elif array_checksum(array) != record["checksum"]:
                problems.append(f"{path}: checksum mismatch (the stored data is corrupt or changed since it was saved)")
    if problems:
        _raise(where, "the restored arrays are not the ones saved for this model", problems)


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
    import orbax.checkpoint as ocp

    params = Path(directory) / "params"
    if not params.is_dir():
        raise CheckpointError(f"{params}: not found (an x2sam_jax checkpoint holds its arrays there)")
    try:
        tree = ocp.StandardCheckpointer().metadata(params).item_metadata.tree
    except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many types for a damaged tree
        raise CheckpointError(f"{params}: cannot read the Orbax metadata ({error})") from error
    return {path: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype) for path, leaf in _flat(tree).items()}


def restore_params(directory: str | Path, target) -> Any:
    """Restores ``directory/params`` into ``target`` and verifies it.

    ``target`` is a tree of ShapeDtypeStructs (the abstract model); leaves with a sharding are
    restored into it, the others onto the default device (jax Arrays, never numpy). Names and
    shapes are compared with the stored metadata before any data is read; after the read, every
    array is checked against checksums.json. Arrays come back in the target's dtypes.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    stored = stored_arrays(directory)
    problems = layout_problems(_flat(target), stored)
    if problems:
        _raise(directory, "the stored arrays do not match the model built from its config.json", problems)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])   # this process's, on any process
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = list(_flat(target))
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
    import orbax.checkpoint as ocp

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
    rng_state = _rng_key_data(nnx.to_pure_dict(nnx.state(model, nnx.RngState)))
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
    import typing

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
        raise FileNotFoundError(f"{file} not found: {path} is not an x2sam_jax checkpoint")
    meta = read_json(file)
    if "model_type" not in meta or "config" not in meta:
        raise CheckpointError(f"{file}: expected keys 'model_type' and 'config'")
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

    Every array is verified against the model built from ``config.json`` and against its
    recorded checksum (:func:`restore_params`); a mismatch is a :class:`CheckpointError`.

    Args:
      path: the checkpoint directory.
      mesh: optional ``jax.sharding.Mesh``; parameters are restored directly into their
        sharded layout (logical names -> ``x2sam_jax.sharding`` rules). Without one they go to
        the default device.
      dtype: optional floating dtype to cast parameters to (e.g. ``jnp.bfloat16``).
      **config_overrides: config fields that do not change parameter shapes (e.g. ``scan_layers``).
    """
    path = Path(path).absolute()
    config = read_config(path)
    abstract = abstract_model(config, **config_overrides)
    graphdef, params, rng_state = nnx.split(abstract, nnx.Not(nnx.RngState), ...)
    if mesh is not None:
        from x2sam_jax.sharding import state_shardings

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
        import orbax.checkpoint as ocp

        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                              jax.eval_shape(_rng_key_data, nnx.to_pure_dict(rng_state)))
        saved_rngs = ocp.StandardCheckpointer().restore(path / "rng_state", target)
    rng_state = _materialize_rng_state(rng_state, saved_rngs)
    if mesh is not None:  # on the mesh too, so the model's inputs to jit match a freshly built one's
        from x2sam_jax.sharding import place   # valid on a mesh spanning several processes

        rng_state = jax.tree.map(place, rng_state, state_shardings(rng_state, mesh))
    return nnx.merge(graphdef, params, rng_state)


def load_flat_params(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of a checkpoint as ``{"a.b.0.c": numpy array}`` in their stored dtypes
    (for exporters), verified against the recorded checksums."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    stored = stored_arrays(path)
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params")
    except Exception as error:  # noqa: BLE001 - name the checkpoint whatever TensorStore raises
        raise CheckpointError(f"{path / 'params'}: cannot be read ({error})") from error
    flat = {k: np.asarray(v) for k, v in _flat(restored).items()}
    verify_restored(stored, flat, read_checksums(path), where=path)
    return flat
