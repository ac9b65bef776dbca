"""Compiled memory of the stage-3 train step with the LM loss on full [B, L, V] logits
(``LossConfig.lm_chunk=0``, the reference path) and on chunks of labelled positions (the default,
``losses.chunked_lm_loss``), printed as JSON.

The reduced tiny X2SAM (tests/_train_helpers.py) with the real Qwen3 vocabulary (151,672) and a
long sequence (``--length``), one CPU device, compiled only (nothing runs): per side the compiled
step's ``memory_analysis()`` (temporary, argument, output bytes) and compile time. The numbers are
a CPU compile's (XLA's CPU buffer assignment), not an accelerator's.

    python benchmarks/bench_lm_loss.py --length 2048 --chunks 0 64
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151672)
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="labelled tokens kept per sample (a segmentation answer: ~10)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64])
    args = parser.parse_args()

    import jax
    import numpy as np

    import test_x2sam
    from _train_helpers import LOSS, build, reduced_config, stage3_batch, to_device
    from common import loadavg
    from x2sam_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    base = reduced_config()
    config = dataclasses.replace(base, vlm=dataclasses.replace(
        base.vlm, text=dataclasses.replace(base.vlm.text, vocab_size=args.vocab)))
    test_x2sam.make_batch = functools.partial(test_x2sam.make_batch, seq_len=args.length)
    batch = stage3_batch(config, np.random.default_rng(0))
    labels = batch["labels"]
    for index in np.ndindex(labels.shape[:2]):                  # keep the last answer tokens only
        row = labels[index]
        labelled = np.flatnonzero(row != -100)
        row[labelled[:-args.answer_tokens]] = -100
    batch = to_device(batch, mesh)
    result = {"device": str(jax.devices()[0]), "length": args.length, "vocab": args.vocab,
              "batch": int(labels.shape[1]), "labelled_per_sample": int((labels[..., 1:] != -100).sum(-1).max()),
              "loadavg_before": loadavg(), "sides": {}}
    for chunk in args.chunks:
        run = build(3, mesh, config=config, loss=dataclasses.replace(LOSS, lm_chunk=chunk))
        start = time.perf_counter()
        compiled = run["step"].compile(run["state"], run["frozen"], run["rest"], batch)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        result["sides"]["full_logits" if chunk == 0 else f"chunk_{chunk}"] = {
            "compile_s_loaded": round(seconds, 1),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "full_logits_f32_bytes": int(labels.shape[1] * args.length * args.vocab * 4),
        }
    result["loadavg_after"] = loadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
