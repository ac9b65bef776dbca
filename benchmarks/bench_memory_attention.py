"""X2SAM's memory attention (models/mask_memory.py ``MemoryAttention``) forward + backward at the
4B sizes, per attention implementation, with and without attention dropout; JSON out.

What runs in a video step at t > 0, once per feature scale: 4 pre-norm layers of RoPE
self-attention over the scale's map (64², 128² or 256² tokens for 1024² frames) and
cross-attention to the memory bank (K = 5 frames of a 64² memory map each, every scale: the
memory encoder downsamples the scales by 1, 2 and 4; no object pointers), width 256, one head of
256. The 256² level (65,536 queries, self-attention 65,536 x 65,536) is the largest FLOP term of a
video step. The bank is full (steady state) and passed with its validity mask, as
``MaskMemory.attend`` does (``--masks none`` adds the same call without it: the cuDNN path turns a
key mask into a dense [B, 1, Lq, Lk] bias).

Per case (implementation x ``attention_dropout`` x mask): the median step time over interleaved
rounds (benchmarks/common.py), the compiled memory (``memory_analysis``), and which kernels the
optimised HLO holds (cuDNN flash attention appears as custom calls ``__cudnn$fmha...``). The fused
kernels take no dropout (layers/attention.py raises): their dropout-0.1 cases are listed as
skipped. A case that fails to compile or run (out of memory) is reported with its error.
bfloat16 compute, float32 parameters, residual/FFN dropout as configured (0.1), the preset's remat
policy of the layer scan; gradients of the parameters, the features and the memory.

    python benchmarks/bench_memory_attention.py --levels 64 256          # GPU: xla, query_chunked, cudnn
    python benchmarks/bench_memory_attention.py --small --repeats 3      # CPU: 16²/32² maps, 16² memory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="side of the query maps (default 256; --small: 16 32)")
    p.add_argument("--memory-side", type=int, default=None,
                   help="side of one frame's memory map (default 64; --small 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--implementations", nargs="+", default=None,
                   help="default: xla query_chunked, plus cudnn on GPU or splash on TPU")
    p.add_argument("--dropouts", type=float, nargs="+", default=(0.1, 0.0), help="attention_dropout values")
    p.add_argument("--masks", nargs="+", choices=("bank", "none"), default=("bank",))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="CPU sizes: 16² and 32² maps, a 16² memory map")
    p.add_argument("--out", default=None, help="also write the JSON here, rewritten after every level (a run cut "
                                               "short by a time limit keeps the levels it finished)")
    return p.parse_args(argv)


def default_implementations(platform: str) -> list[str]:
    return ["xla", "query_chunked"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(platform, [])


def build_case(memory_config, implementation: str, dropout: float, side: int, memory_len: int, batch: int,
               use_mask: bool):
    """(jitted forward+backward, its arguments) of one case."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.models.mask_memory import MemoryAttention
    from x2sam_jax.rng import reseed_rngs

    config = dataclasses.replace(memory_config, attention_implementation=implementation,
                                 attention_dropout=dropout, dtype="bfloat16")
    module = MemoryAttention(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    module = nnx.view(module, deterministic=False, raise_if_not_found=False)   # training: dropout on
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(1), 3)
    features = jax.random.normal(keys[0], (batch, side, side, config.hidden_size), jnp.bfloat16)
    memory = jax.random.normal(keys[1], (batch, memory_len, config.memory_dim), jnp.bfloat16)
    memory_pos = jax.random.normal(keys[2], (1, memory_len, config.memory_dim), jnp.bfloat16)
    mask = jnp.ones((batch, memory_len), bool) if use_mask else None

    def loss(params, features, memory, key):
        # The RNG streams rebuilt inside the differentiated trace (as train/step.py does).
        out = nnx.merge(graphdef, params, reseed_rngs(rest, key))(features, memory, memory_pos, mask)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    @jax.jit
    def step(params, features, memory, key):
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, features, memory, key)

    return step, (params, features, memory, jax.random.key(2))


def attention_flops(side: int, memory_len: int, batch: int, width: int, layers: int) -> float:
    """Matmul FLOPs of the attention products alone (QK^T and PV, self + cross), forward + backward
    (x3), for a sense of scale; projections and the MLP are left out."""
    queries = side * side
    forward = 2 * 2 * batch * queries * (queries + memory_len) * width * layers
    return 3.0 * forward


def main(argv=None):
    args = _parse(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_train_step import memory_dict
    from benchmarks.common import hlo_kernels, interleaved_medians, loadavg
    from x2sam_jax.config import x2sam_preset
    from x2sam_jax.layers.attention import choose_implementation

    platform = jax.devices()[0].platform
    memory_config = x2sam_preset("x2sam_4b").memory
    levels = args.levels or ([16, 32] if args.small else [256])
    memory_side = args.memory_side or (16 if args.small else 64)
    memory_len = memory_config.num_memory_frames * memory_side * memory_side
    implementations = args.implementations or default_implementations(platform)
    result = {"jax": jax.__version__, "platform": platform, "device_kind": jax.devices()[0].device_kind,
              "sizes": "small (CPU)" if args.small else "x2sam_4b",
              "memory_config": {k: getattr(memory_config, k) for k in
                                ("hidden_size", "memory_dim", "num_heads", "num_layers", "mlp_dim",
                                 "num_memory_frames", "dropout", "remat_policy")},
              "memory_tokens": memory_len, "batch": args.batch, "repeats": args.repeats,
              "loadavg_start": loadavg(), "levels": {}}
    for side in levels:
        cases, runs = {}, {}
        for implementation in implementations:
            for dropout in args.dropouts:
                for mask in args.masks:
                    name = f"{implementation}/dropout={dropout:g}/mask={mask}"
                    entry = cases[name] = {}
                    if implementation in ("cudnn", "splash") and dropout > 0:
                        entry["skipped"] = "the fused kernel takes no dropout (layers/attention.py raises)"
                        continue
                    try:
                        step, call_args = build_case(memory_config, implementation, dropout, side, memory_len,
                                                     args.batch, mask == "bank")
                        start = time.perf_counter()
                        compiled = step.lower(*call_args).compile()
                        entry["compile_s"] = round(time.perf_counter() - start, 1)
                        entry["memory"] = memory_dict(compiled.memory_analysis())
                        entry["kernels"] = hlo_kernels(compiled.as_text())
                        start = time.perf_counter()
                        jax.block_until_ready(compiled(*call_args))
                        entry["first_run_s"] = round(time.perf_counter() - start, 3)
                    except Exception as e:  # out of memory, an unsupported kernel: reported, the others go on
                        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        traceback.print_exc(file=sys.stderr)
                        continue
                    runs[name] = (lambda compiled=compiled, call_args=call_args:
                                  jax.block_until_ready(compiled(*call_args)))
        if runs:
            timing = interleaved_medians(runs, args.repeats)
            for name in runs:
                cases[name].update(median_s=round(timing[name]["median_s"], 5), times_s=timing[name]["times_s"])
            # Times are printed either way; "loaded" says whether other work shared the machine.
            level = {"loadavg_1min_during": timing["loadavg_1min_during"],
                     "loaded": "loaded: not a result" if timing["loaded"] else False}
        else:
            level = {}
        # What the model runs when attention_implementation is None (its default), per dropout.
        auto = {}
        for dropout in args.dropouts:
            head_dim = memory_config.hidden_size // memory_config.num_heads
            q_shape = (args.batch, side * side, memory_config.num_heads, head_dim)
            auto[f"dropout={dropout:g}"] = {
                kind: choose_implementation(q_shape, (args.batch, length, memory_config.num_heads, head_dim),
                                            jnp.bfloat16, dropout=dropout > 0, platform=platform)
                for kind, length in (("self", side * side), ("cross", memory_len))}
        level["automatic_choice"] = auto
        flops = attention_flops(side, memory_len, args.batch, memory_config.hidden_size, memory_config.num_layers)
        result["levels"][f"{side}x{side}"] = {"queries": side * side,
                                              "attention_matmul_flops_fwd_bwd": flops, **level, "cases": cases}
        result["loadavg_end"] = loadavg()
        if args.out:
            write_json(result, args.out)
    print(json.dumps(result, indent=1))


def write_json(result: dict, path: str) -> None:
    """Written to a temporary name, then renamed: never a half-written file."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(target)


if __name__ == "__main__":
    main()
