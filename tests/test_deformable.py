"""grid_sample and multi-scale deformable attention against torch / transformers (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from x2sam_jax.layers.deformable import grid_sample, ms_deform_attn

from _tolerance import GRADIENT_ULPS, assert_equal_up_to_reordering

TOL = 1e-5  # max-abs, float32, values ~N(0, 1)


@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_matches_torch_including_out_of_bounds(align_corners):
    rng = np.random.default_rng(0)
    value = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    # Points well outside [-1, 1] exercise the zero padding; some sit exactly on borders.
    grid = rng.uniform(-1.3, 1.3, size=(2, 4, 6, 2)).astype(np.float32)
    grid[0, 0, :3] = [[-1, -1], [1, 1], [0, 0]]
    expected = F.grid_sample(torch.from_numpy(value).permute(0, 3, 1, 2), torch.from_numpy(grid),
                             mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    expected = expected.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda v, g: grid_sample(v, g, align_corners=align_corners))(value, grid))
    assert got.shape == expected.shape == (2, 4, 6, 3)
    err = np.abs(got - expected).max()
    print(f"grid_sample align_corners={align_corners} max-abs {err:.2e}")
    assert err <= TOL, err
    # Outside points really are (partially) zero: the result is not just a clamped lookup.
    far = np.abs(grid).max(-1) > 1.2
    assert far.any() and np.abs(got[far]).max() < np.abs(value).max()


def test_grid_sample_at_pixel_centres_returns_pixels():
    value = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    ys, xs = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    # align_corners=False: pixel j's centre is at (2j + 1) / size - 1.
    grid = np.stack([(2 * xs + 1) / 4 - 1, (2 * ys + 1) / 3 - 1], -1).astype(np.float32)
    got = np.asarray(grid_sample(value, np.stack([grid, grid])))
    np.testing.assert_allclose(got, value, atol=1e-5)


def test_ms_deform_attn_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    rng = np.random.default_rng(1)
    shapes = ((6, 5), (3, 4), (2, 2))
    batch, queries, heads, head_dim, points = 2, 11, 4, 8, 3
    seq = sum(h * w for h, w in shapes)
    value = rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32)
    locations = rng.uniform(-0.15, 1.15, size=(batch, queries, heads, len(shapes), points, 2)).astype(np.float32)
    logits = rng.normal(size=(batch, queries, heads, len(shapes) * points)).astype(np.float32)
    weights = torch.softmax(torch.from_numpy(logits), -1).reshape(batch, queries, heads, len(shapes), points)
    expected = multi_scale_deformable_attention(torch.from_numpy(value), list(shapes),
                                                torch.from_numpy(locations), weights).numpy()
    got = np.asarray(jax.jit(ms_deform_attn, static_argnums=1)(value, shapes, locations, weights.numpy()))
    assert got.shape == expected.shape == (batch, queries, heads * head_dim)
    err = np.abs(got - expected).max()
    print(f"ms_deform_attn max-abs {err:.2e}")
    assert err <= TOL, err


def test_ms_deform_attn_rejects_mismatched_shapes():
    value = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, ((3, 3),), jnp.zeros((1, 5, 2, 1, 2, 2)), jnp.zeros((1, 5, 2, 1, 2)))


def test_query_chunks_give_the_same_values_and_gradients():
    rng = np.random.default_rng(2)
    shapes = ((4, 3), (2, 2))
    value = rng.normal(size=(1, 16, 2, 4)).astype(np.float32)
    locations = rng.uniform(0, 1, size=(1, 10, 2, 2, 3, 2)).astype(np.float32)
    weights = rng.uniform(0, 1, size=(1, 10, 2, 2, 3)).astype(np.float32)

    def loss(v, loc, w, chunk):
        out = ms_deform_attn(v, shapes, loc, w, query_chunk_size=chunk)
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (gv, gl, gw), full = grad(value, locations, weights, None)
    (cv, cl, cw), chunked = grad(value, locations, weights, 4)   # 10 queries -> 3 chunks, 2 padded
    assert_equal_up_to_reordering(chunked, full, what="output")
    for name, a, b in (("value", cv, gv), ("locations", cl, gl), ("weights", cw, gw)):
        assert_equal_up_to_reordering(a, b, ulps=GRADIENT_ULPS, what=f"gradient of {name}")
    assert np.abs(np.asarray(gl)).max() > 0  # locations do receive gradients
