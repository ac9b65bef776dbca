"""Video sources on tiny fixtures written here in each dataset's real on-disk format."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import refvos, ytvis
from x2sam_jax.data.sources.common import decode_rle, encode_mask

H, W, T = 20, 28, 3


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _uncompressed_rle(mask):
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": [H, W], "counts": counts}


def _palette_png(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (256 * 3 - 12))
    img.save(path)


def _decode(rle):
    return None if rle is None else decode_rle(rle).astype(bool)


# ----------------------------------------------------------------------------------- YouTube-VIS
def _write_ytvis(root, split="train"):
    tracks = [[_rect(1, 5, 1 + t, 6 + t) for t in range(T)],
              [None, _rect(10, 18, 10, 20), _rect(11, 19, 12, 22)]]
    _dump(os.path.join(root, split, f"{split}.json"), {
        "videos": [{"id": 3, "file_names": [f"abc/{i:05d}.jpg" for i in range(T)], "height": H, "width": W, "length": T},
                   {"id": 4, "file_names": ["empty/00000.jpg"], "height": H, "width": W, "length": 1}],
        "annotations": [
            {"id": 1, "video_id": 3, "category_id": 7, "iscrowd": 0,
             "segmentations": [_uncompressed_rle(m) for m in tracks[0]]},
            {"id": 2, "video_id": 3, "category_id": 9, "iscrowd": 0,
             "segmentations": [None] + [encode_mask(m) for m in tracks[1][1:]]},
        ],
        "categories": [{"id": 7, "name": "person"}, {"id": 9, "name": "sedan_car"}]})
    return tracks


def test_youtube_vis_tracks(tmp_path):
    tracks = _write_ytvis(str(tmp_path))
    src = ytvis.youtube_vis(str(tmp_path), "train")
    assert len(src) == 1 and src.frame_count(0) == T
    s = src[0]
    assert s.task == "vgen_seg" and len(s.frames) == T
    assert s.frames[1] == str(tmp_path / "train" / "JPEGImages" / "abc" / "00001.jpg")
    assert s.categories == ["person", "sedan car"]
    for inst, track in zip(s.instances, tracks):
        for got, want in zip(inst.masks, track):
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(_decode(got), want)
    assert [i.category for i in s.instances] == ["person", "sedan car"]


def test_youtube_vis_bad_track(tmp_path):
    _write_ytvis(str(tmp_path))
    path = tmp_path / "train" / "train.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentations"] = data["annotations"][1]["segmentations"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(BadSample, match="2 masks for 3 frames"):
        ytvis.youtube_vis(str(tmp_path), "train")[0]
    del data["videos"][0]["file_names"]
    path.write_text(json.dumps(data))
    src = ytvis.youtube_vis(str(tmp_path), "train")
    assert src.frame_count(0) == 0  # a malformed record cannot stop length sorting at start-up
    with pytest.raises(BadSample, match="file_names"):
        src[0]
    with pytest.raises(FileNotFoundError, match="valid"):
        ytvis.youtube_vis(str(tmp_path), "valid")
    os.makedirs(tmp_path / "valid")
    with pytest.raises(FileNotFoundError, match="gt.json"):
        ytvis.youtube_vis(str(tmp_path), "valid")
    os.replace(path, tmp_path / "valid" / "gt.json")  # the 2021 evaluation file name
    assert ytvis.youtube_vis(str(tmp_path), "valid", name="ytvis21").name == "ytvis21"


# ----------------------------------------------------------------------------------- Ref-YouTube-VOS / DAVIS
def _write_ref_ytvos(root, split="train"):
    maps = []
    for t in range(T):
        ids = np.zeros((H, W), np.uint8)
        ids[_rect(2, 8, 2 + t, 9 + t)] = 1
        if t != 1:  # object 2 is out of view in frame 1
            ids[_rect(12, 18, 15, 25)] = 2
        _palette_png(os.path.join(root, split, "Annotations", "vid1", f"{5 * t:05d}.png"), ids)
        maps.append(ids)
    _dump(os.path.join(root, "meta_expressions", split, "meta_expressions.json"), {"videos": {"vid1": {
        "frames": [f"{5 * t:05d}" for t in range(T)],
        "expressions": {"0": {"exp": "a cat walking", "obj_id": "1"}, "1": {"exp": "the dog", "obj_id": "2"},
                        "2": {"exp": "cat on the left", "obj_id": "1"}}}}})
    return maps


def test_ref_youtube_vos_palette_masks(tmp_path):
    maps = _write_ref_ytvos(str(tmp_path))
    _dump(str(tmp_path / "train" / "meta.json"), {"videos": {"vid1": {"objects": {
        "1": {"category": "cat", "frames": []}, "2": {"category": "dog", "frames": []}}}}})
    src = refvos.ref_youtube_vos(str(tmp_path), "train")
    s = src[0]
    assert [i.category for i in s.instances] == ["cat", "dog"]
    assert s.task == "vref_seg" and (s.height, s.width) == (H, W) and src.frame_count(0) == T
    assert [(p.text, p.instance_indices) for p in s.phrases] == [
        ("a cat walking", [0]), ("the dog", [1]), ("cat on the left", [0])]
    for inst, obj in zip(s.instances, (1, 2)):
        for t in range(T):
            np.testing.assert_array_equal(_decode(inst.masks[t]), maps[t] == obj)
    assert _decode(s.instances[1].masks[1]).sum() == 0  # annotated frame, object not visible
    per_exp = refvos.ref_youtube_vos(str(tmp_path), "train", group="expression")
    assert len(per_exp) == 3 and per_exp[1].phrases[0].text == "the dog" and len(per_exp[1].instances) == 1


def test_ref_youtube_vos_valid_without_masks_reads_size_from_image(tmp_path):
    # An obj_id without any mask file is no ground truth either: a sample without targets.
    root = str(tmp_path)
    _dump(os.path.join(root, "meta_expressions", "valid", "meta_expressions.json"), {"videos": {"v": {
        "frames": ["00000", "00005"], "expressions": {"0": {"exp": "x", "obj_id": "1"}}}}})
    os.makedirs(os.path.join(root, "valid", "JPEGImages", "v"))
    Image.new("RGB", (W, H)).save(os.path.join(root, "valid", "JPEGImages", "v", "00000.jpg"))
    s = refvos.ref_youtube_vos(root, "valid")[0]
    assert (s.height, s.width) == (H, W) and not s.has_targets and s.instances == []
    assert [(p.text, p.instance_indices) for p in s.phrases] == [("x", [])]


def test_ref_davis17_layout(tmp_path):
    root = str(tmp_path)
    ids = np.zeros((H, W), np.uint8)
    ids[3:9, 3:9] = 3
    _palette_png(os.path.join(root, "Annotations", "480p", "bear", "00000.png"), ids)
    _dump(os.path.join(root, "meta_expressions", "valid", "meta_expressions.json"), {"videos": {"bear": {
        "frames": ["00000"], "expressions": {"0": {"exp": "a brown bear", "obj_id": "3"}}}}})
    s = refvos.ref_davis17(root, "valid")[0]
    assert s.dataset == "ref_davis17"
    assert s.frames == [os.path.join(root, "JPEGImages", "480p", "bear", "00000.jpg")]
    np.testing.assert_array_equal(_decode(s.instances[0].masks[0]), ids == 3)


def test_ref_vos_mask_size_mismatch_is_bad_sample(tmp_path):
    _write_ref_ytvos(str(tmp_path))
    _palette_png(str(tmp_path / "train" / "Annotations" / "vid1" / "00005.png"), np.zeros((H + 2, W), np.uint8))
    with pytest.raises(BadSample, match="several sizes"):
        refvos.ref_youtube_vos(str(tmp_path), "train")[0]


# ----------------------------------------------------------------------------------- ReVOS
def test_revos_merges_anno_ids_and_filters_questions(tmp_path):
    root = str(tmp_path)
    a = [_rect(1, 4, 1, 4), None]
    b = [_rect(10, 15, 10, 15), _rect(11, 16, 11, 16)]
    _dump(os.path.join(root, "annotations", "mask_dict.json"), {
        "7": [encode_mask(m) if m is not None else None for m in a],
        "8": [_uncompressed_rle(m) for m in b]})
    _dump(os.path.join(root, "annotations", "meta_expressions_train_.json"), {"videos": {"v1": {
        "vid_id": 1, "frames": ["00010", "00000"],  # unsorted on purpose: sources sort frame names
        "expressions": {"0": {"exp": "the two objects", "obj_id": [0, 1], "anno_id": [7, 8]},
                        "1": {"exp": "which object could roll away?", "obj_id": [1], "anno_id": [8]}}}}})
    src = refvos.revos(root, "train")
    s = src[0]
    assert s.task == "vreason_seg" and s.frames[0].endswith(os.path.join("v1", "00000.jpg"))
    np.testing.assert_array_equal(_decode(s.instances[0].masks[0]), a[0] | b[0])
    np.testing.assert_array_equal(_decode(s.instances[0].masks[1]), b[1])
    np.testing.assert_array_equal(_decode(s.instances[1].masks[1]), b[1])
    assert s.meta["is_question"] == [False, True]
    assert [p.text for p in refvos.revos(root, "train", query_type="reasoning")[0].phrases] == [
        "which object could roll away?"]
    referring = refvos.revos(root, "train", query_type="referring")
    assert referring.task == "vref_seg" and [p.text for p in referring[0].phrases] == ["the two objects"]

    data = json.loads((tmp_path / "annotations" / "meta_expressions_train_.json").read_text())
    data["videos"]["v1"]["expressions"]["1"]["anno_id"] = [99]
    _dump(os.path.join(root, "annotations", "meta_expressions_train_.json"), data)
    with pytest.raises(BadSample, match="missing mask 99"):
        refvos.revos(root, "train")[0]


# ----------------------------------------------------------------------------------- YouTube-VOS 2019
def test_youtube_vos_first_frame_mask_prompts(tmp_path):
    root = str(tmp_path)
    frames = ["00000", "00005", "00010"]
    maps = []
    for t, f in enumerate(frames):
        ids = np.zeros((H, W), np.uint8)
        ids[2:6, 2:6] = 1
        if t >= 1:  # object 2 enters in the second frame
            ids[10:14, 10:16] = 2
        _palette_png(os.path.join(root, "train", "Annotations", "v", f"{f}.png"), ids)
        maps.append(ids)
    _dump(os.path.join(root, "train", "meta.json"), {"videos": {"v": {"objects": {
        "1": {"category": "person", "frames": frames}, "2": {"category": "dog", "frames": frames[1:]}}}}})
    src = refvos.youtube_vos(root, "train")
    s = src[0]
    assert s.task == "vobj_seg" and src.frame_count(0) == 3
    assert [(p.kind, p.frame, p.instance_indices) for p in s.visual_prompts] == [("mask", 0, [0]), ("mask", 1, [1])]
    np.testing.assert_array_equal(_decode(s.visual_prompts[1].mask), maps[1] == 2)
    np.testing.assert_array_equal(_decode(s.instances[1].masks[0]), np.zeros((H, W), bool))
    assert [i.category for i in s.instances] == ["person", "dog"]


# ----------------------------------------------------------------------------------- VIPSeg / VSPW
def test_vipseg_tracks_from_rgb_pngs(tmp_path):
    from x2sam_jax.data.sources import video_genseg
    from x2sam_jax.data.sources.common import id_to_rgb

    root = str(tmp_path)
    vid = "12_abc"
    person = [_rect(2, 8, 2 + t, 8 + t) for t in range(T)]
    road = [~p for p in person]
    images, anns = [], []
    for t in range(T):
        ids = np.zeros((H, W), np.int64)
        ids[road[t]] = 21000
        if t != 2:
            ids[person[t]] = 125 * 1000 + 1  # the person leaves in the last frame
        else:
            ids[person[t]] = 21000
        os.makedirs(os.path.join(root, "panomasksRGB", vid), exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(root, "panomasksRGB", vid, f"{t:08d}.png"))
        os.makedirs(os.path.join(root, "images", vid), exist_ok=True)
        Image.new("RGB", (W, H)).save(os.path.join(root, "images", vid, f"{t:08d}.jpg"))
        images.append({"id": f"{vid}_{t}", "file_name": f"{t:08d}.jpg", "height": H, "width": W})
        segs = [{"id": 21000, "category_id": 21, "iscrowd": 0}]
        if t != 2:
            segs.append({"id": 125001, "category_id": 125, "iscrowd": 0})
        anns.append({"image_id": f"{vid}_{t}", "file_name": f"{t:08d}.png", "segments_info": segs})
    _dump(os.path.join(root, "panoptic_gt_VIPSeg_train.json"), {
        "videos": [{"video_id": vid, "images": images}], "annotations": [{"video_id": vid, "annotations": anns}],
        "categories": [{"id": 21, "name": "road", "isthing": 0}, {"id": 125, "name": "person", "isthing": 1}]})
    s = video_genseg.vipseg(root, "train")[0]
    assert s.frames[0] == os.path.join(root, "images", vid, "00000000.jpg") and s.categories == ["road", "person"]
    road_track, person_track = s.instances
    assert not road_track.is_thing and person_track.is_thing and person_track.instance_id == 125001
    for t in range(T):
        expected_road = road[t] | (person[t] if t == 2 else np.zeros_like(road[t]))
        np.testing.assert_array_equal(_decode(road_track.masks[t]), expected_road)
    np.testing.assert_array_equal(_decode(person_track.masks[1]), person[1])
    assert person_track.masks[2] is None


def test_vspw_semantic_maps_ignore_zero_and_255(tmp_path):
    from x2sam_jax.data.sources import video_genseg

    root = str(tmp_path)
    (tmp_path / "train.txt").write_text("vidA\n")
    _dump(os.path.join(root, "label_num_dic_final.json"), {"others": 0, "wall": 1, "ceiling": 2, "door": 3})
    maps = []
    for t in range(T):
        m = np.full((H, W), 1, np.uint8)
        m[:4] = 0
        m[-2:] = 255
        if t > 0:
            m[8:12, 8:12] = 3
        os.makedirs(os.path.join(root, "semmasks", "vidA"), exist_ok=True)
        Image.fromarray(m).save(os.path.join(root, "semmasks", "vidA", f"{t:08d}.png"))
        maps.append(m)
    src = video_genseg.vspw(root, "train")
    assert src.categories == ["wall", "ceiling", "door"] and src.frame_count(0) == T
    s = src[0]
    assert [(i.category, i.category_id) for i in s.instances] == [("wall", 1), ("door", 3)]
    assert s.instances[1].masks[0] is None
    for t in range(T):
        np.testing.assert_array_equal(_decode(s.instances[0].masks[t]), maps[t] == 1)
    m = maps[0].copy()
    m[0, 0] = 9
    Image.fromarray(m).save(os.path.join(root, "semmasks", "vidA", "00000000.png"))
    with pytest.raises(BadSample, match=r"class ids \[9\]"):
        src[0]


# ----------------------------------------------------------------------------------- video VGD
def _official_prompt_frame(frame_cats):
    """The official search, written out: every category combination, largest first."""
    from itertools import chain, combinations

    all_ids = [c for f in frame_cats for c in f]
    frame_sets = [sorted(set(f)) for f in frame_cats]
    ordered = sorted(set(all_ids), key=all_ids.count, reverse=True)
    for combo in chain.from_iterable(combinations(ordered, r) for r in range(len(ordered), 0, -1)):
        if sorted(combo) in frame_sets:
            return frame_sets.index(sorted(combo))
    return 0


def test_prompt_frame_matches_official_search():
    from x2sam_jax.data.sources.vgd import prompt_frame

    rng = np.random.default_rng(0)
    for _ in range(300):
        frames = [list(rng.integers(1, 6, size=rng.integers(0, 4))) for _ in range(rng.integers(1, 7))]
        assert prompt_frame(frames) == _official_prompt_frame(frames), frames


def test_video_vgd_tracks_and_prompts(tmp_path):
    from x2sam_jax.data.sources import vgd

    a = [_rect(2, 8, 2, 8), _rect(2, 8, 4, 10)]
    b = _rect(12, 18, 12, 20)
    pt = _rect(4, 6, 4, 6)
    recs = [{"video_id": 7, "image_files": ["v7/00000.jpg", "v7/00005.jpg"], "image_sizes": [[H, W], [H, W]],
             "annotations": [
                 [{"id": 300, "category_id": 1, "segmentation": encode_mask(a[0]),
                   "visual_prompts": {"point_visual_prompt": encode_mask(pt), "mask_visual_prompt": encode_mask(a[0])}}],
                 [{"id": 301, "category_id": 1, "segmentation": encode_mask(a[1]),
                   "visual_prompts": {"point_visual_prompt": encode_mask(pt)}},
                  {"id": 901, "category_id": 2, "segmentation": encode_mask(b),
                   "visual_prompts": {"point_visual_prompt": encode_mask(b)}}]]}]
    _dump(str(tmp_path / "vid_vgdseg_yt19_train.json"), recs)
    _dump(str(tmp_path / "train.json"), {"categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]})
    src = vgd.VideoVgdSource(str(tmp_path / "vid_vgdseg_yt19_train.json"), str(tmp_path / "JPEGImages"),
                             categories_file=str(tmp_path / "train.json"), prompt_kinds=("point",))
    s = src[0]
    assert s.task == "vvgd_seg" and src.frame_count(0) == 2
    assert [(i.instance_id, i.category) for i in s.instances] == [(3, "person"), (9, "dog")]
    np.testing.assert_array_equal(_decode(s.instances[0].masks[1]), a[1])
    assert s.instances[1].masks[0] is None
    assert [(p.kind, p.frame, p.instance_indices) for p in s.visual_prompts] == [
        ("point", 0, [0]), ("point", 1, [0]), ("point", 1, [1])]
    assert vgd.prompt_frame(s.meta["frame_category_ids"]) == 1


# ----------------------------------------------------------------------------------- VideoInstruct
def test_video_instruct_groups_questions(tmp_path):
    from x2sam_jax.data.sources import chat

    _dump(str(tmp_path / "VideoInstruct100K.json"), [
        {"video_id": "v_abc", "q": "What happens?", "a": "A dog runs."},
        {"video_id": "v_xyz", "q": "Where?", "a": "A park."},
        {"video_id": "v_abc", "q": "What colour is the dog?", "a": "Brown."}])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v_abc.mkv").write_bytes(b"")
    src = chat.VideoInstructSource(str(tmp_path / "VideoInstruct100K.json"), str(tmp_path / "videos"))
    s = src[0]
    assert s.task == "vchat" and s.frames == [str(tmp_path / "videos" / "v_abc.mkv")] and s.meta["video_file"]
    assert [t["value"] for t in s.conversation] == [
        "<video>\nWhat happens?", "A dog runs.", "What colour is the dog?", "Brown."]
    assert src[1].frames == [str(tmp_path / "videos" / "v_xyz.mp4")]  # not checked here: transforms open it


# ----------------------------------------------------------------------------------- VideoGLaMM GCG
def test_parse_markup_caption():
    from x2sam_jax.data.sources.video_gcg import parse_markup_caption

    text, phrases = parse_markup_caption("Two foxes. One [fox on a tube](1), another [fox sitting](2, 3).")
    assert text == "Two foxes. One fox on a tube, another fox sitting."
    assert [(p, text[s:e], ids) for p, (s, e), ids in phrases] == [
        ("fox on a tube", "fox on a tube", ["1"]), ("fox sitting", "fox sitting", ["2", "3"])]


def test_mevis_and_ytvos_gcg(tmp_path):
    from x2sam_jax.data.sources import video_gcg

    root = str(tmp_path)
    a = [_rect(1, 5, 1, 5), None]
    b = [_rect(8, 12, 8, 12), _rect(9, 13, 9, 13)]
    c = [None, _rect(15, 19, 2, 6)]
    _dump(os.path.join(root, "caps", "vid.json"), {"caption": "A [cat](1) near [two dogs](2, 3)."})
    _dump(os.path.join(root, "meta.json"), {"videos": {"vid": {"frames": ["00000", "00005"], "expressions": {
        "0": {"exp": "cat", "obj_id": [1], "anno_id": [11]}, "1": {"exp": "dogs", "obj_id": [2, 3], "anno_id": [12, 13]}}}}})
    _dump(os.path.join(root, "mask_dict.json"), {
        "11": [encode_mask(a[0]), None], "12": [encode_mask(m) for m in b], "13": [None, _uncompressed_rle(c[1])]})
    src = video_gcg.MarkupGcgVideoSource(os.path.join(root, "caps"), os.path.join(root, "meta.json"),
                                         os.path.join(root, "JPEGImages"), mask_file=os.path.join(root, "mask_dict.json"))
    s = src[0]
    assert s.task == "vgcg_seg" and s.caption == "A cat near two dogs."
    assert [(p.text, p.span) for p in s.phrases] == [("cat", (2, 5)), ("two dogs", (11, 19))]
    assert s.instances[0].masks[1] is None
    np.testing.assert_array_equal(_decode(s.instances[1].masks[0]), b[0])
    np.testing.assert_array_equal(_decode(s.instances[1].masks[1]), b[1] | c[1])

    for t, f in enumerate(["00000", "00005"]):  # the same objects as palette PNGs (YouTube-VOS-GCG)
        ids = np.zeros((H, W), np.uint8)
        for obj, track in ((1, a), (2, b), (3, c)):
            if track[t] is not None:
                ids[track[t]] = obj
        _palette_png(os.path.join(root, "Annotations", "vid", f"{f}.png"), ids)
    png_src = video_gcg.MarkupGcgVideoSource(os.path.join(root, "caps"), os.path.join(root, "meta.json"),
                                             os.path.join(root, "JPEGImages"), mask_dir=os.path.join(root, "Annotations"))
    for x, y in zip(png_src[0].instances, s.instances):
        assert [_decode(m) is None for m in x.masks] == [_decode(m) is None for m in y.masks]
        for mx, my in zip(x.masks, y.masks):
            if mx is not None:
                np.testing.assert_array_equal(_decode(mx), _decode(my))

    _dump(os.path.join(root, "caps", "vid.json"), {"caption": "A [cat](7)."})
    with pytest.raises(BadSample, match="object 7"):
        src[0]


def test_dense_cap_video_gcg(tmp_path):
    from x2sam_jax.data.sources import video_gcg

    m1, m2 = _rect(1, 6, 1, 6), _rect(10, 16, 10, 20)
    _dump(str(tmp_path / "video_gcg.json"), {
        "videos": [{"id": 4, "file_names": ["v/1.jpg", "v/0.jpg"], "height": H, "width": W, "length": 2,
                    "dataset_split": "yt19", "dense_cap": {"caption": "A man rides a bike", "token_pos": [1, 4, 4],
                                                           "mask_id": [5, 6, 7]}}],
        "annotations": [{"id": 5, "segmentations": [encode_mask(m1), None]},
                        {"id": 6, "segmentations": [None, encode_mask(m2)]},
                        {"id": 7, "segmentations": [encode_mask(m2), encode_mask(m1)]}]})
    s = video_gcg.DenseCapGcgVideoSource(str(tmp_path / "video_gcg.json"), str(tmp_path / "frames"))[0]
    assert s.frames[0] == str(tmp_path / "frames" / "yt19" / "train" / "JPEGImages" / "v" / "0.jpg")
    assert [(p.text, p.span) for p in s.phrases] == [("man", (2, 5)), ("bike", (14, 18))]
    assert s.instances[0].masks[1] is None
    np.testing.assert_array_equal(_decode(s.instances[1].masks[1]), m2 | m1)


def test_vidstg_gcg_per_object_pngs(tmp_path):
    from x2sam_jax.data.sources import video_gcg

    root = tmp_path / "video_glamm"
    base = root / "vidstg_gcg"
    _dump(str(base / "train_captions" / "123.json"), {"caption": "A [child](4) throws a [ball](7)."})
    child = [_rect(2, 9, 2, 7), _rect(2, 9, 4, 9)]
    ball = [None, _rect(12, 15, 20, 23)]
    for t in range(2):
        os.makedirs(base / "train" / "123" / "frames", exist_ok=True)
        Image.new("RGB", (W, H)).save(base / "train" / "123" / "frames" / f"{t:05d}.jpg")
        for obj, track in ((4, child), (7, ball)):
            if track[t] is not None:
                os.makedirs(base / "train" / "123" / "masks" / f"{obj:03d}", exist_ok=True)
                Image.fromarray(track[t].astype(np.uint8) * 255).save(
                    base / "train" / "123" / "masks" / f"{obj:03d}" / f"{t:05d}.png")
    from x2sam_jax.data.sources import FACTORIES

    src = FACTORIES["vidstg_gcg"](str(root))
    assert len(src) == 1 and src.frame_count(0) == 2
    s = src[0]
    assert s.caption == "A child throws a ball." and [p.span for p in s.phrases] == [(2, 7), (17, 21)]
    assert s.frames[1] == str(base / "train" / "123" / "frames" / "00001.jpg")
    for inst, track in zip(s.instances, (child, ball)):
        for got, want in zip(inst.masks, track):
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_array_equal(_decode(got), want)
