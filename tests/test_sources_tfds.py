"""Prepared TFDS (ArrayRecord) datasets read through tfds.data_source, without TensorFlow."""

import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from x2sam_jax.data import synthetic  # noqa: E402
from x2sam_jax.data.schema import Instance, Phrase, Sample, VisualPrompt  # noqa: E402
from x2sam_jax.data.sources.common import decode_rle, encode_mask, open_frame  # noqa: E402
from x2sam_jax.data.sources.tfds_source import TfdsSource, prepare_tfds, sample_from_json, sample_to_json  # noqa: E402


def test_sample_json_round_trip_keeps_types():
    m = np.zeros((6, 7), bool)
    m[1:3, 2:5] = True
    rle = encode_mask(m)
    s = Sample(dataset="d", task="vgd_seg", sample_id="1", frames=["a.jpg"], height=6, width=7,
               instances=[Instance(masks=[{"size": [6, 7], "counts": rle["counts"].encode()}], category="cat")],
               phrases=[Phrase(text="x", instance_indices=[0], span=(0, 1))],
               visual_prompts=[VisualPrompt(kind="box", frame=0, mask=rle, box=(1.0, 2.0, 3.0, 4.0), instance_indices=[0])],
               meta={"k": [1, 2]})
    back = sample_from_json(sample_to_json(s))
    assert back == s and isinstance(back.instances[0].masks[0]["counts"], bytes)
    assert back.phrases[0].span == (0, 1) and back.visual_prompts[0].box == (1.0, 2.0, 3.0, 4.0)


def test_prepare_and_read_back_synthetic(tmp_path):
    root = str(tmp_path / "syn")
    synthetic.generate(root, num_images=6, num_videos=2, frames=3, size=(40, 48), seed=1)
    srcs = synthetic.sources(root)
    builder_dir = prepare_tfds("syn_mix", str(tmp_path / "tfds"), {"train": srcs["coco_panoptic"], "video": srcs["ytvis19"]})
    assert os.path.isdir(builder_dir)
    by_dir = TfdsSource(builder_dir=builder_dir, split="train")
    by_name = TfdsSource(name="syn_mix", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(by_dir) == len(by_name) == len(srcs["coco_panoptic"])
    for i in range(len(by_dir)):
        got, want = by_dir[i], srcs["coco_panoptic"][i]
        assert got.instances == want.instances and got.categories == want.categories  # order kept
        assert got.frames == [f"tfds://syn_mix/train/{i}/0"] and got.meta["frame_paths"] == want.frames
        np.testing.assert_array_equal(np.asarray(open_frame(got, 0)), np.asarray(open_frame(want, 0)))
    video = TfdsSource(builder_dir=builder_dir, split="video")
    assert video.frame_count(0) == 3 and video[0].task == "vgen_seg"
    for a, b in zip(video[0].instances, srcs["ytvis19"][0].instances):
        for ma, mb in zip(a.masks, b.masks):
            assert (ma is None and mb is None) or np.array_equal(decode_rle(ma), decode_rle(mb))


def test_custom_builder_with_to_sample(tmp_path):
    """Any TFDS dataset: a hand-written GeneratorBasedBuilder and a feature -> Sample mapping."""
    import tensorflow_datasets as tfds

    masks = [np.zeros((5, 6), np.uint8) for _ in range(2)]
    masks[0][1:3, 1:3] = 1
    masks[1][2:5, 3:6] = 1

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    class TinyRef(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "mask_png": tfds.features.Tensor(shape=(), dtype=np.object_),
                "expression": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, m in enumerate(masks):
                yield i, {"image": png(np.full((5, 6, 3), 9 * i, np.uint8)), "mask_png": png(m * 255),
                          "expression": f"object {i}"}

    TinyRef(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()  # tfrecord needs TF

    def to_sample(f, index):
        mask = np.asarray(Image.open(io.BytesIO(f["mask_png"]))) > 0
        text = f["expression"].decode()
        return Sample(dataset="tiny_ref", task="ref_seg", sample_id=str(index), frames=[f"tfds://tiny_ref/{index}"],
                      height=mask.shape[0], width=mask.shape[1], instances=[Instance(masks=[encode_mask(mask)])],
                      phrases=[Phrase(text=text, instance_indices=[0])], meta={"frame_bytes": [f["image"]]})

    src = TfdsSource(builder_dir=os.path.join(str(tmp_path), "tiny_ref", "1.0.0"), split="train", to_sample=to_sample)
    assert len(src) == 2
    for i in range(2):
        s = src[i]
        assert s.phrases[0].text == f"object {i}"
        np.testing.assert_array_equal(decode_rle(s.instances[0].masks[0]), masks[i])
        assert np.asarray(open_frame(s, 0))[0, 0, 0] == 9 * i
    with pytest.raises(FileNotFoundError, match="missing"):
        TfdsSource(builder_dir=str(tmp_path / "missing"), split="train")


def test_prepared_dataset_flows_through_the_pipelines(tmp_path):
    """TFDS-prepared synthetic data (frames embedded as bytes) through make_features and the train
    and eval pipelines gives exactly the batches of the file-based sources; evaluation walks every
    clip of each video."""
    from x2sam_jax.data import features as F
    from x2sam_jax.data.pipeline import build_eval_pipeline, build_train_pipeline
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer

    root = str(tmp_path / "syn")
    synthetic.generate(root, num_images=5, num_videos=3, frames=8, size=(40, 48), seed=2)
    srcs = synthetic.sources(root)
    builder_dir = prepare_tfds("syn_pipe", str(tmp_path / "tfds"),
                               {"images": srcs["coco_panoptic"], "videos": srcs["ref_ytvos"]})
    tok = build_tiny_tokenizer()
    for split, files in (("images", srcs["coco_panoptic"]), ("videos", srcs["ref_ytvos"])):
        tfds_source = TfdsSource(builder_dir=builder_dir, split=split)
        assert tfds_source[0].frames[0].startswith("tfds://")
        runs = [list(build_train_pipeline([s], tokenizer=tok, global_batch_images=4, sam_size=64, seed=5,
                                          process_index=0, process_count=1, num_epochs=1,
                                          feature_kwargs={"clip_len": 4}))
                for s in (files, tfds_source)]  # fmt: skip
        assert len(runs[0]) == len(runs[1]) > 0
        for a, b in zip(*runs):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {key}")

    # Evaluation over whole videos: 8 frames, clip_len 4 -> clips [0..3], [4..7] of every video.
    videos = TfdsSource(builder_dir=builder_dir, split="videos")
    batches = list(build_eval_pipeline(videos, tokenizer=tok, batch_size=2, sam_size=64, process_index=0,
                                       process_count=1, feature_kwargs={"clip_len": 4}))  # fmt: skip
    rows = []
    for b in batches:
        for r in np.flatnonzero(b["sample_valid"]):
            rows.append((int(b["sample_index"][r]), int(b["clip_index"][r]), b["clip_frames"][r].tolist(), b, r))
    assert [(i, c) for i, c, *_ in rows] == [(i, c) for i in range(len(videos)) for c in range(2)]
    for i, c, clip_frames, b, r in rows:
        clip = list(range(4 * c, 4 * c + 4))
        assert clip_frames[:4] == clip and all(v == -1 for v in clip_frames[4:])
        want = F.make_features(srcs["ref_ytvos"][i], tokenizer=tok, train=False, rng=np.random.default_rng(0),
                               sam_size=64, clip=clip)  # fmt: skip
        n = len(want["gt_classes"])
        np.testing.assert_array_equal(b["gt_masks"][r, :4, :n], want["gt_masks"])
        np.testing.assert_array_equal(b["sam_pixel_values"][r, :4], want["sam_pixel_values"])
    assert all(not b["sample_valid"][b["sample_index"] < 0].any() for b in batches)
