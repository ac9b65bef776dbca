"""Qwen3-VL speed, side by side with transformers on the same weights; JSON out.

    python benchmarks/bench_qwen3_vl.py [--configs tiny medium] [--prompt 128] [--new-tokens 32]
        [--repeats 3] [--compile-4b] [--out bench.json]

For each config: a random HF ``Qwen3VLForConditionalGeneration`` is saved, converted with
``convert_weights.qwen3_vl`` and loaded; then

* prefill: one forward over a text prompt of ``--prompt`` tokens (median of ``--repeats`` runs
  after a warm-up; JAX time excludes compilation, which is reported separately);
* decode: per-token time of greedy generation = (time to generate N tokens - prefill) / (N - 1),
  for ``x2sam_jax.generate`` (fixed cache, while_loop) and ``transformers.generate`` (dynamic cache);
* ratio = torch time / JAX time (> 1: JAX is faster).

``--compile-4b`` also lowers and compiles the 36-layer Qwen3-VL-4B text stack (abstract weights
from ``nnx.eval_shape``, nothing allocated) scanned and unrolled, and reports both compile times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    text.update(rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=section,
                                     mrope_interleaved=True))
    vocab = text["vocab_size"]
    vision = dict(vision, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, vision["depth"] - 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 6,
                         video_token_id=vocab - 5, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                         tie_word_embeddings=True)


def _median_time(fn, repeats):
    fn()  # warm-up (compiles for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_config(name, prompt, new_tokens, repeats, workdir):
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
            hf.generate(input_ids=ids_t, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0)

    start = time.perf_counter()
    jax_prefill()
    prefill_compile = time.perf_counter() - start
    start = time.perf_counter()
    jax_generate()
    generate_compile = time.perf_counter() - start
    result = {"config": name, "prompt_tokens": prompt, "new_tokens": new_tokens,
              "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
              "jax_first_call_s": {"prefill": prefill_compile, "generate": generate_compile}}
    jp, tp = _median_time(jax_prefill, repeats), _median_time(torch_prefill, repeats)
    jg, tg = _median_time(jax_generate, repeats), _median_time(torch_generate, repeats)
    jd, td = (jg - jp) / (new_tokens - 1), (tg - tp) / (new_tokens - 1)
    result.update(prefill_s={"jax": jp, "torch": tp, "torch_over_jax": tp / jp},
                  decode_per_token_s={"jax": jd, "torch": td, "torch_over_jax": td / jd if jd > 0 else None})
    return result


def bench_compile_4b(length=256):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from x2sam_jax.config import Qwen3TextConfig
    from x2sam_jax.models.qwen3_text import Qwen3TextModel

    out = {"model": "Qwen3-VL-4B text stack (36 layers)", "tokens": length}
    for scan in (True, False):
        config = dataclasses.replace(Qwen3TextConfig.qwen3_vl_4b(), scan_layers=scan, dtype="bfloat16")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=sorted(CONFIGS))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-4b", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results = {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            results["runs"].append(bench_config(name, args.prompt, args.new_tokens, args.repeats, Path(tmp)))
            print(json.dumps(results["runs"][-1]), file=sys.stderr)
    if args.compile_4b:
        results["compile_4b"] = bench_compile_4b()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
