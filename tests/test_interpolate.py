"""resize() against torch F.interpolate, and sine_position_embedding against transformers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from x2sam_jax.layers.interpolate import resize
from x2sam_jax.layers.position import sine_position_embedding

# Sizes cover up- and down-sampling, non-square, non-integer ratios, size 1 and identity.
SIZES = [((7, 7), (14, 14)), ((7, 7), (20, 13)), ((16, 12), (5, 9)), ((9, 11), (9, 11)),
         ((5, 6), (1, 1)), ((3, 8), (32, 3)), ((13, 17), (26, 34))]
TOL = 1e-5  # float32 rounding of weights / sum order; a wrong convention gives errors of O(0.1)


def _torch_resize(x_nhwc, size, method, align_corners):
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))
    kwargs = {} if method == "nearest" else {"align_corners": align_corners}
    out = F.interpolate(t, size=size, mode=method, **kwargs)
    return np.transpose(out.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("method,align_corners", [("bilinear", False), ("bilinear", True),
                                                  ("bicubic", False), ("bicubic", True),
                                                  ("nearest", False)])
@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_resize_matches_torch(method, align_corners, in_size, out_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *in_size, 3)).astype(np.float32)
    want = _torch_resize(x, out_size, method, align_corners)
    got = np.asarray(jax.jit(lambda a: resize(a, out_size, method=method,
                                              align_corners=align_corners))(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_resize_extra_leading_dims_and_bf16():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 5, 4)).astype(np.float32)
    want = _torch_resize(x.reshape(6, 6, 5, 4), (11, 7), "bicubic", False).reshape(2, 3, 11, 7, 4)
    got = resize(jnp.asarray(x), (11, 7), method="bicubic")
    assert np.abs(np.asarray(got) - want).max() < TOL
    got_bf16 = resize(jnp.asarray(x, jnp.bfloat16), (11, 7), method="bicubic")
    assert got_bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got_bf16, np.float32) - want).max() < 0.1


def test_resize_rejects_bad_arguments():
    x = jnp.zeros((4, 4, 1))
    with pytest.raises(ValueError, match="unknown method"):
        resize(x, (2, 2), method="area")
    with pytest.raises(ValueError, match="align_corners"):
        resize(x, (2, 2), method="nearest", align_corners=True)


@pytest.mark.parametrize("height,width,feats", [(8, 8, 64), (5, 12, 16), (64, 32, 128)])
def test_sine_position_matches_transformers(height, width, feats):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding
    from transformers.models.sam2.modeling_sam2 import Sam2SinePositionEmbedding

    for cls in (Sam2SinePositionEmbedding, Mask2FormerSinePositionEmbedding):
        ref = cls(num_position_features=feats, normalize=True)(
            torch.Size((1, 3, height, width)), "cpu", torch.float32)
        want = ref[0].permute(1, 2, 0).numpy()
        got = np.asarray(sine_position_embedding(height, width, feats))
        assert got.shape == (height, width, 2 * feats)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Unnormalised variant.
    ref = Sam2SinePositionEmbedding(num_position_features=feats, normalize=False)(
        torch.Size((1, 3, height, width)), "cpu", torch.float32)
    got = np.asarray(sine_position_embedding(height, width, feats, normalize=False))
    np.testing.assert_allclose(got, ref[0].permute(1, 2, 0).numpy(), atol=1e-5, rtol=0)


def test_sine_position_with_mask_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

    mask = np.ones((2, 6, 9), np.int64)
    mask[0, 4:, :] = 0
    mask[1, :, 5:] = 0
    ref = Mask2FormerSinePositionEmbedding(num_position_features=32, normalize=True)(
        torch.Size((2, 3, 6, 9)), "cpu", torch.float32, mask=torch.from_numpy(mask))
    got = np.asarray(sine_position_embedding(6, 9, 32, mask=jnp.asarray(mask)))
    assert got.shape == (2, 6, 9, 64)
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
