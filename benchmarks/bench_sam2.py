"""SAM2 image encoder speed and memory: jitted JAX ``Sam2VisionEncoder`` vs transformers
``Sam2VisionModel`` on the same random weights (copied through the converter's rule table) and
input; JSON out. One command (the numbers of issue 15):

    python -m benchmarks.bench_sam2 --variants tiny --size 1024 --dtypes float32 bfloat16 \
        --repeats 7 --memory large --out sam2.json

Per variant and dtype: the FLOPs of the forward (XLA's cost analysis of the loop-free form,
cross-checked with torch's flop counter), the bound those FLOPs take at this machine's measured
fp32 matmul peak (a large matmul in numpy, XLA and torch; the best of the three), the JAX and
torch forward times (medians of ``--repeats`` interleaved rounds, each side run once per round,
so machine load hits both alike; the 1-minute load average of every round is printed), each
side's share of the bound, the JAX/torch ratio (of medians, and of the fastest rounds, the
steadier one on a loaded machine), compile time and the FPN difference. Torch runs eagerly
under ``no_grad`` with its default threads; JAX on its default backend. ``--profile DIR``
writes a ``jax.profiler`` trace of JAX forwards and adds where the time goes (XLA ops by kind).

``--memory large`` adds the compiled memory (XLA ``memory_analysis``, abstract weights, nothing
allocated) of that encoder's forward at ``--size``, for the one-shot attention (every window's
full logits at once) and the automatic choice. ``--attention`` forces an attention form
(x2sam_jax.layers.attention); ``--scan`` scans runs of identical blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (bound, interleaved_medians, loadavg, matmul_peak, profile_runs, speed,  # noqa: E402
                               torch_flops, xla_flops)
from convert_weights.sam2 import hf_vision_config, sam2_rules, target_shapes  # noqa: E402
from x2sam_jax.config import hiera_preset  # noqa: E402
from x2sam_jax.conversion import load_tensors, unflatten  # noqa: E402
from x2sam_jax.models.hiera import Sam2VisionEncoder  # noqa: E402


def build_pair(variant: str, dtype: str, seed: int = 0, attention=None, scan=False):
    from transformers import Sam2VisionModel

    config = hiera_preset(variant, dtype=dtype, attention_implementation=attention, scan_layers=scan)
    torch.manual_seed(seed)
    hf = Sam2VisionModel(hf_vision_config(config))
    with torch.no_grad():  # HF zero-initialises the position tables; make every weight matter
        hf.backbone.pos_embed.normal_(0, 0.02)
        hf.backbone.pos_embed_window.normal_(0, 0.02)
    hf = hf.eval()
    tensors = ((k, v.detach().numpy()) for k, v in hf.state_dict().items())
    arrays, _ = load_tensors(target_shapes(config), tensors, sam2_rules(prefix=""))
    model = Sam2VisionEncoder(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, unflatten(arrays))
    nnx.update(model, params)
    hf = hf.to(dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return model, hf


def _forward_fn(graphdef):
    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x).fpn_hidden_states
    return forward


def bench(variant: str, size: int, batch: int, repeats: int, dtype: str, peak: float,
          attention: str | None = None, scan: bool = False, profile: str | None = None) -> dict:
    model, hf = build_pair(variant, dtype, attention=attention, scan=scan)
    pixels = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    x = jax.device_put(jnp.asarray(pixels))
    graphdef, state = nnx.split(model)
    forward = _forward_fn(graphdef)
    start = time.perf_counter()
    compiled = forward.lower(state, x).compile()
    compile_s = time.perf_counter() - start
    x_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(hf.dtype)

    def run_jax():
        return jax.block_until_ready(compiled(state, x))

    def run_torch():
        with torch.no_grad():
            return hf(x_torch).fpn_hidden_states

    flops_xla = loop_free_flops(variant, dtype, x)
    flops_torch = torch_flops(hf, x_torch)
    times = interleaved_medians({"jax": run_jax, "torch": run_torch}, repeats)
    jax_s, torch_s = times["jax"]["median_s"], times["torch"]["median_s"]
    limit = bound(flops_xla, peak)
    got, want = run_jax(), run_torch()
    diff = max(float(np.abs(np.asarray(g, np.float32) - w.float().permute(0, 2, 3, 1).numpy()).max())
               for g, w in zip(got, want))
    result = {
        "variant": variant, "size": size, "batch": batch, "dtype": dtype, "attention": attention or "auto",
        "scan_layers": scan, "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
        "gflop_xla_cost_analysis_loop_free": round(flops_xla / 1e9, 2),
        "gflop_torch_flop_counter": round(flops_torch / 1e9, 2),
        "bound_s_at_fp32_peak": round(limit, 4),
        "jax_forward_s": round(jax_s, 4), "torch_forward_s": round(torch_s, 4),
        "ratio_jax_over_torch": speed(jax_s / torch_s, times),
        "jax_pct_of_bound": speed(100 * limit / jax_s, times, 1),
        "torch_pct_of_bound": speed(100 * limit / torch_s, times, 1),
        "jax_min_s": round(times["jax"]["min_s"], 4), "torch_min_s": round(times["torch"]["min_s"], 4),
        "ratio_of_min_times": speed(times["jax"]["min_s"] / times["torch"]["min_s"], times),
        "loadavg_1min_during": times["loadavg_1min_during"], "repeats": repeats,
        "compile_s": round(compile_s, 2), "fpn_max_abs_diff": diff,
    }
    if profile:
        trace_dir = str(Path(profile) / f"{variant}_{size}_{dtype}")
        result["profile_dir"] = trace_dir
        result["profile_top_ops_3_forwards"] = profile_runs(run_jax, trace_dir)
    print(json.dumps(result), file=sys.stderr)
    return result


def loop_free_flops(variant: str, dtype: str, x) -> float:
    """XLA's FLOP count of the forward, from the same model without loops (one-shot attention, no
    block scan): cost analysis counts a loop body once, whatever its trip count."""
    config = hiera_preset(variant, dtype=dtype, attention_implementation="xla", scan_layers=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam2VisionEncoder(config, rngs=nnx.Rngs(0))))
    return xla_flops(_forward_fn(graphdef).lower(state, jax.ShapeDtypeStruct(x.shape, x.dtype)).compile())


def compiled_memory(variant: str, size: int, batch: int, dtype: str) -> dict:
    """XLA's memory analysis of the forward with abstract weights, per attention form."""
    out = {"variant": variant, "size": size, "batch": batch, "dtype": dtype}
    for attention in ("xla", None):
        config = hiera_preset(variant, dtype=dtype, attention_implementation=attention)
        abstract = nnx.eval_shape(lambda: Sam2VisionEncoder(config, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        memory = _forward_fn(graphdef).lower(state, x).compile().memory_analysis()
        out["one_shot_attention" if attention else "auto_attention"] = {
            "temp_mib": round(memory.temp_size_in_bytes / 2 ** 20, 1),
            "argument_mib": round(memory.argument_size_in_bytes / 2 ** 20, 1),
            "output_mib": round(memory.output_size_in_bytes / 2 ** 20, 1)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["tiny"], choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", choices=["xla", "query_chunked", "cudnn", "splash"], default=None,
                        help="HieraConfig.attention_implementation (default: chosen by platform and shape)")
    parser.add_argument("--scan", action="store_true", help="HieraConfig.scan_layers (scan runs of equal blocks)")
    parser.add_argument("--memory", nargs="*", default=[], choices=["tiny", "small", "base_plus", "large"],
                        help="variants whose compiled forward memory is reported")
    parser.add_argument("--profile", help="directory for a jax.profiler trace of the JAX forward")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    results = {"machine": {"matmul_fp32": matmul_peak(), "loadavg_start": loadavg()}, "runs": [], "memory": []}
    print(json.dumps(results["machine"]), file=sys.stderr)
    peak = results["machine"]["matmul_fp32"]["peak_gflops"]
    for variant in args.variants:
        for dtype in args.dtypes:
            results["runs"].append(bench(variant, args.size, args.batch, args.repeats, dtype, peak, args.attention,
                                         args.scan, args.profile))
    for variant in args.memory:
        results["memory"].append(compiled_memory(variant, args.size, args.batch, "float32"))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return results


if __name__ == "__main__":
    main()
