"""Test-wide settings: CPU, float32 matmuls at full precision (parity tests compare to torch)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import x2sam_jax  # noqa: E402,F401  (sets the flax config the models rely on)
