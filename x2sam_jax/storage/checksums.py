"""Checksums of arrays and verification of restored trees.

``array_checksum`` is the same for a numpy array and a jax.Array of any sharding, on one process or
many. Model directories (``x2sam_jax.model_checkpoint``) store ``tree_checksums`` of their
parameters in ``checksums.json``; training checkpoints (``x2sam_jax.train.run_checkpoint``) store
them beside each step. Both call :func:`verify_restored` after a restore, so a corrupt or edited
file is an error naming the array, never a silently different model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from x2sam_jax.storage.atomic import CheckpointError

CHECKSUM_ALGORITHM = "fmix32-sum-x2"    # recorded with the checksums: what array_checksum computes

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


def flat_tree(tree) -> dict[str, Any]:
    """{"a.b.0.c": leaf} of a pytree (nested dicts, nnx.State, ...)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): leaf
            for path, leaf in leaves}


def tree_checksums(tree) -> dict[str, dict[str, Any]]:
    """{"a.b.0.c": {"shape": [...], "dtype": "float32", "checksum": "..."}} for every array of
    ``tree``: what :func:`verify_restored` checks a restored copy against."""
    out = {}
    for path, leaf in sorted(flat_tree(tree).items()):
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


def raise_problems(where, headline: str, problems: list[str], limit: int = 20):
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
    found = flat_tree(restored)
    problems = layout_problems(flat_tree(target), found)
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
        raise_problems(where, "the restored arrays are not the ones saved for this model", problems)

