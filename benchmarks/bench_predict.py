"""The Predictor's first call (restore + compile) against its later calls, tiny X2SAM, JSON out.

    python benchmarks/bench_predict.py [--repeats 5] [--batch 4] [--cli]

Saves an untrained tiny X2SAM with its tokenizer to a temporary model directory and generates a
synthetic image and an 8-frame synthetic clip. Then, in this process: the restore
(``Predictor(dir)``), the first call on the image and on the clip (each traces and compiles its
bucket's generation and forward programs), and ``--repeats`` later calls of each (interleaved,
median; they must compile nothing, checked and reported as ``programs``). ``--batch N``: one
``predict_batch`` of N images against N single calls, per input. ``--cli``: the CLI twice in fresh
processes with one new compilation cache, the second run reading the first's programs.

Timings on a machine loaded by other work are flagged (``loaded``: the 1-minute load average
above the core count during the rounds) and are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import interleaved_medians, is_loaded, loadavg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _inputs(work: Path) -> tuple[str, str]:
    """(an image file, a folder of 8 frames) from the synthetic dataset."""
    from x2sam_jax.data import synthetic

    synthetic.generate(str(work / "data"), num_images=4, num_videos=4, frames=8, size=(120, 160), seed=0)
    image = sorted((work / "data" / "coco" / "val2017").iterdir())[0]
    clip = sorted((work / "data" / "ytvis19" / "valid" / "JPEGImages").iterdir())[0]
    return str(image), str(clip)


def _save_model(work: Path) -> Path:
    from flax import nnx

    import x2sam_jax
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.runs import preset_model_config

    tokenizer = build_tiny_tokenizer()
    model = X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0))
    x2sam_jax.save(work / "model", model)
    tokenizer.save_pretrained(str(work / "model" / "tokenizer"))
    return work / "model"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _cli(model_dir: Path, image: str, cache: Path, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "x2sam_jax.predict", "--checkpoint", str(model_dir), "--image", image,
                    "--prompt", "the red circle", "--out", str(out), "--cache-dir", str(cache)],
                   env=env, check=True, capture_output=True, timeout=1800)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="inputs of the batched call (0: skip)")
    parser.add_argument("--cli", action="store_true", help="also time two CLI runs sharing a fresh cache")
    args = parser.parse_args(argv)

    import jax

    import x2sam_jax

    result = {"benchmark": "predict", "device": jax.devices()[0].device_kind, "machine": platform.machine(),
              "cpus": os.cpu_count(), "loadavg_start": loadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        model_dir = _save_model(work)
        image, clip = _inputs(work)
        loads = [os.getloadavg()[0]]
        restore_s, predictor = _timed(lambda: x2sam_jax.Predictor(model_dir))
        first_image_s, _ = _timed(lambda: predictor.predict(image, prompt="the red circle"))
        first_clip_s, _ = _timed(lambda: predictor.predict(clip, prompt="the red circle"))
        loads.append(os.getloadavg()[0])
        programs = predictor.programs()
        later = interleaved_medians({"image": lambda: predictor.predict(image, prompt="the red circle"),
                                     "clip_8_frames": lambda: predictor.predict(clip, prompt="the red circle")},
                                    repeats=args.repeats, warmup=0)
        if predictor.programs() != programs:
            raise RuntimeError(f"later calls compiled: {programs} -> {predictor.programs()}")
        result.update(restore_s=round(restore_s, 3), first_call_s={"image": round(first_image_s, 3),
                                                                   "clip_8_frames": round(first_clip_s, 3)},
                      later_calls=later, programs=programs)
        if args.batch:
            images = [image] * args.batch
            predictor.predict_batch(images, prompt="the red circle")   # compiles its batch bucket
            batch = interleaved_medians({
                "batched": lambda: predictor.predict_batch(images, prompt="the red circle"),
                "one_by_one": lambda: [predictor.predict(i, prompt="the red circle") for i in images]},
                repeats=args.repeats, warmup=0)
            batch["per_input_s"] = {k: batch[k]["median_s"] / args.batch for k in ("batched", "one_by_one")}
            result["batch"] = {"inputs": args.batch, **batch}
        if args.cli:
            cache = work / "cache"
            first = _cli(model_dir, image, cache, work / "cli_first")
            second = _cli(model_dir, image, cache, work / "cli_second")
            loads.append(os.getloadavg()[0])
            result["cli_s"] = {"first_run": round(first, 3), "second_run_cached": round(second, 3),
                               "cache_files": sum(1 for _ in cache.rglob("*") if _.is_file())}
        loads += later["loadavg_1min_during"]
    result["loaded"] = is_loaded(loads) or bool(later.get("loaded"))
    if result["loaded"]:
        result["note"] = "the machine was loaded by other work: these timings are not results"
    result["median_later_over_first"] = {
        k: round(later[k]["median_s"] / result["first_call_s"][k], 4) for k in ("image", "clip_8_frames")}
    result["loadavg_end"] = loadavg()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
