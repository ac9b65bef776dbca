"""Readers on files in the datasets' published formats (tests/data/*, each folder's README names the
source), the evaluation splits that ship without ground truth, SA-1B, and bad records that must be
counted skips (issue 13: truncated RLE, annotation without image_id)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data import features, transforms
from x2sam_jax.data.pipeline import build_eval_pipeline, build_train_pipeline
from x2sam_jax.data.robust import classify
from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import coco, refvos, sa1b, video_genseg, ytvis
from x2sam_jax.data.sources.common import check_rle, decode_rle, encode_mask, rle_counts

DATA = os.path.join(os.path.dirname(__file__), "data")
SAM = 64
# Qwen pixel budgets far below the real ones: the published images are 720p-2000px, the tests only
# need the pipeline to run on them.
SMALL_QWEN = transforms.QwenVisionPreprocessConfig(image_min_pixels=1024, image_max_pixels=64 * 64,
                                                   video_min_pixels=1024, video_max_pixels=8 * 64 * 64)
FEATURES = {"sam_size": SAM, "qwen": SMALL_QWEN}


@pytest.fixture(scope="module")
def tok():
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _jpeg(path, width, height, color=(90, 120, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)


# ----------------------------------------------------------------------------------- RLE checks
def test_rle_counts_match_pycocotools_runs():
    rng = np.random.default_rng(0)
    for k in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_counts(rle["counts"])
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)  # runs alternate 0, 1, 0, ...
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)  # column-major, as COCO


def test_truncated_rle_is_a_counted_corrupt_mask(tok, tmp_path):
    """Issue 13: counts cut to half decoded with pycocotools into random masks (the sum changed from
    run to run) and nothing was skipped. Now the run check refuses it and the pipeline counts it."""
    H, W = 20, 20
    good = np.zeros((H, W), bool)
    good[5:15, 5:15] = True
    rle = encode_mask(good)
    cut = {"size": [H, W], "counts": rle["counts"][: len(rle["counts"]) // 2]}
    with pytest.raises(ValueError, match="bad mask RLE"):
        check_rle(cut)
    with pytest.raises(ValueError, match="bad mask RLE"):
        decode_rle(cut)
    with pytest.raises(BadSample) as info:
        transforms.decode_rle(cut, H, W)
    assert classify(info.value) == "corrupt_mask"
    assert transforms.decode_rle(rle, H, W).sum() == 100
    # An uncompressed run list one pixel short is refused the same way.
    with pytest.raises(BadSample, match="bad mask RLE"):
        transforms.decode_rle({"size": [H, W], "counts": [0, H * W - 1]}, H, W)

    root = str(tmp_path)
    for name in ("a.jpg", "b.jpg"):
        _jpeg(os.path.join(root, "val2017", name), W, H)
    _dump(os.path.join(root, "annotations", "instances_val2017.json"), {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle},
                        {"id": 11, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": cut}],
        "categories": [{"id": 1, "name": "thing"}]})
    source = coco.coco_instances(root, "val2017", task="gen_seg")
    with pytest.raises(BadSample) as info:
        source[1]
    assert classify(info.value) == "corrupt_mask"
    it = build_eval_pipeline(source, tokenizer=tok, batch_size=2, feature_kwargs=FEATURES,
                             process_index=0, process_count=1)
    batch = next(it)
    assert list(batch["sample_index"]) == [0, -1]  # the good image; the bad one is skipped, not refilled
    assert it.stats()["by_reason"] == {"corrupt_mask": 1}
    assert batch["gt_masks"][0].sum() == 8 * 8  # the 10x10 square of a 20 px image on the S/4 = 16 grid


def test_annotation_without_image_id_is_a_counted_skip(tok, tmp_path):
    """Issue 13: one annotation without image_id made the whole source fail with a bare KeyError."""
    root = str(tmp_path)
    H, W = 16, 16
    ids = np.zeros((H, W, 3), np.uint8)
    ids[2:9, 2:9] = (5, 0, 0)  # segment id 5
    os.makedirs(os.path.join(root, "panoptic_val2017"))
    Image.fromarray(ids).save(os.path.join(root, "panoptic_val2017", "a.png"))
    _jpeg(os.path.join(root, "val2017", "a.jpg"), W, H)
    segments = [{"id": 5, "category_id": 1, "iscrowd": 0}]
    _dump(os.path.join(root, "annotations", "panoptic_val2017.json"), {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments},
                        {"file_name": "b.png", "segments_info": segments},  # no image_id
                        {"image_id": 99, "file_name": "c.png", "segments_info": segments}],  # unknown image
        "categories": [{"id": 1, "name": "person", "isthing": 1}]})
    source = coco.coco_panoptic(root, "val2017")
    assert len(source) == 3 and source[0].instances[0].masks[0] == encode_mask(ids[..., 0] == 5)
    for k, message in ((1, "unknown image_id 99"), (2, "annotation #1 has no 'image_id'")):
        with pytest.raises(BadSample, match=message) as info:
            source[k]
        assert classify(info.value) == "malformed_record"
        assert source.frame_count(k) == 0
    it = build_eval_pipeline(source, tokenizer=tok, batch_size=3, feature_kwargs=FEATURES,
                             process_index=0, process_count=1)
    assert list(next(it)["sample_index"]) == [0, -1, -1] and it.stats()["by_reason"] == {"malformed_record": 2}

    # The instances file the same way: the record without image_id is its own counted skip.
    _dump(os.path.join(root, "annotations", "instances_val2017.json"), {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode_mask(ids[..., 0] == 5)},
                        {"id": 2, "category_id": 1, "segmentation": encode_mask(ids[..., 0] == 5)}],
        "categories": [{"id": 1, "name": "person"}]})
    instances = coco.coco_instances(root, "val2017")
    assert len(instances) == 2 and len(instances[0].instances) == 1
    with pytest.raises(BadSample, match=r"annotation #1 \(id 2\) has no 'image_id'"):
        instances[1]


# ----------------------------------------------------------------------------------- Ref-YouTube-VOS
def test_ref_youtube_vos_valid_meta_reads_every_expression(tok):
    """The released valid meta file: expressions with only "exp"; the test videos it also lists are
    left out as the challenge protocol does."""
    root = os.path.join(DATA, "ref_youtube_vos")
    source = refvos.ref_youtube_vos(root, "valid")
    meta = json.load(open(os.path.join(root, "meta_expressions", "valid", "meta_expressions.json")))["videos"]
    assert not source.has_targets and len(source) == 2  # 3 videos listed, 1 of them a test video
    read = {}
    for k in range(len(source)):
        s = source[k]
        assert not s.has_targets and s.instances == [] and s.task == "vref_seg"
        assert s.frames == [os.path.join(root, "valid", "JPEGImages", s.meta["video_id"], f"{f}.jpg")
                            for f in meta[s.meta["video_id"]]["frames"]]
        with Image.open(s.frames[0]) as img:
            assert (s.height, s.width) == (img.height, img.width)
        for eid, phrase in zip(s.meta["expression_ids"], s.phrases):
            assert phrase.instance_indices == []
            read[(s.meta["video_id"], eid)] = phrase.text
    assert read == {(v, e): x["exp"] for v, video in meta.items() if v != "0390fabe58"
                    for e, x in video["expressions"].items()}
    everything = refvos.ref_youtube_vos(root, "valid", exclude_test_videos=False, group="expression")
    assert len(everything) == sum(len(v["expressions"]) for v in meta.values()) == 6

    # Evaluation features: every expression is a condition, no targets; training refuses the sample.
    s = source[1]
    f = features.make_features(s, tokenizer=tok, train=False, rng=np.random.default_rng(0), **FEATURES)
    assert len(f["cond_spans"]) == 3 and f["gt_masks"].shape == (3, 0, SAM // 4, SAM // 4)
    with pytest.raises(BadSample, match="no ground truth"):
        features.make_features(s, tokenizer=tok, train=True, rng=np.random.default_rng(0), **FEATURES)


# ----------------------------------------------------------------------------------- YouTube-VIS
def test_youtube_vis_valid_without_annotations_yields_its_videos(tok, tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "valid"))
    shutil.copy(os.path.join(DATA, "youtube_vis", "valid.json"), os.path.join(root, "valid", "valid.json"))
    # The published valid file has no categories: the train file's are used.
    _dump(os.path.join(root, "train", "train.json"), {"videos": [], "annotations": [], "categories": [
        {"id": 1, "name": "person"}, {"id": 2, "name": "giant_panda"}, {"id": 6, "name": "sedan"}]})
    source = ytvis.youtube_vis(root, "valid")
    assert len(source) == 1 and not source.has_targets
    s = source[0]
    assert not s.has_targets and s.instances == [] and s.num_frames == 36 and (s.height, s.width) == (720, 1280)
    assert s.categories == ["person", "giant panda", "sedan"] and s.meta["video_id"] == 1
    assert s.frames[5] == os.path.join(root, "valid", "JPEGImages", "00f88c4f0a", "00025.jpg")
    # Training on an annotated file still drops empty videos; the valid file keeps them on its own.
    assert len(ytvis.youtube_vis(root, "valid", skip_empty=True)) == 0
    for name in s.frames[:8]:
        _jpeg(name, 1280, 720)
    clip = features.select_frames(s, list(range(8)))
    f = features.make_features(clip, tokenizer=tok, train=False, rng=np.random.default_rng(0), **FEATURES)
    assert len(f["cond_spans"]) == 3 and f["gt_masks"].shape[:2] == (8, 0)


# ----------------------------------------------------------------------------------- VIPSeg
def _vipseg_truth(root, vid, frame, category_id, isthing):
    """The made-up raw mask (VIPSeg encoding) of one category: the ground truth behind the JSON."""
    raw = np.asarray(Image.open(os.path.join(root, "panomasks", vid, f"{frame}.png"))).astype(np.int64)
    return (raw // 100 == category_id + 1) & (raw >= 125) if isthing else raw == category_id + 1


def test_vipseg_json_of_its_own_conversion_script_reads_every_frame(tmp_path):
    root = os.path.join(DATA, "vipseg")
    data = json.load(open(os.path.join(root, "panoptic_gt_VIPSeg_train.json")))
    assert data["videos"][0]["images"][0]["file_name"] == "00000000.png"  # named after the mask
    train, val = video_genseg.vipseg(root, "train"), video_genseg.vipseg(root, "val")
    for source, vid, expected in ((train, "101_demoA", {"road", "sky", "person", "car"}),
                                  (val, "102_demoB", {"wall", "person"})):
        s = source[0]
        assert s.meta["video_id"] == vid and len(s.categories) == 124
        assert s.frames == [os.path.join(root, "images", vid, f"{t:08d}.jpg") for t in range(3)]
        assert all(os.path.isfile(f) for f in s.frames)
        assert {i.category for i in s.instances} == expected
        for inst in s.instances:
            for t in range(3):
                truth = _vipseg_truth(root, vid, f"{t:08d}", inst.category_id, inst.is_thing)
                if inst.masks[t] is None:
                    assert not truth.any()
                else:
                    np.testing.assert_array_equal(decode_rle(inst.masks[t]).astype(bool), truth)
        frames, _ = features.load_frames(s)  # every frame decodes at the annotated size
        assert [f.shape for f in frames] == [(24, 40, 3)] * 3
    assert val[0].instances[[i.category for i in val[0].instances].index("person")].masks[2] is None

    # X2SAM's layout (file_name = the .jpg frame) reads the same frames.
    copy = str(tmp_path / "vipseg")
    shutil.copytree(root, copy)
    for video in data["videos"]:
        for image in video["images"]:
            image["file_name"] = image["file_name"].replace(".png", ".jpg")
    _dump(os.path.join(copy, "panoptic_gt_VIPSeg_train.json"), data)
    x2sam_layout = video_genseg.vipseg(copy, "train")[0]
    assert [os.path.basename(f) for f in x2sam_layout.frames] == [f"{t:08d}.jpg" for t in range(3)]
    assert [i.masks for i in x2sam_layout.instances] == [i.masks for i in train[0].instances]

    # Neither name on disk: a clear, counted error naming the file and what was tried.
    shutil.rmtree(os.path.join(copy, "images", "101_demoA"))
    with pytest.raises(BadSample, match=r"missing image file .*101_demoA/00000000.jpg \(also tried") as info:
        video_genseg.vipseg(copy, "train")[0]
    assert classify(info.value) == "missing_file"


def test_vipseg_frame_extension_is_resolved_once_per_video(tmp_path):
    root = str(tmp_path / "vipseg")
    shutil.copytree(os.path.join(DATA, "vipseg"), root)
    source = video_genseg.vipseg(root, "train")
    first = source[0]
    assert source._frame_suffix == {"101_demoA": ".jpg"}
    os.remove(first.frames[1])  # not probed again: the file's absence surfaces when it is decoded
    assert source[0].frames == first.frames
    with pytest.raises(BadSample, match="missing image file"):
        features.load_frames(source[0])


# ----------------------------------------------------------------------------------- SA-1B
def _sa1b_tree(root):
    """The released layout: sa_000020/ with the published JSON and a 2000x1500 image (not published)."""
    published = os.path.join(DATA, "sa1b", "sa_000020", "sa_226381.json")
    os.makedirs(os.path.join(root, "sa_000020"))
    shutil.copy(published, os.path.join(root, "sa_000020", "sa_226381.json"))
    _jpeg(os.path.join(root, "sa_000020", "sa_226381.jpg"), 2000, 1500)
    data = json.load(open(published))
    return data


def test_sa1b_released_layout_and_index_reuse(tmp_path):
    root = str(tmp_path / "SA1B")
    data = _sa1b_tree(root)
    source = sa1b(root, progress=False)
    index_file = os.path.join(root, ".x2sam_sa1b_index.npz")
    assert source.index_info == {"images": 1, "folders": 1, "listed_folders": 1, "index_file": index_file}
    s = source[0]
    assert s.task == "gen_seg" and s.categories == ["object"] and s.sample_id == "sa_226381"
    assert s.frames == [os.path.join(root, "sa_000020", "sa_226381.jpg")] and (s.height, s.width) == (1500, 2000)
    assert [i.category for i in s.instances] == ["object"] * 8
    assert [i.instance_id for i in s.instances] == [a["id"] for a in data["annotations"]]
    for inst, ann in zip(s.instances, data["annotations"]):
        assert decode_rle(inst.masks[0]).sum() == ann["area"]  # the file's own area
    assert len(sa1b(root, max_masks=3, progress=False)[0].instances) == 3  # the first 3, file order

    # Built once: the next construction reads the cache and lists no folder.
    stamp = os.stat(index_file).st_mtime_ns
    again = sa1b(root, progress=False)
    assert again.index_info["listed_folders"] == 0 and len(again) == 1 and os.stat(index_file).st_mtime_ns == stamp
    # A new folder is listed alone; images without their JSON are left out.
    os.makedirs(os.path.join(root, "sa_000021"))
    shutil.copy(os.path.join(root, "sa_000020", "sa_226381.json"), os.path.join(root, "sa_000021", "sa_7.json"))
    shutil.copy(os.path.join(root, "sa_000020", "sa_226381.jpg"), os.path.join(root, "sa_000021", "sa_7.jpg"))
    shutil.copy(os.path.join(root, "sa_000020", "sa_226381.jpg"), os.path.join(root, "sa_000021", "sa_8.jpg"))
    grown = sa1b(root, progress=False)
    assert grown.index_info["listed_folders"] == 1 and len(grown) == 2
    assert grown.paths(1) == (os.path.join(root, "sa_000021", "sa_7.jpg"), os.path.join(root, "sa_000021", "sa_7.json"))
    assert sa1b(root, progress=False).index_info["listed_folders"] == 0
    # A read-only dataset keeps its index outside (explicit file here).
    outside = str(tmp_path / "cache" / "sa1b.npz")
    assert sa1b(root, index_file=outside, progress=False).index_info["listed_folders"] == 2
    assert os.path.isfile(outside)


def test_sa1b_feeds_the_stage1_pipeline_and_counts_corrupt_files(tok, tmp_path):
    root = str(tmp_path / "SA1B")
    _sa1b_tree(root)
    folder = os.path.join(root, "sa_000021")
    os.makedirs(folder)
    for k in (1, 2, 3):
        shutil.copy(os.path.join(root, "sa_000020", "sa_226381.json"), os.path.join(folder, f"sa_{k}.json"))
        shutil.copy(os.path.join(root, "sa_000020", "sa_226381.jpg"), os.path.join(folder, f"sa_{k}.jpg"))
    with open(os.path.join(folder, "sa_2.json"), "w") as f:
        f.write('{"image": {"height": 1500, "width": 2000}, "annotations": [')  # cut off
    with open(os.path.join(folder, "sa_3.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    it = build_train_pipeline([{"type": "sa1b", "root": root, "max_masks": 5}], tokenizer=tok,
                              global_batch_images=1, images_per_device=1, seed=0, feature_kwargs={"qwen": SMALL_QWEN},
                              sam_size=SAM, process_index=0, process_count=1, num_epochs=1)
    batches = list(it)
    assert len(batches) == 4  # one image per step; the two bad ones are refilled by good ones
    # (a bad image is counted each time it is drawn, as its own slot or as a refill candidate)
    stats = it.stats()
    assert set(stats["by_reason"]) == {"corrupt_image", "malformed_record"}
    assert any("sa_2.json" in m for m in stats["examples"]["malformed_record"])
    assert any("sa_3.jpg" in m for m in stats["examples"]["corrupt_image"])
    for b in batches:
        # One-class generic segmentation: one condition ("object"), every mask a target of class 0.
        assert b["gt_classes"][0][b["instance_valid"][0]].tolist() == [0] * 5
        assert int(b["cond_valid"][0].sum()) == 1
        text = tok.decode(b["input_ids"][0][b["attention_mask"][0].astype(bool)])
        assert text.count("<p>object</p>") == 1
