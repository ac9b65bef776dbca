"""SAM2 image encoder speed: jitted JAX ``Sam2VisionEncoder`` vs transformers ``Sam2VisionModel``.

Both run the same random weights (copied through the converter's rule table) on the same input.
Torch runs eagerly under ``torch.no_grad`` on its default device (CUDA when available); JAX on its
default backend. Prints one JSON object per variant: compile time, median forward times, the
JAX/torch ratio and the max-abs difference of the FPN maps.

    python -m benchmarks.bench_sam2 --variants tiny large --size 1024 --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from convert_weights.sam2 import hf_vision_config, sam2_rules, target_shapes
from x2sam_jax.config import hiera_preset
from x2sam_jax.conversion import load_tensors, unflatten
from x2sam_jax.models.hiera import Sam2VisionEncoder


def build_pair(variant: str, dtype: str, torch_device: str, seed: int = 0, attention=None, scan=False):
    from transformers import Sam2VisionModel

    config = hiera_preset(variant, dtype=dtype, attention_implementation=attention, scan_blocks=scan)
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
    hf = hf.to(torch_device, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return model, hf


def time_calls(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(variant: str, size: int, batch: int, iters: int, warmup: int, dtype: str,
          attention: str | None = None, scan: bool = False) -> dict:
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf = build_pair(variant, dtype, torch_device, attention=attention, scan=scan)
    pixels = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    x = jax.device_put(jnp.asarray(pixels))

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x).fpn_hidden_states

    start = time.perf_counter()
    compiled = forward.lower(state, x).compile()
    compile_s = time.perf_counter() - start

    def run_jax():
        return jax.block_until_ready(compiled(state, x))

    x_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch_device, hf.dtype)

    def run_torch():
        with torch.no_grad():
            out = hf(x_torch).fpn_hidden_states
        if torch_device == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(warmup):
        run_jax()
        run_torch()
    # Alternate the two so that load from other processes hits both alike.
    jax_times, torch_times = [], []
    for _ in range(iters):
        jax_times += time_calls(run_jax, 1)
        torch_times += time_calls(run_torch, 1)
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)

    got = run_jax()
    want = run_torch()
    diff = max(float(np.abs(np.asarray(g, np.float32) - w.float().permute(0, 2, 3, 1).cpu().numpy()).max())
               for g, w in zip(got, want))
    return {"variant": variant, "size": size, "batch": batch, "dtype": dtype, "attention": attention or "auto", "scan_blocks": scan,
            "jax_backend": jax.default_backend(), "torch_device": torch_device,
            "torch_threads": torch.get_num_threads(), "compile_s": round(compile_s, 3),
            "jax_forward_ms": round(1e3 * jax_s, 2), "torch_forward_ms": round(1e3 * torch_s, 2),
            "ratio_jax_over_torch": round(jax_s / torch_s, 3),
            "jax_min_ms": round(1e3 * min(jax_times), 2), "torch_min_ms": round(1e3 * min(torch_times), 2),
            "fpn_max_abs_diff": diff, "iters": iters}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "large"],
                        choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", choices=["xla", "cudnn", "query_chunked"], default=None,
                        help="HieraConfig.attention_implementation (default: auto by backend)")
    parser.add_argument("--scan", action="store_true", help="HieraConfig.scan_blocks (scan runs of equal blocks)")
    args = parser.parse_args(argv)
    results = [bench(v, args.size, args.batch, args.iters, args.warmup, args.dtype, args.attention, args.scan)
               for v in args.variants]
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
