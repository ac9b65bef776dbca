"""The synthetic dataset: deterministic for a seed, fast, and readable by the real sources."""

import hashlib
import os

import numpy as np
import pytest

from x2sam_jax.data import synthetic
from x2sam_jax.data.sources.common import decode_rle


def _tree_hash(root):
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "data")
    synthetic.generate(root, num_images=40, num_videos=6, frames=4, size=(64, 80), seed=3)
    return root


def test_same_seed_same_files_other_seed_differs(generated, tmp_path):
    root = generated
    again = str(tmp_path / "again")
    synthetic.generate(again, num_images=40, num_videos=6, frames=4, size=(64, 80), seed=3)
    assert _tree_hash(root) == _tree_hash(again)
    other = str(tmp_path / "other")
    synthetic.generate(other, num_images=40, num_videos=6, frames=4, size=(64, 80), seed=4)
    assert _tree_hash(root) != _tree_hash(other)


def test_refuses_to_overwrite_and_leaves_nothing_half_written(generated, tmp_path):
    root = generated
    with pytest.raises(FileExistsError):
        synthetic.generate(root, num_images=2, num_videos=1)
    with pytest.raises(ValueError, match="at least 32"):
        synthetic.generate(str(tmp_path / "tiny"), size=8)
    assert not os.path.exists(tmp_path / "tiny")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic-")]


def test_flows_through_real_sources(generated):
    root = generated
    train, val = synthetic.sources(root, "train"), synthetic.sources(root, "val")
    assert {k: len(v) for k, v in train.items()} == {
        "coco_panoptic": 30, "coco_instances": 30, "refcoco": 30, "ytvis19": 5, "ref_ytvos": 5, "ytvos": 5,
        "coco_vgd": 30, "coco_interactive": 30, "grandf_gcg": 30}
    assert len(val["coco_panoptic"]) == 10 and len(val["ytvis19"]) == 1

    pan, inst = train["coco_panoptic"][0], train["coco_instances"][0]
    assert pan.frames == inst.frames and os.path.isfile(pan.frames[0])
    masks = np.stack([decode_rle(i.masks[0]) for i in pan.instances])
    # panoptic segments tile the image exactly: every pixel belongs to one segment
    np.testing.assert_array_equal(masks.sum(0), np.ones((64, 80)))
    things = [i for i in pan.instances if i.is_thing]
    assert {i.category for i in things} <= set(synthetic.THING_CATEGORIES)
    assert {i.category for i in pan.instances if not i.is_thing} <= set(synthetic.STUFF_CATEGORIES)
    assert [i.instance_id for i in things] == [i.instance_id for i in inst.instances]
    for a, b in zip(things, inst.instances):
        np.testing.assert_array_equal(decode_rle(a.masks[0]), decode_rle(b.masks[0]))

    for k in range(len(train["refcoco"])):
        ref = train["refcoco"][k]
        assert ref.phrases and os.path.isfile(ref.frames[0])
        for p in ref.phrases:  # every expression names its target's category
            target = ref.instances[p.instance_indices[0]]
            assert target.category in p.text

    vis, rvos = train["ytvis19"][0], train["ref_ytvos"][0]
    assert len(vis.frames) == 4 and all(os.path.isfile(f) for f in rvos.frames)
    assert [os.path.basename(f) for f in vis.frames] == [os.path.basename(f) for f in rvos.frames]
    # a referred object's palette masks equal its YouTube-VIS track wherever the track is present
    by_category = {}
    for inst in vis.instances:
        by_category.setdefault(inst.category, []).append(inst)
    for inst in rvos.instances:
        track_masks = [[None if m is None else decode_rle(m) for m in t.masks] for t in vis.instances]
        own = [decode_rle(m) for m in inst.masks]
        assert any(all(tm is None or np.array_equal(tm, o) for tm, o in zip(t, own)) for t in track_masks)
        assert inst.category in synthetic.THING_CATEGORIES

    vos = train["ytvos"][0]  # the same objects as a VOS sample: a mask prompt on each first visible frame
    assert vos.task == "vobj_seg" and len(vos.visual_prompts) == len(vos.instances)
    for prompt in vos.visual_prompts:
        first = vos.instances[prompt.instance_indices[0]].masks[prompt.frame]
        assert decode_rle(prompt.mask).sum() >= synthetic.MIN_AREA and prompt.mask == first


def test_sources_pickle_for_grain_workers(generated):
    import pickle

    import grain

    root = generated
    for name, src in synthetic.sources(root, "val").items():
        clone = pickle.loads(pickle.dumps(src))
        assert clone[0] == src[0] and len(clone) == len(src), name
        ds = grain.MapDataset.source(src).shuffle(seed=1)
        assert sorted(ds[i].sample_id for i in range(len(ds))) == sorted(src[i].sample_id for i in range(len(src)))
