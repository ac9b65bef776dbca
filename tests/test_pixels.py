"""Pixels travel as uint8 and the encoders normalise them first thing (x2sam_jax.layers.pixels).

The device's normalisation of a collated uint8 batch must equal, bit for bit, the float32 batch the
host built before pixels travelled as uint8 (normalise with the processors' float32 ops, then pad
with 0.0): Qwen image and video patches and SAM frames with padding, in float32 and after the cast
to bfloat16 (which the host did with ml_dtypes, to nearest even as XLA's convert)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from x2sam_jax.data import transforms as tf
from x2sam_jax.data.batching import BucketConfig, Collator
from x2sam_jax.layers import pixels as px

QWEN = tf.QwenVisionPreprocessConfig(image_min_pixels=32 * 32, image_max_pixels=96 * 96,
                                     video_min_pixels=32 * 32, video_max_pixels=6 * 64 * 64)
SAM = tf.SamPreprocessConfig(size=64)
BUCKETS = BucketConfig(patch_counts=(256,), frames=(4,))


def host_normalize(image_uint8, mean, std):
    """(x * (1/255) - mean) / std in float32: the processors' ops, as the host computed them."""
    return ((image_uint8.astype(np.float32) * np.float32(1 / 255) - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


def _text(n=4):
    return {"input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32)}


def test_table_is_the_float32_arithmetic_for_every_value():
    levels = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)
    for mean, std in [(px.IMAGENET_MEAN, px.IMAGENET_STD), (px.QWEN_MEAN, px.QWEN_STD)]:
        np.testing.assert_array_equal(px.normalize_table(mean, std).T, host_normalize(levels, mean, std))


def test_qwen_patches_uint8_batch_equals_the_host_normalised_batch():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(100, 150), (31, 45)]]
    clip = rng.integers(0, 256, (5, 60, 80, 3), dtype=np.uint8)          # odd: the last frame repeats
    new, old = [], []
    for image in images:
        pixels, grid = tf.qwen_image_patches(image, QWEN)
        rh, rw = tf.smart_resize(*image.shape[:2], QWEN.factor, QWEN.image_min_pixels, QWEN.image_max_pixels)
        frame = host_normalize(np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC)), px.QWEN_MEAN,
                               px.QWEN_STD)
        new.append((pixels, grid))
        old.append(tf.patchify(np.repeat(frame[None], 2, 0), QWEN))
    pixels, grid = tf.qwen_video_patches(clip, QWEN)
    rh, rw = tf.video_smart_resize(5, 60, 80, QWEN.factor, 2, QWEN.video_min_pixels, QWEN.video_max_pixels)
    frames = host_normalize(tf.torch_bicubic_resize(clip, rh, rw), px.QWEN_MEAN, px.QWEN_STD)
    new.append((pixels, grid))
    old.append(tf.patchify(np.concatenate([frames, frames[-1:]]), QWEN))
    assert all(p.dtype == np.uint8 for p, _ in new)

    collate = Collator(BUCKETS)
    uint8 = collate([{**_text(), "pixel_values": p, "grid_thw": g[None]} for p, g in new])
    floats = collate([{**_text(), "pixel_values": p, "grid_thw": g[None]} for p, g in old])
    assert uint8["pixel_values"].dtype == np.uint8 and floats["pixel_values"].dtype == np.float32
    assert uint8["pixel_valid"].sum(1).min() < 256                       # padded rows in every sample
    np.testing.assert_array_equal(uint8["grid_thw"], floats["grid_thw"])
    _assert_device_equals_host(px.normalize_patches, uint8["pixel_values"], uint8["grid_thw"], floats["pixel_values"])


def _assert_device_equals_host(normalize, pixels, where, host):
    """The device normaliser on uint8 ``pixels`` equals the host-normalised float32 batch bit for
    bit, in float32 and in bfloat16 (the host batch rounded as XLA rounds)."""
    normalise = jax.jit(normalize, static_argnums=2)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = normalise(pixels, where, dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got), host.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16
                                                                    else np.float32))


def test_sam_frames_uint8_batch_equals_the_host_normalised_batch():
    rng = np.random.default_rng(1)
    samples = [[rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)],
               [rng.integers(0, 256, (90, 33, 3), dtype=np.uint8) for _ in range(3)]]
    new, old = [], []
    for frames in samples:
        pixels, sizes, canvases = [], [], []
        for image in frames:
            uint8, valid = tf.sam_image(image, SAM)
            rh, rw = tf.longest_side_shape(*image.shape[:2], SAM.size)
            canvas = np.zeros((SAM.size, SAM.size, 3), np.float32)        # normalised, then zero-padded
            canvas[:rh, :rw] = host_normalize(np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR)),
                                              px.IMAGENET_MEAN, px.IMAGENET_STD)
            pixels.append(uint8), sizes.append(valid), canvases.append(canvas)
        new.append({**_text(), "sam_pixel_values": np.stack(pixels), "sam_valid_hw": np.stack(sizes)})
        old.append({**_text(), "sam_pixel_values": np.stack(canvases), "sam_valid_hw": np.stack(sizes)})
    collate = Collator(BUCKETS, sam_size=SAM.size)
    uint8, floats = collate(new), collate(old)
    assert uint8["sam_pixel_values"].dtype == np.uint8 and uint8["sam_pixel_values"].shape == (2, 4, 64, 64, 3)
    assert uint8["sam_pixel_values"].nbytes * 4 == floats["sam_pixel_values"].nbytes
    assert (uint8["sam_valid_hw"] < SAM.size).any(-1)[:, :1].all()         # padded columns / rows in both
    _assert_device_equals_host(px.normalize_frames, uint8["sam_pixel_values"], uint8["sam_valid_hw"],
                               floats["sam_pixel_values"])


def test_float_pixels_pass_through_and_uint8_frames_need_their_sizes():
    floats = jnp.ones((2, 8, 8, 3), jnp.float32)
    assert px.normalize_frames(floats, None, jnp.bfloat16) is floats
    patches = jnp.ones((4, 12), jnp.float32)
    assert px.normalize_patches(patches, jnp.ones((1, 3), jnp.int32), jnp.bfloat16) is patches
    with pytest.raises(ValueError, match="sam_valid_hw"):
        px.normalize_frames(floats.astype(jnp.uint8), None, jnp.float32)


def test_collator_refuses_a_batch_that_mixes_uint8_and_float_pixels():
    features = [{**_text(), "pixel_values": np.zeros((4, 12), dtype), "grid_thw": np.array([[1, 2, 2]], np.int32)}
                for dtype in (np.uint8, np.float32)]
    with pytest.raises(ValueError, match="pixel_values of one batch mix dtypes"):
        Collator(BUCKETS, patch_dim=12)(features)
    assert Collator(BUCKETS, sam_size=SAM.size)([], batch_size=1)["sam_pixel_values"].dtype == np.uint8
