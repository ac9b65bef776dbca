"""Projectors: the official pixel-shuffle channel order and the two MLPs against torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from x2sam_jax.config import ProjectorConfig
from x2sam_jax.models.projectors import ExtraProjector, MLMProjector, pixel_shuffle

TOL = 1e-5


def _torch_pixel_shuffle(x, scale_factor=0.5):
    """The official x2sam.model.utils.pixel_shuffle (channels-last), step by step."""
    b, h, w, c = x.size()
    x = x.reshape(b, h, int(w * scale_factor), int(c // scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(w * scale_factor), int(h * scale_factor), int(c // (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def _torch_mlp(kernel_in, bias_in, kernel_out, bias_out):
    mlp = torch.nn.Sequential(torch.nn.Linear(*kernel_in.shape), torch.nn.GELU(),
                              torch.nn.Linear(*kernel_out.shape))
    with torch.no_grad():
        mlp[0].weight.copy_(torch.from_numpy(np.array(kernel_in).T.copy()))
        mlp[0].bias.copy_(torch.from_numpy(np.array(bias_in)))
        mlp[2].weight.copy_(torch.from_numpy(np.array(kernel_out).T.copy()))
        mlp[2].bias.copy_(torch.from_numpy(np.array(bias_out)))
    return mlp


def _randomise_biases(module, seed):
    rng = np.random.default_rng(seed)
    for layer in (module.fc1, module.fc2):
        layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape), jnp.float32)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 8, 8, 5)])
def test_pixel_shuffle_matches_official_channel_order(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = _torch_pixel_shuffle(torch.from_numpy(x)).numpy()
    got = np.asarray(pixel_shuffle(jnp.asarray(x)))
    assert got.shape == (shape[0], shape[1] // 2, shape[2] // 2, 4 * shape[3])
    np.testing.assert_array_equal(got, want)  # a pure permutation: exact
    # The order is (dy, dx, c): channel C..2C-1 of cell (0,0) is pixel (0, 1).
    c = shape[3]
    np.testing.assert_array_equal(got[0, 0, 0, c:2 * c], x[0, 0, 1])
    np.testing.assert_array_equal(got[0, 0, 0, 2 * c:3 * c], x[0, 1, 0])


def test_pixel_shuffle_rejects_odd_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(jnp.zeros((1, 5, 4, 3)))


def test_extra_projector_matches_torch():
    cfg = ProjectorConfig(llm_hidden_size=24, mask_encoder_channels=6)
    module = ExtraProjector(cfg, rngs=nnx.Rngs(0))
    _randomise_biases(module, 1)
    assert module.fc1.kernel.shape == (24, 24)        # 4 x 6 shuffled channels -> 24
    x = np.random.default_rng(2).normal(size=(2, 8, 6, 6)).astype(np.float32)
    mlp = _torch_mlp(module.fc1.kernel[...], module.fc1.bias[...], module.fc2.kernel[...], module.fc2.bias[...])
    with torch.no_grad():
        shuffled = _torch_pixel_shuffle(torch.from_numpy(x))
        want = mlp(shuffled.reshape(2, -1, shuffled.shape[-1])).numpy()
    got = np.asarray(module(jnp.asarray(x)))
    assert got.shape == (2, 12, 24)
    print(f"extra projector max-abs {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= TOL


def test_extra_projector_names_bad_input():
    module = ExtraProjector(ProjectorConfig(llm_hidden_size=8, mask_encoder_channels=6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 6\]"):
        module(jnp.zeros((1, 4, 4, 5)))


def test_mlm_projector_matches_torch():
    cfg = ProjectorConfig(llm_hidden_size=20, decoder_hidden_size=12)
    module = MLMProjector(cfg, rngs=nnx.Rngs(0))
    _randomise_biases(module, 3)
    x = np.random.default_rng(4).normal(size=(3, 7, 20)).astype(np.float32)
    mlp = _torch_mlp(module.fc1.kernel[...], module.fc1.bias[...], module.fc2.kernel[...], module.fc2.bias[...])
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    got = np.asarray(module(jnp.asarray(x)))
    assert got.shape == (3, 7, 12)
    print(f"mlm projector max-abs {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= TOL
