"""Device mesh and the one table that maps logical parameter/activation axes to mesh axes.

Model code only names logical axes (``nnx.with_partitioning(init, ("embed", "mlp"))``); this
module decides where they live. Mesh axes are ``("data", "fsdp", "tensor")``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The first matching
# mesh axis that is still free in a spec is used, as in MaxText's logical_axis_rules.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),            # the scan axis of stacked layers
    ("vocab", "tensor"),
    ("embed", "fsdp"),           # model width
    ("mlp", "tensor"),           # feed-forward hidden
    ("heads", "tensor"),         # attention heads x head_dim, flattened
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # LoRA B [rank, out] and A [in, rank] where `in` is mlp/heads: the rank takes fsdp, so both
    # shard under fsdp-only meshes (A of embed-wide inputs shards on embed).
    ("lora_rank", "fsdp"),
    ("conv_in", None),
    ("conv_out", ("tensor", "fsdp")),   # conv kernels [kh, kw, in, out]: out over tensor, then fsdp
    ("kernel_h", None),
    ("kernel_w", None),
    ("kernel_t", None),
    ("norm", None),
    ("queries", None),
    ("position", None),
    ("length", None),
    # activations only
    ("height", None),
    ("width", None),
    ("predictions", None),
)

# Logical layouts of the activations the models constrain (``constrain(x, TOKENS)``).
TOKENS = ("batch", "length", "embed")               # [B, L, D] sequences
MAPS = ("batch", "height", "width", "embed")        # [B, H, W, C] channels-last feature maps
QUERIES = ("batch", "queries", "embed")             # [B, Q, D] decoder queries


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, dcn_data: int = 1,
              dcn_fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default all): see :func:`device_grid`."""
    return Mesh(device_grid(data, fsdp, tensor, devices, dcn_data, dcn_fsdp), MESH_AXES)


def device_grid(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, dcn_data: int = 1,
                dcn_fsdp: int = 1) -> np.ndarray:
    """The [data, fsdp, tensor] array of devices of a mesh; one of data, fsdp, tensor may be -1 (all remaining
    devices). Devices are laid out by ``mesh_utils`` (the torus order on TPUs).

    ``dcn_data`` / ``dcn_fsdp`` > 1 make a hybrid mesh for several TPU slices or GPU hosts: the
    data (fsdp) axis is ``dcn_data`` (``dcn_fsdp``) groups joined by the data-centre network, each
    inside one slice (TPU ``slice_index``) or, where devices have no slice, one process; tensor
    always stays inside a group. E.g. 4 slices of 64 chips, data=4 fsdp=64 dcn_data=4."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {devices.size}")
    dcn = [dcn_data, dcn_fsdp, 1]
    if dcn == [1, 1, 1]:
        return mesh_utils.create_device_mesh(sizes, list(devices.flat), allow_split_physical_axes=True)
    if sizes[0] % dcn_data or sizes[1] % dcn_fsdp:
        raise ValueError(f"dcn_data={dcn_data} / dcn_fsdp={dcn_fsdp} must divide data={sizes[0]} / fsdp={sizes[1]}")
    inner = [size // d for size, d in zip(sizes, dcn)]
    by_process = len({getattr(d, "slice_index", 0) for d in devices.flat}) == 1     # GPU hosts: per process
    return mesh_utils.create_hybrid_device_mesh(inner, dcn, list(devices.flat), process_is_granule=by_process,
                                                allow_split_physical_axes=True)


def logical_to_mesh(logical: Sequence[str | None] | None, mesh: Mesh | None = None,
                    rules=LOGICAL_AXIS_RULES, shape: Sequence[int] | None = None) -> P:
    """Maps a tuple of logical axis names to a PartitionSpec.

    A mesh axis is used at most once per spec; axes of size 1 (or absent from ``mesh``) are
    dropped so the same rules work on any mesh shape. With ``shape`` (and ``mesh``), a
    dimension takes the longest prefix of its mesh axes whose sizes divide it, and the axes it
    cannot use stay free for the later dimensions (a conv kernel [kh, kw, 3, C] shards C).
    """
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for index, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule in LOGICAL_AXIS_RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        if shape is not None and mesh is not None:
            while keep and shape[index] % int(np.prod([mesh.shape[a] for a in keep])):
                keep = keep[:-1]
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def activation_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec of an activation of ``shape`` named ``logical_axes`` on ``mesh``; a
    dimension is split over the longest prefix of its mesh axes that divides it (a batch of 4
    on data=2 x fsdp=4 still splits over data)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape {tuple(shape)}")
    return logical_to_mesh(logical_axes, mesh, rules, shape)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """Constrains an activation's sharding by logical axis names (MaxText's
    ``nn.with_logical_constraint``), under the mesh made active with ``jax.set_mesh``.

    A no-op without an active mesh (single-device and eager code pay nothing). A dimension the
    mesh axes do not divide is left unconstrained. ``len(logical_axes)`` must equal ``x.ndim``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, logical_axes, mesh, rules))


def vocab_parallel_logits(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """``hidden [..., D] @ weight [D, V]`` with the vocabulary split over every device of the active
    mesh (Megatron's vocab-parallel head, over all mesh axes). Each device holds every position's
    hidden state (gathered: a chunk of positions is small) and V/N columns of the weight, so
    neither the whole weight nor its whole float32 gradient [D, V] is ever on one device: with
    the batch split instead, each device would form a full [D, V] partial gradient (1.5 GB at
    Qwen3-VL-4B's 151,672 x 2,560) before reducing it. V is padded to a multiple of the device
    count; padded columns hold the dtype's minimum (a softmax weight of 0). Returns [..., V_pad];
    V_pad == V and a plain product without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return hidden @ weight
    axes = tuple(name for name in mesh.axis_names if mesh.shape[name] > 1)
    devices = int(np.prod([mesh.shape[name] for name in axes], dtype=np.int64))
    vocab = weight.shape[1]
    pad = -vocab % devices
    columns = axes or None
    weight = jax.lax.with_sharding_constraint(jnp.pad(weight, ((0, 0), (0, pad))), P(None, columns))
    hidden = jax.lax.with_sharding_constraint(hidden, P())
    logits = jax.lax.with_sharding_constraint(hidden @ weight, P(*([None] * (hidden.ndim - 1)), columns))
    if pad:
        logits = jnp.where(jnp.arange(vocab + pad) < vocab, logits, jnp.finfo(logits.dtype).min)
    return logits


def _logical_names(variable) -> tuple | None:
    meta = variable.get_metadata() if isinstance(variable, nnx.Variable) else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for every leaf of an NNX state, from the logical names in its metadata.

    A dimension whose size its mesh axes do not divide is not split over them (they stay free
    for the other dimensions); :func:`replicated_report` lists the large arrays left whole on
    every device.
    """

    def one(variable):
        names = _logical_names(variable)
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        shape = tuple(getattr(value, "shape", ()))
        if names and len(names) != len(shape):
            raise ValueError(f"logical axes {tuple(names)} for an array of shape {shape}")
        spec = logical_to_mesh(names, mesh, rules, shape) if names else P()
        return variable.replace(NamedSharding(mesh, spec)) if isinstance(variable, nnx.Variable) \
            else NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_report(state: nnx.State, shardings, threshold_bytes: int = 1 << 20, *, label: str = "state",
                      log=None) -> list[tuple[str, tuple, int]]:
    """Lists (and logs as warnings) every array of ``state`` above ``threshold_bytes`` whose
    sharding replicates it on every device of a mesh with more than one device: its rules (or
    a dimension the mesh does not divide) leave it whole on each device, with its gradients and
    optimizer moments. Returns [(path, shape, bytes)]."""
    log = log or logging.getLogger("x2sam_jax.sharding").warning
    found = []
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, (nnx.Variable, NamedSharding)))
    for (path, leaf), sharding in zip(leaves, specs):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        if not hasattr(value, "shape") or sharding.mesh.size == 1:
            continue
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        if nbytes > threshold_bytes and sharding.is_fully_replicated:
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            name = name.removesuffix(".value").removesuffix(".raw_value")
            found.append((name, tuple(value.shape), nbytes))
    for name, shape, nbytes in found:
        log("%s: %s %s (%.1f MiB) is replicated on every device of the mesh", label, name, shape, nbytes / 2**20)
    return found


def create_sharded(make_module, mesh: Mesh, rules=LOGICAL_AXIS_RULES, compiler_options: dict | None = None):
    """Builds a module whose parameters are born sharded: eval_shape -> specs -> jit(out_shardings).

    ``compiler_options`` go to the initialiser's compile (e.g. {"xla_backend_optimization_level": 0}
    makes it compile ~3x faster on CPU; it runs once)."""
    abstract = nnx.eval_shape(make_module)
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules)

    create = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings,
                     compiler_options=compiler_options)
    with jax.set_mesh(mesh):
        state = create()
    return nnx.merge(graphdef, state)


def compiler_options(fast_compile: bool | None) -> dict | None:
    """XLA compiler options. ``fast_compile=None`` turns the LLVM backend optimisation off on
    CPU only: compiles take ~2x less time (an initialiser ~3x) and steps run up to 2x slower,
    a good trade for jobs that compile a few programs and run few steps (the main job, tests). Other
    platforms keep XLA's defaults unless ``fast_compile`` is True."""
    if fast_compile is None:
        fast_compile = jax.devices()[0].platform == "cpu"
    return {"xla_backend_optimization_level": 0} if fast_compile else None


# ------------------------------------------------------------------------------------- multi-process
def global_array(value, sharding) -> jax.Array:
    """A host value (the same on every process) as a global array with ``sharding``.

    Each process fills only its own devices' shards (``jax.make_array_from_callback``), so this
    works on a mesh spanning other processes' devices, where ``jax.device_put`` refuses a
    sharding that is not fully addressable. PRNG key arrays go through their key data."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = global_array(np.asarray(jax.random.key_data(value)), sharding)
        impl = jax.random.key_impl(value)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(value, sharding) -> jax.Array:
    """``value`` laid out as ``sharding``, valid in a multi-process run. Host values and
    process-local arrays (which every process must hold equal) become global arrays
    (:func:`global_array`); a global jax.Array already laid out so is returned as is, another one
    is resharded by a jitted copy (no trip through the host, no single-device gather)."""
    if not isinstance(value, jax.Array) or (value.is_fully_addressable and not sharding.is_fully_addressable):
        return global_array(value, sharding)   # host values, or local copies every process holds
    if value.sharding == sharding:
        return value
    if value.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.jit(lambda x: x, out_shardings=sharding)(value)
