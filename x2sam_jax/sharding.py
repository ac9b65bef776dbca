"""Device mesh and the one table that maps logical parameter/activation axes to mesh axes.

Model code only names logical axes (``nnx.with_partitioning(init, ("embed", "mlp"))``); this
module decides where they live. Mesh axes are ``("data", "fsdp", "tensor")``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
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
    ("lora_rank", None),
    ("conv_in", None),           # conv kernels of the vision/segmentation branches are small
    ("conv_out", "tensor"),
    ("kernel_h", None),
    ("kernel_w", None),
    ("kernel_t", None),
    ("norm", None),
    ("queries", None),
    ("position", None),
    ("length", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh; one size may be -1 (all remaining devices)."""
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
    return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_to_mesh(logical: Sequence[str | None] | None, mesh: Mesh | None = None,
                    rules=LOGICAL_AXIS_RULES) -> P:
    """Maps a tuple of logical axis names to a PartitionSpec.

    A mesh axis is used at most once per spec; axes of size 1 (or absent from ``mesh``) are
    dropped so the same rules work on any mesh shape.
    """
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule in LOGICAL_AXIS_RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def activation_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec of an activation of ``shape`` named ``logical_axes`` on ``mesh``; a
    dimension the mesh axes do not divide is left unsharded."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape {tuple(shape)}")
    spec = logical_to_mesh(logical_axes, mesh, rules)
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
        fixed.append(axes if dim % size == 0 else None)
    return P(*fixed)


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


def _logical_names(variable) -> tuple | None:
    meta = variable.get_metadata() if isinstance(variable, nnx.Variable) else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for every leaf of an NNX state, from the logical names in its metadata.

    A dimension whose size the mesh axis does not divide is replicated instead.
    """

    def one(variable):
        names = _logical_names(variable)
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        spec = logical_to_mesh(names, mesh, rules) if names else P()
        shape = getattr(value, "shape", ())
        fixed = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            fixed.append(axes if size and dim % size == 0 else None)
        return variable.replace(NamedSharding(mesh, P(*fixed))) if isinstance(variable, nnx.Variable) \
            else NamedSharding(mesh, P(*fixed))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def shard_module(module: nnx.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.Module:
    """Moves an existing module's state onto ``mesh`` following its logical names (in place)."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module


def compiler_options(fast_compile: bool | None) -> dict | None:
    """XLA compiler options. ``fast_compile=None`` turns the LLVM backend optimisation off on
    CPU only: compiles take ~2x less time (an initialiser ~3x) and steps run up to 2x slower,
    a good trade for jobs that compile a few programs and run few steps (the main job, tests). Other
    platforms keep XLA's defaults unless ``fast_compile`` is True."""
    if fast_compile is None:
        fast_compile = jax.devices()[0].platform == "cpu"
    return {"xla_backend_optimization_level": 0} if fast_compile else None
