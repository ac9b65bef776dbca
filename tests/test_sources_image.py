"""Image sources on tiny fixtures written here in each dataset's real on-disk format.

Every test writes masks, reads them back through the source and compares the decoded RLEs with
what was written (exact pixel equality), and checks bad records raise BadSample and missing
files raise FileNotFoundError naming the path.
"""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import coco, refer
from x2sam_jax.data.sources.common import decode_rle, encode_mask, id_to_rgb

H, W = 24, 32


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


# ----------------------------------------------------------------------------------- COCO panoptic
def _write_coco_panoptic(root, split="val2017"):
    person, tree = _rect(2, 10, 3, 9), _rect(12, 20, 20, 30)
    sky = ~(person | tree)
    sky[20:, :] = False  # bottom rows stay unlabeled (id 0)
    ids = np.zeros((H, W), np.int64)
    ids[person], ids[tree], ids[sky] = 5, 300, 70000  # 70000 needs all three PNG channels
    os.makedirs(os.path.join(root, f"panoptic_{split}"))
    Image.fromarray(id_to_rgb(ids)).save(os.path.join(root, f"panoptic_{split}", "000000000007.png"))
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 88, "name": "tree-merged", "isthing": 0},
            {"id": 187, "name": "sky-other-merged", "isthing": 0}]
    anns = [{"image_id": 7, "file_name": "000000000007.png", "segments_info": [
        {"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 300, "category_id": 88, "iscrowd": 0},
        {"id": 70000, "category_id": 187, "iscrowd": 1}]},
        {"image_id": 8, "file_name": "000000000008.png", "segments_info": []}]
    images = [{"id": 7, "file_name": "000000000007.jpg", "height": H, "width": W},
              {"id": 8, "file_name": "000000000008.jpg", "height": H, "width": W}]
    _dump(os.path.join(root, "annotations", f"panoptic_{split}.json"),
          {"images": images, "annotations": anns, "categories": cats})
    return {5: person, 300: tree, 70000: sky}


def test_coco_panoptic_things_stuff_and_masks(tmp_path):
    expected = _write_coco_panoptic(str(tmp_path))
    src = coco.coco_panoptic(str(tmp_path), "val2017")
    assert len(src) == 1  # the image without segments is skipped
    s = src[0]
    assert s.task == "gen_seg" and s.frames == [str(tmp_path / "val2017" / "000000000007.jpg")]
    assert (s.height, s.width) == (H, W)
    assert s.categories == ["person", "tree", "sky other"]
    by_id = {inst.instance_id: inst for inst in s.instances}
    assert sorted(by_id) == [5, 300, 70000]
    for seg_id, mask in expected.items():
        np.testing.assert_array_equal(decode_rle(by_id[seg_id].masks[0]).astype(bool), mask)
    assert by_id[5].is_thing and not by_id[300].is_thing and not by_id[70000].is_thing
    assert by_id[300].category == "tree" and by_id[70000].iscrowd and not by_id[5].iscrowd
    assert src.frame_count(0) == 1


def test_coco_panoptic_bad_records(tmp_path):
    _write_coco_panoptic(str(tmp_path))
    path = tmp_path / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="unknown category 999"):
        coco.coco_panoptic(str(tmp_path), "val2017")[0]
    data["annotations"][0]["segments_info"][0]["category_id"] = 1
    data["images"][0]["height"] = H + 1  # PNG no longer matches the image size
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="PNG"):
        coco.coco_panoptic(str(tmp_path), "val2017")[0]
    os.remove(tmp_path / "panoptic_val2017" / "000000000007.png")
    with pytest.raises(BadSample, match="not found"):
        coco.coco_panoptic(str(tmp_path), "val2017")[0]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        coco.coco_panoptic(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="panoptic_train2017.json"):
        coco.coco_panoptic(str(tmp_path), "train2017")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        coco.coco_instances(str(tmp_path), "train2017")
    with pytest.raises(FileNotFoundError, match="refs\\(unc\\).p"):
        os.makedirs(tmp_path / "refcoco")
        refer.refcoco(str(tmp_path), "refcoco")


def test_ade20k_panoptic_layout(tmp_path):
    root = str(tmp_path)
    ids = np.zeros((H, W), np.int64)
    ids[:, :10] = 1
    ids[:, 10:] = 2
    os.makedirs(os.path.join(root, "ade20k_panoptic_val"))
    Image.fromarray(id_to_rgb(ids)).save(os.path.join(root, "ade20k_panoptic_val", "ADE_val_00000001.png"))
    _dump(os.path.join(root, "ade20k_panoptic_val.json"), {
        "images": [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "height": H, "width": W}],
        "annotations": [{"image_id": "ADE_val_00000001", "file_name": "ADE_val_00000001.png",
                         "segments_info": [{"id": 1, "category_id": 3, "iscrowd": 0},
                                           {"id": 2, "category_id": 12, "iscrowd": 0}]}],
        "categories": [{"id": 3, "name": "floor, flooring", "isthing": 0}, {"id": 12, "name": "person", "isthing": 1}]})
    s = coco.ade20k_panoptic(root, "val")[0]
    assert s.dataset == "ade20k_panoptic" and s.task == "ov_seg"
    assert s.frames == [os.path.join(root, "images", "validation", "ADE_val_00000001.jpg")]
    np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]), (ids == 1).astype(np.uint8))
    assert [i.is_thing for i in s.instances] == [False, True]


# ----------------------------------------------------------------------------------- COCO instances
def _write_coco_instances(root, split="train2017"):
    poly_mask = _rect(4, 12, 4, 12)
    crowd = _rect(14, 22, 2, 30)
    rle = encode_mask(_rect(0, 6, 20, 28))
    anns = [
        # polygon of the square [4, 12) x [4, 12): pycocotools' rasterisation of the corners
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": _uncompressed_rle(crowd)},
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": rle},
        {"id": 4, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [[1, 1, 2, 2]]},  # ignored
    ]
    _dump(os.path.join(root, "annotations", f"instances_{split}.json"), {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "traffic_light"}]})
    return poly_mask, crowd, decode_rle(rle).astype(bool)


def test_coco_instances_polygon_rle_and_crowd(tmp_path):
    _, crowd, rle_mask = _write_coco_instances(str(tmp_path))
    src = coco.coco_instances(str(tmp_path))
    assert len(src) == 1
    s = src[0]
    assert s.categories == ["dog", "traffic light"]
    poly = decode_rle(s.instances[0].masks[0])
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[4, 4, 12, 4, 12, 12, 4, 12]], H, W)))
    np.testing.assert_array_equal(poly, ref)
    assert 60 <= poly.sum() <= 90  # an 8x8 square, give or take pycocotools' boundary rule
    np.testing.assert_array_equal(decode_rle(s.instances[1].masks[0]).astype(bool), crowd)
    assert s.instances[1].iscrowd and s.instances[1].category == "traffic light"
    np.testing.assert_array_equal(decode_rle(s.instances[2].masks[0]).astype(bool), rle_mask)
    assert [i.instance_id for i in s.instances] == [1, 2, 3]  # the two-point polygon is dropped


def test_coco_instances_bad_segmentation(tmp_path):
    _write_coco_instances(str(tmp_path))
    path = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"]["counts"] = [3, 4]  # covers 7 pixels, not H*W
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="annotation 2"):
        coco.coco_instances(str(tmp_path))[0]
    del data["annotations"][1]["segmentation"]
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="malformed record"):
        coco.coco_instances(str(tmp_path))[0]


# ----------------------------------------------------------------------------------- RefCOCO / gRefCOCO
def _write_refer(root, dataset="refcoco", split_by="unc", grefs_json=False):
    a, b = _rect(2, 10, 2, 10), _rect(12, 20, 12, 30)
    data_dir = os.path.join(root, dataset)
    os.makedirs(data_dir, exist_ok=True)
    instances = {
        "images": [{"id": 10, "file_name": "COCO_train2014_000000000010.jpg", "height": H, "width": W},
                   {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "height": H, "width": W}],
        "annotations": [{"id": 100, "image_id": 10, "category_id": 1, "segmentation": encode_mask(a)},
                        {"id": 101, "image_id": 10, "category_id": 2, "segmentation": [[12, 12, 30, 12, 30, 20, 12, 20]]},
                        {"id": 102, "image_id": 11, "category_id": 1, "segmentation": encode_mask(b)}],
        "categories": [{"id": 1, "name": "man"}, {"id": 2, "name": "car"}],
    }
    _dump(os.path.join(data_dir, "instances.json"), instances)

    def sents(*texts):
        return [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": i} for i, t in enumerate(texts)]

    if not grefs_json:
        refs = [
            {"ref_id": 0, "ann_id": 100, "image_id": 10, "split": "train", "category_id": 1,
             "sentences": sents("The Left Man", "man on left", "the left man")},
            {"ref_id": 1, "ann_id": 101, "image_id": 10, "split": "train", "category_id": 2, "sentences": sents("red car")},
            {"ref_id": 2, "ann_id": 102, "image_id": 11, "split": "val", "category_id": 1, "sentences": sents("a man")},
        ]
        with open(os.path.join(data_dir, f"refs({split_by}).p"), "wb") as f:
            pickle.dump(refs, f, protocol=2)
    else:
        refs = [
            {"ref_id": 0, "ann_id": [100, 101], "image_id": 10, "split": "val", "no_target": False,
             "category_id": 1, "sentences": sents("everything on the left and the car")},
            {"ref_id": 1, "ann_id": [-1], "image_id": 10, "split": "val", "no_target": True,
             "category_id": 1, "sentences": sents("the flying dog")},
        ]
        _dump(os.path.join(data_dir, "grefs(unc).json"), refs)
    return a, b


def test_refcoco_groups_by_image_and_dedupes_sentences(tmp_path):
    a, _ = _write_refer(str(tmp_path))
    src = refer.refcoco(str(tmp_path), "refcoco", "train")
    assert len(src) == 1 and src.name == "refcoco"
    s = src[0]
    assert s.task == "ref_seg" and s.frames == [str(tmp_path / "images" / "train2014" / "COCO_train2014_000000000010.jpg")]
    assert [(p.text, p.instance_indices) for p in s.phrases] == [
        ("the left man", [0]), ("man on left", [0]), ("red car", [1])]
    np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]).astype(bool), a)
    car = decode_rle(s.instances[1].masks[0])
    np.testing.assert_array_equal(car, mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects([[12, 12, 30, 12, 30, 20, 12, 20]], H, W))))
    per_ref = refer.refcoco(str(tmp_path), "refcoco", "train", group="ref")
    assert len(per_ref) == 2 and len(per_ref[1].instances) == 1 and per_ref[1].phrases[0].text == "red car"


def test_refcocog_uses_umd_split_and_rejects_code_in_pickle(tmp_path):
    _write_refer(str(tmp_path), "refcocog", "umd")
    assert len(refer.refcoco(str(tmp_path), "refcocog", "val")) == 1

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "refcocog" / "refs(umd).p", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        refer.refcoco(str(tmp_path), "refcocog", "val")


def test_refcoco_missing_annotation_is_bad_sample(tmp_path):
    _write_refer(str(tmp_path))
    path = tmp_path / "refcoco" / "instances.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="missing annotation 100"):
        refer.refcoco(str(tmp_path), "refcoco", "train")[0]


def test_grefcoco_multi_and_no_target(tmp_path):
    a, _ = _write_refer(str(tmp_path), "grefcoco", grefs_json=True)
    src = refer.grefcoco(str(tmp_path), "val", group="ref")
    assert len(src) == 2
    multi, none = src[0], src[1]
    assert multi.phrases[0].instance_indices == [0, 1] and len(multi.instances) == 2
    np.testing.assert_array_equal(decode_rle(multi.instances[0].masks[0]).astype(bool), a)
    assert none.phrases[0].text == "the flying dog" and none.phrases[0].instance_indices == [] and not none.instances
    assert len(refer.grefcoco(str(tmp_path), "val", include_no_target=False, group="ref")) == 1


# ----------------------------------------------------------------------------------- LISA ReasonSeg
def test_lisa_polygons_ignore_and_queries(tmp_path):
    from x2sam_jax.data.sources import lisa

    split = tmp_path / "train"
    split.mkdir()
    Image.new("RGB", (W, H)).save(split / "img1.jpg")
    shapes = [{"label": "target", "points": [[2, 2], [20, 2], [20, 16], [2, 16]]},
              {"label": "ignore", "points": [[5, 5], [9, 5], [9, 9], [5, 9]]},
              {"label": "flag", "points": [[0, 0], [31, 0], [31, 23], [0, 23]]}]
    (split / "img1.json").write_text(json.dumps(
        {"text": ["What keeps the food cold?", "the fridge"], "is_sentence": True, "shapes": shapes}))
    Image.new("RGB", (W, H)).save(split / "img2.jpg")
    (split / "img2.json").write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": [
        {"label": "t", "points": [[1, 1], [3, 1], [3, 3]]}]}))
    src = lisa.LisaReasonSegSource(str(tmp_path), "train")
    assert len(src) == 2
    s = src[0]
    assert s.task == "reason_seg" and [p.text for p in s.phrases] == ["What keeps the food cold?", "the fridge"]
    target = decode_rle(s.instances[0].masks[0]).astype(bool)
    ignore = decode_rle(s.meta["ignore_mask"]).astype(bool)
    outer = np.zeros((H, W), bool)
    outer[2:17, 2:21] = True  # PIL fills the polygon interior and its outline (inclusive corners)
    inner = np.zeros((H, W), bool)
    inner[5:10, 5:10] = True
    np.testing.assert_array_equal(ignore, inner)
    np.testing.assert_array_equal(target, outer & ~inner)  # the smaller ignore shape is painted last
    assert len(lisa.LisaReasonSegSource(str(tmp_path), "train", query_type="phrase")) == 1
    (split / "img2.json").write_text("{broken")
    with pytest.raises(BadSample, match="not valid JSON"):
        src[1]
    with pytest.raises(FileNotFoundError, match="val"):
        lisa.LisaReasonSegSource(str(tmp_path), "val")


# ----------------------------------------------------------------------------------- GCG
def _gcg_masks():
    return _rect(1, 8, 1, 10), _rect(12, 22, 5, 30), _rect(0, 4, 25, 32)


def test_gcg_grandf_flavour_spans_and_overlaps(tmp_path):
    from x2sam_jax.data.sources import gcg

    man, car, sign = _gcg_masks()
    caption = '"A man stands next to a red car."'
    clean = caption.strip('"').lower()
    records = [{"image_id": "img1", "file_name": "img1.jpg", "caption": caption, "groundings": {
        "a red car": {"token_positives": [clean.index("a red car"), clean.index("a red car") + 9],
                      "rle_masks": [encode_mask(car)]},
        "A man": {"token_positives": [0, 5], "rle_masks": [encode_mask(man), encode_mask(sign)]},
        "man stands": {"token_positives": [2, 12], "rle_masks": [encode_mask(man)]},  # overlaps "a man"
        "a dog": {"token_positives": [0, 5], "rle_masks": [encode_mask(man)]},  # not in the caption
    }}]
    path = tmp_path / "GranDf_HA_GCG_train.json"
    path.write_text(json.dumps(records))
    src = gcg.GcgSource(str(path), str(tmp_path / "images"))
    assert src.flavour == "grandf"
    s = src[0]
    assert s.caption == clean and s.task == "gcg_seg" and (s.height, s.width) == (H, W)  # size from the RLE
    assert [(p.text, p.span) for p in s.phrases] == [("a man", (0, 5)), ("a red car", (21, 30))]
    assert all(s.caption[p.span[0]:p.span[1]] == p.text for p in s.phrases)
    np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]).astype(bool), man | sign)  # pieces merged
    np.testing.assert_array_equal(decode_rle(s.instances[1].masks[0]).astype(bool), car)


def test_gcg_refcocog_and_flickr_flavours(tmp_path):
    from x2sam_jax.data.sources import gcg

    man, car, _ = _gcg_masks()
    refcocog = [{"k1": {"img_file_name": "COCO_1.jpg", "caption": "the car is parked near the man.", "height": H,
                        "width": W, "refs": [{"sentence": "the man", "segmentation": [[1, 1, 10, 1, 10, 8, 1, 8]]},
                                             {"sentence": "The car", "segmentation": encode_mask(car)}]}}]
    p1 = tmp_path / "RefCOCOg_GCG_train.json"
    p1.write_text(json.dumps(refcocog))
    s = gcg.GcgSource(str(p1), str(tmp_path))[0]
    assert [(p.text, p.span) for p in s.phrases] == [("the car", (0, 7)), ("the man", (23, 30))]
    np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]).astype(bool), car)

    flickr = {"images": [{"id": 5, "file_name": "5.jpg", "caption": "A man drives a car", "height": H, "width": W},
                         {"id": 6, "file_name": "6.jpg", "caption": "two words", "height": H, "width": W}],
              "annotations": [{"id": 1, "image_id": 5, "tokens_positive": [[15, 18]], "sam_mask": encode_mask(car)},
                              {"id": 2, "image_id": 5, "tokens_positive": [[0, 5]], "sam_mask": encode_mask(man)},
                              {"id": 3, "image_id": 6, "tokens_positive": [[0, 3]], "sam_mask": encode_mask(man)}]}
    p2 = tmp_path / "flickr_mergedGT_GCG_train.json"
    p2.write_text(json.dumps(flickr))
    src = gcg.GcgSource(str(p2), str(tmp_path))
    assert src.flavour == "flickr" and len(src) == 1  # captions under three words are skipped
    assert [(p.text, p.span) for p in src[0].phrases] == [("a man", (0, 5)), ("car", (15, 18))]

    refcocog[0]["k1"]["refs"][1]["segmentation"] = {"size": [H + 1, W], "counts": "bad"}
    p1.write_text(json.dumps(refcocog))
    with pytest.raises(BadSample, match="the car"):
        gcg.GcgSource(str(p1), str(tmp_path))[0]


# ----------------------------------------------------------------------------------- COCO-VGD / Interactive
def test_coco_vgd_prompts_per_kind(tmp_path):
    from x2sam_jax.data.sources import vgd

    obj, point, box = _rect(4, 14, 4, 14), _rect(8, 10, 8, 10), _rect(3, 15, 3, 15)
    root = tmp_path / "coco_vgd"
    _dump(str(root / "coco2017" / "annotations" / "instances_train2017.json"),
          {"images": [], "annotations": [], "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]})
    _dump(str(root / "annotations" / "img_vgdseg_coco_train.json"), [{
        "image_file": "000001.jpg", "image_id": 1, "image_size": [H, W], "annotations": [
            {"id": 11, "category_id": 18, "segmentation": encode_mask(obj), "visual_prompts": {
                "point_visual_prompt": encode_mask(point), "box_visual_prompt": encode_mask(box),
                "scribble_visual_prompt": encode_mask(np.zeros((H, W), bool))}},  # empty: dropped
            {"id": 12, "category_id": 3, "segmentation": encode_mask(box), "visual_prompts": {
                "box_visual_prompt": encode_mask(obj)}}]}])
    src = vgd.coco_vgd(str(root), "train")
    s = src[0]
    assert s.task == "vgd_seg" and s.categories == ["car", "dog"]
    assert [(p.kind, p.instance_indices) for p in s.visual_prompts] == [("point", [0]), ("box", [0]), ("box", [1])]
    np.testing.assert_array_equal(decode_rle(s.visual_prompts[0].mask).astype(bool), point)
    np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]).astype(bool), obj)
    assert s.instances[0].category == "dog"
    point_only = vgd.coco_vgd(str(root), "train", prompt_kinds=("point",))[0]
    assert len(point_only.instances) == 1 and [p.kind for p in point_only.visual_prompts] == ["point"]
    with pytest.raises(BadSample, match="scribble"):
        vgd.coco_vgd(str(root), "train", prompt_kinds=("scribble",))[0]
    with pytest.raises(ValueError, match="prompt_kinds"):
        vgd.coco_vgd(str(root), "train", prompt_kinds=("lasso",))


def test_coco_interactive(tmp_path):
    from x2sam_jax.data.sources import vgd

    obj, scribble = _rect(4, 14, 4, 14), _rect(9, 10, 5, 13)
    path = tmp_path / "coco_interactive_val_psalm.json"
    path.write_text(json.dumps([{"image": "val2017/000000000139.jpg",
                                 "image_info": {"id": 139, "file_name": "000000000139.jpg", "height": H, "width": W},
                                 "anns": [{"id": 5, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0,
                                           "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]],
                                           "scribble_visual_prompt_mask": encode_mask(scribble),
                                           "box_visual_prompt_mask": encode_mask(obj)}]}]))
    s = vgd.CocoInteractiveSource(str(path), str(tmp_path / "coco2017"))[0]
    assert s.task == "inter_seg" and s.frames == [str(tmp_path / "coco2017" / "val2017" / "000000000139.jpg")]
    assert [p.kind for p in s.visual_prompts] == ["scribble", "box"] and s.visual_prompts[1].box == (4, 4, 14, 14)
    np.testing.assert_array_equal(decode_rle(s.visual_prompts[0].mask).astype(bool), scribble)
    assert s.meta["prompt_dilation"] == {"point": 10, "scribble": 5}


# ----------------------------------------------------------------------------------- LLaVA chat
def test_llava_chat_json_and_jsonl(tmp_path):
    from x2sam_jax.data.sources import chat

    recs = [{"id": "a", "image": "coco/train2017/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "c", "image": "x.jpg", "conversations": [{"from": "robot", "value": "?"}]}]
    os.makedirs(tmp_path / "images" / "coco" / "train2017")
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "coco" / "train2017" / "1.jpg")
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    for name in ("llava.json", "llava.jsonl"):
        src = chat.LlavaChatSource(str(tmp_path / name), str(tmp_path / "images"))
        assert len(src) == 2  # the pure-text record is skipped
        s = src[0]
        assert s.task == "chat" and s.frames == [str(tmp_path / "images" / "coco" / "train2017" / "1.jpg")]
        assert s.conversation[1] == {"from": "gpt", "value": "A cat."} and (s.height, s.width) == (H, W)
        with pytest.raises(BadSample, match="bad turn"):
            src[1]
    with_text = chat.LlavaChatSource(str(tmp_path / "llava.json"), str(tmp_path), exclude_pure_text=False)
    assert with_text[1].frames == [] and with_text.frame_count(1) == 0
    with pytest.raises(BadSample, match="1.jpg"):  # image_dir is wrong here: the header cannot be read
        with_text[0]


def test_build_source_from_config_dict(tmp_path):
    from x2sam_jax.data import sources

    _write_refer(str(tmp_path))
    src = sources.build_source({"type": "refcoco", "root": str(tmp_path), "split": "train"})
    assert src.name == "refcoco" and len(src) == 1
    _write_coco_instances(str(tmp_path / "coco"))
    by_class = sources.build_source({"type": "CocoInstancesSource", "ann_file": str(
        tmp_path / "coco" / "annotations" / "instances_train2017.json"), "image_dir": str(tmp_path)})
    assert len(by_class[0].instances) == 3
    with pytest.raises(ValueError, match="unknown source type 'nope'"):
        sources.build_source({"type": "nope"})
    with pytest.raises(ValueError, match="unknown source type 'BadSample'"):
        sources.build_source({"type": "BadSample"})


def test_every_factory_names_the_missing_path(tmp_path):
    from x2sam_jax.data import sources

    for name, factory in sources.FACTORIES.items():
        missing = tmp_path / f"no_{name}"
        with pytest.raises(FileNotFoundError, match=f"no_{name}"):
            factory(str(missing))
        missing.mkdir()  # the root exists, its annotation files do not
        with pytest.raises(FileNotFoundError, match=f"no_{name}"):
            factory(str(missing))


def test_gcg_val_file_is_images_only(tmp_path):
    from x2sam_jax.data.sources import gcg

    path = tmp_path / "val_gcg_coco_mask_gt.json"
    path.write_text(json.dumps({"images": [{"id": "sa_1", "height": H, "width": W}],
                                "annotations": [{"image_id": "sa_1", "segmentation": encode_mask(_rect(0, 2, 0, 2))}]}))
    src = gcg.GcgSource(str(path), str(tmp_path))
    assert src.flavour == "val"
    s = src[0]
    assert s.frames == [str(tmp_path / "sa_1.jpg")] and not s.instances and s.caption is None


def test_gcg_val_file_with_caption_ground_truth(tmp_path):
    """GLaMM's val/test ground truth: the mask file plus {split}_gcg_coco_caption_gt.json beside it
    (caption and labels; the i-th mask grounds the i-th label)."""
    from x2sam_jax.data.sources import gcg

    masks = tmp_path / "val_gcg_coco_mask_gt.json"
    masks.write_text(json.dumps({
        "images": [{"id": "a", "file_name": "a.jpg", "height": H, "width": W},
                   {"id": "b", "file_name": "b.jpg", "height": H, "width": W}],
        "annotations": [{"image_id": "a", "segmentation": encode_mask(_rect(0, 2, 0, 2))},
                        {"image_id": "a", "segmentation": encode_mask(_rect(5, 9, 5, 9))},
                        {"image_id": "b", "segmentation": encode_mask(_rect(0, 2, 0, 2))}]}))
    (tmp_path / "val_gcg_coco_caption_gt.json").write_text(json.dumps({
        "images": [{"id": "a"}, {"id": "b"}],
        "annotations": [{"image_id": "a", "caption": "A dog chases a ball.", "labels": ["A dog", "a ball"]},
                        {"image_id": "b", "caption": "Two cats.", "labels": ["two cats", "a mouse"]}]}))
    src = gcg.GcgSource(str(masks), str(tmp_path))
    s = src[0]
    assert s.caption == "a dog chases a ball." and [p.text for p in s.phrases] == ["a dog", "a ball"]
    assert [p.span for p in s.phrases] == [(0, 5), (13, 19)]
    assert decode_rle(s.instances[1].masks[0])[5:9, 5:9].all() and s.instances[1].masks[0] != s.instances[0].masks[0]
    with pytest.raises(BadSample, match="2 labels for 1 ground-truth masks"):
        src[1]
    assert not gcg.GcgSource(str(masks), str(tmp_path), caption_file=False)[0].instances


def test_sample_validate_catches_inconsistent_records():
    from x2sam_jax.data.schema import Instance, Phrase, Sample, VisualPrompt

    rle = encode_mask(_rect(0, 2, 0, 2))

    def sample(**kw):
        base = dict(dataset="d", task="ref_seg", sample_id="s", frames=["a.jpg"], height=H, width=W,
                    instances=[Instance(masks=[rle])], phrases=[Phrase(text="x", instance_indices=[0])])
        return Sample(**{**base, **kw})

    assert sample().validate().num_frames == 1
    for bad, reason in [
        (dict(task="segment"), "unknown task"),
        (dict(frames=[]), "no frames"),
        (dict(height=0), "bad image size"),
        (dict(instances=[Instance(masks=[rle, rle])]), "2 masks for 1 frames"),
        (dict(phrases=[Phrase(text="x", instance_indices=[1])]), "missing instances"),
        (dict(visual_prompts=[VisualPrompt(kind="lasso", frame=0, mask=rle)]), "kind 'lasso'"),
        (dict(visual_prompts=[VisualPrompt(kind="box", frame=1, mask=rle)]), "frame 1 of 1"),
    ]:
        with pytest.raises(BadSample, match=reason):
            sample(**bad).validate()
    assert Sample(dataset="d", task="chat", sample_id="t", frames=[], height=0, width=0).validate().frames == []
