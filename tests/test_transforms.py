"""Preprocessing equality against transformers' processors, mask grids, clips, image decoding."""

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, SamImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize

from x2sam_jax.data import clips
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.schema import BadSample
from x2sam_jax.layers.pixels import normalize_frames, normalize_patches

TOL = 1e-5  # max-abs tolerance for normalised pixels (float32 rescale/normalise rounding)


def _patches(pixels, grid):
    """uint8 patches normalised as the ViT does first thing (float32)."""
    assert pixels.dtype == np.uint8
    return np.asarray(normalize_patches(jnp.asarray(pixels), jnp.asarray(grid)[None], jnp.float32))


def _frame(pixels, valid_hw):
    """A uint8 SAM frame normalised as the mask encoder does first thing (float32)."""
    assert pixels.dtype == np.uint8
    return np.asarray(normalize_frames(jnp.asarray(pixels), jnp.asarray(valid_hw), jnp.float32))


def _video_reference():
    """transformers' Qwen3-VL video processor module. Its package import is gated on torchvision
    (absent here), so load the file directly; `patchify` and `smart_resize` need torch only."""
    name = "transformers.models.qwen3_vl._video_processing_reference"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(transformers.__file__), "models/qwen3_vl/video_processing_qwen3_vl.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "transformers.models.qwen3_vl"
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _qwen_reference(min_pixels, max_pixels):
    return Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )  # fmt: skip


@pytest.mark.parametrize("hw", [(100, 150), (333, 77), (480, 640), (31, 45), (1000, 40)])
def test_qwen_image_matches_transformers(hw):
    # Small budget so the test is quick; (31, 45) hits min_pixels, (480, 640) hits max_pixels.
    cfg = tf.QwenVisionPreprocessConfig(image_min_pixels=64 * 64, image_max_pixels=256 * 256)
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = _qwen_reference(cfg.image_min_pixels, cfg.image_max_pixels)(images=[image], return_tensors="np")
    pixels, grid = tf.qwen_image_patches(image, cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert pixels.shape == ref["pixel_values"].shape == (int(np.prod(grid)), 1536)
    assert np.abs(_patches(pixels, grid) - ref["pixel_values"]).max() <= TOL


def test_qwen_image_default_budget_matches_transformers():
    cfg = tf.QwenVisionPreprocessConfig()  # Qwen3-VL-4B-Instruct budgets: 65536 .. 16777216 pixels
    image = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    ref = _qwen_reference(cfg.image_min_pixels, cfg.image_max_pixels)(images=[image], return_tensors="np")
    pixels, grid = tf.qwen_image_patches(image, cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert np.abs(_patches(pixels, grid) - ref["pixel_values"]).max() <= TOL
    assert grid[1] * grid[2] * 256 >= cfg.image_min_pixels  # upscaled to the minimum budget


def test_smart_resize_matches_transformers_on_many_sizes():
    rng = np.random.default_rng(0)
    video_ref = _video_reference()
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(8, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = int(rng.integers(1, 200)) * 1024, int(rng.integers(200, 20000)) * 1024
        assert tf.smart_resize(h, w, 32, lo, hi) == ref_smart_resize(h, w, 32, lo, hi)
        t = int(rng.integers(2, 20))
        assert tf.video_smart_resize(t, h, w, 32, 2, lo, hi) == video_ref.smart_resize(t, h, w, 2, 32, lo, hi)


def _torchvision_bicubic(frames_uint8, height, width):
    """What torchvision's tensor resize does for uint8 bicubic with antialias (torchvision itself is
    not installed): float interpolate, clamp, round."""
    x = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("hw_out", [(96, 128, 64, 96), (100, 150, 224, 320), (480, 640, 224, 288), (31, 200, 32, 96)])
def test_video_resize_matches_torch_antialiased_bicubic(hw_out):
    h, w, oh, ow = hw_out
    frames = np.random.default_rng(h).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    diff = np.abs(tf.torch_bicubic_resize(frames, oh, ow).astype(int) - _torchvision_bicubic(frames, oh, ow))
    # Float32 summation order (torch may fuse multiply-adds) can flip a rounding at an exact .5:
    # measured 0 to 1.6e-5 of the pixels, by one grey level.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


@pytest.mark.parametrize("num_frames", [2, 5, 8])
def test_qwen_video_matches_transformers_patchify(num_frames):
    cfg = tf.QwenVisionPreprocessConfig(video_min_pixels=64 * 64, video_max_pixels=8 * 96 * 128)
    frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 120, 170, 3), dtype=np.uint8)
    pixels, grid = tf.qwen_video_patches(frames, cfg)
    pixels = _patches(pixels, grid)
    reference = _video_reference()
    rh, rw = reference.smart_resize(num_frames, 120, 170, 2, 32, cfg.video_min_pixels, cfg.video_max_pixels)
    assert (rh, rw) == (grid[1] * 16, grid[2] * 16)
    resized = _torchvision_bicubic(frames, rh, rw)
    video = torch.from_numpy((resized.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)[None]
    ref, gt, gh, gw = reference.Qwen3VLVideoProcessor.patchify(None, video, 16, 2, 2)
    assert (gt, gh, gw) == tuple(grid) and gt == (num_frames + 1) // 2
    diff = np.abs(pixels - ref[0].numpy())
    # equal to 1e-5 except where a rounding flipped one grey level (2/255 after normalisation)
    assert (diff > TOL).mean() < 1e-4 and diff.max() <= 2 / 255 + TOL


def test_qwen_single_frame_video_is_duplicated():
    cfg = tf.QwenVisionPreprocessConfig(video_min_pixels=64 * 64, video_max_pixels=2 * 128 * 128)
    frame = np.random.default_rng(3).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    single_pixels, single_grid = tf.qwen_video_patches(frame[None], cfg)
    pair_pixels, pair_grid = tf.qwen_video_patches(np.stack([frame, frame]), cfg)
    assert single_grid[0] == 1
    np.testing.assert_array_equal(single_grid, pair_grid)
    np.testing.assert_array_equal(single_pixels, pair_pixels)


@pytest.mark.parametrize("size", [1024, 512])
def test_sam_image_and_masks_match_transformers(size):
    ref = SamImageProcessorPil(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4},
    )  # fmt: skip
    cfg = tf.SamPreprocessConfig(size=size)
    rng = np.random.default_rng(size)
    for hw in [(100, 150), (333, 77), (480, 640), (37, 1001)]:
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        mask = rng.random(hw) > 0.5
        out = ref(images=[image], segmentation_maps=[mask.astype(np.uint8)], return_tensors="np")
        pixels, valid = tf.sam_image(image, cfg)
        np.testing.assert_array_equal(valid, out["reshaped_input_sizes"][0])
        normalised = _frame(pixels, valid)
        assert np.abs(normalised - out["pixel_values"][0].transpose(1, 2, 0)).max() <= TOL
        assert not normalised[valid[0]:].any() and not normalised[:, valid[1]:].any()  # zero padding
        assert not pixels[valid[0]:].any() and not pixels[:, valid[1]:].any()
        dirty = np.full((size, size, 3), 7, np.uint8)  # in place: every pixel, padding too, written
        np.testing.assert_array_equal(tf.sam_image(image, cfg, out=dirty)[0], pixels)
        np.testing.assert_array_equal(tf.gt_mask_grid(mask, cfg), out["labels"][0].astype(bool))


def test_region_masks_match_pil_nearest_then_pad():
    rng = np.random.default_rng(0)
    cfg = tf.SamPreprocessConfig(size=256)
    for hw in [(90, 130), (301, 47), (256, 256), (20, 30)]:
        mask = rng.random(hw) > 0.7
        rh, rw = tf.longest_side_shape(*hw, 256)
        expected = np.zeros((256, 256), bool)
        expected[:rh, :rw] = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((rw, rh), Image.NEAREST)) > 0
        np.testing.assert_array_equal(tf.region_mask_grid(mask, cfg), expected)
    stacked = rng.random((2, 3, 40, 60)) > 0.5  # leading axes pass through
    assert tf.region_mask_grid(stacked, cfg).shape == (2, 3, 256, 256)


def test_decode_rle_size_mismatch_is_bad_sample():
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 12), np.uint8)))
    assert tf.decode_rle(rle, 10, 12).sum() == 120
    assert not tf.decode_rle(None, 4, 5).any()
    with pytest.raises(BadSample, match="mask of size"):
        tf.decode_rle(rle, 12, 10)


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(BadSample, match="missing image file .*nope.jpg"):
        tf.load_image(str(missing))
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(BadSample, match="corrupt image file .*bad.jpg"):
        tf.load_image(str(corrupt))
    good = tmp_path / "ok.png"
    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(good)  # grayscale -> RGB
    assert tf.load_image(str(good)).shape == (5, 7, 3)


def test_stride_clips_cover_the_video_in_consecutive_runs():
    for length in [1, 2, 7, 8, 9, 17, 30]:
        for stride in [1, 2, 3]:
            result = clips.stride_clips(length, 8, stride)
            covered = sorted(i for c in result for i in c)
            assert all(len(c) <= 8 for c in result)
            assert all(np.all(np.diff(c) == stride) for c in result if len(c) > 1)
            assert [c[0] for c in result] == sorted(c[0] for c in result)
            # every frame is covered; clips are full length unless their whole sequence is shorter
            assert set(covered) == set(range(length))
            assert all(len(c) == min(8, len(range(c[0] % stride, length, stride))) for c in result)
            # overlaps only where the last clip of a sequence was shifted back to end at its frame
            assert len(covered) - length < 8 * stride


def test_span_clips_spread_over_the_video():
    result = clips.span_clips(40, 8)
    assert len(result) == 5 and all(len(c) == 8 for c in result)
    assert result[0] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert sorted(i for c in result for i in c) == list(range(40))
    short = clips.span_clips(5, 8)
    assert short == [[0, 1, 2, 3, 4]]
    rng = np.random.default_rng(0)
    drawn = {tuple(clips.choose_clip(40, rng, "span")) for _ in range(50)}
    assert drawn == {tuple(c) for c in result}
    with pytest.raises(ValueError, match="unknown clip mode"):
        clips.all_clips(10, "random")
