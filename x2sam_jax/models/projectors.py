"""The two MLP projectors of X2SAM (docs/architecture.md#projectors).

``MLMProjector``: LLM hidden states -> mask-decoder width (Linear, GELU, Linear), used for the
``<SEG>`` state and the ``<p>...</p>`` condition embeddings.
``ExtraProjector``: the SAM2 stage-3 trunk map -> LLM width, after a 0.5 pixel shuffle; its
output is what the region sampler reads.

Parameter paths: ``fc1`` / ``fc2`` are the official ``model.0`` / ``model.2`` (index 1 of the
torch ``nn.Sequential`` is the GELU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from x2sam_jax.config import ProjectorConfig


def pixel_shuffle(x: jax.Array, scale_factor: float = 0.5) -> jax.Array:
    """Space-to-depth of the official ``pixel_shuffle`` (channels-last).

    [B, H, W, C] -> [B, H*s, W*s, C/s²]. For s = 0.5 the output channel index is
    (dy, dx, c) row-major: out[b, i, j, (2*dy + dx)*C + c] = x[b, 2i+dy, 2j+dx, c], which is
    what the official reshape/permute sequence produces.
    """
    if x.ndim != 4:
        raise ValueError(f"pixel_shuffle expects [B, H, W, C], got shape {x.shape}")
    factor = round(1 / scale_factor)
    if abs(factor * scale_factor - 1) > 1e-9:
        raise ValueError(f"pixel_shuffle: 1/scale_factor must be an integer, got {scale_factor}")
    batch, height, width, channels = x.shape
    if height % factor or width % factor:
        raise ValueError(f"pixel_shuffle: spatial size {height}x{width} is not divisible by {factor}")
    x = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height // factor, width // factor, factor * factor * channels)


def _linear(in_features: int, out_features: int, names: tuple[str, str], rngs: nnx.Rngs,
            dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
                      rngs=rngs)


class _TwoLayerMLP(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = _linear(in_features, out_features, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.fc2 = _linear(out_features, out_features, ("mlp", "embed"), rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # torch ACT2FN["gelu"] is the exact (erf) GELU.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class MLMProjector(_TwoLayerMLP):
    """[..., llm_hidden_size] -> [..., decoder_hidden_size]."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        super().__init__(config.llm_hidden_size, config.decoder_hidden_size, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)


class ExtraProjector(_TwoLayerMLP):
    """Stage-3 map [B, H, W, C] -> tokens [B, H*W*r², llm_hidden_size] (row-major over the
    shuffled grid), r = downsample_ratio."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        factor = round(1 / config.downsample_ratio)
        super().__init__(config.mask_encoder_channels * factor * factor, config.llm_hidden_size,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.downsample_ratio = config.downsample_ratio
        self.in_channels = config.mask_encoder_channels

    def __call__(self, feature_map: jax.Array) -> jax.Array:
        if feature_map.ndim != 4 or feature_map.shape[-1] != self.in_channels:
            raise ValueError(f"ExtraProjector expects [B, H, W, {self.in_channels}], "
                             f"got shape {feature_map.shape}")
        x = feature_map
        if self.downsample_ratio != 1:
            x = pixel_shuffle(x, self.downsample_ratio)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return super().__call__(x)
