"""Minimal reproduction: a wrong gradient from XLA's SPMD partitioner on a mesh whose three axes
are all > 1 (jax/jaxlib 0.10.2, CPU, 8 simulated devices).

    f(k0, k1, k2, x) = sum(w * (tanh(tanh(x @ k0) @ k1) @ k2))

with the kernels sharded (fsdp, tensor), the batch over (data, fsdp), on a (data, fsdp, tensor) =
(2, 2, 2) mesh. The forward is right; grad w.r.t. k0 is not:

- GSPMD, shardings propagated from the inputs: right (~4e-7 relative to the largest entry);
- GSPMD with the activations constrained to P(("data", "fsdp"), "tensor"): off by O(1);
- Shardy (JAX's default), with or without the constraints: off by O(1).

The same program on (1, 4, 2), (2, 1, 4), (2, 4, 1) or (1, 8, 1) is right under both partitioners:
the bug needs data, fsdp and tensor all > 1. Nothing here breaks a tie: the function is smooth.
x2sam_jax works around it (``x2sam_jax.train.step.activation_constraints_safe`` and
``config.partitioner = "gspmd"``); tests/test_train_step.py runs this file.

Run: python scripts/repro_three_axis_gradient.py  -> one line per variant: name, relative error.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def gradient(mesh, constrain: bool, w):
    def constrained(a):
        spec = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
        return jax.lax.with_sharding_constraint(a, spec) if constrain else a

    def f(k0, k1, k2, x):
        h = constrained(jnp.tanh(constrained(x @ k0)))
        h = constrained(jnp.tanh(h @ k1))
        return jnp.sum(w * (h @ k2))

    return jax.grad(f)


def main(shape=(2, 2, 2)):
    rng = np.random.default_rng(0)
    k0, k1, k2 = (rng.normal(size=(32, 32)).astype(np.float32) / 5 for _ in range(3))
    x = rng.normal(size=(64, 32)).astype(np.float32)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    want = np.asarray(jax.jit(gradient(mesh, False, w))(k0, k1, k2, x))      # one device: no partitioning
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(k0, P("fsdp", "tensor")), put(k1, P("fsdp", "tensor")), put(k2, P("fsdp", None)),
            put(x, P(("data", "fsdp"))))
    previous = jax.config.jax_use_shardy_partitioner
    try:
        for partitioner in ("gspmd", "shardy"):
            jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
            for constrain in (False, True):
                got = np.asarray(jax.jit(gradient(mesh, constrain, w)).lower(*args).compile()(*args))
                error = float(np.abs(got - want).max() / np.abs(want).max())
                print(f"{partitioner}_{'constrained' if constrain else 'propagated'} {error:.3g}")
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


if __name__ == "__main__":
    import sys

    main(tuple(int(s) for s in sys.argv[1].split("x")) if len(sys.argv) > 1 else (2, 2, 2))
