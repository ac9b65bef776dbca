"""Convert a SAM2 / SAM2.1 image encoder to an x2sam_jax checkpoint, and back to HF.

    python -m convert_weights.sam2 --src facebook_sam2.1-hiera-large/ --dst ckpt/sam2_large
    python -m convert_weights.sam2 --src sam2.1_hiera_large.pt --variant large --dst ckpt/sam2_large
    python -m convert_weights.sam2 --to-hf --src ckpt/sam2_large --dst hf_sam2_vision/

SRC is either an HF directory (config.json + safetensors) of a full ``Sam2Model`` (vision keys
under ``vision_encoder.``) or of a bare ``Sam2VisionModel``, or an official ``sam2.1_hiera_*.pt``
(state dict under "model", keys ``image_encoder.trunk.*`` / ``image_encoder.neck.*``; the
architecture comes from ``--variant``). Only the image encoder is converted: prompt encoder,
mask decoder and memory weights are listed as skipped; any other key is an error. The output is
written atomically: a failed conversion leaves no DST behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from x2sam_jax import model_checkpoint
from x2sam_jax.cli import cli_errors
from x2sam_jax.config import HieraConfig, hiera_preset
from x2sam_jax.conversion import (CONV2D, IDENTITY, LINEAR, ConversionError, Rule, Transform, export_tensors, flatten,
                                  is_hf_export, iter_checkpoint, load_tensors, mark_hf_export, save_safetensors_sharded,
                                  unflatten)
from x2sam_jax.storage.atomic import atomic_directory, read_json

# torch position tables [1, C, h, w] <-> channels-last [h, w, C].
POSITION_TABLE = Transform(lambda a: a[0].transpose(1, 2, 0), lambda a: a.transpose(2, 0, 1)[None])

# Leaf names: torch weight/bias -> NNX kernel/bias (or scale/bias for norms).
_LINEAR = (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))
_NORM = (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY))
_CONV = (("weight", "kernel", CONV2D), ("bias", "bias", IDENTITY))


def _module_rules(source: str, target: str, leaves) -> list[Rule]:
    return [Rule(f"{source}.{s}", f"{target}.{t}", transform) for s, t, transform in leaves]


def sam2_rules(prefix: str = "vision_encoder.") -> list[Rule]:
    """Rules for transformers' Sam2VisionModel keys (``{prefix}backbone.*``, ``{prefix}neck.*``).

    The X2SAM converter reuses them with its own prefix (e.g. ``segmentor.encoder.``); the
    target paths are relative to :class:`x2sam_jax.models.hiera.Sam2VisionEncoder`.
    """
    p = prefix
    block = f"{p}backbone.blocks.{{i}}"
    rules = _module_rules(f"{p}backbone.patch_embed.projection", "backbone.patch_embed.projection", _CONV)
    rules += [Rule(f"{p}backbone.pos_embed", "backbone.pos_embed", POSITION_TABLE),
              Rule(f"{p}backbone.pos_embed_window", "backbone.pos_embed_window", POSITION_TABLE)]
    for name, leaves in (("layer_norm1", _NORM), ("attn.qkv", _LINEAR), ("attn.proj", _LINEAR),
                         ("layer_norm2", _NORM), ("mlp.proj_in", _LINEAR), ("mlp.proj_out", _LINEAR),
                         ("proj", _LINEAR)):
        rules += _module_rules(f"{block}.{name}", f"backbone.blocks.{{i}}.{name}", leaves)
    rules += _module_rules(f"{p}neck.convs.{{j}}", "neck.convs.{j}", _CONV)
    return rules


def official_rules(prefix: str = "image_encoder.") -> list[Rule]:
    """Rules for the official facebookresearch/sam2 checkpoint keys (``image_encoder.trunk.*``)."""
    p = f"{prefix}trunk"
    rules = _module_rules(f"{p}.patch_embed.proj", "backbone.patch_embed.projection", _CONV)
    rules += [Rule(f"{p}.pos_embed", "backbone.pos_embed", POSITION_TABLE),
              Rule(f"{p}.pos_embed_window", "backbone.pos_embed_window", POSITION_TABLE)]
    for source, target, leaves in (("norm1", "layer_norm1", _NORM), ("attn.qkv", "attn.qkv", _LINEAR),
                                   ("attn.proj", "attn.proj", _LINEAR), ("norm2", "layer_norm2", _NORM),
                                   ("mlp.layers.0", "mlp.proj_in", _LINEAR),
                                   ("mlp.layers.1", "mlp.proj_out", _LINEAR), ("proj", "proj", _LINEAR)):
        rules += _module_rules(f"{p}.blocks.{{i}}.{source}", f"backbone.blocks.{{i}}.{target}", leaves)
    rules += _module_rules(f"{prefix}neck.convs.{{j}}.conv", "neck.convs.{j}", _CONV)
    return rules


# Known non-encoder weights of a full HF Sam2Model / Sam2VideoModel checkpoint.
HF_SKIP = (r"prompt_encoder\.", r"mask_decoder\.", r"shared_image_embedding\.", r"no_memory_embedding$",
           r"no_memory_positional_encoding$", r"memory_attention\.", r"memory_encoder\.",
           r"memory_temporal_positional_encoding$", r"mask_downsample\.", r"object_pointer_proj\.",
           r"temporal_positional_encoding_projection_layer\.", r"no_object_pointer$",
           r"occlusion_spatial_embedding_parameter$")
# Known non-encoder weights of an official sam2 checkpoint.
OFFICIAL_SKIP = (r"sam_prompt_encoder\.", r"sam_mask_decoder\.", r"memory_attention\.", r"memory_encoder\.",
                 r"maskmem_tpos_enc$", r"no_mem_embed$", r"no_mem_pos_enc$", r"no_obj_ptr$",
                 r"no_obj_embed_spatial$", r"mask_downsample\.", r"obj_ptr_proj\.", r"obj_ptr_tpos_proj\.")


# ----------------------------------------------------------------------------------------------
# Configs: HF <-> HieraConfig
# ----------------------------------------------------------------------------------------------


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def config_from_hf(vision: dict, source: str = "config.json") -> HieraConfig:
    """HieraConfig from a transformers Sam2VisionConfig dict (its ``backbone_config`` inside)."""
    backbone = vision.get("backbone_config") or {}
    defaults = HieraConfig()
    get = lambda key: backbone.get(key, getattr(defaults, key))  # noqa: E731
    config = HieraConfig(
        hidden_size=int(get("hidden_size")), num_attention_heads=int(get("num_attention_heads")),
        num_channels=int(get("num_channels")), patch_kernel_size=_pair(get("patch_kernel_size")),
        patch_stride=_pair(get("patch_stride")), patch_padding=_pair(get("patch_padding")),
        query_stride=_pair(get("query_stride")), num_query_pool_stages=int(get("num_query_pool_stages")),
        blocks_per_stage=tuple(get("blocks_per_stage")), embed_dim_per_stage=tuple(get("embed_dim_per_stage")),
        num_attention_heads_per_stage=tuple(get("num_attention_heads_per_stage")),
        window_size_per_stage=tuple(get("window_size_per_stage")),
        global_attention_blocks=tuple(get("global_attention_blocks")),
        window_positional_embedding_background_size=_pair(get("window_positional_embedding_background_size")),
        mlp_ratio=float(get("mlp_ratio")), hidden_act=get("hidden_act"), layer_norm_eps=float(get("layer_norm_eps")),
        fpn_hidden_size=int(vision.get("fpn_hidden_size", 256)),
        fpn_top_down_levels=tuple(vision.get("fpn_top_down_levels", (2, 3))),
        num_feature_levels=int(vision.get("num_feature_levels", 3)),
        image_size=_pair(get("image_size") if backbone.get("image_size") is not None else 1024)[0])
    channels = vision.get("backbone_channel_list")
    if channels is not None and tuple(channels) != config.backbone_channel_list:
        raise ConversionError(f"{source}: backbone_channel_list {list(channels)} is not the reversed "
                              f"embed_dim_per_stage {list(config.embed_dim_per_stage)}")
    for key, want in (("fpn_kernel_size", 1), ("fpn_stride", 1), ("fpn_padding", 0)):
        if int(vision.get(key, want)) != want:
            raise ConversionError(f"{source}: {key}={vision[key]} is not supported (expected {want})")
    return config


def hf_vision_config(config: HieraConfig):
    """The transformers ``Sam2VisionConfig`` describing ``config``."""
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig

    backbone = Sam2HieraDetConfig(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_channels=config.num_channels, image_size=[config.image_size, config.image_size],
        patch_kernel_size=list(config.patch_kernel_size), patch_stride=list(config.patch_stride),
        patch_padding=list(config.patch_padding), query_stride=list(config.query_stride),
        window_positional_embedding_background_size=list(config.window_positional_embedding_background_size),
        num_query_pool_stages=config.num_query_pool_stages, blocks_per_stage=list(config.blocks_per_stage),
        embed_dim_per_stage=list(config.embed_dim_per_stage),
        num_attention_heads_per_stage=list(config.num_attention_heads_per_stage),
        window_size_per_stage=list(config.window_size_per_stage),
        global_attention_blocks=list(config.global_attention_blocks), mlp_ratio=config.mlp_ratio,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps)
    sizes = [[config.image_size // s, config.image_size // s] for s in (4, 8, 16)]
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=list(config.backbone_channel_list),
                              backbone_feature_sizes=sizes, fpn_hidden_size=config.fpn_hidden_size,
                              fpn_top_down_levels=list(config.fpn_top_down_levels),
                              num_feature_levels=config.num_feature_levels, hidden_act=config.hidden_act,
                              layer_norm_eps=config.layer_norm_eps)
    return vision


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def target_shapes(config: HieraConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat parameter path -> (shape, dtype) of the encoder built from ``config`` (no memory used)."""
    abstract = model_checkpoint.abstract_model(config)
    flat = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


def read_source(src: Path, variant: str | None):
    """(config, tensor iterator, rules, skip) for an HF directory or an official .pt file."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory (expected an HF SAM2 directory or an "
                                "official sam2 .pt file)")
    if src.is_dir():
        config_file = src / "config.json"
        if not config_file.exists():
            raise ConversionError(f"{src}: no config.json (expected an HF SAM2 directory)")
        meta = read_json(config_file)
        model_type = meta.get("model_type")
        if model_type in ("sam2", "sam2_video"):
            vision, prefix, skip = meta.get("vision_config") or {}, "vision_encoder.", HF_SKIP
        elif model_type == "sam2_vision_model":
            vision, prefix, skip = meta, "", ()
        else:
            raise ConversionError(f"{config_file}: model_type {model_type!r} is not a SAM2 model "
                                  "(expected 'sam2', 'sam2_video' or 'sam2_vision_model')")
        try:
            config = config_from_hf(vision, str(config_file))
        except (TypeError, ValueError, KeyError) as error:
            raise ConversionError(f"{config_file}: not a valid SAM2 vision config ({error!r})") from None
        if variant is not None and config != hiera_preset(variant):
            print(f"note: --variant {variant} ignored; the architecture comes from {config_file}", file=sys.stderr)
        return config, iter_checkpoint(src), sam2_rules(prefix), skip
    if variant is None:
        raise ConversionError(f"{src}: an official SAM2 .pt file needs --variant (tiny|small|base_plus|large)")
    return hiera_preset(variant), iter_checkpoint(src, subkey="model"), official_rules(), OFFICIAL_SKIP


def convert(src: str | Path, dst: str | Path, variant: str | None = None, overwrite: bool = False,
            config_overrides: dict | None = None) -> list[str]:
    """Converts SRC into an x2sam_jax checkpoint at DST; returns the skipped source keys."""
    src, dst = Path(src), Path(dst)
    with atomic_directory(dst, overwrite, sources=[src]) as tmp:   # checks DST before reading
        config, tensors, rules, skip = read_source(src, variant)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        arrays, skipped = load_tensors(target_shapes(config), tensors, rules, skip, source=str(src))
        model_checkpoint.write_params(tmp, unflatten(arrays))
        model_checkpoint.write_config(tmp, config, extra={"source": str(src)})
    return skipped


def export_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> None:
    """Writes an x2sam_jax SAM2 checkpoint as a transformers Sam2VisionModel directory."""
    src, dst = Path(src), Path(dst)
    with atomic_directory(dst, overwrite, sources=[src], replaceable=is_hf_export,
                          what="an HF export of x2sam_jax") as tmp:
        config = model_checkpoint.read_config(src)
        if not isinstance(config, HieraConfig):
            raise ConversionError(f"{src}: holds a {type(config).__name__}, not a SAM2 encoder (HieraConfig)")
        tensors = export_tensors(model_checkpoint.load_flat_params(src), sam2_rules(prefix=""))
        hf_vision_config(config).save_pretrained(str(tmp))
        save_safetensors_sharded(tensors, tmp)
        mark_hf_export(tmp, src)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert_weights.sam2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="HF SAM2 directory, official .pt, or (with --to-hf) "
                                                    "an x2sam_jax checkpoint")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--variant", choices=("tiny", "small", "base_plus", "large"),
                        help="architecture of an official .pt checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--to-hf", action="store_true", help="export an x2sam_jax checkpoint to HF safetensors")
    args = parser.parse_args(argv)
    if args.to_hf:
        export_hf(args.src, args.dst, args.overwrite)
        print(f"wrote transformers Sam2VisionModel to {args.dst}")
        return 0
    skipped = convert(args.src, args.dst, args.variant, args.overwrite)
    print(f"wrote {args.dst}; skipped {len(skipped)} non-encoder keys"
          + (f" (e.g. {', '.join(skipped[:3])})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
