"""Benchmark-server files from `x2sam_jax.eval.evaluate` (issue 14): splits without ground truth in
the datasets' published formats (tests/data/ref_youtube_vos, tests/data/youtube_vis) are predicted
by the tiny model and written as the servers take them; a mixed config scores the split that has
ground truth and writes the other's file; the oracle (ground truth as predictions) shows that the
files hold exactly the post-processed predictions, at the right videos, expressions, frames and
category ids."""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from test_eval import _eval_config, data, setup  # noqa: F401  (the tiny model, tokenizer, mesh and synthetic data)
from test_submissions import _load_results_like_ytvos

DATA = os.path.join(os.path.dirname(__file__), "data")
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 6, "name": "sedan"}]   # of the YouTube-VIS 2019 train file
VIS_FRAME_HW = (720, 1280)


def _published_splits(root):
    """The published valid files under the data root: Ref-YouTube-VOS (meta with only "exp", small
    JPEG frames) and YouTube-VIS (one 36-frame 1280 x 720 video, frames written here as the
    README says)."""
    shutil.copytree(os.path.join(DATA, "ref_youtube_vos"), os.path.join(root, "ytrvos21_published"))
    vis = os.path.join(root, "ytvis19_published", "valid")
    os.makedirs(vis)
    shutil.copy(os.path.join(DATA, "youtube_vis", "valid.json"), vis)
    frame = np.full(VIS_FRAME_HW + (3,), 40, np.uint8)
    frame[200:500, 300:800] = (200, 60, 60)
    for name in json.load(open(os.path.join(vis, "valid.json")))["videos"][0]["file_names"]:
        path = os.path.join(vis, "JPEGImages", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(frame).save(path, quality=80)


def _published_datasets():
    from x2sam_jax.data.transforms import QwenVisionPreprocessConfig

    # 720p frames: a small Qwen pixel budget keeps the clips within the tiny buckets' 512 patches.
    small = QwenVisionPreprocessConfig(video_min_pixels=1024, video_max_pixels=8 * 64 * 64)
    return {
        "ref_ytvos_valid": {"source": {"type": "ref_ytvos", "root": "ytrvos21_published", "split": "valid",
                                       "group": "expression"}},
        "ytvis_valid": {"source": {"type": "ytvis19", "root": "ytvis19_published", "split": "valid",
                                   "categories": CATEGORIES}, "feature": {"qwen": small}},
    }


@pytest.fixture(scope="module")
def published(setup):  # noqa: F811
    """`setup` with the published splits beside the synthetic data."""
    _published_splits(setup["root"])
    return setup


@pytest.fixture(scope="module")
def evaluated(published, tmp_path_factory):
    """One evaluation of a mixed config: the synthetic Ref-YouTube-VOS valid split (ground truth,
    2 expressions) and the two published splits without ground truth (every sample)."""
    from x2sam_jax.eval import evaluate

    setup = published
    config = _eval_config(setup["root"], 8)
    config["max_samples"] = 0
    config["datasets"] = {"ref_ytvos": dict(config["datasets"]["ref_ytvos"], max_samples=2), **_published_datasets()}
    out = tmp_path_factory.mktemp("submissions") / "run"
    results = evaluate(setup["model"], setup["tokenizer"], config, mesh=setup["mesh"], output_dir=str(out))
    return out, results


def _png(archive, name):
    with Image.open(io.BytesIO(archive.read(name))) as png:
        return png.mode, np.asarray(png)


def test_ref_youtube_vos_valid_gives_the_challenge_zip(evaluated):
    out, results = evaluated
    root = os.path.join(DATA, "ref_youtube_vos")
    meta = json.load(open(os.path.join(root, "meta_expressions", "valid", "meta_expressions.json")))["videos"]
    test_videos = json.load(open(os.path.join(root, "meta_expressions", "test", "meta_expressions.json")))["videos"]
    expected = sorted(f"Annotations/{v}/{e}/{f}.png" for v, video in meta.items() if v not in test_videos
                      for e in video["expressions"] for f in video["frames"])
    assert len(expected) == 2 * 4 + 3 * 3
    assert results["ref_ytvos_valid"] == {"entries": 17, "frames_filled": 0, "samples": 5, "skipped": 0, "failed": 0,
                                          "submission": "submissions/ref_ytvos_valid/submission.zip"}
    with zipfile.ZipFile(out / "submissions" / "ref_ytvos_valid" / "submission.zip") as archive:
        assert sorted(archive.namelist()) == expected
        for name in expected:
            video, _, frame = name.split("/")[1:]
            with Image.open(os.path.join(root, "valid", "JPEGImages", video, frame.replace(".png", ".jpg"))) as jpg:
                width, height = jpg.size
            mode, values = _png(archive, name)
            assert mode == "L" and values.shape == (height, width) and set(np.unique(values)) <= {0, 255}


def test_youtube_vis_valid_gives_the_results_json(evaluated, tmp_path):
    out, results = evaluated
    # 36 frames in clips of 4: 9 clips, each with its 10 best (query, category) tracks of the
    # tiny model's 8 queries x 2 categories.
    assert results["ytvis_valid"] == {"entries": 90, "samples": 1, "skipped": 0, "failed": 0,
                                      "submission": "submissions/ytvis_valid/results.zip"}
    with zipfile.ZipFile(out / "submissions" / "ytvis_valid" / "results.zip") as archive:
        assert archive.namelist() == ["results.json"]
        archive.extractall(tmp_path)
    gt = json.load(open(os.path.join(DATA, "youtube_vis", "valid.json")))
    anns = _load_results_like_ytvos(gt, str(tmp_path / "results.json"))
    per_clip = {}
    for ann in anns:
        assert ann["video_id"] == 1 and ann["category_id"] in (1, 6) and 0.0 <= ann["score"] <= 1.0
        assert len(ann["segmentations"]) == 36
        frames = [t for t, seg in enumerate(ann["segmentations"]) if seg is not None]
        assert len(frames) == 4 and frames == list(range(frames[0], frames[0] + 4)) and frames[0] % 4 == 0
        for t in frames:
            seg = ann["segmentations"][t]
            assert seg["size"] == list(VIS_FRAME_HW) and mask_utils.decode(seg).shape == VIS_FRAME_HW
            assert ann["areas"][t] == mask_utils.decode(seg).sum()
        per_clip[frames[0] // 4] = per_clip.get(frames[0] // 4, 0) + 1
    assert per_clip == {c: 10 for c in range(9)}


def test_mixed_config_scores_one_split_and_writes_the_other(evaluated):
    out, results = evaluated
    assert set(results) == {"ref_ytvos", "ref_ytvos_valid", "ytvis_valid"}
    scored = results["ref_ytvos"]
    assert {"J", "F", "J&F", "J&F_x2sam"} <= set(scored) and scored["samples"] == 2
    assert "submission" not in scored and not (out / "submissions" / "ref_ytvos").exists()
    for name in ("ref_ytvos_valid", "ytvis_valid"):
        assert not {"J", "F", "J&F", "AP", "mAP_x2sam"} & set(results[name])
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(json.dumps(results))
    markdown = (out / "results.md").read_text()
    assert "| `submissions/ref_ytvos_valid/submission.zip` |" in markdown
    assert "| `submissions/ytvis_valid/results.zip` |" in markdown


def _palette_masks(root, video, frames, obj_id):
    return [np.asarray(Image.open(os.path.join(root, "valid", "Annotations", video, f"{f}.png"))) == obj_id
            for f in frames]


def test_oracle_submissions_hold_the_ground_truth(published, tmp_path):
    """With the ground truth fed back as predictions (frames of 32 pixels = the S/4 grid, so the
    predictions equal it exactly), the files hold the ground truth: each expression's PNGs are its
    object's masks, also when clips overlap (clips of 3 over 4 frames: [0, 1, 2] and the last one
    shifted back to [1, 2, 3]); the results JSON scores AP 1.0 against the annotation file
    with the dataset's category ids. Overlays of a split without ground truth show the prediction
    alone."""
    from x2sam_jax.eval import evaluate
    from x2sam_jax.eval.metrics import VideoMaskAP

    setup = published
    config = _eval_config(setup["root"], 8) | {"sam_size": 128, "region_tokens": 4}
    ref, vis = config["datasets"]["ref_ytvos"], config["datasets"]["ytvis19"]
    config["datasets"] = {
        "ref_ytvos": dict(ref, submission="ref_youtube_vos"),
        "ref_ytvos_tail": dict(ref, submission="ref_youtube_vos", feature={"clip_len": 3}),
        # the oracle has one query per target slot (16): keep every track, as the AP does
        "ytvis19": dict(vis, submission="youtube_vis", options={"metrics": ("AP",), "submission_top_k": 16}),
        "ref_ytvos_valid": _published_datasets()["ref_ytvos_valid"],
    }
    results = evaluate(None, setup["tokenizer"], config, mesh=setup["mesh"], oracle=True, output_dir=str(tmp_path),
                       visualize=1)
    for name, panels in (("ref_ytvos", 3), ("ref_ytvos_valid", 2)):   # input | prediction [| ground truth]
        with Image.open(tmp_path / "overlays" / name / "00000.gif") as gif:   # panels >= 200 pixels wide
            assert gif.n_frames == 4 and panels * 200 <= gif.size[0] < (panels + 1) * 200, name
    # COCO-style AP averages interpolated precisions of 1.0 in float: 1.0 up to rounding
    assert results["ref_ytvos"]["J&F"] == 1.0 and results["ytvis19"]["AP"] == pytest.approx(1.0, abs=1e-12)

    root = os.path.join(setup["root"], "ytrvos21")
    meta = json.load(open(os.path.join(root, "meta_expressions", "valid", "meta_expressions.json")))["videos"]
    video = sorted(meta)[0]                                          # max_samples 2: its expressions 0, 1
    frames = meta[video]["frames"]
    assert len(frames) == 4
    for name in ("ref_ytvos", "ref_ytvos_tail"):
        assert results[name]["entries"] == 8 and results[name]["frames_filled"] == 0
        with zipfile.ZipFile(tmp_path / results[name]["submission"]) as archive:
            assert len(archive.namelist()) == 8
            for exp_id in ("0", "1"):
                truth = _palette_masks(root, video, frames, int(meta[video]["expressions"][exp_id]["obj_id"]))
                for frame, mask in zip(frames, truth):
                    mode, values = _png(archive, f"Annotations/{video}/{exp_id}/{frame}.png")
                    np.testing.assert_array_equal(values == 255, mask)
                    assert mode == "L" and set(np.unique(values)) <= {0, 255}

    with zipfile.ZipFile(tmp_path / results["ytvis19"]["submission"]) as archive:
        entries = json.loads(archive.read("results.json"))
    annotations = json.load(open(os.path.join(setup["root"], "ytvis19", "valid", "valid.json")))
    videos = {v["id"]: v for v in annotations["videos"]}
    assert {e["video_id"] for e in entries} == {min(videos)} and len(entries) == 16   # max_samples 2: 1 video
    assert {e["category_id"] for e in entries} <= {c["id"] for c in annotations["categories"]}
    video = videos[min(videos)]
    gt = [{"segmentations": a["segmentations"], "category_id": a["category_id"], "iscrowd": a["iscrowd"]}
          for a in annotations["annotations"] if a["video_id"] == video["id"]]
    ap = VideoMaskAP(sorted(c["id"] for c in annotations["categories"]))
    ap.add_video(video["height"], video["width"], gt,
                 [{"segmentations": e["segmentations"], "category_id": e["category_id"], "score": e["score"]}
                  for e in entries])
    assert ap.summary()["AP"] == pytest.approx(1.0, abs=1e-12)


def test_incomplete_submission_is_an_error_and_writes_nothing(setup, tmp_path):
    """A sample that cannot be read (a missing frame) leaves its expression without predictions:
    the evaluation fails naming the missing entries and no zip appears."""
    from x2sam_jax.eval import evaluate

    root = tmp_path / "data"
    shutil.copytree(os.path.join(DATA, "ref_youtube_vos"), root / "ytrvos21_published")
    os.remove(root / "ytrvos21_published" / "valid" / "JPEGImages" / "01c88b5b60" / "00005.jpg")
    config = _eval_config(root, 8) | {"sam_size": 128, "region_tokens": 4, "max_samples": 0}
    config["datasets"] = {"ref_ytvos_valid": _published_datasets()["ref_ytvos_valid"]}
    with pytest.raises(ValueError, match=r"ref_ytvos_valid: incomplete Ref-YouTube-VOS submission .* 9 expected "
                                         r"\(video, expression, frame\) masks missing .*3 samples were skipped"):
        evaluate(None, setup["tokenizer"], config, mesh=setup["mesh"], oracle=True, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "submissions" / "ref_ytvos_valid" / "submission.zip").exists()
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
