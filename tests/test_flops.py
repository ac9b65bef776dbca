"""The train step's FLOPs counter (every scan iteration counted) and the peak FLOP/s for MFU."""

import jax
import jax.numpy as jnp
import pytest

from x2sam_jax.train import flops

LAYERS, M, K = 6, 64, 128
MATMULS = 2 * M * K * K * LAYERS        # the forward's matmul FLOPs


def _stack(w, x, remat=False, unroll=1):
    def body(h, wi):
        return jnp.tanh(h @ wi), None

    body = jax.checkpoint(body) if remat else body
    return jax.lax.scan(body, x, w, unroll=unroll)[0].sum()


def _unrolled(w, x):
    h = x
    for i in range(LAYERS):
        h = jnp.tanh(h @ w[i])
    return h.sum()


def _args():
    return jnp.ones((LAYERS, K, K)), jnp.ones((M, K))


def _xla(fn, *args) -> float:
    return flops._flops(jax.jit(fn).lower(*args).cost_analysis())


def test_xla_counts_a_scan_body_once_and_program_flops_counts_every_layer():
    w, x = _args()
    raw = _xla(_stack, w, x)
    counted = flops.program_flops(jax.jit(_stack).trace(w, x))
    # jax 0.10.2: XLA's cost analysis sees one of the six layers.
    assert raw == pytest.approx(MATMULS / LAYERS, rel=0.02)
    assert counted == pytest.approx(MATMULS, rel=0.02)
    assert counted == pytest.approx(_xla(_unrolled, w, x), rel=1e-3)
    # scan(unroll=4) of 6: a loop body of 4 once plus 2 unrolled: nothing missing, nothing added.
    unrolled4 = lambda w, x: _stack(w, x, unroll=4)  # noqa: E731
    assert flops.program_flops(jax.jit(unrolled4).trace(w, x)) == pytest.approx(MATMULS, rel=0.02)


def test_gradient_remat_and_an_accumulation_scan_around_the_layer_scan():
    w, x = _args()
    grad = jax.grad(_stack)
    # Without remat: the forward, dh and dW of every layer; the scanned body computes the first
    # layer's (unused) dh too, the unrolled program leaves it out.
    assert flops.program_flops(jax.jit(grad).trace(w, x)) == pytest.approx(3 * MATMULS, rel=0.02)
    assert _xla(jax.grad(_unrolled), w, x) == pytest.approx(3 * MATMULS - MATMULS / LAYERS, rel=0.02)
    assert _xla(grad, w, x) == pytest.approx(3 * MATMULS / LAYERS, rel=0.02)
    # jax.checkpoint recomputes the forward in the backward: one forward more.
    remat = jax.grad(lambda w, x: _stack(w, x, remat=True))
    assert flops.program_flops(jax.jit(remat).trace(w, x)) == pytest.approx(4 * MATMULS, rel=0.02)

    def accumulate(w, xs):   # the train step's micro-batch scan around the layers' scan
        def micro(g, x):
            return g + remat(w, x), None

        return jax.lax.scan(micro, jnp.zeros_like(w), xs)[0]

    xs = jnp.ones((3, M, K))
    traced = jax.jit(accumulate).trace(w, xs)
    assert flops.program_flops(traced) == pytest.approx(3 * 4 * MATMULS, rel=0.02)
    assert _xla(accumulate, w, xs) < 0.2 * 3 * 4 * MATMULS       # one layer of one micro-batch


def test_peak_flops_per_device():
    assert flops.peak_flops_per_device(123.0) == (123.0, "config")
    assert flops.table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.table_peak("NVIDIA H100 PCIe") == 756e12
    assert flops.table_peak("NVIDIA H200") == 989e12
    assert flops.table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.table_peak("TPU v4") == 275e12
    assert flops.table_peak("TPU v5 lite") == 197e12
    assert flops.table_peak("TPU v5p") == 459e12
    assert flops.table_peak("TPU v6 lite") == 918e12
    assert flops.table_peak("cpu") is None
    peak, source = flops.peak_flops_per_device(0.0)     # CPU here: a measured matmul
    assert source.startswith("measured") and 1e8 < peak < 1e14
