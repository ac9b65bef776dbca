"""The Hungarian matcher on device (optax, in the program) vs on the host (scipy through a
callback), at the recipe's sizes, on one device and on a mesh of ``--devices`` simulated CPU
devices, printed as JSON.

Per case: 10 decoder predictions matched one after another (``lax.map``, as
``losses.segmentation_losses`` does) over the frames of 200 queries and N target slots (a quarter
of them padding): 4 images per device (F = 4 per device) and one 8-frame clip per device (F = 8),
N in 16, 64, 128. Each side is one jitted program from the cost matrices to the [10, F, N]
assignment, timed per step (all 10 predictions):
  * one device: "device" (optax) and "host" (one callback with the F problems);
  * the mesh (fsdp = all devices, the frames split over it as the train step splits them):
    "device"; "host_gathered", the host matcher without an active mesh (XLA gathers every
    frame's costs onto device 0 for one callback, as before it ran per shard); and
    "host_per_shard", under ``jax.set_mesh`` (one callback per device with its own frames).
Simulated CPU devices share one thread pool with the host transfers: ``jax.pure_callback`` puts
its operands on CPU device 0, asynchronously on that pool above 100 KiB, so with every pool
thread running a device's program blocked in its callback the program hangs (XLA aborts it after
40 s). The script raises the pool size (``PJRT_NPROC``) above the device count; an accelerator's
programs do not run on that pool.
All sides of a case run in the same rounds (interleaved, so load from other processes hits them
alike), median of ``--repeats`` rounds after a warm-up, with the load average of every round; a
case measured on a loaded machine prints "loaded: not a result" instead of its ratios. Every side
must return the same assignment as "host" on one device (``same_assignment``).

    python benchmarks/bench_matcher.py --repeats 5 --devices 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--predictions", type=int, default=10)
    parser.add_argument("--targets", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8],
                        help="frames per device: 4 images; an 8-frame clip")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices of the mesh (1: no mesh)")
    args = parser.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("PJRT_NPROC", str(args.devices + (os.cpu_count() or 1)))   # see the docstring

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from common import interleaved_medians, loadavg, speed
    from x2sam_jax.sharding import make_mesh
    from x2sam_jax.train.matcher import hungarian_match

    def program(method, mesh=None):
        """The jitted step on the inputs' shardings; under ``mesh`` if given."""
        jitted = jax.jit(lambda costs, valid: jax.lax.map(lambda c: hungarian_match(c, valid, method), costs))
        if mesh is None:
            return jitted

        def under_mesh(costs, valid):     # the active mesh makes the host matcher run per shard
            with jax.set_mesh(mesh):
                return jitted(costs, valid)
        return under_mesh

    one = make_mesh(devices=jax.devices()[:1])
    setups = {"1_device": (one, {"device": ("device", None), "host": ("host", None)})}
    if args.devices > 1:
        setups[f"{args.devices}_devices"] = (make_mesh(data=1, fsdp=args.devices), {
            "device": ("device", None), "host_gathered": ("host", None), "host_per_shard": ("host", "mesh")})
    result = {"platform": str(jax.devices()[0].platform), "devices": args.devices, "cpu_count": os.cpu_count(),
              "pjrt_nproc": os.environ.get("PJRT_NPROC"),
              "loadavg_before": loadavg(), "queries": args.queries, "predictions": args.predictions, "cases": []}
    rng = np.random.default_rng(0)
    for setup, (mesh, sides_spec) in setups.items():
        frame_sharding = NamedSharding(mesh, P(None, tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or None))
        valid_sharding = NamedSharding(mesh, P(frame_sharding.spec[1]))
        programs = {name: program(method, mesh if where else None) for name, (method, where) in sides_spec.items()}
        for per_device in args.frames:
            frames = per_device * mesh.size
            for targets in args.targets:
                costs = rng.normal(size=(args.predictions, frames, args.queries, targets)).astype(np.float32)
                valid = np.ones((frames, targets), bool)
                valid[:, targets - targets // 4:] = False                     # a quarter padded slots
                costs_d, valid_d = jax.device_put(costs, frame_sharding), jax.device_put(valid, valid_sharding)
                sides = {name: (lambda p=p: jax.block_until_ready(p(costs_d, valid_d))) for name, p in programs.items()}
                reference = np.asarray(jax.jit(jax.vmap(lambda c: hungarian_match(c, valid, "host")))(costs))
                same = {name: bool(np.array_equal(np.asarray(fn()), reference)) for name, fn in sides.items()}
                timing = interleaved_medians(sides, args.repeats)
                fastest_host = min(timing[n]["median_s"] for n in sides if n.startswith("host"))
                case = {"setup": setup, "frames_per_device": per_device, "frames": frames, "targets": targets,
                        "same_assignment": same,
                        "ms_per_step": {n: round(1e3 * timing[n]["median_s"], 1) for n in sides},
                        "device_over_host": speed(timing["device"]["median_s"] / fastest_host, timing, 2),
                        "times_s": {n: timing[n]["times_s"] for n in sides},
                        "loadavg_1min_during": timing["loadavg_1min_during"], "loaded": timing["loaded"]}
                if "host_gathered" in sides:
                    case["gathered_over_per_shard"] = speed(
                        timing["host_gathered"]["median_s"] / timing["host_per_shard"]["median_s"], timing, 2)
                result["cases"].append(case)
                print(json.dumps(case), file=sys.stderr, flush=True)
    result["loadavg_after"] = loadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
