"""Collation into bucket shapes: padding values, validity masks, a bounded set of batch shapes."""

import numpy as np
import pytest
from _data_standins import PATCH_DIM, SAM, ToySource, toy_features

from x2sam_jax.data.batching import BucketConfig, Collator, ExceedsBucket, batch_shape_key, bucket_size, check_fits

BUCKETS = BucketConfig(seq_lengths=(16, 32, 64, 128), patch_counts=(8, 16, 32), grids=(1, 2), frames=(1, 8),
                       instances=(1, 2, 4), conditions=(1, 2, 4), regions=(1, 2), seg_tokens=(1, 2))


def _features(i, frames=1, source="a"):
    return toy_features(ToySource(source, 100, frames=[frames] * 100)[i], np.random.default_rng(i))


def test_bucket_size():
    assert [bucket_size(n, (16, 32, 64), "x") for n in (0, 1, 16, 17, 64)] == [16, 16, 16, 32, 64]
    with pytest.raises(ExceedsBucket, match="x=65 exceeds the largest bucket 64"):
        bucket_size(65, (16, 32, 64), "x")
    with pytest.raises(ValueError, match="sorted"):
        BucketConfig(seq_lengths=(64, 32))


def test_collate_pads_with_zeros_and_masks():
    feats = [_features(1), _features(4), _features(2)]  # seq 17/38/24, patches 8/20/12, instances 2/2/3
    batch = Collator(BUCKETS, pad_token_id=7, sam_size=SAM, patch_dim=PATCH_DIM)(feats)
    assert batch["input_ids"].shape == (3, 64)  # max 38 -> bucket 64
    assert batch["pixel_values"].shape == (3, 32, PATCH_DIM)  # max 20 -> 32
    assert batch["gt_masks"].shape == (3, 1, 4, SAM // 4, SAM // 4)  # 3 instances -> bucket 4
    assert batch["grid_thw"].shape == (3, 1, 3) and batch["sam_pixel_values"].shape == (3, 1, SAM, SAM, 3)
    for b, f in enumerate(feats):
        n, p, k = len(f["input_ids"]), len(f["pixel_values"]), len(f["gt_classes"])
        np.testing.assert_array_equal(batch["input_ids"][b, :n], f["input_ids"])
        assert (batch["input_ids"][b, n:] == 7).all() and (batch["labels"][b, n:] == -100).all()
        np.testing.assert_array_equal(batch["labels"][b, :n], f["labels"])
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, :n].all()
        np.testing.assert_array_equal(batch["pixel_values"][b, :p], f["pixel_values"])
        assert (batch["pixel_values"][b, p:] == 0).all()  # padded pixel rows are zeros
        assert batch["pixel_valid"][b].sum() == p
        np.testing.assert_array_equal(batch["gt_classes"][b], list(range(k)) + [-1] * (4 - k))
        assert batch["instance_valid"][b].tolist() == [True] * k + [False] * (4 - k)
        assert not batch["gt_masks"][b, :, k:].any() and batch["gt_masks"][b, :, :k].all()
        np.testing.assert_array_equal(batch["seg_positions"][b, :1], f["seg_positions"])
        assert batch["seg_valid"][b].tolist() == [True]  # one <SEG> -> bucket 1
    assert batch["sample_valid"].all()


def test_padded_grid_rows_and_frames_are_zero():
    feats = [_features(3, frames=1), _features(5, frames=3)]
    feats[0]["grid_thw"] = np.array([[1, 2, 4], [1, 2, 2]], np.int32)  # two images in sample 0
    batch = Collator(BUCKETS, sam_size=SAM, patch_dim=PATCH_DIM)(feats)
    assert batch["grid_thw"].shape == (2, 2, 3)
    np.testing.assert_array_equal(batch["grid_thw"][1, 1], [0, 0, 0])  # padded grid row
    assert batch["sam_pixel_values"].shape[1] == 8  # 3 frames -> frame bucket 8
    assert batch["frame_valid"].tolist() == [[True] + [False] * 7, [True] * 3 + [False] * 5]
    assert (batch["sam_pixel_values"][1, 3:] == 0).all() and (batch["sam_pixel_values"][1, :3] == 5).all()
    assert (batch["sam_valid_hw"][1, 3:] == 0).all() and not batch["gt_frame_valid"][1, 3:].any()
    np.testing.assert_array_equal(batch["num_frames"], [1, 3])


def test_eval_padding_rows_and_empty_batches():
    batch = Collator(BUCKETS, sam_size=SAM, patch_dim=PATCH_DIM)([_features(1)], batch_size=3)
    assert batch["sample_valid"].tolist() == [True, False, False]
    assert not batch["attention_mask"][1:].any() and (batch["labels"][1:] == -100).all()
    empty = Collator(BUCKETS, sam_size=SAM, patch_dim=PATCH_DIM)([], batch_size=2)
    assert empty["input_ids"].shape == (2, 16) and not empty["sample_valid"].any()
    with pytest.raises(ValueError, match="empty"):
        Collator(BUCKETS)([])


def test_sample_beyond_the_largest_bucket_is_rejected():
    f = _features(1)
    f["input_ids"] = np.zeros(200, np.int32)
    f["labels"] = np.zeros(200, np.int32)
    with pytest.raises(ExceedsBucket, match="seq_lengths=200"):
        check_fits(f, BUCKETS)


def test_number_of_batch_shapes_is_bounded():
    rng = np.random.default_rng(0)
    collate = Collator(BUCKETS, sam_size=SAM, patch_dim=PATCH_DIM)
    shapes = set()
    for _ in range(150):
        frames = int(rng.choice([1, 8]))
        feats = []
        for _ in range(2):
            f = _features(int(rng.integers(0, 100)), frames=frames)
            n = int(rng.integers(1, 129))
            f["input_ids"], f["labels"] = np.ones(n, np.int32), np.ones(n, np.int32)
            feats.append(f)
        shapes.add(batch_shape_key(collate(feats)))
    # 150 batches of 128 possible sequence lengths collapse onto the buckets reachable here:
    # 4 sequence x 3 patch x 3 instance x 2 frame buckets.
    assert len(shapes) <= BUCKETS.max_programs()
    assert len(shapes) <= 4 * 3 * 3 * 2  # seq x patch x instance x frame buckets reachable here
    seq_sizes = {dict(k)["input_ids"][1] for k in shapes}
    assert seq_sizes <= set(BUCKETS.seq_lengths) and len(seq_sizes) == 4


def test_tied_dimensions_take_one_bucket_position():
    """Tied dimensions move together: the position is the largest any of them needs, so a group
    adds as many programs as one of its lists."""
    buckets = BucketConfig(seq_lengths=(64, 128, 256), patch_counts=(16, 64, 256), instances=(4, 16),
                           conditions=(8, 32), seg_tokens=(2, 8), regions=(1,), grids=(1,), frames=(1,),
                           tied=(("seq_lengths", "patch_counts"), ("instances", "conditions", "seg_tokens")))
    sizes = dict(seq_lengths=100, patch_counts=10, instances=3, conditions=20, seg_tokens=1, regions=0, grids=1,
                 frames=1)
    padded = buckets.padded(sizes)
    assert (padded["seq_lengths"], padded["patch_counts"]) == (128, 64)          # text needs position 1
    assert (padded["instances"], padded["conditions"], padded["seg_tokens"]) == (16, 32, 8)   # conditions: 1
    assert buckets.max_programs() == 3 * 2
    assert BucketConfig(seq_lengths=(64, 128, 256), patch_counts=(16, 64, 256)).max_programs() > 6
    with pytest.raises(ValueError, match="one length"):
        BucketConfig(seq_lengths=(64, 128), patch_counts=(16,), tied=(("seq_lengths", "patch_counts"),))
    with pytest.raises(ValueError, match="unknown dimension"):
        BucketConfig(tied=(("seq_lengths", "tokens"),))
    with pytest.raises(ExceedsBucket):
        buckets.padded(dict(sizes, patch_counts=300))


def test_batch_without_sam_frames_has_no_frames_and_no_regions():
    """Chat samples carry no SAM side: their batch pads frames and regions to 0 (the train step's
    LLM-only signal, whatever the buckets); beside one sample with frames, and for an all-padding
    batch, the frame buckets apply as usual."""
    from x2sam_jax.data.batching import NO_FRAME_DIMS, batch_dims, pad_batch

    sam_side = ("sam_pixel_values", "sam_valid_hw", "gt_masks", "gt_classes", "gt_frame_valid", "region_masks",
                "region_frame")
    chat = [{k: v for k, v in _features(i).items() if k not in sam_side} for i in (1, 2)]
    collate = Collator(BUCKETS, sam_size=SAM, patch_dim=PATCH_DIM)
    batch = collate(chat)
    dims = batch_dims(batch)
    assert {n: dims[n] for n in NO_FRAME_DIMS} == {"frames": 0, "regions": 0}
    assert batch["sam_pixel_values"].shape == (2, 0, SAM, SAM, 3) and batch["gt_masks"].shape[1] == 0
    assert batch["region_masks"].shape == (2, 0, SAM, SAM) and batch["sample_valid"].all()
    assert batch_dims(pad_batch(batch, dims, 0)) == dims
    assert collate([chat[0], _features(3)])["frame_valid"].tolist() == [[False], [True]]
    assert collate([], batch_size=2)["frame_valid"].shape == (2, 1)
