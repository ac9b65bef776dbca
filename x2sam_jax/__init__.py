"""x2sam_jax: X2SAM (any segmentation in images and videos) in JAX / Flax NNX."""

import flax

# Parameters carry logical sharding names as metadata; they are placed on a mesh explicitly
# (x2sam_jax.sharding), so modules can be built without an active mesh.
flax.config.update("flax_always_shard_variable", False)

from x2sam_jax.model_checkpoint import load, save  # noqa: E402

__all__ = ["load", "save"]
__version__ = "0.1.0"
