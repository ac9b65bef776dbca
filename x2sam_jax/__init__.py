"""x2sam_jax: X2SAM (any segmentation in images and videos) in JAX / Flax NNX."""

import flax

# Parameters carry logical sharding names as metadata; they are placed on a mesh explicitly
# (x2sam_jax.sharding), so modules can be built without an active mesh.
flax.config.update("flax_always_shard_variable", False)

from x2sam_jax.model_checkpoint import load, save  # noqa: E402

__all__ = ["load", "save", "load_tokenizer", "Predictor", "Prediction"]
__version__ = "0.1.0"

# Imported on first use: the predictor pulls in the data pipeline and the evaluation, and
# transformers loads slowly; `import x2sam_jax` stays as light as before.
_LAZY = {"Predictor": "x2sam_jax.predictor", "Prediction": "x2sam_jax.predictor",
         "load_tokenizer": "x2sam_jax.data.tokenizer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'x2sam_jax' has no attribute {name!r}")
