"""The three sources of convert_weights.x2sam, written for any (tiny) X2SAMConfig from one set of
random parameters: an HF Qwen3-VL directory (with a tokenizer), an HF Sam2Model directory and the
release ``pytorch_model.bin`` (bf16, the trained subset of
docs/architecture.md#released-checkpoint-layout)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from _qwen3_vl_helpers import save_tiny_tokenizer
from x2sam_jax.conversion import flatten

BASE_EXTRA_ROWS = 6          # the base vocabulary differs from the release's resized one
MERGER_KEY = "vlm.visual.merger.linear_fc1.kernel"
NECK_KEY = "segmentor.encoder.neck.convs.0.bias"


def bf16_exact(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def save_release(tensors: dict, path):
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(torch.bfloat16)
                for k, v in tensors.items()}, str(path))
    return path


def write_x2sam_sources(root, config, seed: int = 0):
    """(expected flat params, base values, qwen dir, sam2 dir, release tensors) under ``root``.

    Every parameter is random and rounded to bf16 (so the bf16 release is exact). The Qwen base
    has a larger vocabulary and a different merger than the release, the SAM2 base a different
    neck bias (the release must win), plus prompt-encoder / SAM-memory keys that must be skipped.
    The base tokenizer has vocab - 3 tokens (the release appends <SEG>, <p>, </p>).
    """
    from flax import nnx
    from transformers import Sam2Config

    from convert_weights import qwen3_vl, sam2
    from convert_weights import x2sam as conv
    from x2sam_jax.conversion import export_tensors, save_safetensors_sharded
    from x2sam_jax.models.x2sam import X2SAM

    vocab = config.vlm.text.vocab_size
    width = config.vlm.text.hidden_size
    model = nnx.eval_shape(lambda: X2SAM(config, rngs=nnx.Rngs(0)))
    shapes = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
    rng = np.random.default_rng(seed)  # every parameter random (LoRA B, biases, scales start at 0/1)
    expected = {k: bf16_exact(0.2 * rng.standard_normal(v.shape)) for k, v in sorted(shapes.items())}

    # Qwen3-VL base: a larger vocabulary and a different merger than the release.
    vlm_config = dataclasses.replace(config.vlm, lora=None)
    base_vlm = {k[4:]: v for k, v in expected.items() if k.startswith("vlm.") and not k.endswith((".lora_a", ".lora_b"))}
    base_vlm["language_model.embed_tokens.embedding"] = rng.standard_normal((vocab + BASE_EXTRA_ROWS, width)).astype(np.float32)
    base_vlm[MERGER_KEY[4:]] = expected[MERGER_KEY] + 1.0
    qwen_dir = root / "qwen"
    hf = qwen3_vl.config_to_hf(vlm_config)
    hf["text_config"]["vocab_size"] = vocab + BASE_EXTRA_ROWS
    save_safetensors_sharded(export_tensors(base_vlm, qwen3_vl.model_rules(vlm_config)), qwen_dir, max_shard_bytes=100_000)
    (qwen_dir / "config.json").write_text(json.dumps(hf))
    save_tiny_tokenizer(qwen_dir, vocab - 3)
    # SAM2 base: a full Sam2Model directory (vision keys under vision_encoder.) + unused heads.
    base_encoder = {k[len("segmentor.encoder."):]: v for k, v in expected.items() if k.startswith("segmentor.encoder.")}
    base_encoder[NECK_KEY[len("segmentor.encoder."):]] = expected[NECK_KEY] - 1.0
    sam2_dir = root / "sam2"
    sam2_tensors = export_tensors(base_encoder, sam2.sam2_rules("vision_encoder."))
    sam2_tensors["prompt_encoder.point_embed.weight"] = np.ones((4, 32), np.float32)
    sam2_tensors["memory_attention.layers.0.linear1.weight"] = np.ones((8, 32), np.float32)
    sam2_tensors["no_memory_embedding"] = np.ones((1, 1, 32), np.float32)
    save_safetensors_sharded(sam2_tensors, sam2_dir)
    Sam2Config(vision_config=sam2.hf_vision_config(config.mask_encoder).to_dict()).save_pretrained(str(sam2_dir))
    release = conv.release_tensors(expected, config)
    release["segmentor.shared_image_embedding.positional_embedding"] = np.ones((2, 16), np.float32)
    base = {MERGER_KEY: base_vlm[MERGER_KEY[4:]], NECK_KEY: base_encoder[NECK_KEY[len("segmentor.encoder."):]]}
    return expected, base, qwen_dir, sam2_dir, release
