"""Qwen3-VL speed and memory, side by side with transformers on the same weights; JSON out.
One command (the numbers of issue 15):

    python benchmarks/bench_qwen3_vl.py --configs medium --prompt 512 2048 --repeats 7 \
        --memory-4b --out qwen.json

For each config and prompt length: a random HF ``Qwen3VLForConditionalGeneration`` is saved,
converted with ``convert_weights.qwen3_vl`` and loaded; then

* prefill: one forward over a text prompt (JAX: the jitted ``model(input_ids=...)``, compile
  time reported separately); FLOPs by XLA's cost analysis (of the loop-free form) and torch's
  flop counter, and the bound they take at this machine's measured fp32 matmul peak
  (benchmarks/common.py); the ratio of medians and of the fastest rounds;
* decode: per-token time of greedy generation = (time to generate N tokens - prefill) / (N - 1),
  for ``x2sam_jax.generate`` (fixed cache, while_loop) and ``transformers.generate``;
* every time is the median of ``--repeats`` interleaved rounds (JAX and torch run once per round,
  so machine load hits both alike), with the 1-minute load average of each round.

``--memory-4b`` compiles (never runs) the 36-layer Qwen3-VL-4B text stack with abstract weights
at ``--memory-length`` tokens (default 8192), batch 1, bf16 compute: XLA's memory analysis of the
forward with the one-shot attention (the [L, L] logits of every head, the pre-issue-15 form) and
with the automatic choice (query-chunked on CPU), and of a LoRA training step (loss gradient)
per remat policy. ``--compile-4b`` reports the compile time of the stack scanned and unrolled.
``--profile DIR`` writes a ``jax.profiler`` trace of JAX prefills and adds the top ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (bound, interleaved_medians, loadavg, matmul_peak, profile_runs, speed,  # noqa: E402
                               torch_flops, xla_flops)

CONFIGS = {
    # name: (text kwargs, vision kwargs)
    "tiny": (dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5]),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)),
    "medium": (dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, mrope_section=[12, 10, 10]),
               dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4)),
}


def _hf_config(name):
    from transformers import Qwen3VLConfig

    text, vision = CONFIGS[name]
    text = dict(text)
    section = text.pop("mrope_section")
    text.update(rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=section,
                                     mrope_interleaved=True))
    vocab = text["vocab_size"]
    vision = dict(vision, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, vision["depth"] - 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 6,
                         video_token_id=vocab - 5, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                         tie_word_embeddings=True)


def bench_config(name, prompts, new_tokens, repeats, workdir, peak, profile=None):
    import jax
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    import x2sam_jax
    from convert_weights.qwen3_vl import convert
    from x2sam_jax.generate import generate

    torch.manual_seed(0)
    hf = Qwen3VLForConditionalGeneration(_hf_config(name)).eval().float()
    src, dst = workdir / f"{name}_hf", workdir / f"{name}_jax"
    hf.save_pretrained(src)
    convert(src, dst)
    model = x2sam_jax.load(dst)
    vocab = CONFIGS[name][0]["vocab_size"]
    results = []
    for prompt in prompts:
        ids = np.random.default_rng(0).integers(10, vocab - 10, (1, prompt))
        ids_t = torch.tensor(ids)

        def jax_prefill():
            jax.block_until_ready(model(input_ids=ids).logits)

        def torch_prefill():
            with torch.no_grad():
                hf(input_ids=ids_t)

        def jax_generate():
            jax.block_until_ready(generate(model, ids, max_new_tokens=new_tokens).tokens)

        def torch_generate():
            with torch.no_grad():
                hf.generate(input_ids=ids_t, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=0)

        start = time.perf_counter()
        jax_prefill()
        prefill_compile = time.perf_counter() - start
        start = time.perf_counter()
        jax_generate()
        generate_compile = time.perf_counter() - start
        flops_xla = loop_free_flops(dst, ids, model.position_ids(ids)[0])
        flops_torch = torch_flops(hf, ids_t)
        prefill = interleaved_medians({"jax": jax_prefill, "torch": torch_prefill}, repeats)
        gen = interleaved_medians({"jax": jax_generate, "torch": torch_generate}, max(3, repeats // 2))
        jp, tp = prefill["jax"]["median_s"], prefill["torch"]["median_s"]
        jd = (gen["jax"]["median_s"] - jp) / (new_tokens - 1)
        td = (gen["torch"]["median_s"] - tp) / (new_tokens - 1)
        limit = bound(flops_xla, peak)
        result = {"config": name, "prompt_tokens": prompt, "new_tokens": new_tokens,
                  "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
                  "jax_first_call_s": {"prefill": round(prefill_compile, 2), "generate": round(generate_compile, 2)},
                  "prefill_gflop_xla_cost_analysis_loop_free": round(flops_xla / 1e9, 2),
                  "prefill_gflop_torch_flop_counter": round(flops_torch / 1e9, 2),
                  "prefill_bound_s_at_fp32_peak": round(limit, 4),
                  "prefill_s": {"jax": round(jp, 4), "torch": round(tp, 4), "jax_over_torch": speed(jp / tp, prefill),
                                "jax_min": round(prefill["jax"]["min_s"], 4),
                                "torch_min": round(prefill["torch"]["min_s"], 4),
                                "ratio_of_min_times": speed(prefill["jax"]["min_s"] / prefill["torch"]["min_s"],
                                                            prefill),
                                "jax_pct_of_bound": speed(100 * limit / jp, prefill, 1),
                                "torch_pct_of_bound": speed(100 * limit / tp, prefill, 1),
                                "loadavg_1min_during": prefill["loadavg_1min_during"]},
                  "decode_per_token_s": {"jax": round(jd, 5), "torch": round(td, 5),
                                         "torch_over_jax": speed(td / jd, gen, 2) if jd > 0 else None,
                                         "loadavg_1min_during": gen["loadavg_1min_during"]},
                  "repeats": repeats}
        if profile:
            trace_dir = str(Path(profile) / f"{name}_{prompt}")
            result["profile_dir"] = trace_dir
            result["profile_top_ops_3_prefills"] = profile_runs(jax_prefill, trace_dir)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    return results


def loop_free_flops(checkpoint, ids, positions) -> float:
    """XLA's FLOP count of the prefill, from the same model without loops (layers unrolled,
    one-shot attention): cost analysis counts a loop body once, whatever its trip count."""
    import jax
    from flax import nnx

    from x2sam_jax.model_checkpoint import read_config
    from x2sam_jax.models.qwen3_vl import Qwen3VLModel

    config = read_config(checkpoint)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, scan_layers=False,
                                                                  attention_implementation="xla"))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VLModel(config, rngs=nnx.Rngs(0))))
    logits = jax.jit(lambda state, *args: nnx.merge(graphdef, state).forward_arrays(*args).logits)
    return xla_flops(logits.lower(state, ids, np.ones_like(ids), positions).compile())


def _text_stack(**overrides):
    from x2sam_jax.config import LoRAConfig, Qwen3TextConfig

    return dataclasses.replace(Qwen3TextConfig.qwen3_vl_4b(), dtype="bfloat16", **overrides), LoRAConfig()


def memory_4b(length=8192, policies=("none", "full", "save_attention", "save_out_proj", "dots_no_batch")):
    """Compiled memory of the 4B text stack (abstract bf16 weights, batch 1) at ``length`` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.models.lora import lora_grad_filter
    from x2sam_jax.models.qwen3_text import Qwen3TextModel

    def mib(memory):
        return {"temp_mib": round(memory.temp_size_in_bytes / 2 ** 20, 1),
                "argument_mib": round(memory.argument_size_in_bytes / 2 ** 20, 1),
                "output_mib": round(memory.output_size_in_bytes / 2 ** 20, 1)}

    out = {"model": "Qwen3-VL-4B text stack (36 layers, float32 weights, bf16 compute, LoRA r=128)",
           "tokens": length, "batch": 1,
           "one_head_full_logits_mib": round(length * length * 4 / 2 ** 20, 1)}
    embeds = jax.ShapeDtypeStruct((1, length, 2560), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def build(**overrides):
        config, lora = _text_stack(**overrides)
        abstract = nnx.eval_shape(lambda: Qwen3TextModel(config, lora, rngs=nnx.Rngs(0)))
        return nnx.split(abstract)

    for label, implementation in (("forward_one_shot_attention", "xla"), ("forward_auto_attention", None)):
        graphdef, state = build(attention_implementation=implementation)
        forward = jax.jit(lambda state, e, m: nnx.merge(graphdef, state)(e, m)[0])
        start = time.perf_counter()
        out[label] = mib(forward.lower(state, embeds, mask).compile().memory_analysis())
        out[label]["compile_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({label: out[label]}), file=sys.stderr)

    out["train_step_auto_attention"] = {}
    for policy in policies:
        graphdef, state = build(remat_policy=policy)

        def loss_grad(state, e, m):
            model = nnx.merge(graphdef, state)
            return nnx.grad(lambda model: jnp.mean(model(e, m)[0].astype(jnp.float32) ** 2),
                            argnums=lora_grad_filter())(model)

        memory = jax.jit(loss_grad).lower(state, embeds, mask).compile().memory_analysis()
        out["train_step_auto_attention"][policy] = mib(memory)
        print(json.dumps({policy: out["train_step_auto_attention"][policy]}), file=sys.stderr)
    return out


def bench_compile_4b(length=256):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.models.qwen3_text import Qwen3TextModel

    out = {"model": "Qwen3-VL-4B text stack (36 layers)", "tokens": length}
    for scan in (True, False):
        config, _ = _text_stack(scan_layers=scan)
        abstract = nnx.eval_shape(lambda: Qwen3TextModel(config, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)

        def forward(state, embeds, mask):
            return nnx.merge(graphdef, state)(embeds, mask)[0]

        embeds = jax.ShapeDtypeStruct((1, length, config.hidden_size), jnp.bfloat16)
        mask = jax.ShapeDtypeStruct((1, length), jnp.int32)
        start = time.perf_counter()
        lowered = jax.jit(forward).lower(state, embeds, mask)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        out["scanned" if scan else "unrolled"] = {"lower_s": lowered_at - start, "compile_s": done - lowered_at}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["medium"], choices=sorted(CONFIGS))
    parser.add_argument("--prompt", nargs="+", type=int, default=[512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-4b", action="store_true")
    parser.add_argument("--memory-length", type=int, default=8192)
    parser.add_argument("--compile-4b", action="store_true")
    parser.add_argument("--profile", help="directory for a jax.profiler trace of the JAX prefill")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    results = {"machine": {"loadavg_start": loadavg()}, "runs": []}
    if args.configs:
        results["machine"]["matmul_fp32"] = matmul_peak()
        print(json.dumps(results["machine"]), file=sys.stderr)
        peak = results["machine"]["matmul_fp32"]["peak_gflops"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.configs:
                results["runs"] += bench_config(name, args.prompt, args.new_tokens, args.repeats, Path(tmp), peak,
                                                args.profile)
    if args.memory_4b:
        results["memory_4b"] = memory_4b(args.memory_length)
    if args.compile_4b:
        results["compile_4b"] = bench_compile_4b()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return results


if __name__ == "__main__":
    main()
