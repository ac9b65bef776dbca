"""Peak memory of streaming a whole video (``Predictor.predict_video``) against the video's length,
tiny X2SAM, JSON out.

    python benchmarks/bench_stream_memory.py [--frames 150 600] [--size 128x96] [--memory carry]

Saves an untrained tiny X2SAM once; then, per length, a fresh process restores it, streams a
9-frame warm-up video (every program compiles there), resets the kernel's peak-RSS record
(``/proc/self/clear_refs``) and streams a generated mp4 of that many frames (a square moving
across a W x H frame). Per length: the peak RSS during that stream (``VmHWM``) and its rise over
the RSS the stream started from, the process's
lifetime peak (``ru_maxrss``, compiles included), the peak of host Python / numpy allocations
during the stream (``tracemalloc``), the seconds, and what the outputs hold (overlay frames,
mask lines). On a CPU backend the device buffers are host memory, so the RSS covers them.
``ratios``: the longest video's peaks over the shortest's; constant memory means about 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import is_loaded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def moving_square(path: str, frames: int, width: int, height: int, fps: float = 25.0) -> str:
    """An H.264 mp4 of a red square sliding across a grey frame, encoded frame by frame."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        side = max(4, height // 4)
        for t in range(frames):
            frame = np.full((height, width, 3), 60, np.uint8)
            x = (3 * t) % (width - side)
            frame[height // 3:height // 3 + side, x:x + side] = (220, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(model_dir: str, frames: int, width: int, height: int, memory: str) -> dict:
    import tracemalloc

    import av

    import x2sam_jax

    work = Path(tempfile.mkdtemp(prefix="x2sam-stream-"))
    predictor = x2sam_jax.Predictor(model_dir)
    warm = moving_square(str(work / "warm.mp4"), 9, width, height)
    predictor.predict_video(warm, prompt="the red square", out=str(work / "warm"), memory=memory)
    video = moving_square(str(work / "video.mp4"), frames, width, height)
    reset = _reset_peak()
    before = _status_mb("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    done = predictor.predict_video(video, prompt="the red square", out=str(work / "out"), memory=memory)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    peak = _status_mb("VmHWM") if reset else None
    with av.open(done.video) as container:
        overlay_frames = sum(1 for _ in container.decode(container.streams.video[0]))
    lines = [json.loads(line) for line in Path(done.masks).read_text().splitlines()]
    return {"frames": frames, "stream_peak_rss_mb": round(peak, 1) if peak else None,
            "rss_before_stream_mb": round(before, 1) if before else None,
            "stream_growth_mb": round(peak - before, 1) if peak and before else None,
            "lifetime_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tracemalloc_peak_mb": round(traced_peak, 2), "seconds": round(seconds, 2),
            "seconds_per_frame": round(seconds / frames, 4), "overlay_frames": overlay_frames,
            "mask_lines": len(lines), "frames_in_order": [r["frame"] for r in lines] == list(range(frames))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[150, 600])
    parser.add_argument("--size", default="128x96", help="WxH of the generated video")
    parser.add_argument("--memory", choices=("carry", "reset"), default="carry")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), width, height, args.memory)))
        return {}

    from flax import nnx

    import x2sam_jax
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.runs import preset_model_config

    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="x2sam-bench-stream-") as work:
        tokenizer = build_tiny_tokenizer()
        x2sam_jax.save(Path(work) / "model", X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0)))
        tokenizer.save_pretrained(str(Path(work) / "model" / "tokenizer"))
        # No persistent compilation cache: a process that compiles peaks higher than one that
        # reads its programs, and every length must start from the same state.
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        runs = []
        for frames in args.frames:
            done = subprocess.run([sys.executable, __file__, "--child", str(Path(work) / "model"), str(frames),
                                   "--size", args.size, "--memory", args.memory],
                                  env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    shortest, longest = min(runs, key=lambda r: r["frames"]), max(runs, key=lambda r: r["frames"])
    ratios = {key: round(longest[key] / shortest[key], 3) for key in ("stream_peak_rss_mb", "lifetime_peak_rss_mb",
                                                                      "tracemalloc_peak_mb")
              if longest[key] and shortest[key]}
    result = {"benchmark": "stream_memory", "size": args.size, "memory": args.memory, "runs": runs,
              "ratios": ratios, "loadavg_1min": loads, "loaded": is_loaded(loads), "machine": platform.node(),
              "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
