"""The main job (x2sam_jax.demo) end to end on the smallest settings, its post-processing on
hand-made masks, and the overlay drawing (x2sam_jax.eval.visualize)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from x2sam_jax import demo
from x2sam_jax.eval import visualize


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    settings = demo.DemoSettings(out=str(out), num_images=4, num_videos=2, frames=4, image_batch_size=2,
                                 image_batches=1, video_batches=1, seed=3)
    return out, demo.run(settings)


def test_demo_summary_numbers(demo_run):
    out, summary = demo_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # 4 images -> 1 val image; 2 videos -> 1 val video (4 frames, padded to the 8-frame bucket)
    assert summary["dataset"]["val_sources"]["coco_panoptic"] == 1
    assert summary["dataset"]["val_sources"]["ref_ytvos"] == 1
    runs = [(b["source"], b["split"]) for b in summary["batches"]]
    assert runs[:3] == [("coco_panoptic", "val"), ("refcoco", "val"), ("ref_ytvos", "val")]
    assert len(runs) == 4 and runs[3][1] == "train" and runs[3][0] in ("coco_panoptic", "refcoco")
    queries, grid = summary["model"]["queries"], summary["model"]["sam_size"] // 4
    for batch in summary["batches"]:
        frames = 8 if batch["source"] == "ref_ytvos" else 1
        size = 1 if batch["source"] == "ref_ytvos" else 2
        assert batch["mask_logits"] == [size, frames, queries, grid, grid]
        assert batch["class_logits"][:3] == [size, frames, queries]
        assert batch["valid_samples"] == (1 if batch["split"] == "val" else 2)   # the train mixture refills
    # one image program (val and train batches share it), one clip program
    assert len(summary["programs"]) == 2
    assert summary["batches"][3]["program"] == summary["batches"][0]["program"]
    # the checkpoint round trip is exact and reuses the compiled program
    assert summary["checkpoint"]["mask_logits_max_abs_diff"] == 0.0
    assert summary["checkpoint"]["reload_recompiled"] is False
    assert (out / "checkpoint" / "config.json").exists()
    # skip statistics of every pipeline
    assert summary["pipeline"]["skipped_total"] == 0
    assert set(summary["pipeline"]["by_source"]) == {"coco_panoptic", "refcoco", "ref_ytvos", "train_mixture"}
    for stats in summary["pipeline"]["by_source"].values():
        assert {"total", "by_reason", "by_source"} <= set(stats)
    # IoU: every scored condition in [0, 1]; an untrained LM is about as good as a uniform guess
    iou = summary["iou"]
    assert iou["count"] == len(iou["rows"]) > 0
    assert all(0.0 <= r["iou"] <= 1.0 and 0.0 < r["all_foreground_iou"] <= 1.0 for r in iou["rows"])
    assert 0.0 <= iou["mean"] <= 1.0
    assert {r["source"] for r in iou["rows"]} == {"coco_panoptic", "refcoco", "ref_ytvos"}
    assert abs(summary["lm_loss"]["mean"] - summary["lm_loss"]["uniform"]) < 1.0
    assert "randomly initialised" in summary["note"]


def test_demo_overlays(demo_run):
    out, summary = demo_run
    files = [out / f for f in summary["overlays"]["files"]]
    assert {f.suffix for f in files} == {".png", ".gif"}
    for f in files:
        assert f.stat().st_size > 0
        with Image.open(f) as image:
            width, height = image.size
            # prediction | ground truth panels of the 160-pixel-wide frames, plus a legend
            assert width == 2 * 160 + 4 and height > 120
            if f.suffix == ".gif":
                assert image.n_frames == 4


def test_demo_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.prepare_out_dir(tmp_path, overwrite=False)
    assert (tmp_path / "precious.txt").exists()


def _hand_made_batch():
    """One image, two real conditions (one without a target) and a padded slot; 8x8 grid."""
    grid = 8
    gt = np.zeros((1, 1, 2, grid, grid), bool)
    gt[0, 0, 0, 2:6, 2:6] = True                          # target 0 answers condition 0 (16 pixels)
    return {
        "gt_masks": gt,
        "gt_classes": np.array([[0, -1]], np.int32),
        "cond_valid": np.array([[True, True, False]]),
        "frame_valid": np.array([[True]]),
        "sample_valid": np.array([True]),
        "sample_index": np.array([7], np.int32),
        "orig_hw": np.array([[32, 32]], np.int32),        # square: the whole 8x8 grid is valid
    }


def test_best_query_and_iou_on_known_masks():
    batch = _hand_made_batch()
    # class logits [B, T, Q=3, C+1=4]: query 2 is the best for condition 0; the padded slot 2 has
    # the largest logit of all but is never a condition; background is excluded
    class_logits = np.full((1, 1, 3, 4), -5.0, np.float32)
    class_logits[0, 0, 2, 0] = 3.0
    class_logits[0, 0, 1, 2] = 9.0
    class_logits[0, 0, 0, 3] = 9.0
    mask_logits = np.full((1, 1, 3, 8, 8), -1.0, np.float32)
    mask_logits[0, 0, 0] = 1.0                            # query 0 covers everything (not chosen)
    mask_logits[0, 0, 2, 2:6, 2:4] = 1.0                  # query 2: left half of the target
    mask_logits[0, 0, 2, 0, 0] = 1.0                      # plus one false positive
    rows = demo.batch_ious(batch, mask_logits, class_logits)
    assert len(rows) == 1                                 # condition 1 has no target: not scored
    row = rows[0]
    assert (row["sample"], row["condition"], row["query"]) == (7, 0, 2)
    assert row["iou"] == pytest.approx(8 / 17)            # 8 shared pixels, union 16 + 1
    assert row["all_foreground_iou"] == pytest.approx(16 / 64)
    expected_score = math.exp(3.0) / (math.exp(3.0) + 2 * math.exp(-5.0))  # c0, c1, background
    assert row["score"] == pytest.approx(expected_score)


def test_iou_is_cropped_to_the_unpadded_grid():
    batch = _hand_made_batch()
    batch["orig_hw"] = np.array([[16, 32]], np.int32)     # 8x8 grid -> rows 0..3 are the image
    batch["gt_masks"][:] = False
    batch["gt_masks"][0, 0, 0, 0:2, 0:4] = True
    class_logits = np.zeros((1, 1, 1, 4), np.float32)
    mask_logits = np.full((1, 1, 1, 8, 8), -1.0, np.float32)
    mask_logits[0, 0, 0, 0:2, 0:4] = 1.0
    mask_logits[0, 0, 0, 4:, :] = 1.0                     # positives in the padding do not count
    (row,) = demo.batch_ious(batch, mask_logits, class_logits)
    assert row["iou"] == 1.0
    assert row["all_foreground_iou"] == pytest.approx(8 / 32)


def test_upsample_to_original_matches_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    logits = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)   # [T, K, h, w]
    ours = demo.upsample_to_original(logits, 32, (24, 32), (30, 40))
    ref = F.interpolate(torch.from_numpy(logits), size=(32, 32), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[:, :, :24, :32], size=(30, 40), mode="bilinear", align_corners=False)
    assert ours.shape == (2, 3, 30, 40)
    # thresholds can only differ where torch's logit is within float rounding of 0
    disagree = ours != (ref.numpy() > 0)
    assert np.abs(ref.numpy()[disagree]).max(initial=0.0) < 1e-5


def test_overlay_colours_outline_and_background():
    image = np.full((6, 6, 3), 100, np.uint8)
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 1:5, 1:5] = True
    color = np.array([[200, 0, 50]], np.uint8)
    out = visualize.overlay(image, mask, color, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])        # outside: untouched
    np.testing.assert_array_equal(out[1, 1], [200, 0, 50])           # outline: the colour
    np.testing.assert_array_equal(out[2, 2], [150, 50, 75])          # inside: the 50 % blend
    with pytest.raises(ValueError, match="do not match"):
        visualize.overlay(image, np.zeros((1, 5, 6), bool))


def test_palette_is_distinct_and_gif_round_trips(tmp_path):
    colors = visualize.palette(12)
    assert len({tuple(c) for c in colors}) == 12
    frames = [np.full((10, 14, 3), 40 * t, np.uint8) for t in range(3)]
    page = visualize.add_legend(visualize.side_by_side([frames[0], frames[1]], ["a", "b"]), ["x", "y"], colors)
    assert page.shape[1] == 2 * 14 + 4 and page.shape[0] > 10
    path = visualize.save_gif(tmp_path / "clip.gif", frames, duration_ms=100)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        gif.seek(2)
        np.testing.assert_array_equal(np.asarray(gif.convert("RGB"))[0, 0], [80, 80, 80])
    with pytest.raises(ValueError, match="differ in size"):
        visualize.save_gif(tmp_path / "bad.gif", [frames[0], np.zeros((5, 5, 3), np.uint8)])
    assert not (tmp_path / "bad.gif").exists()


def test_command_line_settings():
    settings = demo.parse_args(["--out", "somewhere", "--num-images", "8", "--video-batches", "0",
                                "--no-fast-compile"])
    assert settings == demo.DemoSettings(out="somewhere", num_images=8, video_batches=0, fast_compile=False)
    assert demo.parse_args([]).fast_compile is None                    # auto: on for CPU only
    with pytest.raises(SystemExit):
        demo.parse_args(["--num-images", "0"])


@pytest.mark.slow
def test_demo_on_two_devices(tmp_path):
    """The same job on a 2-device mesh (forced host devices, in a subprocess): the model and the
    batches are sharded over fsdp, still two programs, the round trip is still exact."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "x2sam_jax.demo", "--out", str(out), "--num-images", "8",
                    "--num-videos", "2", "--frames", "4", "--image-batches", "1"],
                   check=True, env=env, capture_output=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["devices"]["count"] == 2 and summary["model"]["devices"]["mesh"]["fsdp"] == 2
    assert len(summary["programs"]) == 2
    assert [b["mask_logits"][0] for b in summary["batches"]] == [4, 4, 2, 4]   # 2 images / 1 clip per device
    assert summary["checkpoint"]["mask_logits_max_abs_diff"] == 0.0
    assert summary["checkpoint"]["reload_recompiled"] is False
