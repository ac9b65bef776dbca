"""Post-processing of x2sam_jax.eval.postprocess against its references: transformers'
compute_segments (the panoptic rule X2SAM copies), torch's F.interpolate (mask upsampling), and
transcriptions of X2SAM's instance / referring / interactive post-process functions."""

import numpy as np
import pytest

from x2sam_jax.eval import inference, postprocess
from x2sam_jax.layers.interpolate import resize, resize_numpy


def test_class_probabilities_ignore_padded_condition_slots():
    logits = np.array([[2.0, 1.0, 50.0, 0.0]])          # conditions 0, 1, a padded slot, background
    probs = postprocess.class_probabilities(logits, num_conditions=2)
    expected = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12)


def test_upsample_matches_torch_and_the_jax_resize():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    logits = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    ours = postprocess.upsample(logits, 32, (24, 32), (30, 40))
    ref = F.interpolate(torch.from_numpy(logits)[None], size=(32, 32), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[:, :, :24, :32], size=(30, 40), mode="bilinear", align_corners=False)[0].numpy()
    # torch sums the two taps per axis in float32 too; only the order of the x*w products may
    # differ, so agreement is to float32 rounding of values of magnitude ~3
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # the numpy twin of layers.interpolate.resize is the same computation, bit for bit
    jax_out = np.asarray(resize(np.moveaxis(logits, 0, -1), (30, 40)))
    np.testing.assert_array_equal(np.moveaxis(resize_numpy(logits, (30, 40)), 0, -1), jax_out)


def _torch_segments(probs, logits, threshold, fuse):
    """transformers' remove_low_and_no_objects + compute_segments (maskformer), X2SAM's panoptic path."""
    import torch
    from transformers.models.maskformer.image_processing_pil_maskformer import compute_segments

    scores = torch.from_numpy(probs)
    pred_scores, pred_labels = scores.max(-1)
    keep = pred_scores > threshold
    mask_probs = torch.from_numpy(logits).double().sigmoid()[keep]
    return compute_segments(mask_probs, pred_scores[keep], pred_labels[keep], 0.5, 0.8, set(fuse))


def test_panoptic_matches_transformers_compute_segments():
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(20):
        q, c = 6, 4
        probs = rng.dirichlet(np.ones(c + 1) * 0.3, size=q)[:, :c]
        logits = rng.normal(size=(q, 12, 14)) * 4
        for k in range(q):                                  # blobs: confident masks on some queries
            y, x = rng.integers(0, 10), rng.integers(0, 12)
            logits[k, y:y + 5, x:x + 6] += 8
        ids, segments = postprocess.panoptic(probs, logits, np.ones(c, bool))
        ref_ids, ref_segments = _torch_segments(probs, logits, 0.0, fuse=())
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        assert [(s["id"], s["category"]) for s in segments] == [(s["id"], s["label_id"]) for s in ref_segments]
        compared += len(segments)
    assert compared >= 10   # segments exist to compare (the weighted-area rule drops many)


def test_panoptic_fuses_stuff_and_keeps_ids_unique():
    probs = np.array([[0.9, 0.0], [0.0, 0.9], [0.9, 0.0], [0.0, 0.9]])   # things of class 0, stuff of class 1
    logits = np.full((4, 4, 8), -10.0)
    logits[0, :, 0:2] = logits[1, :, 2:4] = logits[2, :, 4:6] = logits[3, :, 6:8] = 10.0
    ids, segments = postprocess.panoptic(probs, logits, np.array([True, False]))
    assert [(s["id"], s["category"]) for s in segments] == [(1, 0), (2, 1), (3, 0)]
    np.testing.assert_array_equal(ids[0], [1, 1, 2, 2, 3, 3, 2, 2])     # the two stuff queries share id 2
    track_ids, track_segments = postprocess.panoptic(probs, logits, np.array([True, False]), track_ids=True)
    assert [s["id"] for s in track_segments] == [1, 6, 3]              # query + 1; stuff: Q + 1 + class


def _x2sam_instances(scores, logits, keep):
    """X2SAM's _instance_genseg_postprocess (threshold 0): topk over (query, class), masks > 0,
    score x mean probability inside, things only."""
    q, c = scores.shape
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:q]
    out = []
    for index in order:
        query, label = index // c, index % c
        mask = logits[query] > 0
        prob = 1 / (1 + np.exp(-logits[query]))
        score = flat[index] * (prob * mask).sum() / (mask.sum() + 1e-6)
        if score >= 0.0 and keep[label]:
            out.append((int(query), int(label), float(score)))
    return out


def test_instances_follow_x2sam():
    rng = np.random.default_rng(2)
    scores = rng.dirichlet(np.ones(4), size=5)[:, :3]
    logits = rng.normal(size=(5, 7, 9)) * 3
    keep = np.array([True, False, True])
    ours = postprocess.instances(scores, logits, keep=keep)
    ref = sorted(_x2sam_instances(scores, logits, keep), key=lambda r: -r[2])
    assert [(p["query"], p["category"]) for p in ours] == [(q, c) for q, c, _ in ref]
    np.testing.assert_allclose([p["score"] for p in ours], [s for _, _, s in ref], rtol=1e-12)


def test_referring_and_interactive_choose_as_x2sam():
    scores = np.array([[0.1, 0.7], [0.8, 0.65], [0.6, 0.2]])       # Q=3, C=2
    logits = -np.ones((3, 4, 4))
    logits[0, :2, :2] = 1       # query 0: top-left
    logits[1, 2:, 2:] = 1       # query 1: bottom-right
    logits[2, :2, 2:] = 1       # query 2: top-right
    masks = postprocess.referring(scores, logits)
    np.testing.assert_array_equal(masks[0], logits[1] > 0)           # condition 0: top query 1
    np.testing.assert_array_equal(masks[1], logits[0] > 0)           # condition 1: top query 0
    grefs = postprocess.referring(scores, logits, multi_threshold=0.6)
    np.testing.assert_array_equal(grefs[0], (logits[1] > 0) | (logits[2] > 0))   # 0.8 and 0.6 pass
    # interactive: candidates scoring >= 0.5 (or the top one); the one overlapping the prompt wins
    prompts = np.zeros((2, 4, 4), bool)
    prompts[0, 0, 3] = True                                          # inside query 2's mask
    prompts[1, 3, 3] = True                                          # inside query 1's mask
    chosen = postprocess.interactive(scores, logits, prompts, threshold=0.5)
    np.testing.assert_array_equal(chosen[0], logits[2] > 0)          # not the top query 1
    np.testing.assert_array_equal(chosen[1], logits[1] > 0)


def test_oracle_outputs_reproduce_the_targets():
    gt = np.zeros((2, 1, 3, 4, 4), bool)
    gt[0, 0, 0, :2] = True
    gt[0, 0, 1, 2:] = True
    gt[1, 0, 0, :, :1] = True
    batch = {"gt_masks": gt, "gt_classes": np.array([[1, 0, -1], [0, -1, -1]]), "cond_valid": np.ones((2, 2), bool)}
    out = inference.oracle_outputs(batch)
    np.testing.assert_array_equal(out["mask_logits"] > 0, gt)
    probs = postprocess.class_probabilities(out["class_logits"][0, 0], 2)   # [N, C]
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0 and probs[0].max() > 1 - 1e-9
    assert probs[2].max() < 1e-9                                      # a padded slot scores nothing


def test_generated_answers_replace_the_template_answer():
    from types import SimpleNamespace

    ids = SimpleNamespace(pad=0, p_start=5, p_end=6, seg=7)
    batch = {                                            # row 0: prompt of 3 tokens; row 1: padding
        "input_ids": np.array([[1, 2, 3, 9, 9, 9, 9, 9], [0] * 8], np.int32),
        "labels": np.array([[-100, -100, -100, 9, 9, 9, 9, 9], [-100] * 8], np.int32),
        "attention_mask": np.array([[True] * 8, [False] * 8]),
        "sample_valid": np.array([True, False]),
        "cond_spans": np.zeros((2, 2, 2), np.int32), "cond_valid": np.zeros((2, 2), bool),
        "seg_positions": np.zeros((2, 1), np.int32), "seg_valid": np.zeros((2, 1), bool),
    }
    assert list(inference.prompt_lengths(batch)) == [3, 0]
    # answer: "</p> <p> x </p> <p> y <SEG>" -> one well-formed span (a stray </p> and an unclosed <p>)
    tokens = np.array([[6, 5, 11, 6, 5, 12, 7, 99], [0] * 8], np.int32)
    out = inference.with_answers(batch, tokens, np.array([7, 1]), ids)
    np.testing.assert_array_equal(out["input_ids"][0], [1, 2, 3, 6, 5, 11, 6, 5])   # cut at the bucket's end
    np.testing.assert_array_equal(out["attention_mask"][0], [True] * 8)
    assert out["cond_valid"][0].tolist() == [True, False] and out["cond_spans"][0, 0].tolist() == [4, 6]
    assert not out["seg_valid"][0].any()                  # the <SEG> did not fit
    assert (out["labels"][0, :3] == -100).all() and (out["labels"][0, 3:] == out["input_ids"][0, 3:]).all()
    assert batch["cond_valid"].sum() == 0                 # the input batch is left alone


def test_gcg_caption_follows_x2sam():
    from x2sam_jax.eval.tasks import gcg_caption

    answer = "<p>A red circle</p> on <p>the grass</p>. And the segmentation mask is <SEG>.<|im_end|>"
    assert gcg_caption(answer) == "A red circle on the grass."
    assert gcg_caption("a red circle on the grass.") == ""            # no <SEG>: no caption
