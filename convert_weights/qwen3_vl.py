"""Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``) <-> x2sam_jax checkpoint.

    python -m convert_weights.qwen3_vl --src HF_DIR --dst DST [--add-x2sam-tokens] [--overwrite]
        [--position-mode mrope|sequential]
    python -m convert_weights.qwen3_vl --to-hf --src DST --dst HF_DIR [--overwrite]

HF -> JAX reads the (sharded) safetensors one tensor at a time, fills the abstract model's
parameters through one rule table (text rules here, vision rules from
``convert_weights.qwen3_vl_vision``), and writes DST atomically: ``config.json``, ``params/``
(Orbax), ``hf_config.json`` (the source config, for the export) and the tokenizer / processor
files. Any missing, unexpected or mis-shaped key fails the whole conversion with one error and
leaves no DST.

``--add-x2sam-tokens`` does what the official X2SAM code does at model build time:
``tokenizer.add_tokens(["<SEG>", "<p>", "</p>"], special_tokens=True)`` then
``resize_token_embeddings(len(tokenizer))`` (HF default ``mean_resizing=True``). For the hub
Qwen3-VL checkpoints len(tokenizer) (151669 + 3) is *smaller* than the padded embedding (151936),
so the matrices are truncated to len(tokenizer) rows and the new tokens reuse existing rows;
when the tokenizer outgrows the matrix, new rows are drawn like HF does (mean of the old rows
plus N(0, 1e-9·covariance), or the mean alone when that covariance is not positive definite).

JAX -> HF (``--to-hf``) merges LoRA (if any) into the base weights and writes safetensors +
config.json that ``Qwen3VLForConditionalGeneration.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from convert_weights.qwen3_vl_vision import VISION_SKIP, vision_rules
from flax import nnx

from x2sam_jax.cli import cli_errors
from x2sam_jax.config import Qwen3VLConfig, Qwen3VLVisionConfig
from x2sam_jax.conversion import (LINEAR, ConversionError, Rule, export_tensors, flatten, is_hf_export,
                                  iter_checkpoint, load_tensors, mark_hf_export, save_safetensors_sharded, unflatten)
from x2sam_jax.model_checkpoint import load_flat_params, read_config, write_config, write_params
from x2sam_jax.models.qwen3_vl import Qwen3VLModel
from x2sam_jax.storage.atomic import atomic_directory, read_json

X2SAM_TOKENS = ("<SEG>", "<p>", "</p>")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------
# Rule tables and configs
# ----------------------------------------------------------------------------------------------


def text_rules(prefix: str = "model.language_model.", target_prefix: str = "language_model.",
               tied: bool = True, lm_head_key: str = "lm_head.weight") -> list[Rule]:
    """HF Qwen3-VL text keys -> flat Qwen3TextModel paths (layers stacked on axis 0)."""
    p, t = prefix, target_prefix
    rules = [Rule(f"{p}embed_tokens.weight", f"{t}embed_tokens.embedding"),
             Rule(f"{p}norm.weight", f"{t}norm.weight")]
    layer, target = f"{p}layers.{{i}}.", f"{t}layers."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(Rule(f"{layer}self_attn.{name}.weight", f"{target}self_attn.{name}.kernel", LINEAR))
        rules.append(Rule(f"{layer}self_attn.{name}.bias", f"{target}self_attn.{name}.bias"))
    for name in ("q_norm", "k_norm"):
        rules.append(Rule(f"{layer}self_attn.{name}.weight", f"{target}self_attn.{name}.weight"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{layer}mlp.{name}.weight", f"{target}mlp.{name}.kernel", LINEAR))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"{layer}{name}.weight", f"{target}{name}.weight"))
    if not tied:
        rules.append(Rule(lm_head_key, "lm_head.kernel", LINEAR))
    return rules


def model_rules(config: Qwen3VLConfig) -> list[Rule]:
    rules = text_rules(tied=config.text.tie_word_embeddings)
    if config.vision is not None:
        rules += vision_rules("model.visual.", "visual.")
    return rules


def skip_patterns(config: Qwen3VLConfig) -> list[str]:
    # A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
    skip = [r"^lm_head\.weight$"] if config.text.tie_word_embeddings else []
    return skip + list(VISION_SKIP)


def config_from_hf(hf: dict, *, position_mode: str = "mrope", **text_overrides) -> Qwen3VLConfig:
    """``Qwen3VLConfig`` from an HF Qwen3-VL config.json dict (text fields may be overridden)."""
    config = Qwen3VLConfig.from_hf(hf, position_mode=position_mode)
    if text_overrides:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, **text_overrides))
    return config


def config_to_hf(config: Qwen3VLConfig) -> dict:
    """An HF config.json dict for ``config`` (used when no hf_config.json was kept)."""
    out = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
           "text_config": config.text.to_hf(), "tie_word_embeddings": config.text.tie_word_embeddings,
           "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
           "vision_start_token_id": config.vision_start_token_id,
           "vision_end_token_id": config.vision_end_token_id}
    if config.vision is not None:
        v = config.vision
        out["vision_config"] = {"model_type": "qwen3_vl_vision",
                                **{k: getattr(v, k) for k in Qwen3VLVisionConfig._HF_KEYS},
                                "deepstack_visual_indexes": list(v.deepstack_visual_indexes)}
    return out


# ----------------------------------------------------------------------------------------------
# Vocabulary resize (official X2SAM: resize_token_embeddings(len(tokenizer)))
# ----------------------------------------------------------------------------------------------


def resize_rows(matrix: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """HF ``_get_resized_embeddings`` with ``mean_resizing=True`` on a [V, D] matrix."""
    old = matrix.shape[0]
    if rows <= old:
        return matrix[:rows]
    weights = matrix.astype(np.float32)
    mean = weights.mean(0)
    centered = weights - mean
    covariance = centered.T @ centered / old
    added = rows - old
    try:
        chol = np.linalg.cholesky(1e-9 * covariance.astype(np.float64))
        new = mean + np.random.default_rng(seed).standard_normal((added, mean.size)) @ chol.T
    except np.linalg.LinAlgError:  # not positive definite: HF falls back to the mean
        new = np.broadcast_to(mean, (added, mean.size))
    return np.concatenate([matrix, new.astype(matrix.dtype)], axis=0)


def _resized(tensors, keys: set[str], rows: int | None):
    for key, value in tensors:
        if rows is not None and key in keys and value.shape[0] != rows:
            value = resize_rows(value, rows)
        yield key, value


# ----------------------------------------------------------------------------------------------
# HF -> JAX
# ----------------------------------------------------------------------------------------------


# Files of a directory that are never copied as side files: our own bookkeeping.
NOT_SIDE_FILES = {"checksums.json", "x2sam_jax_export.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
# --add-x2sam-tokens resizes the embedding to len(tokenizer) + 3 rows, as the official code does.
# Hub embeddings are padded only a little past their tokenizer (Qwen3-VL: 151669 -> 151936); a
# tokenizer under half the rows is not the model's own, and the resize would drop trained rows.
MIN_TOKENIZER_FRACTION = 0.5


def copy_side_files(src: Path, dst: Path, skip_names: set[str]) -> list[str]:
    """Copies tokenizer / processor / generation files (everything that is not weights)."""
    copied = []
    for path in sorted(src.iterdir()):
        if (not path.is_file() or path.name in skip_names or path.name in NOT_SIDE_FILES
                or path.name in WEIGHT_INDEXES or path.suffix in WEIGHT_SUFFIXES or path.name.startswith(".")):
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def load_tokenizer_with_x2sam_tokens(src: Path, vocab_size: int):
    """The source's own tokenizer with <SEG>, <p>, </p> added. Refuses a directory without
    tokenizer files (transformers would build an empty tokenizer there) and one far smaller than
    the embedding, whose resize would cut away the model's vocabulary."""
    from transformers import AutoTokenizer

    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(f"--add-x2sam-tokens: {src} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                              "copy the model's tokenizer next to its weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as error:  # noqa: BLE001 - report which directory holds a broken tokenizer
        raise ConversionError(f"--add-x2sam-tokens: cannot load the tokenizer of {src}: {error}") from None
    if len(tokenizer) < MIN_TOKENIZER_FRACTION * vocab_size:
        raise ConversionError(f"--add-x2sam-tokens: the tokenizer of {src} has {len(tokenizer)} tokens for an "
                              f"embedding of {vocab_size} rows (config.json); resizing to it would drop "
                              f"{vocab_size - len(tokenizer) - len(X2SAM_TOKENS)} trained rows. Is it the model's own tokenizer?")
    tokenizer.add_tokens(list(X2SAM_TOKENS), special_tokens=True)
    return tokenizer


def convert(src: str | Path, dst: str | Path, *, add_x2sam_tokens: bool = False, overwrite: bool = False,
            position_mode: str = "mrope", dtype: str = "float32") -> Path:
    """Converts an HF Qwen3-VL directory into an x2sam_jax checkpoint at ``dst``.

    ``dtype`` is the stored parameter dtype ("bfloat16" halves the size of a bf16 hub checkpoint's
    copy; ``x2sam_jax.load`` casts to the model's dtype on restore).
    """
    import ml_dtypes

    stored = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
    if dtype not in stored:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(stored)}")
    src, dst = Path(src), Path(dst)
    with atomic_directory(dst, overwrite, sources=[src]) as tmp:   # checks DST before reading
        config_file = src / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} not found: --src must be an HF Qwen3-VL directory")
        hf = read_json(config_file)
        try:
            config = config_from_hf(hf, position_mode=position_mode)
        except (TypeError, ValueError, KeyError) as error:
            raise ConversionError(f"{config_file}: not a valid Qwen3-VL config ({error!r})") from None

        tokenizer, added_ids = None, {}
        if add_x2sam_tokens:
            tokenizer = load_tokenizer_with_x2sam_tokens(src, config.text.vocab_size)
            added_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in X2SAM_TOKENS}
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=len(tokenizer)))
            hf = json.loads(json.dumps(hf))
            hf["text_config"]["vocab_size"] = len(tokenizer)

        abstract = nnx.eval_shape(lambda: Qwen3VLModel(config, rngs=nnx.Rngs(0)))
        flat = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Not(nnx.RngState))))
        targets = {k: (tuple(v.shape), stored[dtype] if np.issubdtype(np.dtype(v.dtype), np.floating) else np.dtype(v.dtype))
                   for k, v in flat.items()}

        tensors = iter_checkpoint(src)
        if add_x2sam_tokens:
            tensors = _resized(tensors, {"model.language_model.embed_tokens.weight", "lm_head.weight"},
                               config.text.vocab_size)
        try:
            from tqdm import tqdm

            tensors = tqdm(tensors, desc=f"converting {src.name}", unit=" tensors", leave=False)
        except ImportError:
            pass
        values, skipped = load_tensors(targets, tensors, model_rules(config), skip_patterns(config), source=str(src))

        write_params(tmp, unflatten(values))
        del values
        extra = {"source": str(src.absolute()), "skipped_source_keys": skipped}
        if added_ids:
            extra["x2sam_token_ids"] = added_ids
        write_config(tmp, config, extra)
        (tmp / "hf_config.json").write_text(json.dumps(hf, indent=2))
        copy_side_files(src, tmp, {"config.json"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return dst


# ----------------------------------------------------------------------------------------------
# JAX -> HF
# ----------------------------------------------------------------------------------------------


def merge_lora_flat(flat: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Folds ``X.lora_a`` / ``X.lora_b`` into ``X.kernel`` (kernel += scale·A·B) and drops them."""
    out = {k: v for k, v in flat.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in flat:
        if key.endswith(".lora_a"):
            base = key[: -len(".lora_a")]
            kernel = out[f"{base}.kernel"]
            delta = np.einsum("...ir,...ro->...io", flat[key].astype(np.float32),
                              flat[f"{base}.lora_b"].astype(np.float32))
            out[f"{base}.kernel"] = (kernel.astype(np.float32) + scale * delta).astype(kernel.dtype)
    return out


def export_to_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Writes an HF Qwen3-VL directory (config.json + safetensors + side files) from ``src``."""
    src, dst = Path(src), Path(dst)
    with atomic_directory(dst, overwrite, sources=[src], replaceable=is_hf_export,
                          what="an HF export of x2sam_jax") as tmp:
        config = read_config(src)
        if not isinstance(config, Qwen3VLConfig):
            raise ConversionError(f"{src}: holds a {type(config).__name__}, not a Qwen3VLConfig")
        flat = load_flat_params(src)
        if config.lora is not None:
            flat = merge_lora_flat(flat, config.lora.scale)
        tensors = export_tensors(flat, model_rules(config))
        hf_file = src / "hf_config.json"
        hf = read_json(hf_file) if hf_file.exists() else config_to_hf(config)
        hf["text_config"]["vocab_size"] = config.text.vocab_size
        save_safetensors_sharded(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        copy_side_files(src, tmp, {"config.json", "hf_config.json"})
        mark_hf_export(tmp, src)
    return dst


@cli_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert_weights.qwen3_vl", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="HF Qwen3-VL directory (or x2sam_jax checkpoint with --to-hf)")
    parser.add_argument("--dst", required=True, help="output directory (written atomically)")
    parser.add_argument("--add-x2sam-tokens", action="store_true", help="add <SEG>, <p>, </p> and resize embeddings")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--position-mode", choices=("mrope", "sequential"), default="mrope")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="stored parameter dtype (HF -> JAX)")
    parser.add_argument("--to-hf", action="store_true", help="export an x2sam_jax checkpoint back to HF")
    parser.add_argument("--max-shard-bytes", type=int, default=4 << 30, help="--to-hf: safetensors shard size")
    args = parser.parse_args(argv)
    if args.to_hf:
        out = export_to_hf(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=args.max_shard_bytes)
    else:
        out = convert(args.src, args.dst, add_x2sam_tokens=args.add_x2sam_tokens, overwrite=args.overwrite,
                      position_mode=args.position_mode, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
