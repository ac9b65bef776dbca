"""The Hungarian matcher on device (optax, in the program) vs on the host (scipy through a
callback), at the recipe's sizes, printed as JSON.

Per case: 10 decoder predictions matched one after another (``lax.map``, as
``losses.segmentation_losses`` does) over F frames of 200 queries and N target slots (a quarter
of them padding), for 4 images (F = 4) and one 8-frame clip (F = 8), N in 16, 64, 128. Each side
is one jitted program from the cost matrices to the [10, F, N] assignment; both sides of a case run
in the same rounds (interleaved, so load from other processes hits both alike), median of
``--repeats`` rounds after a warm-up, with the load average of every round. Also checks that both
sides return the same assignment.

    python benchmarks/bench_matcher.py --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
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
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8], help="4 images; an 8-frame clip")
    args = parser.parse_args()

    import jax
    import numpy as np

    from common import interleaved_medians, loadavg, speed
    from x2sam_jax.train.matcher import hungarian_match

    def program(method):
        def run(costs, valid):
            return jax.lax.map(lambda c: hungarian_match(c, valid, method), costs)
        return jax.jit(run)

    programs = {m: program(m) for m in ("device", "host")}
    result = {"device": str(jax.devices()[0]), "loadavg_before": loadavg(), "queries": args.queries,
              "predictions": args.predictions, "cases": []}
    rng = np.random.default_rng(0)
    for frames in args.frames:
        for targets in args.targets:
            costs = jax.device_put(rng.normal(size=(args.predictions, frames, args.queries, targets))
                                   .astype(np.float32))
            valid = np.ones((frames, targets), bool)
            valid[:, targets - targets // 4:] = False                     # a quarter padded slots
            valid = jax.device_put(valid)
            sides = {m: functools.partial(lambda p: jax.block_until_ready(p(costs, valid)), p)
                     for m, p in programs.items()}
            same = bool(np.array_equal(np.asarray(sides["device"]()), np.asarray(sides["host"]())))
            timing = interleaved_medians(sides, args.repeats)
            result["cases"].append({
                "frames": frames, "targets": targets, "same_assignment": same,
                "device_median_s": round(timing["device"]["median_s"], 5),
                "host_median_s": round(timing["host"]["median_s"], 5),
                "device_over_host": speed(timing["device"]["median_s"] / timing["host"]["median_s"], timing, 2),
                "times_s": {m: timing[m]["times_s"] for m in programs},
                "loadavg_1min_during": timing["loadavg_1min_during"]})
            print(json.dumps(result["cases"][-1]), file=sys.stderr, flush=True)
    result["loadavg_after"] = loadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
