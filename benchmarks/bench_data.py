"""Training data pipeline throughput on the synthetic dataset (images and video clips), JSON out.

    python benchmarks/bench_data.py [--sam-size 1024] [--threads 2] [--batches 8] [--workers 0]

Generates the synthetic dataset in a temporary directory, builds the training pipeline over the
real sources with the real feature code (built-in tiny tokenizer), and times:
  image: COCO panoptic, 4 images per micro-batch (one device's worth);
  video: Ref-YouTube-VOS, 1 clip of 8 frames per micro-batch.
Reported per kind: samples/s and frames/s after a warm-up batch, seconds per batch (wall, and CPU
summed over threads: steadier on a shared machine), the batch shapes seen (bucketing keeps these
few), and the skip report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2sam_jax.data import synthetic  # noqa: E402
from x2sam_jax.data.batching import batch_shape_key  # noqa: E402
from x2sam_jax.data.pipeline import build_train_pipeline  # noqa: E402
from x2sam_jax.data.tokenizer import build_tiny_tokenizer  # noqa: E402


def _time(source, *, tokenizer, global_batch_images, sam_size, threads, workers, batches):
    it = build_train_pipeline([source], tokenizer=tokenizer, global_batch_images=global_batch_images,
                              sam_size=sam_size, seed=0, process_index=0, process_count=1, num_threads=threads,
                              num_workers=workers, num_epochs=None, prefetch=2)
    first = next(it)  # warm-up: thread start, first decode
    start, cpu_start = time.perf_counter(), time.process_time()
    samples = frames = 0
    shapes = {batch_shape_key(first)}
    for _ in range(batches):
        b = next(it)
        samples += int(b["sample_valid"].sum())
        frames += int(b["num_frames"].sum())
        shapes.add(batch_shape_key(b))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads; steadier than wall on a shared machine
    stats = it.stats()
    it.close()
    return {
        "samples_per_s": samples / seconds,
        "frames_per_s": frames / seconds,
        "seconds_per_batch": seconds / batches,
        "cpu_seconds_per_batch": cpu_seconds / batches,
        "batch_size": int(first["input_ids"].shape[0]),
        "distinct_batch_shapes": len(shapes),
        "example_shapes": {k: "x".join(map(str, v.shape)) for k, v in first.items() if k in (
            "input_ids", "pixel_values", "sam_pixel_values", "gt_masks", "region_masks")},
        "skipped": stats["total"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--image-size", type=int, nargs=2, default=(240, 320))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = os.path.join(tmp, "synthetic")
        synthetic.generate(root, num_images=args.images, num_videos=args.videos, frames=8,
                           size=tuple(args.image_size), seed=0)
        generate_s = time.perf_counter() - t0
        sources = synthetic.sources(root, "train")
        tokenizer = build_tiny_tokenizer()
        common = dict(tokenizer=tokenizer, sam_size=args.sam_size, threads=args.threads, workers=args.workers,
                      batches=args.batches)
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "config": vars(args),
            "generate_seconds": generate_s,
            "image": _time(sources["coco_panoptic"], global_batch_images=4, **common),
            "video": _time(sources["ref_ytvos"], global_batch_images=4, **common),
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
