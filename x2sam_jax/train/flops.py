"""Model FLOPs of a jitted program and the per-device peak, for the training log's MFU.

FLOPs. XLA's cost analysis (``Lowered.cost_analysis()`` and ``Compiled.cost_analysis()``, jax
0.10.2) counts the body of a while loop once, not times its trip count. Every ``lax.scan`` is one
(the layer stacks, the micro-batch accumulation of the train step, the frame loop, ``lax.map``),
so a scanned program is under-counted: a scan of 6 [128,128]x[128,128] matmuls counts 4.2 MFLOP
instead of 25.2 (the same 6 matmuls unrolled: 25.2), its gradient 12.6 instead of 72.2
(tests/test_flops.py measures it). :func:`program_flops` corrects XLA's own count rather than
replacing it by an analytic formula: it walks the program's jaxpr, and for every scan adds
``(length - iterations XLA counted) x multiplicity x (XLA's count of the scan body lowered on
its own)``, the multiplicity being the product of the lengths of the scans around it. Nested
scans come out right (a body inside a scan of A inside a scan of L counts A*L times), and a scan
with ``unroll=k`` (k iterations per loop body, the remainder unrolled) is corrected by what its
loop leaves out. The count is the program's, so the recomputation that ``jax.checkpoint`` asks
for is part of it (with a remat policy that saves nothing, about one forward pass more than the
6 x parameters x tokens convention counts).

The whole program's count is taken before SPMD partitioning (``Lowered``, global shapes), so it
is the FLOPs of the global step on any mesh (``Compiled.cost_analysis()`` counts one device's
share, and on GPU its matmuls are library calls the generic analysis does not see). On one CPU
device the two agree for loop-free programs.

``lax.while_loop`` trip counts are unknown when tracing: such loops stay counted once (logged).
The cost is one more lowering (no compile) of every scan body, once per program.

Peak. ``peak_flops_per_device``: a configured value, else a table of dense bf16 peaks by
``device_kind``, else (CPU, unknown accelerators) the best of a few timed float32 matmuls.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

logger = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) bfloat16 peak FLOP/s per chip, by a lower-case substring of
# jax.devices()[0].device_kind; the first match wins (the more specific names come first).
# Sources: NVIDIA's H100 datasheet (SXM 989.4 TFLOPS bf16, PCIe 756; the datasheet's 1979/1513
# are with sparsity), H200 datasheet (SXM 989, as H100 SXM), A100 datasheet (312, every form
# factor); Google Cloud TPU system-architecture pages (v4 275, v5e 197, v5p 459, v6e/Trillium 918
# TFLOPS bf16 per chip). jax names v5e "TPU v5 lite", v5p "TPU v5" or "TPU v5p", v6e "TPU v6 lite".
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),   # v5p ("TPU v5" / "TPU v5p"), after the lite names
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


def _flops(cost) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _sub_jaxprs(value):
    """The jaxprs in one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def body_flops(closed) -> float:
    """XLA's count of one iteration of a scan body (a ClosedJaxpr), lowered on its own (its own
    scans counted once, as in the whole program)."""
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    return _flops(jax.jit(jex_core.jaxpr_as_fun(closed)).lower(*args).cost_analysis())


def _counted_iterations(length: int, unroll) -> int:
    """How many iterations of a scan XLA's count already holds: the loop body (``unroll`` of
    them) once plus the remainder unrolled after the loop; all of them when fully unrolled."""
    unroll = length if unroll is True else max(int(unroll or 1), 1)
    if unroll >= length:
        return length
    return unroll + length % unroll


def scan_correction(jaxpr, multiplicity: int = 1, _warned: list | None = None) -> float:
    """The FLOPs XLA's count of ``jaxpr`` leaves out: every scan's uncounted iterations."""
    warned = [] if _warned is None else _warned
    extra = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            length = int(eqn.params["length"])
            missing = length - _counted_iterations(length, eqn.params.get("unroll", 1))
            body = eqn.params["jaxpr"]
            if missing > 0:
                extra += missing * multiplicity * body_flops(body)
            extra += scan_correction(body.jaxpr, multiplicity * length, warned)
            continue
        if name == "while" and not warned:
            warned.append(True)
            logger.info("a lax.while_loop (unknown trip count) is counted once in the step's FLOPs")
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                extra += scan_correction(sub, multiplicity, warned)
    return extra


def program_flops(traced, lowered=None) -> float:
    """FLOPs of one call of a traced jitted function (``jax.jit(f).trace(*args)``), global (before
    partitioning), every scan iteration counted: XLA's count plus :func:`scan_correction`."""
    lowered = traced.lower() if lowered is None else lowered
    return _flops(lowered.cost_analysis()) + scan_correction(traced.jaxpr.jaxpr)


def table_peak(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


def measure_matmul_peak(size: int = 1024, repeats: int = 5, device=None) -> float:
    """The best FLOP/s of ``repeats`` timed float32 [size,size]x[size,size] matmuls on ``device``
    (default the first), after one warm-up call."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from): ``configured`` when > 0, else the table's
    dense bf16 peak for the device kind, else a measured float32 matmul peak."""
    if configured and float(configured) > 0:
        return float(configured), "config"
    kind = jax.devices()[0].device_kind
    peak = table_peak(kind)
    if peak is not None:
        return peak, f"table ({kind}, dense bf16)"
    return measure_matmul_peak(), f"measured float32 matmul ({kind})"
