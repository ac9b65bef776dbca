"""Evaluation throughput of the tiny X2SAM on the synthetic datasets, batch 1 against batch 8, JSON out.

    python benchmarks/bench_eval.py [--repeats 5] [--images 64] [--videos 16] [--fast-compile/--no-fast-compile]

Generates the synthetic dataset in a temporary directory, builds the tiny model on every local
device, and runs `x2sam_jax.eval.evaluate` (pipeline -> jitted forward -> post-processing ->
metrics) on an image dataset (COCO panoptic: PQ, mIoU, AP) and a video dataset (Ref-YouTube-VOS:
J&F) at batch size 1 and 8. A first run per batch size compiles (its time is reported apart);
then the two batch sizes alternate for `--repeats` timed runs each (interleaved, so load changes
on a shared machine hit both alike) and the median is reported: evaluated samples/s end to end,
and the share of the time spent in the jitted forward. Also: the number of compiled programs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from x2sam_jax.data import synthetic  # noqa: E402
from x2sam_jax.data.tokenizer import build_tiny_tokenizer  # noqa: E402
from x2sam_jax.runs import preset_model_config  # noqa: E402
from x2sam_jax.eval import evaluator, inference  # noqa: E402
from x2sam_jax.models.x2sam import X2SAM  # noqa: E402
from x2sam_jax.sharding import compiler_options, create_sharded, make_mesh  # noqa: E402

DATASETS = {
    "coco_panoptic": {"source": {"type": "coco_panoptic", "root": "coco", "split": "val2017"}},
    "ref_ytvos": {"source": {"type": "ref_ytvos", "root": "ytrvos21", "split": "valid", "group": "expression"}},
}


class _TimedForward:
    """Wraps the cached forward to add up the seconds spent in it (device work included)."""

    def __init__(self, forward):
        self.forward, self.seconds = forward, 0.0
        self.programs = forward.programs

    def __call__(self, *args):
        import jax

        start = time.perf_counter()
        out = jax.block_until_ready(self.forward(*args))
        self.seconds += time.perf_counter() - start
        return out


def _run(model, tokenizer, mesh, config, batch_size, name, forward):
    forward.seconds = 0.0
    start = time.perf_counter()
    results = evaluator.evaluate(model, tokenizer, {**config, "batch_size": batch_size,
                                                    "datasets": {name: DATASETS[name]}}, mesh=mesh)
    return time.perf_counter() - start, forward.seconds, results[name]["samples"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="synthetic images (a quarter are evaluated)")
    parser.add_argument("--videos", type=int, default=16, help="synthetic videos (a quarter are evaluated)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(120, 160))
    parser.add_argument("--fast-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="XLA backend optimisation off (default: on CPU)")
    args = parser.parse_args(argv)

    tokenizer = build_tiny_tokenizer()
    mesh = make_mesh(data=1, fsdp=-1)
    options = compiler_options(args.fast_compile)
    model = create_sharded(lambda: X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0)), mesh,
                           compiler_options=options)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "synthetic")
        synthetic.generate(root, num_images=args.images, num_videos=args.videos, frames=8,
                           size=tuple(args.image_size), seed=0)
        config = {"data_root": root, "seed": 0, "fast_compile": args.fast_compile, "feature": {"clip_len": 8},
                  "buckets": {"seq_lengths": [512, 1024], "patch_counts": [512], "grids": [1], "frames": [1, 8],
                              "instances": [16], "conditions": [32], "regions": [8], "seg_tokens": [8]}}
        key = json.dumps(options, sort_keys=True)
        evaluator._FORWARDS[key] = forward = _TimedForward(inference.make_forward(options))
        out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "devices": [str(d) for d in mesh.devices.reshape(-1)]},
               "config": vars(args), "timing": "median of interleaved repeats (batch 1 and 8 alternate)"}
        for name in DATASETS:
            first = {b: _run(model, tokenizer, mesh, config, b, name, forward) for b in (1, 8)}  # compiles
            runs = {1: [], 8: []}
            for _ in range(args.repeats):
                for b in (1, 8):
                    runs[b].append(_run(model, tokenizer, mesh, config, b, name, forward))
            out[name] = {}
            for b in (1, 8):
                seconds = statistics.median(r[0] for r in runs[b])
                forward_seconds = statistics.median(r[1] for r in runs[b])
                samples = runs[b][0][2]
                out[name][f"batch_{b}"] = {
                    "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
                    "forward_share": forward_seconds / seconds, "first_run_seconds": first[b][0]}
            out[name]["speedup_batch_8"] = (out[name]["batch_8"]["samples_per_s"]
                                            / out[name]["batch_1"]["samples_per_s"])
        out["compiled_programs"] = forward.programs()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
