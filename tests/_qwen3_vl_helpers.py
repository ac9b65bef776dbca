"""Shared fixtures of the Qwen3-VL tests: tiny random HF models saved in >= 3 safetensors shards,
and processor-style inputs built directly (input_ids with pad tokens, pixel rows in patch order)."""

from __future__ import annotations

import numpy as np

VOCAB = 256
IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 250, 251, 252, 253
PATCH, TEMPORAL, MERGE = 16, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH


def tiny_hf_config(tie: bool = True, layers: int = 3, vocab: int = VOCAB):
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                max_position_embeddings=512, tie_word_embeddings=tie,
                rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[6, 5, 5],
                                     mrope_interleaved=True))
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 2], in_channels=3)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                         video_token_id=VIDEO_ID, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def make_hf_model(tmp_path, tie: bool = True, seed: int = 0, layers: int = 3, init_std: float = 0.02):
    """A random Qwen3VLForConditionalGeneration saved to tmp_path/'hf' in several shards.

    A larger ``init_std`` gives a less degenerate model (greedy decoding that does not just repeat
    one token), which makes generation tests discriminating."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_hf_config(tie, layers)
    config.initializer_range = config.text_config.initializer_range = init_std
    model = Qwen3VLForConditionalGeneration(config).eval().float()
    with torch.no_grad():  # norms start at 1; randomise them so a wrong mapping shows up
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "hf"
    model.save_pretrained(path, max_shard_size="200KB")
    return model, path


def image_tokens(grid):
    t, h, w = grid
    return [VISION_START] + [IMAGE_ID] * (t * h * w // MERGE ** 2) + [VISION_END]


def video_tokens(grid):
    t, h, w = grid
    out = []
    for frame in range(t):
        out += [5 + frame, 6] + [VISION_START] + [VIDEO_ID] * (h * w // MERGE ** 2) + [VISION_END]
    return out


def pixels(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, PATCH_DIM)).astype(np.float32)


def text_ids(n, seed):
    return list(np.random.default_rng(seed).integers(10, 200, n))


def convert_cli(src, dst, *extra) -> None:
    """Runs the real CLI entry point (python -m convert_weights.qwen3_vl)."""
    from convert_weights.qwen3_vl import main

    assert main(["--src", str(src), "--dst", str(dst), *extra]) == 0


def save_tiny_tokenizer(path, size: int) -> None:
    """A word-level tokenizer with ``size`` tokens, saved next to the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(str(path))


def torch_logits(hf, ids, mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None, position_ids=None):
    import torch

    kw = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    mm = np.where(ids == IMAGE_ID, 1, np.where(ids == VIDEO_ID, 2, 0))
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(image_grid_thw))
    if pixel_values_videos is not None:
        kw.update(pixel_values_videos=torch.tensor(pixel_values_videos), video_grid_thw=torch.tensor(video_grid_thw))
    if pixel_values is not None or pixel_values_videos is not None:
        kw["mm_token_type_ids"] = torch.tensor(mm)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return hf(**kw).logits.numpy()


# config.json of Qwen/Qwen3-VL-4B-Instruct (the fields the builders read)
HUB_4B_CONFIG = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653, "tie_word_embeddings": True,
                "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
                                "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "head_dim": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                                "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                 "mrope_interleaved": True},
                                "rope_theta": 5000000},
                "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                                  "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]}}
