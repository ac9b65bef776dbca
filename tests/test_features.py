"""Sample -> features: the dict of docs/data.md#features for every task family, and bad samples."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data import features as F
from x2sam_jax.data import tokenizer as tk
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample, VisualPrompt

SAM = 128  # small SAM input keeps the test fast; grids are SAM/4 = 32
CONFIG = F.FeatureConfig(
    qwen=tf.QwenVisionPreprocessConfig(image_min_pixels=32 * 32, image_max_pixels=128 * 128,
                                       video_min_pixels=32 * 32, video_max_pixels=8 * 64 * 64),
    sam=tf.SamPreprocessConfig(size=SAM),
)  # fmt: skip
KEYS = {
    "input_ids", "labels", "pixel_values", "grid_thw", "sam_pixel_values", "sam_valid_hw", "orig_hw",
    "gt_masks", "gt_classes", "gt_frame_valid", "region_masks", "region_frame", "cond_spans",
    "seg_positions", "task_id", "num_frames",
}  # fmt: skip
SAM_SIDE = {"sam_pixel_values", "sam_valid_hw", "gt_masks", "gt_classes", "gt_frame_valid", "region_masks",
            "region_frame"}   # what chat samples leave out
H, W = 60, 90


@pytest.fixture(scope="module")
def tokenizer():
    return tk.build_tiny_tokenizer()


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box(r0, r1, c0, c1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    paths = []
    for t in range(10):
        path = root / f"{t:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


MASKS = [_box(5, 25, 5, 30), _box(30, 55, 40, 80), _box(10, 20, 60, 85)]


def _image_sample(frames, task, **kw):
    instances = [
        Instance(masks=[_rle(MASKS[0])], category="red circle"),
        Instance(masks=[_rle(MASKS[1])], category="blue square"),
        Instance(masks=[_rle(MASKS[2])], category="red circle"),
    ]
    base = dict(dataset="handmade", task=task, sample_id="s0", frames=frames[:1], height=H, width=W,
                instances=instances, categories=["red circle", "blue square", "green star", "sky"])  # fmt: skip
    base.update(kw)
    return Sample(**base)


def _check_common(f, tokenizer, num_frames, chat=False):
    ids = tk.SpecialIds.from_tokenizer(tokenizer)
    assert set(f) == (KEYS - SAM_SIDE if chat else KEYS) | {"condition_instances"}   # condition -> instances
    assert int(f["num_frames"]) == num_frames
    assert f["input_ids"].shape == f["labels"].shape and f["input_ids"].dtype == np.int32
    # placeholders equal the merged visual tokens of every image/video
    merged = sum(tf.merged_token_count(g) for g in f["grid_thw"])
    assert (f["input_ids"] == ids.image_pad).sum() == merged == f["pixel_values"].shape[0] // 4
    assert f["pixel_values"].shape[1] == 1536 and f["grid_thw"].shape == (1, 3)
    for s, e in f["cond_spans"]:
        assert f["input_ids"][s] == ids.p_start and f["input_ids"][e] == ids.p_end
    seg = f["seg_positions"]
    assert (f["input_ids"][seg] == ids.seg).all() and (f["labels"][seg] == ids.seg).all()
    if chat:
        return
    assert f["sam_pixel_values"].shape == (num_frames, SAM, SAM, 3)
    h, w = (int(v) for v in f["orig_hw"])
    np.testing.assert_array_equal(f["sam_valid_hw"], [tf.longest_side_shape(h, w, SAM)] * num_frames)
    n = len(f["gt_classes"])
    assert f["gt_masks"].shape == (num_frames, n, SAM // 4, SAM // 4) and f["gt_frame_valid"].shape == (num_frames, n)
    assert (f["gt_classes"] < len(f["cond_spans"])).all()
    np.testing.assert_array_equal(f["gt_frame_valid"], f["gt_masks"].any(axis=(2, 3)))
    assert len(f["region_masks"]) == len(f["region_frame"])


def _grid(mask):
    return tf.gt_mask_grid(mask, CONFIG.sam)


def test_vocabulary_task(frames, tokenizer):
    f = F.make_features(_image_sample(frames, "gen_seg"), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 1)
    np.testing.assert_array_equal(f["orig_hw"], [H, W])
    assert len(f["cond_spans"]) == 4  # evaluation: the whole vocabulary, in order
    np.testing.assert_array_equal(f["gt_classes"], [0, 1, 0])
    for n, mask in enumerate(MASKS):
        np.testing.assert_array_equal(f["gt_masks"][0, n], _grid(mask))
    assert f["task_id"] == F.TASK_IDS["gen_seg"]
    trained = F.make_features(_image_sample(frames, "gen_seg"), tokenizer=tokenizer, train=True,
                              rng=np.random.default_rng(0), config=dataclasses.replace(CONFIG, max_categories=3))  # fmt: skip
    assert len(trained["cond_spans"]) == 3  # both positives + one negative
    # the class of every target is the span that holds its category name
    text = [tokenizer.decode(trained["input_ids"][s : e + 1]) for s, e in trained["cond_spans"]]
    assert [text[c] for c in trained["gt_classes"]] == ["<p>red circle</p>", "<p>blue square</p>", "<p>red circle</p>"]


def test_referring_reasoning_and_gcg(frames, tokenizer):
    phrases = [Phrase("the left circle", [0]), Phrase("nothing here", []), Phrase("all circles", [0, 2])]
    f = F.make_features(_image_sample(frames, "ref_seg", phrases=phrases), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 1)
    assert len(f["cond_spans"]) == 3 and len(f["seg_positions"]) == 3  # one turn per expression
    np.testing.assert_array_equal(f["gt_classes"], [0, 2])  # the no-target expression has no mask
    np.testing.assert_array_equal(f["gt_masks"][0, 1], _grid(MASKS[0] | MASKS[2]))

    f = F.make_features(_image_sample(frames, "reason_seg", phrases=phrases[:1],
                                      conversation=[{"from": "gpt", "value": "It is round."}]),
                        tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 1)
    assert len(f["cond_spans"]) == 1 and len(f["gt_classes"]) == 1

    caption = "A red circle sits above a blue square."
    gcg = [Phrase("a blue square", [1], span=(24, 37)), Phrase("A red circle", [0], span=(0, 12))]
    f = F.make_features(_image_sample(frames, "gcg_seg", phrases=gcg, caption=caption), tokenizer=tokenizer,
                        train=True, rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 1)
    spans_text = [tokenizer.decode(f["input_ids"][s : e + 1]) for s, e in f["cond_spans"]]
    assert spans_text == ["<p>A red circle</p>", "<p>a blue square</p>"]  # caption order
    np.testing.assert_array_equal(f["gt_classes"], [0, 1])
    np.testing.assert_array_equal(f["gt_masks"][0, 0], _grid(MASKS[0]))
    assert (f["labels"][f["cond_spans"][:, 0]] >= 0).all()  # GCG phrases sit in the answer


def test_region_tasks(frames, tokenizer):
    ids = tk.SpecialIds.from_tokenizer(tokenizer)
    for task in ("inter_seg", "vgd_seg"):
        for train in (True, False):
            f = F.make_features(_image_sample(frames, task), tokenizer=tokenizer, train=train,
                                rng=np.random.default_rng(1), config=CONFIG)  # fmt: skip
            _check_common(f, tokenizer, 1)
            regions = len(f["region_masks"])
            assert regions == len(f["cond_spans"]) == (3 if task == "inter_seg" else 2)
            assert (f["input_ids"] == ids.region).sum() == 64 * regions
            assert f["region_masks"].shape[1:] == (SAM, SAM) and all(m.any() for m in f["region_masks"])
            # each region prompt overlaps a target of its own class (prompts sit on their instance)
            for r in range(regions):
                targets = f["gt_masks"][0, f["gt_classes"] == r]
                region_small = tf.resize_masks_padded(f["region_masks"][r], SAM // 4)
                assert (region_small & targets.any(0)).any() or f["region_masks"][r].sum() < 64
    f = F.make_features(_image_sample(frames, "vgd_seg"), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(1), config=CONFIG)  # fmt: skip
    assert sorted(f["gt_classes"].tolist()) == [0, 0, 1]  # both red circles answer one region
    given = [VisualPrompt("box", 0, None, box=(5.0, 5.0, 30.0, 25.0), instance_indices=[0]),
             VisualPrompt("point", 0, None, points=[(60, 40)], instance_indices=[1])]  # fmt: skip
    f = F.make_features(_image_sample(frames, "inter_seg", visual_prompts=given), tokenizer=tokenizer,
                        train=True, rng=np.random.default_rng(1), config=CONFIG)  # fmt: skip
    np.testing.assert_array_equal(f["gt_classes"], [0, 1])
    np.testing.assert_array_equal(f["region_masks"][0], tf.region_mask_grid(_box(5, 25, 5, 30), CONFIG.sam))


def test_chat_task(frames, tokenizer):
    conversation = [{"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "Shapes."}]
    f = F.make_features(_image_sample(frames, "chat", conversation=conversation, instances=[]),
                        tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 1, chat=True)      # no SAM frames, no targets, no visual prompts
    assert len(f["cond_spans"]) == 0 and len(f["seg_positions"]) == 0
    labelled = f["input_ids"][f["labels"] != tk.IGNORE_LABEL]
    assert tokenizer.decode(labelled) == "Shapes.<|im_end|>"

    # A batch of chat samples has no frames (the train step's LLM-only signal); one segmentation
    # sample beside them brings the frames back, the chat row's all padding.
    from x2sam_jax.data.batching import BucketConfig, Collator

    collate = Collator(BucketConfig(seq_lengths=(128, 256)), sam_size=SAM)
    chat = collate([f, f])
    assert chat["sam_pixel_values"].shape == (2, 0, SAM, SAM, 3) and chat["frame_valid"].shape == (2, 0)
    assert chat["gt_masks"].size == 0 and chat["region_masks"].shape == (2, 0, SAM, SAM)
    n = len(f["labels"])
    assert chat["labels"].shape == (2, 128) and (chat["labels"][:, :n] == f["labels"]).all()
    seg = F.make_features(_image_sample(frames, "gen_seg"), tokenizer=tokenizer, train=False,
                          rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    mixed = collate([f, seg])
    assert mixed["sam_pixel_values"].shape[1] == 1 and mixed["frame_valid"].tolist() == [[False], [True]]
    assert mixed["region_masks"].shape[1] == 1 and not mixed["sam_pixel_values"][0].any()


def _video_sample(frames, task="vgen_seg"):
    masks_a, masks_b = [], []
    for t in range(10):
        masks_a.append(_rle(_box(5, 20, 5 + 3 * t, 25 + 3 * t)))
        masks_b.append(_rle(_box(35, 55, 50, 80)) if t % 3 else None)  # absent on frames 0, 3, 6, 9
    return Sample(dataset="handmade_video", task=task, sample_id="v0", frames=frames, height=H, width=W,
                  instances=[Instance(masks_a, category="red circle"), Instance(masks_b, category="blue square")],
                  categories=["red circle", "blue square"], frame_times=[0.5 * t for t in range(10)],
                  phrases=[Phrase("the moving circle", [0])])  # fmt: skip


def test_video_clip_features(frames, tokenizer):
    f = F.make_features(_video_sample(frames), tokenizer=tokenizer, train=False, rng=np.random.default_rng(0),
                        config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 8)  # evaluation: the first 8-frame clip
    assert f["grid_thw"][0, 0] == 4  # frames grouped by 2
    text = tokenizer.decode(f["input_ids"])
    assert text.count("seconds>") == 4 and "<0.2 seconds>" in text and "<3.2 seconds>" in text
    np.testing.assert_array_equal(f["gt_frame_valid"][:, 1], [t % 3 != 0 for t in range(8)])
    assert f["gt_frame_valid"][:, 0].all()
    f = F.make_features(_video_sample(frames, "vref_seg"), tokenizer=tokenizer, train=True,
                        rng=np.random.default_rng(0), config=CONFIG, clip=[2, 3, 4])  # fmt: skip
    _check_common(f, tokenizer, 3)
    assert f["grid_thw"][0, 0] == 2  # odd count: the last frame repeats
    expected = tf.gt_mask_grid(tf.decode_rle(_video_sample(frames).instances[0].masks[4], H, W), CONFIG.sam)
    np.testing.assert_array_equal(f["gt_masks"][2, 0], expected)
    f = F.make_features(_video_sample(frames, "vreason_seg"), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    _check_common(f, tokenizer, 8)  # span mode: frames 0, 1, ..., 7 of 10 (step 10 // 8 = 1)
    text = tokenizer.decode(f["input_ids"])
    assert "<0.2 seconds>" in text and "<3.2 seconds>" in text
    span_clip = [0, 2, 4, 6, 8, 10, 12, 14]
    long_sample = _video_sample(frames * 2)  # 20 frames: span step 2
    long_sample = dataclasses.replace(long_sample, task="vreason_seg", frame_times=[0.5 * t for t in range(20)],
                                      instances=[dataclasses.replace(i, masks=i.masks * 2) for i in long_sample.instances])  # fmt: skip
    f = F.make_features(long_sample, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0), config=CONFIG)
    assert f"<{(0.5 * span_clip[0] + 0.5 * span_clip[1]) / 2:.1f} seconds>" in tokenizer.decode(f["input_ids"])
    assert "<0.5 seconds>" in tokenizer.decode(f["input_ids"]) and "<6.5 seconds>" in tokenizer.decode(f["input_ids"])
    f = F.make_features(_video_sample(frames, "vobj_seg"), tokenizer=tokenizer, train=True,
                        rng=np.random.default_rng(0), config=CONFIG)  # fmt: skip
    assert len(f["region_masks"]) == 2 and (f["region_frame"] < f["num_frames"]).all()


def test_features_are_deterministic_per_rng(frames, tokenizer):
    sample = _image_sample(frames, "vgd_seg")
    a = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(9), config=CONFIG)
    b = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(9), config=CONFIG)
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_synthetic_sources_flow_through(tmp_path, tokenizer):
    from x2sam_jax.data import synthetic

    synthetic.generate(str(tmp_path / "synth"), num_images=4, num_videos=2, frames=6, seed=0)
    for name, source in synthetic.sources(str(tmp_path / "synth"), "train").items():
        sample = source[0]
        f = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)
        _check_common(f, tokenizer, min(sample.num_frames, CONFIG.clip_len) if sample.num_frames > 1 else 1)
        assert len(f["gt_classes"]) > 0, name


def test_bad_samples(frames, tokenizer, tmp_path):
    def run(sample):
        return F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)

    with pytest.raises(BadSample, match="missing image file .*gone.jpg"):
        run(_image_sample([str(tmp_path / "gone.jpg")], "gen_seg"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(BadSample, match="corrupt image file .*corrupt.jpg"):
        run(_image_sample([str(corrupt)], "gen_seg"))
    empty = [Instance(masks=[_rle(np.zeros((H, W), bool))], category="red circle")]
    with pytest.raises(BadSample, match="every target mask is empty"):
        run(_image_sample(frames, "gen_seg", instances=empty))
    crowd = [Instance(masks=[_rle(MASKS[0])], category="red circle", iscrowd=True)]
    with pytest.raises(BadSample, match="empty or crowd"):
        run(_image_sample(frames, "gen_seg", instances=crowd))
    wrong_size = [Instance(masks=[_rle(np.ones((H + 1, W), bool))], category="red circle")]
    with pytest.raises(BadSample, match="instance 0 frame 0: mask of size"):
        run(_image_sample(frames, "gen_seg", instances=wrong_size))
    with pytest.raises(BadSample, match="annotation says 61x90"):
        run(_image_sample(frames, "gen_seg", height=H + 1,
                          instances=[Instance(masks=[_rle(np.ones((H + 1, W), bool))], category="x")]))  # fmt: skip
    with pytest.raises(BadSample, match="GCG sample without a caption"):
        run(_image_sample(frames, "gcg_seg", phrases=[Phrase("a", [0], span=(0, 1))]))
    with pytest.raises(BadSample, match="points at missing instances"):
        run(_image_sample(frames, "ref_seg", phrases=[Phrase("a", [7])]))
    tiny = [Instance(masks=[_rle(_box(0, 2, 0, 2))], category="dot")]  # area 4: no prompt shape fits
    with pytest.raises(BadSample, match="no instance large enough"):
        F.make_features(_image_sample(frames, "inter_seg", instances=tiny), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=dataclasses.replace(CONFIG, eval_prompt_kind="point"))  # fmt: skip
    with pytest.raises(TypeError, match="unknown options"):
        F.make_features(_image_sample(frames, "gen_seg"), tokenizer=tokenizer, train=True,
                        rng=np.random.default_rng(0), bogus=1)  # fmt: skip


# ------------------------------------------------------------------------- given visual prompts
def _given_prompt_sample(frames, task):
    """Three instances (two red circles, one blue square), each prompt kind drawn as a distinct
    shape inside its instance; instance 2 has no box prompt."""
    sample = _image_sample(frames, task)
    prompts = []
    for k, m in enumerate(MASKS):
        rows, cols = np.nonzero(m)
        r, c = int(rows.mean()), int(cols.mean())
        shapes = {"point": _box(r, r + 1, c, c + 1), "scribble": _box(r, r + 1, cols.min(), cols.max()),
                  "box": _box(rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) & ~_box(r, r + 1, c, c + 1),
                  "mask": m & ~_box(r, r + 1, cols.min(), cols.max())}  # fmt: skip
        for kind, shape in shapes.items():
            if kind == "box" and k == 2:
                continue
            prompts.append(VisualPrompt(kind, 0, _rle(shape), instance_indices=[k]))
    return dataclasses.replace(sample, visual_prompts=prompts)


def _region_kinds(f, sample):
    """Kind of the given prompt each region was drawn from (regions are resized prompt masks)."""
    table = {}
    for p in sample.visual_prompts:
        table.setdefault(tf.region_mask_grid(tf.decode_rle(p.mask, H, W), CONFIG.sam).tobytes(), []).append(
            (p.kind, p.instance_indices[0]))
    return [table[r.tobytes()][0] for r in f["region_masks"]]


def test_given_prompts_one_kind_per_instance(frames, tokenizer):
    """Sources give every kind per instance; features keep one region per instance (interactive)
    or per category (VGD): a random kind in training, the evaluation kind in evaluation."""
    ids = tk.SpecialIds.from_tokenizer(tokenizer)
    seen_kinds = set()
    for task, regions in (("inter_seg", 3), ("vgd_seg", 2)):
        sample = _given_prompt_sample(frames, task)
        for seed in range(6):
            f = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(seed), config=CONFIG)
            _check_common(f, tokenizer, 1)
            assert len(f["region_masks"]) == len(f["cond_spans"]) == regions  # not 4 per instance
            assert (f["input_ids"] == ids.region).sum() == 64 * regions
            kinds = _region_kinds(f, sample)
            assert len({inst for _, inst in kinds}) == regions
            seen_kinds |= {kind for kind, _ in kinds}
            if task == "vgd_seg":  # both red circles answer the red-circle region
                circle = [r for r, (_, inst) in enumerate(kinds) if inst in (0, 2)][0]
                assert sorted(f["gt_classes"].tolist()) == sorted([circle, circle, 1 - circle])
            else:
                for r, (_, inst) in enumerate(kinds):
                    np.testing.assert_array_equal(f["gt_masks"][0, f["gt_classes"] == r][0], _grid(MASKS[inst]))
    assert seen_kinds == {"point", "scribble", "box", "mask"}  # training draws among all kinds
    # Training restricted to some kinds.
    sample = _given_prompt_sample(frames, "inter_seg")
    f = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG,
                        prompt_kinds=("scribble",))  # fmt: skip
    assert [k for k, _ in _region_kinds(f, sample)] == ["scribble"] * 3
    # Evaluation: the fixed kind; instance 2 has no box prompt and is dropped (as the official eval).
    f = F.make_features(sample, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0), config=CONFIG,
                        eval_prompt_kind="box")  # fmt: skip
    assert _region_kinds(f, sample) == [("box", 0), ("box", 1)] and f["gt_classes"].tolist() == [0, 1]
    f = F.make_features(_given_prompt_sample(frames, "vgd_seg"), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=CONFIG, eval_prompt_kind="box")  # fmt: skip
    assert _region_kinds(f, _given_prompt_sample(frames, "vgd_seg")) == [("box", 0), ("box", 1)]
    assert f["gt_classes"].tolist() == [0, 1]  # the box-less red circle is no target
    f = F.make_features(_given_prompt_sample(frames, "vgd_seg"), tokenizer=tokenizer, train=False,
                        rng=np.random.default_rng(0), config=CONFIG, eval_prompt_kind="point")  # fmt: skip
    assert _region_kinds(f, _given_prompt_sample(frames, "vgd_seg")) == [("point", 0), ("point", 1)]
    assert f["gt_classes"].tolist() == [0, 0, 1]
    # Video VGD: an instance prompted on several frames keeps the official prompt frame when it
    # has one there (frame 3 shows both categories), else its first prompted frame.
    video = _video_sample(frames, "vvgd_seg")
    circle, square = _rle(_box(5, 20, 14, 34)), _rle(_box(35, 55, 50, 80))
    video.visual_prompts = [VisualPrompt("mask", 1, circle, instance_indices=[0]),
                            VisualPrompt("point", 3, circle, instance_indices=[0]),
                            VisualPrompt("box", 3, square, instance_indices=[1]),
                            VisualPrompt("mask", 4, square, instance_indices=[1])]  # fmt: skip
    video.meta = {"frame_category_ids": [[1], [1], [1], [1, 2]] + [[1, 2]] * 6}
    # Training: both instances have a prompt on frame 3. Evaluation (mask kind): frames 1 and 4.
    for train, expected in ((True, [3, 3]), (False, [1, 4])):
        f = F.make_features(video, tokenizer=tokenizer, train=train, rng=np.random.default_rng(0), config=CONFIG,
                            eval_prompt_kind="mask", clip=list(range(8)))  # fmt: skip
        assert sorted(f["region_frame"].tolist()) == expected and len(f["cond_spans"]) == 2
    only_masks = dataclasses.replace(sample, visual_prompts=[p for p in sample.visual_prompts if p.kind == "mask"])
    with pytest.raises(BadSample, match="no given visual prompt of kind point"):
        F.make_features(only_masks, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0), config=CONFIG)


# ------------------------------------------------------------------------- video chat frames
def _qwen_grey_levels(f):
    """The red level (0..255) of every frame of a video of flat frames, from its Qwen patches: a
    patch row is channel-major, then its temporal pair; the first row of group g is g * gh * gw."""
    t_count, gh, gw = (int(v) for v in f["grid_thw"][0])
    size = CONFIG.qwen.patch_size ** 2
    first = f["pixel_values"][np.arange(t_count) * gh * gw]
    assert first.dtype == np.uint8                      # resized, not normalised (the ViT normalises)
    return np.stack([first[:, :size].mean(1), first[:, size:2 * size].mean(1)], 1).reshape(-1)


def test_video_chat_reads_a_frame_directory(tmp_path, tokenizer):
    import json

    from x2sam_jax.data.sources import chat

    videos = tmp_path / "videos"
    (videos / "v_dir").mkdir(parents=True)
    for t in range(12):  # frame t is a flat grey of level 20 t; natural order (frame_10 after frame_9)
        Image.fromarray(np.full((40, 56, 3), 20 * t, np.uint8)).save(videos / "v_dir" / f"frame_{t}.png")
    (videos / "v_mp4.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "qa.json").write_text(json.dumps([
        {"video_id": "v_dir", "q": "What colour?", "a": "Grey."}, {"video_id": "v_mp4", "q": "Hm?", "a": "No."}]))
    src = chat.VideoInstructSource(str(tmp_path / "qa.json"), str(videos), num_frames=8)
    sample = src[0]
    assert sample.frames == [str(videos / "v_dir")] and sample.height == sample.width == 0
    f = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)
    _check_common(f, tokenizer, 8, chat=True)
    np.testing.assert_array_equal(f["orig_hw"], [40, 56])
    assert f["grid_thw"][0, 0] == 4 and "gt_classes" not in f  # 8 frames in temporal pairs
    # linspace(0, 11, 8).round() = 0 2 3 5 6 8 9 11: read the grey level back from the Qwen patches
    levels = np.round(_qwen_grey_levels(f)).astype(int)
    np.testing.assert_array_equal(levels, 20 * np.array([0, 2, 3, 5, 6, 8, 9, 11]))
    assert tokenizer.decode(f["input_ids"]).count("seconds>") == 4
    with pytest.raises(BadSample, match=r"cannot decode video file .*v_mp4\.mp4") as err:  # a cut-off file
        F.make_features(src[1], tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)
    assert err.value.kind == "corrupt_image"
    (videos / "v_dir" / "frame_3.png").write_bytes(b"broken")
    with pytest.raises(BadSample, match="corrupt image file .*frame_3.png"):
        F.make_features(src[0], tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)


def test_embedded_frames_give_the_same_features(frames, tokenizer):
    """TFDS-style samples (frames named tfds://..., bytes in meta) match file-based samples, also
    after clip selection (the bytes follow the frames)."""
    sample = _video_sample(frames, "vref_seg")
    blobs = [open(p, "rb").read() for p in frames]
    embedded = dataclasses.replace(sample, frames=[f"tfds://x/train/0/{t}" for t in range(10)],
                                   meta={"frame_bytes": blobs})  # fmt: skip
    for train, clip in ((True, [5, 6, 7, 8, 9]), (False, None)):
        a = F.make_features(sample, tokenizer=tokenizer, train=train, rng=np.random.default_rng(2), config=CONFIG,
                            clip=clip)  # fmt: skip
        b = F.make_features(embedded, tokenizer=tokenizer, train=train, rng=np.random.default_rng(2),
                            config=CONFIG, clip=clip)  # fmt: skip
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    broken = dataclasses.replace(embedded, meta={"frame_bytes": blobs[:3] + [b""] + blobs[4:]})
    with pytest.raises(BadSample, match="missing image file tfds://x/train/0/3"):
        F.make_features(broken, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0), config=CONFIG)


def test_video_chat_decodes_an_mp4_with_its_frame_rate(tmp_path, tokenizer):
    """VideoInstruct mp4s are decoded with PyAV: 8 of 12 frames sampled uniformly, times from the fps."""
    import json

    from x2sam_jax.data.sources import chat

    videos = tmp_path / "videos"
    videos.mkdir()
    frames = [np.full((40, 56, 3), 20 * t, np.uint8) for t in range(12)]
    tf.write_video_file(str(videos / "v_abc.mp4"), frames, fps=4)
    (tmp_path / "qa.json").write_text(json.dumps([{"video_id": "v_abc", "q": "What colour?", "a": "Grey."}]))
    sample = chat.VideoInstructSource(str(tmp_path / "qa.json"), str(videos), num_frames=8)[0]
    f = F.make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0), config=CONFIG)
    _check_common(f, tokenizer, 8, chat=True)
    np.testing.assert_array_equal(f["orig_hw"], [40, 56])
    levels = _qwen_grey_levels(f)
    # H.264 at crf 18 is lossy: grey levels come back within a few units.
    np.testing.assert_allclose(levels, 20 * np.array([0, 2, 3, 5, 6, 8, 9, 11]), atol=4)
    # Temporal pairs (0, 2), (3, 5), ... at 4 fps: the mean time of each pair, "<0.2 seconds>" first.
    text = tokenizer.decode(f["input_ids"])
    assert [text.count(f"<{t:.1f} seconds>") for t in (0.25, 1.0, 1.75, 2.5)] == [1, 1, 1, 1]


def test_video_file_round_trip_and_errors(tmp_path):
    frames = [np.full((31, 45, 3), (10 * t, 200 - 10 * t, 90), np.uint8) for t in range(10)]
    path = tf.write_video_file(str(tmp_path / "v.mp4"), frames, fps=5)
    every = tf.load_video_frames(path)
    assert len(every.frames) == 10 and every.fps == 5.0 and every.frames[0].shape == (30, 44, 3)  # even sides
    some = tf.load_video_frames(path, 4)
    np.testing.assert_array_equal(some.indices, [0, 3, 6, 9])
    for index, frame in zip(some.indices, some.frames):
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(0), frames[index][0, 0], atol=4)
    with pytest.raises(BadSample, match="missing video") as err:
        tf.load_video_frames(str(tmp_path / "absent.mp4"), 4)
    assert err.value.kind == "missing_file"
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "v.mp4").read_bytes()[:200])
    with pytest.raises(BadSample, match="cut.mp4"):
        tf.load_video_frames(str(tmp_path / "cut.mp4"), 4)
    with pytest.raises(ValueError, match="one size"):
        tf.write_video_file(str(tmp_path / "w.mp4"), [frames[0], frames[1][:20]])
