"""Data-side pieces of training: the stage-1 class-agnostic sample form, batch shapes agreed across
micro-batches and hosts, and padded frames kept out of the memory bank."""

import numpy as np
import pytest
from _data_standins import SAM, ToySource, toy_features

from x2sam_jax.data import features as F
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.batching import PADDED_AXES, BucketConfig, Collator, batch_dims, pad_batch
from x2sam_jax.data.pipeline import agree_batch_shapes, build_train_pipeline, optimizer_steps


# ------------------------------------------------------------------------------------- stage 1 form
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from x2sam_jax.data import synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    synthetic.generate(str(root), num_images=6, num_videos=1, frames=2, seed=3)
    return str(root)


def test_class_agnostic_form_on_synthetic_coco(synthetic_root):
    from x2sam_jax.data import synthetic

    config = F.FeatureConfig(sam=tf.SamPreprocessConfig(size=128), class_agnostic=True, max_instances=3)
    source = synthetic.sources(synthetic_root, "train")["coco_panoptic"]
    seen_many = False
    for index in range(len(source)):
        sample = source[index]
        usable = [i for i, inst in enumerate(sample.instances)
                  if not inst.iscrowd and any(m is not None for m in inst.masks)]
        full = F.make_features(sample, tokenizer=None, train=False, rng=np.random.default_rng(0),
                               config=F.FeatureConfig(sam=config.sam, class_agnostic=True))
        # Every usable instance (things and stuff alike) is a target of class 0; no text, no Qwen inputs.
        assert len(full["gt_classes"]) == len(usable)
        assert np.all(full["gt_classes"] == 0)
        assert len(full["input_ids"]) == 0 and len(full["labels"]) == 0
        assert "pixel_values" not in full and "cond_spans" not in full
        assert full["gt_masks"].shape == (1, len(usable), 32, 32) and full["gt_frame_valid"].all()
        capped = F.make_features(sample, tokenizer=None, train=True, rng=np.random.default_rng(index), config=config)
        assert len(capped["gt_classes"]) == min(3, len(usable))
        if len(usable) > 3:    # training keeps a random subset of the usable instances
            seen_many = True
            masks = {full["gt_masks"][0, k].tobytes() for k in range(len(usable))}
            subsets = set()
            for s in range(6):
                f = F.make_features(sample, tokenizer=None, train=True, rng=np.random.default_rng(s), config=config)
                assert all(m.tobytes() in masks for m in f["gt_masks"][0])
                subsets.add(tuple(sorted(m.tobytes() for m in f["gt_masks"][0])))
            assert len(subsets) >= 2
    assert seen_many
    batch = Collator(BucketConfig(seq_lengths=(1,), patch_counts=(1,), instances=(8,)), sam_size=128)([full, capped])
    assert batch["input_ids"].shape == (2, 1) and not batch["attention_mask"].any()
    np.testing.assert_array_equal(batch["instance_valid"].sum(1), [len(full["gt_classes"]), len(capped["gt_classes"])])


# ------------------------------------------------------------------------------------- shapes
BUCKETS = BucketConfig(seq_lengths=(32, 64, 128), patch_counts=(8, 16, 32), grids=(1, 2), frames=(1, 8),
                       instances=(1, 2, 4), conditions=(1, 2, 4), regions=(1, 2), seg_tokens=(1, 2))


def _host_pipeline(process_index):
    sources = [ToySource("imgs", 40), ToySource("clips", 16, task="vref_seg", frames=[1 + (5 * i) % 8 for i in range(16)])]
    return build_train_pipeline(sources, global_batch_images=8, images_per_device=2, clips_per_device=1,
                                video_accumulate_steps=2, seed=5, feature_fn=toy_features, buckets=BUCKETS,
                                sam_size=SAM, process_index=process_index, process_count=2, num_threads=1)


def test_two_hosts_agree_on_every_step_shape():
    hosts = [optimizer_steps(_host_pipeline(p)) for p in (0, 1)]
    differed = 0
    for step, groups in zip(range(12), zip(*hosts)):
        own = [[batch_dims(b) for b in g] for g in groups]
        if own[0] != own[1] or any(d != own[h][0] for h in (0, 1) for d in own[h]):
            differed += 1
        # The all-gather of the two hosts: each host contributes its local maxima, sees both.
        local = [_local(g) for g in groups]

        def allgather(v, host):
            np.testing.assert_array_equal(v, local[host])
            return np.stack(local)

        agreed = [agree_batch_shapes(g, pad_token_id=0, allgather=lambda v, h=h: allgather(v, h))
                  for h, g in enumerate(groups)]
        shapes = {tuple(sorted((k, v.shape) for k, v in b.items() if isinstance(v, np.ndarray) and v.ndim))
                  for g in agreed for b in g}
        assert len(shapes) == 1, step            # every micro-batch of both hosts: one program
        dims = batch_dims(agreed[0][0])
        for name, axes in PADDED_AXES.items():   # the agreed size is the maximum, a bucket value
            assert dims[name] == max(d[name] for h in own for d in h)
            assert dims[name] in getattr(BUCKETS, name)
        for original, padded in zip(groups[0] + groups[1], agreed[0] + agreed[1]):
            _check_padding(original, padded)
    assert differed >= 2     # the hosts' own buckets did differ: the agreement mattered


def _local(group):
    return np.max([[batch_dims(b)[n] for n in PADDED_AXES] for b in group], axis=0).astype(np.int32)


def _check_padding(original, padded):
    for key, value in original.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            continue
        region = tuple(slice(0, s) for s in value.shape)
        np.testing.assert_array_equal(padded[key][region], value, err_msg=key)
    extra_labels = padded["labels"][:, original["labels"].shape[1]:]
    assert np.all(extra_labels == -100)
    assert np.all(padded["gt_classes"][:, original["gt_classes"].shape[1]:] == -1)
    assert not padded["instance_valid"][:, original["instance_valid"].shape[1]:].any()
    assert not padded["frame_valid"][:, original["frame_valid"].shape[1]:].any()


def test_pad_batch_rejects_shrinking():
    batch = Collator(BUCKETS, sam_size=SAM)([toy_features(ToySource("imgs", 3)[2], np.random.default_rng(0))])
    dims = batch_dims(batch)
    with pytest.raises(ValueError, match="input_ids"):
        pad_batch(batch, {**dims, "seq_lengths": dims["seq_lengths"] - 1}, 0)
