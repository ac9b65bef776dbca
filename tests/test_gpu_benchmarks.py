"""The GPU benchmarks' CPU side: the random batch of ``bench_train_step --run``, its argument
checks, the HLO kernel count, and (slow) a tiny run of ``bench_memory_attention``."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train_step  # noqa: E402
from benchmarks.common import hlo_kernels  # noqa: E402


def test_hlo_kernels_counts_cudnn_attention_and_plain_dots():
    text = """
  %a = bf16[1,8,4,64]{3,2,1,0} custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %b = (bf16[1,8,4,64]{3,2,1,0}) custom-call(%q, %k), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %c = bf16[64,64]{1,0} custom-call(%x, %y), custom_call_target="__cublas$gemm"
  %d = f32[4,4]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %e = f32[4,4]{1,0} dot(%x, %z), lhs_contracting_dims={1}, rhs_contracting_dims={0}
"""
    kernels = hlo_kernels(text)
    assert (kernels["cudnn_fmha_forward"], kernels["cudnn_fmha_backward"], kernels["dot_instructions"]) == (1, 1, 2)
    assert kernels["custom_calls"]["__cublas$gemm"] == 1


def test_random_batch_is_a_full_consistent_stage3_batch():
    from x2sam_jax.config import x2sam_preset

    config = x2sam_preset("x2sam_4b")
    shape = bench_train_step.recipe_shape(2, 1, clip=False, seq_len=1024, patches=256)
    batch = {k: v[0] for k, v in bench_train_step.random_batch(config, shape, np.random.default_rng(0),
                                                                sam_size=128).items()}
    B, L = 2, 1024
    assert batch["input_ids"].shape == (B, L) and batch["pixel_values"].shape[:2] == (B, 256)
    assert batch["sam_pixel_values"].shape == (B, 1, 128, 128, 3) and batch["gt_masks"].shape[-2:] == (32, 32)
    # 256 patches of a 16 x 16 grid merge 2 x 2 into 64 image tokens.
    assert (batch["grid_thw"][:, 0] == (1, 16, 16)).all()
    assert ((batch["input_ids"] == config.vlm.image_token_id).sum(1) == 64).all()
    for b in range(B):
        ids = batch["input_ids"][b]
        starts, ends = batch["cond_spans"][b].T
        assert (ids[starts] == config.p_start_token_id).all() and (ids[ends] == config.p_end_token_id).all()
        assert (ids[batch["seg_positions"][b]] == config.seg_token_id).all()
        assert (ids == config.region_token_id).sum() == shape["regions"] * config.region_tokens
        labelled = np.flatnonzero(batch["labels"][b] != -100)
        assert labelled.min() > ends.max() and set(batch["seg_positions"][b]) <= set(labelled)
    assert batch["gt_classes"].max() < shape["conditions"] and batch["gt_frame_valid"].all()
    for key in ("sample_valid", "frame_valid", "cond_valid", "seg_valid", "instance_valid", "region_valid",
                "attention_mask", "pixel_valid"):
        assert batch[key].all(), key


def test_random_batch_rejects_a_text_bucket_too_short():
    from x2sam_jax.config import x2sam_preset

    shape = bench_train_step.recipe_shape(1, 1, clip=False, seq_len=512, patches=256)
    with pytest.raises(bench_train_step.RunError, match="seq_len=512 is too short"):
        bench_train_step.random_batch(x2sam_preset("x2sam_4b"), shape, np.random.default_rng(0), sam_size=128)


@pytest.mark.parametrize("argv, message", [
    (["--run"], "with --x2sam-4b"),
    (["--x2sam-4b", "--run", "--sam-size", "100"], "multiple of 32"),
    (["--x2sam-4b", "--run", "--llm-layers", "0"], "--llm-layers must be >= 1"),
])
def test_run_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train_step._parse(argv)
    assert message in capsys.readouterr().err


def test_too_few_llm_layers_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit, match="at least 3"):
        bench_train_step.main(["--x2sam-4b", "--run", "--llm-layers", "1"])
    assert "deepstack" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.slow
def test_memory_attention_benchmark_runs_small(capsys):
    from benchmarks import bench_memory_attention

    bench_memory_attention.main(["--small", "--levels", "4", "--memory-side", "4", "--implementations", "xla",
                                 "cudnn", "--dropouts", "0.1", "--repeats", "1"])
    cases = json.loads(capsys.readouterr().out)["levels"]["4x4"]["cases"]
    assert "takes no dropout" in cases["cudnn/dropout=0.1/mask=bank"]["skipped"]
    xla = cases["xla/dropout=0.1/mask=bank"]
    assert xla["median_s"] > 0 and xla["kernels"]["dot_instructions"] > 0 and xla["kernels"]["cudnn_fmha_forward"] == 0


@pytest.mark.slow
def test_run_mode_measures_the_tiny_step(capsys):
    bench_train_step.main(["--x2sam-4b", "--run", "--model", "tiny", "--sam-size", "128", "--patches", "64",
                           "--seq-len", "256", "--steps", "1", "--warmup", "1"])
    run = json.loads(capsys.readouterr().out)["x2sam_4b_run"]
    assert run["metrics"]["finite"] == 1.0 and np.isfinite(run["metrics"]["loss"])
    assert run["step_median_s"] > 0 and 0 < run["mfu"] < 1 and run["flops_per_step"] > 0
    assert run["hlo_kernels"]["dot_instructions"] > 0 and run["samples_per_s"] > 0
