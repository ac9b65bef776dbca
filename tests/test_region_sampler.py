"""Region sampler: the point draw follows the official rand_sample_repeat, and the tokens equal
the official grid_sample + AvgPool1d given the same points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from x2sam_jax.models.region_sampler import region_tokens, sample_region_points

P = 16  # points per region in these tests (256 in the model)


def _masks():
    """Four 12x10 masks: large (> P pixels), small (< P), exactly P, and empty."""
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 12, 10), bool)
    masks[0, 2:9, 1:8] = rng.random((7, 7)) < 0.8
    masks[1, [1, 3, 3, 7, 11], [0, 4, 9, 2, 5]] = True
    masks[2].reshape(-1)[rng.choice(120, P, replace=False)] = True
    return masks


def _to_pixels(points, height, width):
    rows = np.rint(points[..., 0] * height).astype(int)
    cols = np.rint(points[..., 1] * width).astype(int)
    return rows, cols


def test_points_follow_rand_sample_repeat():
    masks = _masks()
    points, count = sample_region_points(jnp.asarray(masks), jax.random.key(0), P)
    points, count = np.asarray(points), np.asarray(count)
    np.testing.assert_array_equal(count, masks.reshape(4, -1).sum(-1))
    for r in range(3):
        rows, cols = _to_pixels(points[r], 12, 10)
        assert masks[r, rows, cols].all(), f"region {r}: a point lies outside its mask"
        nonzero = np.argwhere(masks[r])                       # row-major, like torch.nonzero
        pixels = rows * 10 + cols
        if count[r] > P:    # a random subset without repeats
            assert len(set(pixels)) == P
        else:               # all pixels in nonzero order, then repeats drawn from them
            np.testing.assert_array_equal(pixels[: count[r]], nonzero[:, 0] * 10 + nonzero[:, 1])
            assert set(pixels[count[r]:]) <= set(pixels[: count[r]])
    assert count[3] == 0


def test_points_are_random_per_key_and_deterministic_per_key():
    masks = jnp.asarray(_masks())
    a, _ = sample_region_points(masks, jax.random.key(0), P)
    b, _ = sample_region_points(masks, jax.random.key(0), P)
    c, _ = sample_region_points(masks, jax.random.key(1), P)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))    # the large mask is re-drawn
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(c[2]))  # exactly P: fixed order


def test_region_tokens_match_official_sampler_given_the_points():
    masks = _masks()
    rng = np.random.default_rng(2)
    batch_masks = np.stack([masks, masks[::-1]])                        # [B=2, R=4, H, W]
    fmap = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)           # extra_projector map
    region_valid = np.array([[True, True, True, True], [True, False, True, True]])
    key = jax.random.key(3)
    tokens, valid = jax.jit(lambda f, m, v: region_tokens(f, m, key, region_valid=v, num_points=P))(
        jnp.asarray(fmap.reshape(2, 16, 6)), jnp.asarray(batch_masks), jnp.asarray(region_valid))
    points, _ = sample_region_points(jnp.asarray(batch_masks), key, P)
    points = torch.from_numpy(np.array(points))                       # (row/H, col/W)

    pool = torch.nn.AvgPool1d(kernel_size=4)
    for b in range(2):
        feat = torch.from_numpy(fmap[b].reshape(16, 6))
        feat_map = feat.reshape(4, 4, 6).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
        # The official point_sample: grid_sample(input, 2 * p.flip(-1) - 1), align_corners=True.
        sampled = F.grid_sample(feat_map, (2.0 * points[b].flip(dims=(2,)) - 1.0).unsqueeze(2),
                                align_corners=True).squeeze(3).transpose(-2, -1)
        want = pool(sampled.transpose(-2, -1)).transpose(-2, -1).numpy()   # [R, P/4, D]
        for r in range(4):
            expected_valid = bool(region_valid[b, r] and batch_masks[b, r].any())
            assert bool(valid[b, r]) == expected_valid
            if expected_valid:
                err = np.abs(np.asarray(tokens[b, r]) - want[r]).max()
                print(f"region tokens b={b} r={r} max-abs {err:.2e}")
                assert err <= 1e-5
            else:
                assert not np.asarray(tokens[b, r]).any()
    assert tokens.shape == (2, 4, P // 4, 6)


def test_region_tokens_name_bad_shapes():
    with pytest.raises(ValueError, match="square grid"):
        region_tokens(jnp.zeros((1, 12, 4)), jnp.zeros((1, 1, 8, 8)), jax.random.key(0), num_points=P)
    with pytest.raises(ValueError, match="masks must be"):
        region_tokens(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 8, 8)), jax.random.key(0), num_points=P)
