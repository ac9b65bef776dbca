"""Benchmark-server prediction files (x2sam_jax/eval/submissions.py), written for the evaluation splits
that ship without ground truth (tests/data/*) and read back the way the servers' tools read them."""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data.sources import refvos, ytvis
from x2sam_jax.data.sources.common import decode_rle
from x2sam_jax.eval import submissions

DATA = os.path.join(os.path.dirname(__file__), "data")


def _random_mask(rng, height, width):
    mask = np.zeros((height, width), bool)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[y : y + rng.integers(1, height // 2 + 1), x : x + rng.integers(1, width // 2 + 1)] = True
    return mask


def _leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n]


# ----------------------------------------------------------------------------------- Ref-YouTube-VOS
def _ref_ytvos_predictions(source, rng):
    predictions = {}
    for k in range(len(source)):
        s = source[k]
        for exp_id in s.meta["expression_ids"]:
            predictions[(s.meta["video_id"], exp_id)] = {
                frame: _random_mask(rng, s.height, s.width) for frame in s.meta["frame_names"]}
    return predictions


def test_ref_youtube_vos_submission_layout_and_round_trip(tmp_path):
    root = str(tmp_path / "ytrvos21")
    shutil.copytree(os.path.join(DATA, "ref_youtube_vos"), root)
    source = refvos.ref_youtube_vos(root, "valid")
    expected = submissions.ref_youtube_vos_expected(source)
    assert sorted(expected) == [("0062f687f1", "0"), ("0062f687f1", "1"),
                                ("01c88b5b60", "0"), ("01c88b5b60", "1"), ("01c88b5b60", "2")]
    predictions = _ref_ytvos_predictions(source, np.random.default_rng(0))
    out = str(tmp_path / "submission.zip")
    assert submissions.write_ref_youtube_vos_submission(predictions, out, expected=expected) == out
    assert os.stat(out).st_mode & 0o777 == 0o644              # readable by whoever it is shared with

    # The challenge layout: Annotations/{video}/{exp_id}/{frame}.png, one per expression and frame,
    # single-channel 0 / 255 at the frame's size.
    with zipfile.ZipFile(out) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"Annotations/{v}/{e}/{f}.png" for (v, e), frames in expected.items() for f in frames)
        for (video, exp_id), frames in predictions.items():
            for frame, mask in frames.items():
                with Image.open(io.BytesIO(archive.read(f"Annotations/{video}/{exp_id}/{frame}.png"))) as png:
                    assert png.mode == "L"
                    values = np.asarray(png)
                assert set(np.unique(values)) <= {0, 255}
                np.testing.assert_array_equal(values == 255, mask)
        archive.extractall(os.path.join(root, "valid"))  # -> valid/Annotations/, X2SAM's valid ground truth
    assert _leftovers(tmp_path) == []

    # The same folder read as per-expression ground truth gives the predictions back as targets.
    scored = refvos.ref_youtube_vos(root, "valid")
    assert scored.has_targets
    for k in range(len(scored)):
        s = scored[k]
        assert s.has_targets and [p.instance_indices for p in s.phrases] == [[j] for j in range(len(s.phrases))]
        for exp_id, inst in zip(s.meta["expression_ids"], s.instances):
            predicted = predictions[(s.meta["video_id"], exp_id)]
            for frame, rle in zip(s.meta["frame_names"], inst.masks):
                np.testing.assert_array_equal(decode_rle(rle).astype(bool), predicted[frame])


def test_ref_youtube_vos_submission_refuses_incomplete_or_bad_input(tmp_path):
    source = refvos.ref_youtube_vos(os.path.join(DATA, "ref_youtube_vos"), "valid")
    expected = submissions.ref_youtube_vos_expected(source)
    predictions = _ref_ytvos_predictions(source, np.random.default_rng(1))
    out = str(tmp_path / "submission.zip")
    del predictions[("01c88b5b60", "1")]["00005"]
    with pytest.raises(ValueError, match=r"1 expected .* missing \[\('01c88b5b60', '1', '00005'\)\]"):
        submissions.write_ref_youtube_vos_submission(predictions, out, expected=expected)
    assert not os.path.exists(out) and _leftovers(tmp_path) == []

    with pytest.raises(TypeError, match="threshold probabilities first"):
        submissions.write_ref_youtube_vos_submission([("v", "0", "00000", np.zeros((4, 4), np.float32))], out)
    with submissions.RefYouTubeVosSubmission(out) as sub:
        sub.add("v", "0", "00000", np.zeros((4, 4), bool))
        with pytest.raises(ValueError, match="added twice"):
            sub.add("v", 0, "00000", np.zeros((4, 4), bool))
        with pytest.raises(ValueError, match=r"mask is \(5, 4\), other frames of video v are \(4, 4\)"):
            sub.add("v", "1", "00000", np.zeros((5, 4), bool))
    with pytest.raises(RuntimeError):  # leaving the block by an exception writes nothing
        with submissions.RefYouTubeVosSubmission(str(tmp_path / "other.zip")) as sub:
            sub.add("v", "0", "00000", np.ones((4, 4), np.uint8))
            raise RuntimeError("evaluation failed")
    assert not os.path.exists(tmp_path / "other.zip") and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- YouTube-VIS
def _load_results_like_ytvos(gt: dict, results_file: str) -> list:
    """What the YouTube-VIS API's `YTVOS.loadRes` does to a results file (the server's loader): a list
    of tracks whose video ids are videos of the ground-truth file; every segmentation is a
    compressed RLE (area and box computed by pycocotools) or None."""
    anns = json.load(open(results_file))
    assert isinstance(anns, list)
    assert {a["video_id"] for a in anns} <= {v["id"] for v in gt["videos"]}
    for k, ann in enumerate(anns):
        ann["areas"], ann["bboxes"] = [], []
        for seg in ann["segmentations"]:
            ann["areas"].append(mask_utils.area(seg) if seg else None)
            ann["bboxes"].append(mask_utils.toBbox(seg) if seg else None)
        ann["id"], ann["iscrowd"] = k + 1, 0
    return anns


def test_youtube_vis_results_json_read_back(tmp_path):
    root = str(tmp_path / "ytvis19")
    os.makedirs(os.path.join(root, "valid"))
    shutil.copy(os.path.join(DATA, "youtube_vis", "valid.json"), os.path.join(root, "valid", "valid.json"))
    source = ytvis.youtube_vis(root, "valid", categories=[{"id": 1, "name": "person"}, {"id": 6, "name": "sedan"}])
    lengths = submissions.youtube_vis_video_lengths(source)
    assert lengths == {1: 36}
    s = source[0]
    rng = np.random.default_rng(0)
    first = np.stack([_random_mask(rng, s.height, s.width) for _ in range(s.num_frames)])  # [T, H, W]
    second = [None] * 10 + [_random_mask(rng, s.height, s.width) for _ in range(26)]  # appears at frame 10
    second[20] = np.zeros((s.height, s.width), np.uint8)  # predicted, but empty on this frame
    predictions = [{"video_id": 1, "category_id": 1, "score": 0.9, "masks": first},
                   {"video_id": 1, "category_id": 6, "score": 0.25, "masks": second}]
    gt = json.load(open(os.path.join(root, "valid", "valid.json")))

    zipped = submissions.write_youtube_vis_results(predictions, str(tmp_path / "results.zip"), video_lengths=lengths,
                                                   category_ids=s.meta["category_ids"])
    with zipfile.ZipFile(zipped) as archive:
        assert archive.namelist() == ["results.json"]  # at the archive's top, as the server expects
        archive.extractall(tmp_path / "unzipped")
    plain = submissions.write_youtube_vis_results(predictions, str(tmp_path / "results.json"))
    assert open(plain, "rb").read() == open(tmp_path / "unzipped" / "results.json", "rb").read()

    anns = _load_results_like_ytvos(gt, plain)
    assert [(a["video_id"], a["category_id"], a["score"]) for a in anns] == [(1, 1, 0.9), (1, 6, 0.25)]
    for ann, pred in zip(anns, (first, second)):
        assert len(ann["segmentations"]) == 36
        for seg, area, mask in zip(ann["segmentations"], ann["areas"], pred):
            if mask is None:
                assert seg is None and area is None
            else:
                assert seg["size"] == [720, 1280] and isinstance(seg["counts"], str) and area == mask.sum()
                np.testing.assert_array_equal(mask_utils.decode(seg).astype(bool), mask != 0)

    for bad, message in (
        ({"video_id": 1, "category_id": 1, "score": 0.5, "masks": first[:35]}, "35 frames for video 1 of 36"),
        ({"video_id": 2, "category_id": 1, "score": 0.5, "masks": first}, "video_id 2 is not a video"),
        ({"video_id": 1, "category_id": 3, "score": 0.5, "masks": first}, "category_id 3"),
        ({"video_id": 1, "category_id": 1, "score": float("nan"), "masks": first}, "not finite"),
        ({"video_id": 1, "category_id": 1, "masks": first}, "missing key 'score'"),
    ):
        out = tmp_path / "bad.zip"
        with pytest.raises(ValueError, match=message):
            submissions.write_youtube_vis_results([predictions[0], bad], str(out), video_lengths=lengths,
                                                  category_ids=[1, 6])
        assert not out.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- from evaluation records
def test_ref_youtube_vos_rles_fill_uncovered_frames_and_refuse_missing_expressions(tmp_path):
    from x2sam_jax.data.sources.common import encode_mask

    source = refvos.ref_youtube_vos(os.path.join(DATA, "ref_youtube_vos"), "valid")
    expected = submissions.ref_youtube_vos_expected(source)
    masks = _ref_ytvos_predictions(source, np.random.default_rng(2))
    rles = {key: {f: encode_mask(m) for f, m in frames.items()} for key, frames in masks.items()}
    del rles[("0062f687f1", "0")]["00015"]          # the last frame: filled from 00010
    del rles[("01c88b5b60", "1")]["00005"]          # between 00000 and 00010: the earlier one on the tie
    out = str(tmp_path / "submission.zip")
    assert submissions.write_ref_youtube_vos_rles(rles, None, expected=expected) == {"entries": 17, "frames_filled": 2}
    assert submissions.write_ref_youtube_vos_rles(rles, out, expected=expected) == {"entries": 17, "frames_filled": 2}
    filled = {("0062f687f1", "0", "00015"): "00010", ("01c88b5b60", "1", "00005"): "00000"}
    with zipfile.ZipFile(out) as archive:
        assert len(archive.namelist()) == 17
        for (video, exp_id), frames in expected.items():
            for frame in frames:
                with Image.open(io.BytesIO(archive.read(f"Annotations/{video}/{exp_id}/{frame}.png"))) as png:
                    values = np.asarray(png)
                source_frame = filled.get((video, exp_id, frame), frame)
                np.testing.assert_array_equal(values == 255, masks[(video, exp_id)][source_frame])

    # An expression without any prediction, or a prediction the split does not list: no zip,
    # with or without writing (every process checks).
    os.remove(out)
    for bad, message in (({k: v for k, v in rles.items() if k != ("01c88b5b60", "2")},
                          r"3 expected .* missing \[\('01c88b5b60', '2', '00000'\)"),
                         ({**rles, ("0390fabe58", "0"): {"00000": rles[("0062f687f1", "1")]["00000"]}},
                          r"1 unexpected \[\('0390fabe58', '0', '00000'\)\]")):
        for path in (None, out):
            with pytest.raises(ValueError, match=message):
                submissions.write_ref_youtube_vos_rles(bad, path, expected=expected)
    assert not os.path.exists(out) and _leftovers(tmp_path) == []


def test_youtube_vis_results_take_rles(tmp_path):
    from x2sam_jax.data.sources.common import encode_mask

    rng = np.random.default_rng(3)
    masks = [_random_mask(rng, 12, 20) for _ in range(3)]
    as_arrays = [{"video_id": 1, "category_id": 6, "score": 0.5, "masks": [masks[0], None, masks[2]]}]
    as_rles = [{"video_id": 1, "category_id": 6, "score": 0.5, "masks": [encode_mask(masks[0]), None,
                                                                          mask_utils.encode(np.asfortranarray(
                                                                              masks[2].astype(np.uint8)))]}]
    submissions.write_youtube_vis_results(as_arrays, str(tmp_path / "a.json"))
    submissions.write_youtube_vis_results(as_rles, str(tmp_path / "b.json"))   # str and bytes counts
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    truncated = dict(encode_mask(masks[0]), counts=encode_mask(masks[0])["counts"][:-2])
    with pytest.raises(ValueError, match=r"prediction #0 frame 0: bad mask RLE"):
        submissions.write_youtube_vis_results([{"video_id": 1, "category_id": 6, "score": 0.5, "masks": [truncated]}],
                                              str(tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists() and _leftovers(tmp_path) == []


def test_which_splits_get_a_submission(tmp_path):
    """The evaluation's plan per dataset: a split without ground truth is not scored and takes its
    reader's format; a named format must fit the source; anything else is a clear error."""
    from types import SimpleNamespace

    from x2sam_jax.eval import tasks
    from x2sam_jax.eval.evaluator import SplitPhrases, Subset, _source_indices, submission_plan

    ref = refvos.ref_youtube_vos(os.path.join(DATA, "ref_youtube_vos"), "valid")
    root = str(tmp_path / "ytvis19")
    os.makedirs(os.path.join(root, "valid"))
    shutil.copy(os.path.join(DATA, "youtube_vis", "valid.json"), os.path.join(root, "valid", "valid.json"))
    vis = ytvis.youtube_vis(root, "valid", categories=[{"id": 1, "name": "person"}])
    assert submission_plan("a", {}, ref) == (False, "ref_youtube_vos")
    assert submission_plan("b", {}, vis) == (False, "youtube_vis")
    assert submission_plan("b", {"submission": "youtube_vis"}, vis) == (False, "youtube_vis")
    scored = SimpleNamespace(has_targets=True, task="vref_seg")
    assert submission_plan("c", {}, scored) == (True, None)
    with pytest.raises(ValueError, match=r"dataset d: submission 'youtube_vis' needs a YouTubeVisSource source, "
                                         r"got RefVosSource"):
        submission_plan("d", {"submission": "youtube_vis"}, ref)
    with pytest.raises(ValueError, match=r"dataset e: unknown submission format 'davis'"):
        submission_plan("e", {"submission": "davis"}, ref)
    with pytest.raises(ValueError, match=r"dataset f: the split has no ground truth .* writes no submission file"):
        submission_plan("f", {}, SimpleNamespace(has_targets=False, task="gen_seg"))
    # The zip's expected entries come from the source's own records: all of them, or the first N.
    assert _source_indices(ref, ref) is None and _source_indices(ref, Subset(ref, 1)) == [0]
    with pytest.raises(ValueError, match=r"ref_ytvos: a Ref-YouTube-VOS submission needs the source's own samples"):
        _source_indices(ref, SplitPhrases(ref))
    with pytest.raises(ValueError, match=r"needs ground truth and writes no submission files"):
        tasks.evaluator_for(SimpleNamespace(name="g", task="ref_seg"), scored=False)


# ----------------------------------------------------------------------------------- YouTube-VOS 2019
def _ytvos_valid(root):
    """A YouTube-VOS 2019 valid split as released: meta.json lists each object's frames from its
    first appearance to the end, Annotations/ only the PNG of each object's first frame (holding
    the objects that appear there). v1: object 1 from 00000, object 3 from 00005; v2: object 2."""
    rng = np.random.default_rng(11)
    split = os.path.join(root, "valid")
    videos = {"v1": (["00000", "00005", "00010", "00015"], {"1": 0, "3": 1}), "v2": (["00000", "00005"], {"2": 0})}
    meta, first_masks = {}, {}
    for vid, (frames, starts) in videos.items():
        os.makedirs(os.path.join(split, "JPEGImages", vid))
        os.makedirs(os.path.join(split, "Annotations", vid))
        for frame in frames:
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).save(
                os.path.join(split, "JPEGImages", vid, f"{frame}.jpg"))
        for t in sorted(set(starts.values())):
            ids = np.zeros((12, 16), np.uint8)
            for oid, first in starts.items():
                if first == t:
                    first_masks[(vid, oid)] = _random_mask(rng, 12, 16)
                    ids[first_masks[(vid, oid)]] = int(oid)
            png = Image.fromarray(ids, mode="P")
            png.putpalette(submissions.davis_palette().reshape(-1).tolist())
            png.save(os.path.join(split, "Annotations", vid, f"{frames[t]}.png"))
        meta[vid] = {"objects": {oid: {"category": "fish", "frames": frames[first:]} for oid, first in starts.items()}}
    with open(os.path.join(split, "meta.json"), "w") as f:
        json.dump({"videos": meta}, f)
    return first_masks


def test_youtube_vos_valid_has_no_targets_and_gives_the_server_zip(tmp_path):
    """The valid split is withheld (first-frame masks are prompts only); its predictions become one
    palette PNG per listed frame with every object's id, overlaps to the higher score (the later
    object id on a tie), an object only from its first frame on, background where nothing is
    predicted."""
    from x2sam_jax.data.sources.common import encode_mask
    from x2sam_jax.eval.evaluator import submission_plan

    root = str(tmp_path / "ytvos19")
    first_masks = _ytvos_valid(root)
    source = refvos.youtube_vos(root, "valid")
    assert not source.has_targets and submission_plan("ytvos19", {}, source) == (False, "youtube_vos")
    v1 = source[0].validate()
    assert not v1.has_targets and v1.meta["frame_names"] == ["00000", "00005", "00010", "00015"]
    assert [i.instance_id for i in v1.instances] == [1, 3] and [p.frame for p in v1.visual_prompts] == [0, 1]
    for inst, first in zip(v1.instances, (0, 1)):   # the first-frame mask, nothing else
        assert [t for t, m in enumerate(inst.masks) if m is not None] == [first]
        np.testing.assert_array_equal(decode_rle(inst.masks[first]), first_masks[("v1", str(inst.instance_id))])
    assert refvos.youtube_vos(root, "valid", has_targets=True).has_targets
    fully_annotated = str(tmp_path / "annotated")                  # a PNG beyond the first frames: targets
    shutil.copytree(root, fully_annotated)
    shutil.copy(os.path.join(root, "valid", "Annotations", "v2", "00000.png"),
                os.path.join(fully_annotated, "valid", "Annotations", "v2", "00005.png"))
    assert refvos.youtube_vos(fully_annotated, "valid").has_targets

    expected = submissions.youtube_vos_expected(source)
    assert expected == {
        "v1": {"frames": ["00000", "00005", "00010", "00015"], "size": (12, 16),
               "objects": {"1": ["00000", "00005", "00010", "00015"], "3": ["00005", "00010", "00015"]}},
        "v2": {"frames": ["00000", "00005"], "size": (12, 16), "objects": {"2": ["00000", "00005"]}}}

    # Evaluation records as tasks.VideoObject keeps them: {(index, "instances", k): {frame: RLE}}.
    rng = np.random.default_rng(12)
    a = {t: _random_mask(rng, 12, 16) for t in range(3)}                 # object 1 on frames 0-2
    b = {t: a[t] | _random_mask(rng, 12, 16) for t in range(3)}          # object 3 overlaps it
    c = {t: _random_mask(rng, 12, 16) for t in range(2)}                 # v2, object 2
    frame_masks = {(0, "instances", 0): {t: encode_mask(m) for t, m in a.items()},
                   (0, "instances", 1): {t: encode_mask(m) for t, m in b.items()},
                   (1, "instances", 0): {t: encode_mask(m) for t, m in c.items()}}
    frame_scores = {(0, "instances", 0): {0: 0.9, 1: 0.8, 2: 0.5},
                    (0, "instances", 1): {0: 0.9, 1: 0.3, 2: 0.5},
                    (1, "instances", 0): {0: 0.7, 1: 0.7}}
    masks, scores = submissions.youtube_vos_predictions(source, frame_masks, frame_scores)
    assert set(masks["v1"]) == {"1", "3"} and set(masks["v1"]["3"]) == {"00000", "00005", "00010"}
    assert scores["v1"]["1"]["00005"] == 0.8
    out = tmp_path / "submission.zip"
    counts = {"entries": 6, "frames_background": 1}                     # v1's 00015: nothing predicted
    assert submissions.write_youtube_vos_rles(masks, None, expected=expected, scores=scores) == counts
    assert submissions.write_youtube_vos_rles(masks, str(out), expected=expected, scores=scores) == counts

    want = {("v1", "00000"): np.where(a[0], 1, 0),                       # object 3 not there yet
            ("v1", "00005"): np.where(a[1], 1, np.where(b[1], 3, 0)),    # object 1 has the higher score
            ("v1", "00010"): np.where(b[2], 3, np.where(a[2], 1, 0)),    # a tie: the later id
            ("v1", "00015"): np.zeros((12, 16), int),
            ("v2", "00000"): np.where(c[0], 2, 0), ("v2", "00005"): np.where(c[1], 2, 0)}
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == sorted(f"Annotations/{v}/{f}.png" for v, f in want)
        for (video, frame), ids in want.items():
            with Image.open(io.BytesIO(archive.read(f"Annotations/{video}/{frame}.png"))) as png:
                assert png.mode == "P" and png.size == (16, 12)
                palette = np.asarray(png.getpalette()[:12], np.uint8).reshape(4, 3)
                np.testing.assert_array_equal(palette, [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
                np.testing.assert_array_equal(np.asarray(png), ids)

    # Without scores the later object id wins every overlap; the writer also takes plain masks.
    plain = str(tmp_path / "plain.zip")
    submissions.write_youtube_vos_submission({"v1": {1: {"00005": a[1]}, 3: {"00005": b[1]}}}, plain)
    with zipfile.ZipFile(plain) as archive:
        assert archive.namelist() == ["Annotations/v1/00005.png"]
        with Image.open(io.BytesIO(archive.read("Annotations/v1/00005.png"))) as png:
            np.testing.assert_array_equal(np.asarray(png), np.where(b[1], 3, np.where(a[1], 1, 0)))

    # A video without any prediction, an object or a frame the video does not have: no zip.
    os.remove(out)
    for bad, message in (({"v1": masks["v1"]}, r"1 videos without any prediction \['v2'\]"),
                         ({**masks, "v2": {"5": masks["v2"]["2"]}}, r"objects \[5\] are not objects of the video"),
                         ({**masks, "v2": {"2": {**masks["v2"]["2"], "00010": masks["v2"]["2"]["00000"]}}},
                          r"frames \['00010'\] are not frames of the video"),
                         ({**masks, "v2": {"256": masks["v2"]["2"]}}, r"does not fit a palette index")):
        for path in (None, str(out)):
            with pytest.raises(ValueError, match=message):
                submissions.write_youtube_vos_rles(bad, path, expected=expected)
    assert not out.exists() and _leftovers(tmp_path) == []
