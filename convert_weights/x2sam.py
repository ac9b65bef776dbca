"""Build a full X2SAM checkpoint from its two base models plus the official release, and back.

    python -m convert_weights.x2sam --qwen Qwen3-VL-4B-Instruct/ --sam2 sam2.1-hiera-large/ \\
        --release x2sam_qwen3_vl_4b_sam2.1_hiera_large_m2f_e1_gpu32_lora/pytorch_model.bin \\
        --dst ckpt/x2sam_4b [--merge-lora] [--overwrite] [--preset x2sam_4b] [--dtype float32]
    python -m convert_weights.x2sam --to-release ckpt/x2sam_4b --dst pytorch_model.bin

Sources, in the order they are read (docs/architecture.md#released-checkpoint-layout):
  --qwen     HF Qwen3-VL directory (config.json + sharded safetensors): ViT, LLM base weights.
  --sam2     SAM2/SAM2.1 HF directory or official ``sam2.1_hiera_*.pt`` (with --sam2-variant):
             the Hiera + FPN mask encoder (prompt encoder, SAM mask decoder and SAM memory are
             skipped: X2SAM re-initialises its own head).
  --release  the official ``pytorch_model.bin`` (bf16, only the trained subset: LoRA, ViT mergers,
             resized embed_tokens / lm_head, the whole segmentor, projectors, bg_embeds). Every
             parameter it holds overrides the base value; the base rows of embed_tokens are never
             used (the release carries the resized vocabulary).

Architecture: the Qwen part from the Qwen config.json, the mask encoder from the SAM2 config (or
variant), the head (pixel decoder, mask decoder, memory, LoRA rank/alpha) from ``--preset``;
vocabulary size = the release's embed_tokens rows; ``<SEG>``, ``<p>``, ``</p>`` are its last three
rows (the official code appends them to the tokenizer and resizes to len(tokenizer));
position_mode="sequential" (what the released weights were trained with).

Strict and atomic: one ConversionError names every missing, unexpected and mis-shaped key, and a
failed conversion leaves no DST behind. Tensors are read one at a time (safetensors / mmapped
torch file), so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from convert_weights.lora import peft_lora_rules
from convert_weights.mask_decoder import mask_decoder_rules
from convert_weights.pixel_decoder import pixel_decoder_rules
from flax import nnx

from x2sam_jax.cli import cli_errors
from x2sam_jax.config import X2SAMConfig, with_run_settings, x2sam_preset
from x2sam_jax.conversion import (CONV2D, LINEAR, ConversionError, Rule, export_tensors, fill_template, flatten,
                                  iter_checkpoint, iter_safetensors, load_tensors, load_torch_file, safetensors_files,
                                  template_regex, torch_to_numpy, unflatten)
from x2sam_jax.model_checkpoint import abstract_model, load_flat_params, read_config, write_config, write_params
from x2sam_jax.storage.atomic import atomic_directory, atomic_file, read_json

# Key prefixes of the release (the official X2SAM module tree wrapped by PEFT).
VLM = "vlm.base_model.model."
RELEASE_LLM = f"{VLM}model.language_model."
RELEASE_VISUAL = f"{VLM}model.visual."
RELEASE_LM_HEAD = f"{VLM}lm_head.weight"
RELEASE_EMBED = f"{RELEASE_LLM}embed_tokens.weight"

# Release keys that are known and deliberately not converted: SAM2's random-Fourier table of the
# (unused) prompt encoder is a persistent buffer of the official segmentor; the Mask2Former loss
# and the region sampler have no weights but are listed in case a variant registers buffers.
RELEASE_SKIP = (r"segmentor\.shared_image_embedding\.", r"segmentor\.criterion\.", r"vision_sampler\.")


# ----------------------------------------------------------------------------------------------
# Rule tables (target paths are flat X2SAM parameter paths)
# ----------------------------------------------------------------------------------------------


def _under(rules: Iterable[Rule], target_prefix: str) -> list[Rule]:
    """The same rules with their targets placed under a parent attribute."""
    return [Rule(r.source, target_prefix + r.target, r.transform) for r in rules]


def _linear(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}.kernel", LINEAR), Rule(f"{source}.bias", f"{target}.bias")]


def _norm(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}.scale"), Rule(f"{source}.bias", f"{target}.bias")]


def _conv(source: str, target: str) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}.kernel", CONV2D), Rule(f"{source}.bias", f"{target}.bias")]


def memory_rules(source: str = "segmentor.", target: str = "segmentor.memory.") -> list[Rule]:
    """Official (HF-style SAM2, modified by X2SAM) memory keys -> :class:`MaskMemory` paths."""
    attn, enc = f"{source}memory_attention.", f"{source}memory_encoder."
    tattn, tenc = f"{target}memory_attention.", f"{target}memory_encoder."
    rules = [Rule(f"{source}no_memory_embedding", f"{target}no_memory_embedding")]
    # memory attention: layers stacked on a leading axis ({i} only in the source)
    for block in ("self_attn", "cross_attn"):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += _linear(f"{attn}layers.{{i}}.{block}.{proj}", f"{tattn}layers.{block}.{proj}")
    for name in ("linear1", "linear2"):
        rules += _linear(f"{attn}layers.{{i}}.{name}", f"{tattn}layers.{name}")
    for name in ("layer_norm1", "layer_norm2", "layer_norm3"):
        rules += _norm(f"{attn}layers.{{i}}.{name}", f"{tattn}layers.{name}")
    rules += _norm(f"{attn}layer_norm", f"{tattn}layer_norm")
    # memory encoder: mask downsampler, ConvNeXt fuser (stacked), per-scale vision downsamplers
    rules += _conv(f"{enc}mask_downsampler.layers.{{j}}.conv", f"{tenc}mask_downsampler.layers.{{j}}.conv")
    rules += _norm(f"{enc}mask_downsampler.layers.{{j}}.layer_norm", f"{tenc}mask_downsampler.layers.{{j}}.layer_norm")
    rules += _conv(f"{enc}mask_downsampler.final_conv", f"{tenc}mask_downsampler.final_conv")
    fuser, tfuser = f"{enc}memory_fuser.layers.{{i}}.", f"{tenc}memory_fuser.layers."
    rules += _conv(f"{fuser}depthwise_conv", f"{tfuser}depthwise_conv")   # [C, 1, 7, 7] -> [7, 7, 1, C]
    rules += _norm(f"{fuser}layer_norm", f"{tfuser}layer_norm")
    rules += _linear(f"{fuser}pointwise_conv1", f"{tfuser}pointwise_conv1")
    rules += _linear(f"{fuser}pointwise_conv2", f"{tfuser}pointwise_conv2")
    rules.append(Rule(f"{fuser}scale", f"{tfuser}scale"))
    down, tdown = f"{enc}vision_downsampler.{{k}}.", f"{tenc}vision_downsampler.{{k}}."
    rules += _conv(f"{down}layers.{{j}}.conv", f"{tdown}layers.{{j}}.conv")
    rules += _norm(f"{down}layers.{{j}}.layer_norm", f"{tdown}layers.{{j}}.layer_norm")
    rules += _conv(f"{down}final_conv", f"{tdown}final_conv")
    rules += _conv(f"{enc}projection", f"{tenc}projection")
    return rules


def projector_rules() -> list[Rule]:
    """``{mlm,extra}_projector.model.{0,2}`` (torch Sequential; 1 is the GELU) -> ``fc1`` / ``fc2``."""
    rules = []
    for name in ("mlm_projector", "extra_projector"):
        rules += _linear(f"{name}.model.0", f"{name}.fc1") + _linear(f"{name}.model.2", f"{name}.fc2")
    return rules


def vlm_release_rules(config: X2SAMConfig) -> list[Rule]:
    """The Qwen3-VL part of the release: LoRA, resized embeddings, lm_head, the ViT (mergers trained).

    The LLM base weights are accepted too, under PEFT's names (``q_proj.base_layer.weight`` for
    wrapped linears): a ZeRO-3 consolidated save holds the whole model, not only the trained subset.
    """
    from convert_weights.qwen3_vl import text_rules
    from convert_weights.qwen3_vl_vision import vision_rules

    rules = [Rule(RELEASE_EMBED, "vlm.language_model.embed_tokens.embedding")]
    text = _under(text_rules(RELEASE_LLM, "language_model.", tied=config.vlm.text.tie_word_embeddings,
                             lm_head_key=RELEASE_LM_HEAD), "vlm.")
    if config.vlm.lora is not None:
        lora = peft_lora_rules(f"{RELEASE_LLM}layers.{{i}}.", "vlm.language_model.layers.",
                               config.vlm.lora.target_modules)
        # The official saver keeps PEFT's adapter name ("default"); plain PEFT saves drop it.
        rules += lora + [Rule(r.source.replace(".default.weight", ".weight"), r.target, r.transform) for r in lora]
        wrapped = tuple(f".{name}.weight" for name in config.vlm.lora.target_modules)
        rules += [Rule(r.source[: -len(".weight")] + ".base_layer.weight", r.target, r.transform)
                  for r in text if r.source.endswith(wrapped)]
    rules += text
    if config.vlm.vision is not None:
        rules += vision_rules(RELEASE_VISUAL, "vlm.visual.")
    return rules


def segmentor_release_rules(config: X2SAMConfig) -> list[Rule]:
    """The segmentor, projectors and background embedding of the release."""
    from convert_weights.sam2 import sam2_rules

    rules = _under(sam2_rules("segmentor.encoder."), "segmentor.encoder.")
    rules += _under(pixel_decoder_rules(config.pixel_decoder, "segmentor.pixel_decoder."),
                    "segmentor.pixel_decoder.")
    rules += _under(mask_decoder_rules(config.mask_decoder, "segmentor.decoder.",
                                       class_predictor_prefix="segmentor.class_predictor.",
                                       bg_embeds_key="bg_embeds.weight"), "segmentor.decoder.")
    return rules + memory_rules() + projector_rules()


def release_rules(config: X2SAMConfig) -> list[Rule]:
    """Every release key the converter understands -> flat X2SAM path."""
    return vlm_release_rules(config) + segmentor_release_rules(config)


def qwen_base_rules(config: X2SAMConfig) -> tuple[list[Rule], list[str]]:
    """(rules, skip) for the HF Qwen3-VL base directory, targets under ``vlm.``."""
    from convert_weights.qwen3_vl import model_rules, skip_patterns

    return _under(model_rules(config.vlm), "vlm."), list(skip_patterns(config.vlm))


# ----------------------------------------------------------------------------------------------
# Reading the release
# ----------------------------------------------------------------------------------------------


class _Release:
    """The release state dict: keys and shapes up front (mmapped), tensors one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--release {self.path}: not a file (expected the official pytorch_model.bin)")
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(self.path), framework="pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
                raise ConversionError(f"{self.path}: cannot read it as safetensors ({error}); is it truncated?") from None
            self._state = None
        else:
            state = load_torch_file(self.path)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ConversionError(f"{self.path}: expected a state dict, found {type(state).__name__}")
            bad = [k for k, v in state.items() if not hasattr(v, "shape")]
            if bad:
                raise ConversionError(f"{self.path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            self._state = state

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        if self._state is None:
            yield from iter_checkpoint(self.path)
            return
        for key in list(self._state):
            yield key, torch_to_numpy(self._state.pop(key))

    def vocab_size(self) -> int:
        if RELEASE_EMBED not in self.shapes:
            raise ConversionError(f"{self.path}: missing key {RELEASE_EMBED} (the resized vocabulary; "
                                  "its row count sets the vocabulary size)")
        return int(self.shapes[RELEASE_EMBED][0])


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def build_config(qwen_hf: dict, mask_encoder, vocab_size: int, preset: str = "x2sam_4b") -> X2SAMConfig:
    """X2SAMConfig: Qwen part from its config.json, mask encoder given, head from ``preset``."""
    from convert_weights.qwen3_vl import config_from_hf

    base = x2sam_preset(preset)
    vlm = config_from_hf(qwen_hf, position_mode="sequential", vocab_size=vocab_size)
    vlm = dataclasses.replace(vlm, lora=base.vlm.lora)
    fpn = mask_encoder.fpn_hidden_size
    config = dataclasses.replace(
        base, vlm=vlm, mask_encoder=mask_encoder,
        pixel_decoder=dataclasses.replace(base.pixel_decoder, feature_channels=(fpn,) * 3),
        projector=dataclasses.replace(base.projector, llm_hidden_size=vlm.text.hidden_size,
                                      mask_encoder_channels=mask_encoder.embed_dim_per_stage[2]),
        # <SEG>, <p>, </p> are appended to the tokenizer, so they are the last three rows
        seg_token_id=vocab_size - 3, p_start_token_id=vocab_size - 2, p_end_token_id=vocab_size - 1)
    return with_run_settings(config, base)  # the preset's scan/remat/attention settings


def target_shapes(config: X2SAMConfig, dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat parameter path -> (shape, stored dtype) of the X2SAM model built from ``config``."""
    import ml_dtypes

    stored = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
    if dtype not in stored:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(stored)}")
    flat = flatten(nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Not(nnx.RngState))))
    return {k: (tuple(v.shape), stored[dtype] if np.issubdtype(np.dtype(v.dtype), np.floating) else np.dtype(v.dtype))
            for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


class _Resolver:
    """Source key -> (target path, stacked index) through a rule table (first match wins)."""

    def __init__(self, rules: Sequence[Rule]):
        self._compiled = [(rule, template_regex(rule.source)) for rule in rules]

    def __call__(self, key: str):
        for rule, regex in self._compiled:
            if m := regex.match(key):
                values = {k: int(v) for k, v in m.groupdict().items()}
                return fill_template(rule.target, values), tuple(values[n] for n in rule.stacked)
        return None


def _qwen_tensors(src: Path, keep) -> Iterator[tuple[str, np.ndarray]]:
    """The Qwen base's safetensors, reading only the tensors ``keep(key)`` accepts (the base
    embed_tokens the release replaces is never loaded)."""
    return iter_safetensors(safetensors_files(src), keep)


def _without_overridden(tensors, resolve: _Resolver, covered: set, overridden: list[str]):
    """Drops base tensors whose parameter slot the release provides (the release wins)."""
    for key, value in tensors:
        if _is_overridden(key, resolve, covered, overridden):
            continue
        yield key, value


def _is_overridden(key: str, resolve: _Resolver, covered: set, overridden: list[str]) -> bool:
    slot = resolve(key)
    if slot is not None and slot in covered:
        overridden.append(key)
        return True
    return False


class _TiedHeadCheck:
    """With tied embeddings the release still lists lm_head (the same tensor as embed_tokens);
    it is skipped, after checking that it really equals the embedding."""

    def __init__(self, tensors):
        self.tensors, self.arrays = tensors, {}

    def __iter__(self):
        for key, value in self.tensors:
            if key in (RELEASE_EMBED, RELEASE_LM_HEAD):
                self.arrays[key] = value
            yield key, value

    def verify(self, source: Path) -> None:
        head, embed = self.arrays.get(RELEASE_LM_HEAD), self.arrays.get(RELEASE_EMBED)
        if head is not None and embed is not None and not (
                head.shape == embed.shape and np.array_equal(np.asarray(head, np.float32), np.asarray(embed, np.float32))):
            raise ConversionError(f"{source}: {RELEASE_LM_HEAD} differs from {RELEASE_EMBED}, but the Qwen "
                                  "config ties the embeddings (tie_word_embeddings=true)")


def merge_lora_in_place(values: dict[str, np.ndarray], scale: float) -> None:
    """kernel += scale * A @ B for every ``X.lora_a`` / ``X.lora_b`` pair, which are removed.

    Works layer by layer on the stacked arrays so the extra memory is one layer's kernel, not a
    second copy of the LLM.
    """
    for key in [k for k in values if k.endswith(".lora_a")]:
        base = key[: -len(".lora_a")]
        lora_a, lora_b = values.pop(key), values.pop(f"{base}.lora_b")
        kernel = values[f"{base}.kernel"]
        if not kernel.flags.writeable:
            kernel = values[f"{base}.kernel"] = np.array(kernel)
        for index in np.ndindex(*lora_a.shape[:-2]):   # the stacked layer axes
            delta = np.asarray(lora_a[index], np.float32) @ np.asarray(lora_b[index], np.float32)
            kernel[index] = (np.asarray(kernel[index], np.float32) + scale * delta).astype(kernel.dtype)


def _progress(tensors, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return tensors
    return tqdm(tensors, desc=desc, unit=" tensors", leave=False)


def convert(qwen: str | Path, sam2: str | Path, release: str | Path, dst: str | Path, *, preset: str = "x2sam_4b",
            sam2_variant: str | None = None, merge_lora: bool = False, overwrite: bool = False,
            dtype: str = "float32") -> dict:
    """Converts Qwen3-VL base + SAM2 base + X2SAM release into an x2sam_jax checkpoint at ``dst``.

    Returns a summary: {"skipped": [source keys], "overridden": [base keys the release replaced],
    "config": X2SAMConfig}.
    """
    qwen, sam2, release, dst = Path(qwen), Path(sam2), Path(release), Path(dst)
    with atomic_directory(dst, overwrite, sources=[qwen, sam2, release]) as tmp:   # checks DST before reading
        summary = _convert_into(tmp, qwen, sam2, release, preset=preset, sam2_variant=sam2_variant,
                                merge_lora=merge_lora, dtype=dtype)
    return summary


def _convert_into(tmp: Path, qwen: Path, sam2: Path, release: Path, *, preset: str, sam2_variant: str | None,
                  merge_lora: bool, dtype: str) -> dict:
    from convert_weights import sam2 as sam2_converter
    from convert_weights.qwen3_vl import copy_side_files

    qwen_config_file = qwen / "config.json"
    if not qwen_config_file.exists():
        raise FileNotFoundError(f"{qwen_config_file} not found: --qwen must be an HF Qwen3-VL directory")
    qwen_hf = read_json(qwen_config_file)
    sam2_config, sam2_tensors, sam2_rules_, sam2_skip = sam2_converter.read_source(sam2, sam2_variant)
    source = _Release(release)
    try:
        config = build_config(qwen_hf, sam2_config, source.vocab_size(), preset)
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"cannot build the X2SAM config from {qwen_config_file}, {sam2} and preset "
                              f"{preset!r}: {error}") from None

    targets = target_shapes(config, dtype)
    qwen_rules, qwen_skip = qwen_base_rules(config)
    base_rules = qwen_rules + _under(sam2_rules_, "segmentor.encoder.")
    release_table = release_rules(config)
    tied = config.vlm.text.tie_word_embeddings
    skip = qwen_skip + list(sam2_skip) + list(RELEASE_SKIP) + ([f"^{re.escape(RELEASE_LM_HEAD)}$"] if tied else [])

    # Which parameter slots the release fills (from its keys alone): the base values are dropped.
    release_resolve = _Resolver(release_table)
    covered = {slot for key in source.shapes if (slot := release_resolve(key)) is not None}
    overridden: list[str] = []
    base_resolve = _Resolver(base_rules)
    qwen_tensors = _qwen_tensors(qwen, lambda key: not _is_overridden(key, base_resolve, covered, overridden))
    base = itertools.chain(qwen_tensors, _without_overridden(sam2_tensors, base_resolve, covered, overridden))
    head_check = _TiedHeadCheck(source.tensors())
    stream = itertools.chain(base, head_check)
    values, skipped = load_tensors(targets, _progress(stream, "converting X2SAM"), base_rules + release_table, skip,
                                   source=f"sources --qwen {qwen}, --sam2 {sam2}, --release {release}")
    if tied:
        head_check.verify(release)
    del head_check

    if merge_lora:
        if config.vlm.lora is None:
            raise ConversionError("--merge-lora: the preset has no LoRA to merge")
        merge_lora_in_place(values, config.vlm.lora.scale)
        config = dataclasses.replace(config, vlm=dataclasses.replace(config.vlm, lora=None))
        expected = set(target_shapes(config, dtype))
        if set(values) != expected:  # the merged layout must be exactly the LoRA-free model's
            raise ConversionError(f"--merge-lora: merged parameters do not match the model without LoRA: "
                                  f"extra {sorted(set(values) - expected)[:5]}, missing {sorted(expected - set(values))[:5]}")

    write_params(tmp, unflatten(values))
    del values
    extra = {"sources": {"qwen": str(qwen.absolute()), "sam2": str(sam2.absolute()),
                         "release": str(release.absolute())},
             "lora_merged": merge_lora, "skipped_source_keys": skipped,
             "base_keys_overridden_by_release": len(overridden)}
    write_config(tmp, config, extra)
    (tmp / "hf_config.json").write_text(json.dumps(qwen_hf, indent=2))
    copy_side_files(qwen, tmp, {"config.json"})  # tokenizer / processor files of the base
    _add_x2sam_tokens(qwen, tmp, config)
    return {"skipped": skipped, "overridden": overridden, "config": config}


def _add_x2sam_tokens(qwen: Path, dst: Path, config) -> None:
    """Saves the base tokenizer with <SEG>, <p>, </p> appended, as the official code builds it;
    their ids must be the ones the converted embedding rows were trained for."""
    if not (qwen / "tokenizer_config.json").exists():
        return  # a weights-only base directory: nothing to extend
    from transformers import AutoTokenizer

    from convert_weights.qwen3_vl import X2SAM_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(str(qwen))
    tokenizer.add_tokens(list(X2SAM_TOKENS), special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in X2SAM_TOKENS]
    expected = [config.seg_token_id, config.p_start_token_id, config.p_end_token_id]
    if ids != expected:
        raise ConversionError(f"{qwen}: the tokenizer gives {dict(zip(X2SAM_TOKENS, ids))} to the X2SAM tokens, "
                              f"but the release's embedding rows put them at {expected}")
    tokenizer.save_pretrained(str(dst))


# ----------------------------------------------------------------------------------------------
# Back to the release layout
# ----------------------------------------------------------------------------------------------


def is_release_parameter(path: str) -> bool:
    """Whether ``path`` belongs to the trained subset the official code saves
    (docs/architecture.md#released-checkpoint-layout)."""
    return (path.startswith(("segmentor.", "mlm_projector.", "extra_projector.", "vlm.lm_head."))
            or path.endswith((".lora_a", ".lora_b"))
            or path.startswith(("vlm.visual.merger.", "vlm.visual.deepstack_merger_list."))
            or path == "vlm.language_model.embed_tokens.embedding")


def release_tensors(flat: dict[str, np.ndarray], config: X2SAMConfig) -> dict[str, np.ndarray]:
    """Flat X2SAM parameters -> the release's {key: torch-layout array} (trained subset only)."""
    if config.vlm.lora is None:
        raise ConversionError("the checkpoint has no LoRA weights (merged?): the release layout needs them")
    subset = {k: v for k, v in flat.items() if is_release_parameter(k)}
    out = export_tensors(subset, release_rules(config))
    if config.vlm.text.tie_word_embeddings:  # torch saves the tied head under its own name too
        out[RELEASE_LM_HEAD] = out[RELEASE_EMBED]
    return out


def export_release(src: str | Path, dst: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Writes an x2sam_jax X2SAM checkpoint as an official-style ``pytorch_model.bin``."""
    import torch

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: expected 'bfloat16' or 'float32'")
    src, dst = Path(src), Path(dst)
    # --overwrite replaces a torch zip archive (an earlier export), never any other file
    with atomic_file(dst, overwrite, sources=[src], replaceable=zipfile.is_zipfile, what="a torch .bin file") as tmp:
        config = read_config(src)
        if not isinstance(config, X2SAMConfig):
            raise ConversionError(f"{src}: holds a {type(config).__name__}, not an X2SAMConfig")
        tensors = release_tensors(load_flat_params(src), config)
        torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        state = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(torch_dtype) for k, v in tensors.items()}
        torch.save(state, str(tmp))
    return dst


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert_weights.x2sam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen", help="HF Qwen3-VL base directory")
    parser.add_argument("--sam2", help="SAM2/SAM2.1 base: HF directory or official .pt")
    parser.add_argument("--sam2-variant", choices=("tiny", "small", "base_plus", "large"),
                        help="architecture of an official SAM2 .pt file")
    parser.add_argument("--release", help="official X2SAM pytorch_model.bin (applied on top of the bases)")
    parser.add_argument("--dst", required=True, help="output checkpoint directory (or .bin with --to-release)")
    parser.add_argument("--preset", default="x2sam_4b", help="X2SAM preset giving the head architecture")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base kernels (W += (alpha/r) B A)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="stored parameter dtype of the converted checkpoint")
    parser.add_argument("--release-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="--to-release: dtype of the written tensors (the official release is bf16)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--to-release", metavar="SRC", help="export an x2sam_jax X2SAM checkpoint to the release layout")
    args = parser.parse_args(argv)
    if args.to_release:
        out = export_release(args.to_release, args.dst, dtype=args.release_dtype, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    missing = [f"--{n}" for n in ("qwen", "sam2", "release") if getattr(args, n) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}")
    summary = convert(args.qwen, args.sam2, args.release, args.dst, preset=args.preset,
                      sam2_variant=args.sam2_variant, merge_lora=args.merge_lora, overwrite=args.overwrite,
                      dtype=args.dtype)
    skipped = summary["skipped"]
    print(f"wrote {args.dst}; {len(summary['overridden'])} base tensors replaced by the release; "
          f"skipped {len(skipped)} known-unused keys" + (f" (e.g. {', '.join(skipped[:3])})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
