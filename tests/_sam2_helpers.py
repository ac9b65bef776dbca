"""Shared fixtures of the SAM2 encoder tests: tiny random transformers SAM2 models."""

from __future__ import annotations

import numpy as np

# Two tiny architectures that differ in depths, windows (incl. ones that force padding),
# global blocks, background table size and heads. Widths are small so CPU tests stay fast.
TINY_A = dict(hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 2, 3, 1],
              embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 2, 4, 8],
              window_size_per_stage=[8, 4, 6, 4], global_attention_blocks=[4],
              window_positional_embedding_background_size=[7, 7])
TINY_B = dict(hidden_size=8, num_attention_heads=2, blocks_per_stage=[2, 1, 4, 2],
              embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[2, 2, 4, 4],
              window_size_per_stage=[4, 8, 14, 7], global_attention_blocks=[4, 6],
              window_positional_embedding_background_size=[5, 9])


def hf_vision_config(backbone: dict, fpn_hidden_size: int = 32, **vision):
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig

    bb = Sam2HieraDetConfig(**backbone)
    return Sam2VisionConfig(backbone_config=bb, backbone_channel_list=list(reversed(backbone["embed_dim_per_stage"])),
                            fpn_hidden_size=fpn_hidden_size, **vision)


def randomize_(model, seed: int = 0, std: float = 0.2):
    """Random values for every parameter (HF initialises position tables to zero)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def hf_vision_model(backbone: dict, seed: int = 0, **vision):
    from transformers import Sam2VisionModel

    return randomize_(Sam2VisionModel(hf_vision_config(backbone, **vision)), seed)


def hf_full_model(backbone: dict, seed: int = 0):
    """A whole Sam2Model (prompt encoder + mask decoder too), as the hub checkpoints are."""
    from transformers import Sam2Config, Sam2Model

    config = Sam2Config(vision_config=hf_vision_config(backbone), prompt_encoder_config=dict(hidden_size=32),
                        mask_decoder_config=dict(hidden_size=32))
    return randomize_(Sam2Model(config), seed)


def torch_fpn(vision_model, pixels_nhwc: np.ndarray):
    """(fpn maps, position encodings, trunk stage outputs) of transformers, as NHWC numpy."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc)).permute(0, 3, 1, 2)
        out = vision_model(x)
        trunk = vision_model.backbone(x).intermediate_hidden_states
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return ([nhwc(t) for t in out.fpn_hidden_states], [nhwc(t) for t in out.fpn_position_encoding],
            [t.numpy() for t in trunk])


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
