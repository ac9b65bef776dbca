"""Mixture plan: repeat factors, one source per global batch, host slices, length-sorted clips."""

import collections
import math

import numpy as np
import pytest

from x2sam_jax.data.mixture import MixtureDataset, MixturePlan, SourceInfo, repeat_factors


def _toy_infos():
    rng = np.random.default_rng(0)
    return [
        SourceInfo("big_images", 900, False),
        SourceInfo("mid_images", 90, False),
        SourceInfo("small_images", 10, False),
        SourceInfo("clips", 60, True, tuple(int(v) for v in rng.integers(1, 9, size=60))),
    ]


def test_repeat_factors_toy_mixture():
    r = repeat_factors([900, 90, 10], threshold=0.1)
    # f = 0.9, 0.09, 0.01  ->  r = 1, sqrt(0.1/0.09), sqrt(10)
    np.testing.assert_allclose(r, [1.0, math.sqrt(0.1 / 0.09), math.sqrt(10.0)], rtol=1e-12)
    plan = MixturePlan(
        [SourceInfo("a", 900, False), SourceInfo("b", 90, False), SourceInfo("c", 10, False)],
        global_batch_images=8, seed=3,
    )
    assert plan.epoch_samples == [900, int(90 * math.sqrt(0.1 / 0.09)), int(10 * math.sqrt(10.0))] == [900, 94, 31]
    # Within an epoch each sample of "c" appears floor(r) or ceil(r) times (before round-up padding).
    order = plan.epoch_order(0, 2)[:31]
    counts = collections.Counter(order.tolist())
    assert set(counts) == set(range(10)) and set(counts.values()) <= {3, 4}
    assert sum(v == 4 for v in counts.values()) == 1
    # "b": 90 samples once, 4 of them twice.
    counts_b = collections.Counter(plan.epoch_order(0, 1)[:94].tolist())
    assert len(counts_b) == 90 and sorted(counts_b.values()).count(2) == 4


def test_every_global_batch_from_one_source_and_hosts_agree():
    infos = _toy_infos()
    kw = dict(global_batch_images=16, seed=7, process_count=2)  # 4 devices, 2 hosts
    hosts = [MixturePlan(infos, process_index=p, **kw) for p in range(2)]
    single = MixturePlan(infos, **{**kw, "process_count": 1})
    assert hosts[0].micro_batches_per_epoch == single.micro_batches_per_epoch
    seen_sources = set()
    for i in range(single.micro_batches_per_epoch):
        parts = [h.micro_batch(i) for h in hosts]
        whole = single.micro_batch(i)
        # all hosts draw the same source at the same step, and their slices tile the global batch
        assert {p.source for p in parts} == {whole.source}
        assert parts[0].positions + parts[1].positions == whole.positions
        assert len(whole.positions) == (16 if not infos[whole.source].is_video else 4)
        seen_sources.add(whole.source)
    assert seen_sources == {0, 1, 2, 3}


def test_epoch_covers_every_planned_sample_once():
    infos = _toy_infos()
    plan = MixturePlan(infos, global_batch_images=16, seed=1)
    positions = collections.defaultdict(list)
    for i in range(plan.micro_batches_per_epoch):
        mb = plan.micro_batch(i)
        positions[mb.source].extend(mb.positions)
    for d in range(len(infos)):
        pos = sorted(positions[d])
        step = plan.micro_batch_size[d] * plan.accumulate_steps[d]
        assert pos == list(range(plan.steps_per_source[d] * step))  # every position exactly once
        assert len(pos) >= plan.epoch_samples[d] > len(pos) - step  # round-up adds < one step


def test_video_steps_accumulate_and_are_length_sorted():
    infos = _toy_infos()
    plan = MixturePlan(infos, global_batch_images=16, seed=2)  # 4 devices: 4 clips per micro-batch
    frames = np.asarray(infos[3].frame_counts)
    order = plan.epoch_order(0, 3)
    n = plan.epoch_samples[3]
    assert np.all(np.diff(frames[order[:n]]) >= 0)  # sorted by frame count before cutting
    micro = [plan.micro_batch(i) for i in range(plan.micro_batches_per_epoch)]
    video_steps = collections.defaultdict(list)
    for mb in micro:
        if mb.source == 3:
            assert mb.accumulate_steps == 4
            video_steps[mb.step].append(mb)
        else:
            assert mb.accumulate_steps == 1 and mb.micro_step == 0
    spread = []
    for step, mbs in video_steps.items():
        assert [m.micro_step for m in mbs] == [0, 1, 2, 3]  # consecutive micro-steps of one step
        for m in mbs:
            f = frames[[plan.sample_index(m, p) for p in m.positions]]
            spread.append(f.max() - f.min())
    # Length-sorted batches hold clips of (nearly) one length; random batches would not.
    rng = np.random.default_rng(0)
    random_spread = [np.ptp(rng.choice(frames, 4)) for _ in range(200)]
    assert np.mean(spread) < 0.5 and np.mean(random_spread) > 3


def test_plan_is_deterministic_and_reshuffles_per_epoch():
    infos = _toy_infos()
    a = MixturePlan(infos, global_batch_images=16, seed=5)
    b = MixturePlan(infos, global_batch_images=16, seed=5)
    c = MixturePlan(infos, global_batch_images=16, seed=6)
    n = a.micro_batches_per_epoch
    first = [a.micro_batch(i) for i in range(n)]
    assert first == [b.micro_batch(i) for i in range(n)]
    assert first != [c.micro_batch(i) for i in range(n)]
    second_epoch = [a.micro_batch(n + i) for i in range(n)]
    assert [m.epoch for m in second_epoch] == [1] * n
    assert [m.source for m in first] != [m.source for m in second_epoch]
    assert not np.array_equal(a.epoch_order(0, 0), a.epoch_order(1, 0))


def test_mixture_dataset_is_a_grain_map_dataset():
    plan = MixturePlan(_toy_infos(), global_batch_images=16, seed=0)
    ds = MixtureDataset(plan, num_epochs=2)
    assert len(ds) == 2 * plan.micro_batches_per_epoch
    assert ds[5] == plan.micro_batch(5)
    assert [m.step for m in ds.map(lambda m: m)[:3]] == [plan.micro_batch(i).step for i in range(3)]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="empty"):
        MixturePlan([SourceInfo("e", 0, False)], global_batch_images=8)
    with pytest.raises(ValueError, match="multiple of images_per_device"):
        MixturePlan([SourceInfo("a", 10, False)], global_batch_images=6)
    with pytest.raises(ValueError, match="does not split over 3 hosts"):
        MixturePlan([SourceInfo("a", 10, False)], global_batch_images=8, process_count=3)


def test_split_global_batch_keeps_the_recipe_on_any_cluster():
    from x2sam_jax.data.mixture import split_global_batch

    # The recipe's 128 images (at most 4 per device): fewest micro-steps, then the size they imply.
    assert split_global_batch(128, 4, 32) == (4, 1)
    assert split_global_batch(128, 4, 8) == (4, 4)
    assert split_global_batch(128, 4, 64) == (2, 1)
    assert split_global_batch(128, 4, 1) == (4, 32)
    assert split_global_batch(128, 1, 32) == (1, 4)            # 128 clips, one per device
    assert split_global_batch(12, 4, 2) == (3, 2)              # 2 micro-steps of 3 per device
    with pytest.raises(ValueError, match="128 images does not split over 256 devices"):
        split_global_batch(128, 4, 256)
    with pytest.raises(ValueError, match="does not split over 3 devices"):
        split_global_batch(128, 4, 3)


def test_accumulated_image_steps_cover_the_same_samples_as_one_micro_batch():
    """8 images per step as 1 x 8 (8 devices) or 4 x 2 (one device, 4 micro-steps): the same
    optimizer steps draw the same sources and the same samples."""
    infos = _toy_infos()
    one = MixturePlan(infos, global_batch_images=8, images_per_device=1, clips_per_device=1, seed=3)
    four = MixturePlan(infos, global_batch_images=2, images_per_device=2, clips_per_device=1, seed=3,
                       image_accumulate_steps=4, video_accumulate_steps=one.micro_batch_size[-1] * one.accumulate_steps[-1])
    assert one.steps_per_epoch == four.steps_per_epoch

    def steps(plan):
        out = {}
        for i in range(plan.micro_batches_per_epoch):
            mb = plan.micro_batch(i)
            out.setdefault(mb.step, (mb.source, []))[1].extend(plan.sample_index(mb, p) for p in mb.positions)
        return {k: (d, sorted(v)) for k, (d, v) in out.items()}

    assert steps(one) == steps(four)
