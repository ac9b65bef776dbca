"""End-to-end Grain pipeline: content of batches, determinism, host slices, Orbax resume, eval."""

import functools
import itertools
import os

import numpy as np
import pytest
from _data_standins import SAM, ToySource, toy_features

from x2sam_jax.data.batching import BucketConfig
from x2sam_jax.data.pipeline import (
    build_eval_pipeline,
    build_train_pipeline,
    optimizer_steps,
    restore_iterator,
    save_iterator,
)

BUCKETS = BucketConfig(seq_lengths=(32, 64, 128), patch_counts=(8, 16, 32), grids=(1, 2), frames=(1, 8),
                       instances=(1, 2, 4), conditions=(1, 2, 4), regions=(1, 2), seg_tokens=(1, 2))


def _sources():
    return [
        ToySource("imgs", 40),
        ToySource("few", 6, task="ref_seg"),
        ToySource("clips", 14, task="vref_seg", frames=[1 + (5 * i) % 8 for i in range(14)]),
    ]


def _build(sources=None, **kw):
    args = dict(global_batch_images=8, seed=11, feature_fn=toy_features, buckets=BUCKETS, sam_size=SAM,
                process_index=0, process_count=1, num_threads=2)
    args.update(kw)
    return build_train_pipeline(sources if sources is not None else _sources(), **args)


def _row_index(batch):
    """The toy features put the sample index in input_ids[:, 0] and in every SAM pixel."""
    return batch["input_ids"][:, 0]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_follow_the_plan():
    it = _build()
    plan = it.plan
    batches = list(it)
    assert len(batches) == plan.micro_batches_per_epoch
    for i, batch in enumerate(batches):
        mb = plan.micro_batch(i)
        expected = [plan.sample_index(mb, p) for p in mb.positions]
        np.testing.assert_array_equal(_row_index(batch), expected)
        np.testing.assert_array_equal(batch["sam_pixel_values"][:, 0, 0, 0, 0], expected)
        assert int(batch["source_index"]) == mb.source and int(batch["micro_step"]) == mb.micro_step
        assert batch["input_ids"].shape[0] == (8 if mb.source < 2 else 2)  # 4 images or 1 clip per device
        if mb.source == 2:
            frames = batch["num_frames"]
            assert batch["sam_pixel_values"].shape[1] == (1 if frames.max() == 1 else 8)
    assert {int(b["source_index"]) for b in batches} == {0, 1, 2}


def test_optimizer_steps_group_micro_batches():
    it = _build()
    groups = list(optimizer_steps(it))
    assert len(groups) == it.plan.steps_per_epoch
    for g in groups:
        source = int(g[0]["source_index"])
        assert len(g) == (4 if source == 2 else 1)
        assert {int(b["source_index"]) for b in g} == {source} and len({int(b["step"]) for b in g}) == 1


def test_repeat_factors_by_source_name():
    """A {name: factor} mapping sets those sources' factors; the others keep the computed ones."""
    default = _build().plan
    plan = _build(repeats={"few": 3.0}).plan
    assert plan.repeats[1] == 3.0 and plan.repeats[0] == default.repeats[0] and plan.repeats[2] == default.repeats[2]
    assert plan.steps_per_source[1] == -(-18 // 8) and plan.steps_per_source[0] == default.steps_per_source[0]
    with pytest.raises(ValueError, match=r"no source named \['many'\]"):
        _build(repeats={"many": 2.0})


def test_deterministic_for_a_seed_whatever_the_thread_count():
    a = list(itertools.islice(_build(num_threads=1), 12))
    b = list(itertools.islice(_build(num_threads=4), 12))
    for x, y in zip(a, b):
        _same(x, y)
    c = next(iter(_build(seed=12)))
    assert not np.array_equal(c["input_ids"], a[0]["input_ids"]) or not np.array_equal(
        c["pixel_values"], a[0]["pixel_values"])


def test_hosts_get_their_slice_of_each_global_batch():
    whole = list(_build(process_count=1))
    host0 = list(_build(process_index=0, process_count=2))
    host1 = list(_build(process_index=1, process_count=2))
    assert len(whole) == len(host0) == len(host1)
    for w, h0, h1 in zip(whole, host0, host1):
        assert int(h0["source_index"]) == int(h1["source_index"]) == int(w["source_index"])
        np.testing.assert_array_equal(np.concatenate([_row_index(h0), _row_index(h1)]), _row_index(w))
        # per-sample augmentation depends on the global position, not on the host
        np.testing.assert_array_equal(np.concatenate([h0["pixel_values"][:, 0, 0], h1["pixel_values"][:, 0, 0]]),
                                      w["pixel_values"][:, 0, 0])


@pytest.mark.parametrize("stop", [5, 13])  # mid-epoch, and in the second epoch
def test_orbax_resume_mid_epoch_equals_uninterrupted(tmp_path, stop):
    reference = list(_build(num_epochs=2))
    it = _build(num_epochs=2)
    for _ in range(stop):
        next(it)
    save_iterator(tmp_path / "data_state", it)
    resumed = restore_iterator(tmp_path / "data_state", _build(num_epochs=2))
    rest = list(resumed)
    assert len(rest) == len(reference) - stop
    for x, y in zip(rest, reference[stop:]):
        _same(x, y)
    assert int(rest[-1]["epoch"]) == 1


def test_restore_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        restore_iterator(tmp_path / "nowhere", _build())


def test_missing_dataset_directory_surfaces_unchanged(tmp_path):
    from x2sam_jax.data.sources.coco import coco_panoptic

    missing = tmp_path / "no_coco"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _build(sources=[ToySource("imgs", 8), functools.partial(coco_panoptic, str(missing))])
    with pytest.raises(FileNotFoundError, match=str(missing)):  # the same through a dict spec
        _build(sources=[{"type": "coco_panoptic", "root": str(missing)}])
    with pytest.raises(ValueError, match="unknown type 'coco_panoptik'"):
        _build(sources=[{"type": "coco_panoptik", "root": str(missing)}])


def test_eval_pipeline_sees_every_sample_once():
    src = ToySource("val", 11)
    batches = []
    for p in range(2):
        batches.append(list(build_eval_pipeline(src, feature_fn=toy_features, batch_size=4, buckets=BUCKETS,
                                                sam_size=SAM, process_index=p, process_count=2)))
    assert len(batches[0]) == len(batches[1]) == 2  # ceil(ceil(11/2)/4), equal on both hosts
    seen = []
    for host in batches:
        for b in host:
            idx = b["sample_index"]
            assert (b["sample_valid"] == (idx >= 0)).all()
            np.testing.assert_array_equal(_row_index(b)[idx >= 0], idx[idx >= 0])
            seen.extend(idx[idx >= 0].tolist())
    assert sorted(seen) == list(range(11))


def test_eval_generator_follows_the_sample_id_and_seed():
    """An evaluation sample's generator (its template draw) is keyed by (seed, sample id): the
    same whatever position the sample holds in the split, another under another seed."""

    class Reversed(ToySource):
        def __getitem__(self, i):
            return super().__getitem__(len(self) - 1 - i)

    def noise_by_id(src, seed):
        out = {}
        for b in build_eval_pipeline(src, feature_fn=toy_features, batch_size=3, buckets=BUCKETS, sam_size=SAM,
                                     seed=seed, process_index=0, process_count=1):
            for r in np.flatnonzero(b["sample_valid"]):
                out[int(b["input_ids"][r, 0])] = float(b["pixel_values"][r, 0, 0])   # toy ids[0] = the sample
        return out

    forward, backward = noise_by_id(ToySource("val", 5), 0), noise_by_id(Reversed("val", 5), 0)
    assert forward == backward and len(set(forward.values())) == 5
    assert all(v != forward[k] for k, v in noise_by_id(ToySource("val", 5), 1).items())


def test_eval_pipeline_walks_every_clip_of_long_videos():
    """Videos longer than clip_len give one item per clip (stride clips; span clips for ReVOS-style
    tasks), each row carrying its sample, clip and source frame indices; images stay one item."""
    from x2sam_jax.data import clips
    from x2sam_jax.data.pipeline import eval_items

    lengths = [20, 5, 8, 11]
    for task, expected_clips in (("vref_seg", lambda n: clips.stride_clips(n, 8)),
                                 ("vreason_seg", lambda n: clips.span_clips(n, 8))):
        src = ToySource("vids", len(lengths), task=task, frames=lengths)
        expected = [(i, c, clip) for i, n in enumerate(lengths)
                    for c, clip in enumerate(expected_clips(n) if n > 8 else [list(range(n))])]
        rows = []
        for b in build_eval_pipeline(src, feature_fn=toy_features, batch_size=3, buckets=BUCKETS, sam_size=SAM,
                                     process_index=0, process_count=1):
            for r in np.flatnonzero(b["sample_valid"]):
                frames = int(b["num_frames"][r])
                assert (b["clip_frames"][r, frames:] == -1).all()
                rows.append((int(b["sample_index"][r]), int(b["clip_index"][r]), b["clip_frames"][r, :frames].tolist()))
            assert (b["clip_index"][~b["sample_valid"]] == -1).all()
        assert rows == expected, task
        for i, n in enumerate(lengths):  # stride clips together cover every frame (span clips, as the
            # official ones, can leave the last frames out, e.g. 17-19 of 20)
            covered = sorted({t for j, _, clip in rows if j == i for t in clip})
            assert covered == list(range(n)) or (task == "vreason_seg" and covered[:-1] == list(range(covered[-1])))
    assert len(eval_items(ToySource("imgs", 4))) == 4
    assert len(eval_items(ToySource("v", 1, task="vref_seg", frames=[20]), whole_videos=False)) == 1


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from x2sam_jax.data import synthetic

    root = str(tmp_path_factory.mktemp("syn") / "data")
    synthetic.generate(root, num_images=8, num_videos=3, frames=8, size=(64, 80), seed=0)
    return root


def test_real_sources_and_features_end_to_end(synthetic_root, tmp_path):
    """Synthetic dataset -> real sources -> make_features (tiny tokenizer) -> padded batches."""
    import orbax.checkpoint as ocp
    import grain

    from x2sam_jax.data import synthetic
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    srcs = synthetic.sources(synthetic_root, "train")
    specs = [srcs["coco_panoptic"],
             {"type": "refcoco", "root": os.path.join(synthetic_root, "refcocos"), "dataset": "refcoco"},
             srcs["ref_ytvos"]]

    def build():
        return build_train_pipeline(specs, tokenizer=tok, global_batch_images=4, sam_size=64,
                                    seed=3, process_index=0, process_count=1, num_epochs=1)

    it = build()
    assert it.plan.sources[2].is_video and not it.plan.sources[0].is_video
    batches = list(it)
    assert len(batches) == it.plan.micro_batches_per_epoch and it.stats()["total"] == 0
    for b in batches:
        d = int(b["source_index"])
        assert b["input_ids"].shape[0] == (1 if d == 2 else 4)
        assert b["input_ids"].shape[1] in BucketConfig().seq_lengths
        assert b["pixel_values"].shape[1] in BucketConfig().patch_counts and b["pixel_values"].shape[2] == 1536
        assert b["sam_pixel_values"].shape[1:] == ((8 if d == 2 else 1), 64, 64, 3)
        assert b["gt_masks"].shape[3:] == (16, 16)
        # every real <SEG> sits inside the sequence and every valid sample has a loss target
        for row in range(b["input_ids"].shape[0]):
            seg = b["seg_positions"][row][b["seg_valid"][row]]
            assert len(seg) >= 1 and (seg < b["attention_mask"][row].sum()).all()
            assert (b["labels"][row] != -100).any()
            assert b["grid_thw"][row, 0].prod() == b["pixel_valid"][row].sum()  # patches match the grid
        assert (b["accumulate_steps"] == (4 if d == 2 else 1))

    # Resume inside a training checkpoint (CheckpointManager + Composite), mid-epoch.
    it = build()
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = build()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    rest = list(fresh)
    assert len(rest) == len(batches) - 3
    for x, y in zip(rest, batches[3:]):
        _same(x, y)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    reference = list(_build(num_epochs=2))
    it = _build(num_epochs=2, num_workers=2)
    got = list(it)
    it.close()
    assert len(got) == len(reference)
    for x, y in zip(got, reference):
        _same(x, y)
    it = _build(num_epochs=2, num_workers=2)
    for _ in range(7):
        next(it)
    state = it.get_state()
    it.close()
    resumed = _build(num_epochs=2, num_workers=2)
    resumed.set_state(state)
    rest = list(resumed)
    resumed.close()
    assert len(rest) == len(reference) - 7
    for x, y in zip(rest, reference[7:]):
        _same(x, y)


_HOST_SCRIPT = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import jax
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
import numpy as np
import test_pipeline
it = test_pipeline._build(process_index=None, process_count=None)
rows = [b["input_ids"][:, 0].tolist() for b in it]
import json
json.dump(rows, open({out!r}, "w"))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_jax_processes_split_every_global_batch(tmp_path):
    """Hosts found through jax.distributed (process_index/process_count defaults)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for pid in range(2):
        script = _HOST_SCRIPT.format(tests=tests, port=port, pid=pid, out=str(tmp_path / f"host{pid}.json"))
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(tests)))
    for p in procs:
        assert p.wait(timeout=300) == 0
    import json

    whole = [_row_index(b).tolist() for b in _build()]
    hosts = [json.loads((tmp_path / f"host{pid}.json").read_text()) for pid in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole)
    assert [a + b for a, b in zip(*hosts)] == whole
