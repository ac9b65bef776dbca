"""The RNG streams of NNX models: typed keys as stored data, and fresh streams per path.

A model's RNG state (dropout, the region sampler) is a tree of typed PRNG keys and counters.
Checkpoints store the keys as their uint32 data (:func:`key_data`); training and restores give every
stream its own key with :func:`reseed_rngs`.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx


def is_key(x) -> bool:
    """Whether ``x`` (an array or ShapeDtypeStruct) holds typed PRNG keys."""
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(tree):
    """Typed PRNG keys -> their uint32 key data (what Orbax stores); other leaves unchanged."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def reseed_rngs(rng_state: nnx.State, key: jax.Array) -> nnx.State:
    """Fresh RNG streams: every key variable gets its own key, derived from ``key`` and its path
    (split along the leading axes of stacked layers, so every layer draws differently), and every
    counter restarts at 0. Jittable; training calls it with a new key every step."""
    def fresh(path, value):
        if is_key(value):
            name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            return k if value.shape == () else jax.random.split(k, value.shape)
        return jnp.zeros(value.shape, value.dtype)

    return jax.tree_util.tree_map_with_path(fresh, rng_state)
