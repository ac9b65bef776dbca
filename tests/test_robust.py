"""Bad data is skipped, counted per reason and source, and refilled deterministically."""

import collections
import logging

import numpy as np
import pytest
from _data_standins import SAM, ToySource, toy_features
from PIL import Image

from x2sam_jax.data import features as features_mod
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.batching import BucketConfig
from x2sam_jax.data.pipeline import build_eval_pipeline, build_train_pipeline
from x2sam_jax.data.robust import SkipStats, TooManyBadSamples, classify
from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample
from x2sam_jax.data.sources.common import empty_rle, encode_mask

BUCKETS = BucketConfig(seq_lengths=(32, 64, 128), patch_counts=(8, 16, 32), grids=(1, 2), frames=(1, 8),
                       instances=(1, 2, 4), conditions=(1, 2, 4), regions=(1, 2), seg_tokens=(1, 2))


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001  (the test wants the real exception object)
        return err
    raise AssertionError("expected an exception")


@pytest.fixture(scope="module")
def real_errors(tmp_path_factory):
    """One exception per failure mode, raised by the real sources / transforms / features code."""
    tmp = tmp_path_factory.mktemp("bad")
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = tmp / "good.jpg"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    empty_sample = Sample(dataset="toy", task="gen_seg", sample_id="e", frames=[str(good)], height=20, width=30,
                          instances=[Instance(masks=[empty_rle(20, 30)], category="thing")], categories=["thing"])
    malformed = Sample(dataset="toy", task="ref_seg", sample_id="m", frames=[str(good)], height=20, width=30,
                       phrases=[Phrase("the thing", [3])])
    return {
        "missing_file": _raised(lambda: tf.load_image(str(tmp / "missing.jpg"))),
        "corrupt_image": _raised(lambda: tf.load_image(str(corrupt))),
        "mask_out_of_bounds": _raised(lambda: tf.decode_rle(encode_mask(np.ones((10, 10), np.uint8)), 20, 30)),
        "empty_mask": _raised(lambda: features_mod.make_features(
            empty_sample, tokenizer=None, train=True, rng=np.random.default_rng(0))),
        "malformed_record": _raised(malformed.validate),
        "corrupt_oserror": OSError("image file is truncated"),
    }


def test_classify_real_messages(real_errors):
    for reason, err in real_errors.items():
        assert classify(err) == reason.replace("corrupt_oserror", "corrupt_image"), (reason, str(err))
    assert classify(FileNotFoundError("x.jpg")) == "missing_file"
    wrapped = BadSample("coco[3]: malformed record (FileNotFoundError: [Errno 2] No such file: 'a.png')")
    assert classify(wrapped) == "missing_file"


def _failing_features(bad_in_features):
    def feature_fn(sample, rng):
        i = int(sample.meta["index"])
        if sample.dataset == "toy" and i in bad_in_features:
            err = bad_in_features[i]
            if err == "too_long":
                f = toy_features(sample, rng)
                f["input_ids"] = f["labels"] = np.zeros(500, np.int32)  # beyond the largest bucket (128)
                return f
            raise err
        return toy_features(sample, rng)

    return feature_fn


def test_each_failure_mode_is_skipped_counted_and_refilled(real_errors):
    n = 48  # 6 micro-batches of 8, one epoch, repeat factor 1
    in_source = {3: real_errors["malformed_record"], 20: real_errors["malformed_record"]}
    in_features = {5: real_errors["missing_file"], 6: real_errors["corrupt_image"],
                   11: real_errors["mask_out_of_bounds"], 30: real_errors["empty_mask"], 31: "too_long",
                   40: real_errors["corrupt_oserror"]}
    reasons = {3: "malformed_record", 20: "malformed_record", 5: "missing_file", 6: "corrupt_image",
               11: "mask_out_of_bounds", 30: "empty_mask", 31: "exceeds_bucket", 40: "corrupt_image"}
    src = ToySource("toy", n, bad=in_source)
    it = build_train_pipeline([src, ToySource("clean", 48)], global_batch_images=8, seed=4,
                              feature_fn=_failing_features(in_features), buckets=BUCKETS, sam_size=SAM,
                              process_index=0, process_count=1, num_threads=2)
    plan = it.plan
    batches = list(it)

    # Independent model of skip-and-refill: walk forward in the source's epoch order.
    expected_counts = collections.Counter()
    for i, batch in enumerate(batches):
        mb = plan.micro_batch(i)
        rows = []
        for p in mb.positions:
            k = 0
            while mb.source == 0 and plan.sample_index(mb, p + k) in reasons:
                expected_counts[reasons[plan.sample_index(mb, p + k)]] += 1
                k += 1
            rows.append(plan.sample_index(mb, p + k))
        np.testing.assert_array_equal(batch["input_ids"][:, 0], rows)  # refilled by the next sample
        assert batch["sample_valid"].all() and batch["input_ids"].shape[0] == 8  # full batches
    stats = it.stats()
    assert stats["by_source"] == {"toy": dict(sorted(expected_counts.items()))}
    assert stats["total"] == sum(expected_counts.values()) >= 8
    assert set(stats["by_reason"]) == {"malformed_record", "missing_file", "corrupt_image", "mask_out_of_bounds",
                                       "empty_mask", "exceeds_bucket"}
    assert "toy: " in it.log_line() and f"skipped {stats['total']} samples" in it.log_line()
    assert any("missing image file" in m for m in stats["examples"]["missing_file"])
    # No bad sample ever reaches a batch.
    seen = np.concatenate([b["input_ids"][:, 0] for b in batches if int(b["source_index"]) == 0])
    assert not set(seen.tolist()) & set(reasons)


def test_skip_counts_survive_iterator_state():
    src = ToySource("toy", 16, bad={0: BadSample("toy[0]: no frames"), 1: BadSample("toy[1]: no frames")})

    def build():
        return build_train_pipeline([src], global_batch_images=8, seed=0, feature_fn=toy_features, buckets=BUCKETS,
                                    sam_size=SAM, process_index=0, process_count=1, num_epochs=3)

    it = build()
    for _ in range(4):
        next(it)
    state = it.get_state()
    total = it.stats()["total"]
    assert total >= 2
    resumed = build()
    resumed.set_state(state)
    assert resumed.stats()["total"] == total
    assert next(resumed)["input_ids"].tolist() == next(it)["input_ids"].tolist()


def test_skips_are_logged(caplog):
    src = ToySource("toy", 8, bad={2: BadSample("toy[2]: no frames")})
    with caplog.at_level(logging.WARNING, logger="x2sam_jax.data"):
        list(build_train_pipeline([src], global_batch_images=8, feature_fn=toy_features, buckets=BUCKETS,
                                  sam_size=SAM, process_index=0, process_count=1))
    assert any("skipped 1 samples (toy: malformed_record=1)" in r.getMessage() for r in caplog.records)


def test_a_bug_is_not_swallowed():
    def broken(sample, rng):
        return 1 // 0

    it = build_train_pipeline([ToySource("toy", 8)], global_batch_images=8, feature_fn=broken, buckets=BUCKETS,
                              sam_size=SAM, process_index=0, process_count=1)
    with pytest.raises(ZeroDivisionError) as info:
        next(it)
    assert any("of toy" in note for note in getattr(info.value, "__notes__", []))


def test_an_all_bad_source_is_a_clear_error():
    src = ToySource("rotten", 8, bad={i: BadSample(f"rotten[{i}]: no frames") for i in range(8)})
    it = build_train_pipeline([src], global_batch_images=8, feature_fn=toy_features, buckets=BUCKETS,
                              sam_size=SAM, process_index=0, process_count=1, max_attempts=5)
    with pytest.raises(TooManyBadSamples, match="rotten: 5 consecutive samples failed"):
        next(it)


def test_eval_marks_bad_samples_invalid_and_counts_them():
    src = ToySource("val", 6, bad={1: BadSample("val[1]: no frames")})
    it = build_eval_pipeline(src, feature_fn=toy_features, batch_size=4, buckets=BUCKETS, sam_size=SAM,
                             process_index=0, process_count=1)
    batches = list(it)
    idx = np.concatenate([b["sample_index"] for b in batches])
    assert sorted(idx[idx >= 0].tolist()) == [0, 2, 3, 4, 5]
    assert it.stats()["by_source"] == {"val": {"malformed_record": 1}}


def test_skip_stats_merge_and_report():
    stats = SkipStats()
    stats.merge([("a", "empty_mask", "a[1]: empty"), ("a", "empty_mask", ""), ("b", "missing_file", "b[2]: x")])
    s = stats.stats()
    assert s["total"] == 3 and s["by_reason"] == {"empty_mask": 2, "missing_file": 1}
    assert s["by_source"] == {"a": {"empty_mask": 2}, "b": {"missing_file": 1}}
    assert stats.log_line() == "data: skipped 3 samples (a: empty_mask=2, b: missing_file=1)"
