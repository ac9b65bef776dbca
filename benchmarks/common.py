"""Shared by the benchmarks: the machine's measured fp32 matmul peak, interleaved timing of the
compared sides (so that load from other processes hits both alike), and the physical bound of a
forward (its FLOPs over that peak)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def interleaved_medians(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Runs every side once per round, ``repeats`` rounds after ``warmup``; per side the median,
    min and all times in seconds, plus the load average seen over the rounds."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    loads = []
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": [round(x, 4) for x in t]}
           for name, t in times.items()}
    out["loadavg_1min_during"] = [round(x, 2) for x in loads]
    out["loaded"] = is_loaded(loads)
    return out


def is_loaded(loads: list[float]) -> bool:
    """Whether other work shared the machine during the rounds: the benchmark itself can at most
    keep every core busy, so a 1-minute load average above the core count (+0.5 for the
    monitoring itself) means runnable work beyond it. Measured quiet on 2 cores: 1.4-1.9."""
    return max(loads, default=0.0) > (os.cpu_count() or 1) + 0.5


def speed(value: float, timing: dict, digits: int = 3):
    """A ratio or share of the bound from ``timing`` (``interleaved_medians``), or the string
    "loaded: not a result" when the machine was loaded while it was measured."""
    return "loaded: not a result" if timing.get("loaded") else round(value, digits)


def matmul_peak(n: int = 4096, repeats: int = 5) -> dict:
    """fp32 GFLOP/s of an n x n x n matmul in numpy, XLA and torch (interleaved, median of
    ``repeats``); ``peak_gflops`` is the best of the three, the bound the benchmarks divide by."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    xla = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
    res = interleaved_medians({"numpy": lambda: a @ b, "xla": lambda: xla(ja, jb).block_until_ready(),
                               "torch": lambda: ta @ tb}, repeats)
    flops = 2.0 * n ** 3
    gflops = {name: round(flops / res[name]["median_s"] / 1e9, 1) for name in ("numpy", "xla", "torch")}
    return {"n": n, "gflops": gflops, "peak_gflops": max(gflops.values()), "loadavg": loadavg(),
            "loaded": res["loaded"]}


def bound(flops: float, peak_gflops: float) -> float:
    """Seconds a forward of ``flops`` takes at the matmul peak (no forward can be faster)."""
    return flops / (peak_gflops * 1e9)


def torch_flops(module, *args) -> float:
    """FLOPs of ``module(*args)`` by torch's flop counter (matmuls, convs, attention). The counter
    sees no FLOPs in the fused CPU SDPA kernel, so attention runs in its math form while counting
    (a causal mask still counts the whole square, as the one-shot XLA form does)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def xla_flops(compiled) -> float:
    """FLOPs of a compiled JAX function by XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def profile_summary(trace_dir: str, top: int = 20) -> dict:
    """Where the time of a ``jax.profiler`` trace in ``trace_dir`` goes: XLA ops (events that carry
    an ``hlo_op``) summed by kind (the op name without its numeric suffix: dot, fusion, copy,
    while, ...) and the ``top`` single ops, each with total milliseconds and count."""
    import collections
    import glob
    import gzip
    import json
    import re

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        if event.get("ph") != "X" or op is None:
            continue
        for table, key in ((by_op, op), (by_kind, re.sub(r"[._]?\d+$", "", op))):
            table[key][0] += event["dur"] / 1e3
            table[key][1] += 1

    def ranked(table, n):
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:n]
        return [{"op": name, "total_ms": round(ms, 2), "count": count} for name, (ms, count) in rows]

    return {"by_kind": ranked(by_kind, top), "top_ops": ranked(by_op, top),
            "total_ms": round(sum(ms for ms, _ in by_op.values()), 2)}


def profile_runs(run: Callable[[], object], trace_dir: str, count: int = 3) -> dict:
    """Traces ``count`` calls of ``run`` into ``trace_dir`` and returns :func:`profile_summary`."""
    import jax

    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(count):
            run()
    return profile_summary(trace_dir)


def hlo_kernels(hlo_text: str) -> dict:
    """Which kernels a compiled program holds (``compiled.as_text()``, the optimised HLO): the
    count of each custom-call target (cuDNN flash attention is ``__cudnn$fmha...``, its backward
    ``...Backward``; cuBLAS matmuls ``__cublas$gemm``; Pallas kernels ``tpu_custom_call`` or
    ``__gpu$xla.gpu.triton``) and of plain ``dot`` instructions (matmuls XLA emits itself, the XLA
    attention forms among them)."""
    import collections
    import re

    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
    fmha = {name: n for name, n in targets.items() if "fmha" in name}
    return {"cudnn_fmha_forward": sum(n for name, n in fmha.items() if "Backward" not in name),
            "cudnn_fmha_backward": sum(n for name, n in fmha.items() if "Backward" in name),
            "dot_instructions": len(re.findall(r"\bdot\(", hlo_text)),
            "custom_calls": dict(sorted(targets.items()))}
