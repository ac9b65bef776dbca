"""X2SAM converter: Qwen3-VL base + SAM2 base + official release -> one x2sam_jax checkpoint.

Fixtures come from one randomly initialised tiny X2SAM (every value rounded to bf16 so the bf16
release is exact): its ViT/LLM part exported through the Qwen3-VL HF exporter (with a different
vocabulary and a different merger, so the release must win), its encoder through the SAM2 HF
exporter (full Sam2Model layout, with prompt-encoder / SAM-memory keys that must be skipped), and
its trained subset written in the release layout (docs/architecture.md#released-checkpoint-layout)
as a bf16 pytorch_model.bin.
"""

from __future__ import annotations

import dataclasses
import copy
import json
import re

import numpy as np
import pytest

from _qwen3_vl_helpers import HUB_4B_CONFIG
from _x2sam_sources import MERGER_KEY, NECK_KEY, save_release as _save_release, write_x2sam_sources
from convert_weights import x2sam as conv
from x2sam_jax.conversion import ConversionError, flatten

# docs/architecture.md#released-checkpoint-layout, written out independently of the converter's
# rule tables.
DESIGN_LAYOUT = [
    r"segmentor\.encoder\.backbone\..+",
    r"segmentor\.encoder\.neck\.convs\.[0-3]\.(weight|bias)",
    r"segmentor\.pixel_decoder\.level_embed",
    r"segmentor\.pixel_decoder\.input_projections\.[0-2]\.[01]\.(weight|bias)",
    r"segmentor\.pixel_decoder\.encoder\.layers\.\d+\.(self_attn\.(sampling_offsets|attention_weights|value_proj|"
    r"output_proj)|self_attn_layer_norm|fc1|fc2|final_layer_norm)\.(weight|bias)",
    r"segmentor\.pixel_decoder\.mask_projection\.(weight|bias)",
    r"segmentor\.pixel_decoder\.(adapter_1|layer_1)\.[01]\.(weight|bias)",
    r"segmentor\.decoder\.(queries_embedder|queries_features|level_embed)\.weight",
    r"segmentor\.decoder\.decoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|self_attn_layer_norm|"
    r"cross_attn\.out_proj|cross_attn_layer_norm|text_cross_attn\.out_proj|text_cross_attn_layer_norm|fc1|fc2|"
    r"final_layer_norm)\.(weight|bias)",
    r"segmentor\.decoder\.decoder\.layers\.\d+\.(cross_attn|text_cross_attn)\.in_proj_(weight|bias)",
    r"segmentor\.decoder\.decoder\.layernorm\.(weight|bias)",
    r"segmentor\.decoder\.decoder\.mask_predictor\.mask_embedder\.[0-2]\.0\.(weight|bias)",
    r"segmentor\.class_predictor\.logit_scale", r"segmentor\.no_memory_embedding", r"bg_embeds\.weight",
    r"segmentor\.memory_encoder\.mask_downsampler\.layers\.[01]\.(conv|layer_norm)\.(weight|bias)",
    r"segmentor\.memory_encoder\.mask_downsampler\.final_conv\.(weight|bias)",
    r"segmentor\.memory_encoder\.memory_fuser\.layers\.[01]\.((depthwise_conv|layer_norm|pointwise_conv1|"
    r"pointwise_conv2)\.(weight|bias)|scale)",
    r"segmentor\.memory_encoder\.vision_downsampler\.[0-2]\..+",
    r"segmentor\.memory_encoder\.projection\.(weight|bias)",
    r"segmentor\.memory_attention\.layers\.\d+\.((self_attn|cross_attn)\.(q|k|v|o)_proj|linear1|linear2|"
    r"layer_norm[123])\.(weight|bias)",
    r"segmentor\.memory_attention\.layer_norm\.(weight|bias)",
    r"vlm\.base_model\.model\.model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
    r"mlp\.(gate|up|down)_proj)\.lora_[AB]\.default\.weight",
    r"vlm\.base_model\.model\.model\.visual\.merger\..+",
    r"vlm\.base_model\.model\.model\.visual\.deepstack_merger_list\.[0-2]\..+",
    r"vlm\.base_model\.model\.lm_head\.weight", r"vlm\.base_model\.model\.model\.language_model\.embed_tokens\.weight",
    r"(mlm_projector|extra_projector)\.model\.[02]\.(weight|bias)",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(config, expected flat params, base values, qwen dir, sam2 dir, release tensors)."""
    from x2sam_jax.config import x2sam_preset

    preset = x2sam_preset("tiny")
    vocab = preset.vlm.text.vocab_size
    config = dataclasses.replace(preset, seg_token_id=vocab - 3, p_start_token_id=vocab - 2, p_end_token_id=vocab - 1)
    expected, base, qwen_dir, sam2_dir, release = write_x2sam_sources(tmp_path_factory.mktemp("x2sam_sources"), config)
    return config, expected, base, qwen_dir, sam2_dir, release


def _convert(world, tmp_path, release=None, extra=(), name="out"):
    _, _, _, qwen_dir, sam2_dir, tensors = world
    release_path = _save_release(tensors if release is None else release, tmp_path / "pytorch_model.bin")
    dst = tmp_path / name
    rc = conv.main(["--qwen", str(qwen_dir), "--sam2", str(sam2_dir), "--release", str(release_path),
                    "--dst", str(dst), "--preset", "tiny", *extra])
    return rc, dst


def _loaded_flat(dst):
    from flax import nnx

    import x2sam_jax

    model = x2sam_jax.load(dst)
    flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))
    return model.config, {k: np.asarray(v) for k, v in flat.items()}


def _no_leftovers(dst) -> bool:
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]


def test_release_layout_is_design_section_8(world):
    """Every exported release key has a §8 name, every §8 family is present, shapes are torch's."""
    config, expected, _, _, _, release = world
    release = {k: v for k, v in release.items() if not k.startswith("segmentor.shared_image_embedding")}
    unmatched = [k for k in release if not any(re.fullmatch(p, k) for p in DESIGN_LAYOUT)]
    assert not unmatched, unmatched
    unused = [p for p in DESIGN_LAYOUT if not any(re.fullmatch(p, k) for k in release)]
    assert not unused, unused
    # nothing of the frozen bases is in the release
    assert not [k for k in release if k.startswith("vlm.") and (".visual.blocks." in k or (
        ".language_model.layers." in k and "lora_" not in k))]
    lora = "vlm.base_model.model.model.language_model.layers.1.mlp.down_proj.lora_"
    assert release[lora + "A.default.weight"].shape == (4, 128)              # [r, in]
    assert release[lora + "B.default.weight"].shape == (64, 4)               # [out, r]
    assert release["segmentor.decoder.decoder.layers.2.cross_attn.in_proj_weight"].shape == (96, 32)
    assert release["segmentor.memory_encoder.memory_fuser.layers.1.depthwise_conv.weight"].shape == (32, 1, 7, 7)
    assert release["bg_embeds.weight"].shape == (1, 32)
    assert release["vlm.base_model.model.lm_head.weight"].shape == (config.vlm.text.vocab_size, 64)
    # hand-written correspondences (torch layout <- JAX layout), independent of the rule tables
    conv2d = lambda k: k.transpose(3, 2, 0, 1)  # noqa: E731  [kh, kw, I, O] -> [O, I, kh, kw]
    mem, enc = "segmentor.memory.memory_attention.layers.", "segmentor.memory.memory_encoder."
    llm = "vlm.base_model.model.model.language_model.layers."
    pairs = {
        "segmentor.memory_attention.layers.0.cross_attn.k_proj.weight": expected[f"{mem}cross_attn.k_proj.kernel"][0].T,
        "segmentor.memory_attention.layers.0.self_attn.o_proj.bias": expected[f"{mem}self_attn.o_proj.bias"][0],
        "segmentor.memory_attention.layers.0.linear1.weight": expected[f"{mem}linear1.kernel"][0].T,
        "segmentor.memory_attention.layers.0.layer_norm2.weight": expected[f"{mem}layer_norm2.scale"][0],
        "segmentor.memory_attention.layer_norm.bias": expected["segmentor.memory.memory_attention.layer_norm.bias"],
        "segmentor.memory_encoder.memory_fuser.layers.1.depthwise_conv.weight":
            conv2d(expected[f"{enc}memory_fuser.layers.depthwise_conv.kernel"][1]),
        "segmentor.memory_encoder.memory_fuser.layers.1.pointwise_conv2.weight":
            expected[f"{enc}memory_fuser.layers.pointwise_conv2.kernel"][1].T,
        "segmentor.memory_encoder.memory_fuser.layers.0.scale": expected[f"{enc}memory_fuser.layers.scale"][0],
        "segmentor.memory_encoder.mask_downsampler.layers.1.conv.weight":
            conv2d(expected[f"{enc}mask_downsampler.layers.1.conv.kernel"]),
        "segmentor.memory_encoder.vision_downsampler.2.layers.1.layer_norm.weight":
            expected[f"{enc}vision_downsampler.2.layers.1.layer_norm.scale"],
        "segmentor.memory_encoder.vision_downsampler.1.final_conv.weight":
            conv2d(expected[f"{enc}vision_downsampler.1.final_conv.kernel"]),
        "segmentor.memory_encoder.projection.weight": conv2d(expected[f"{enc}projection.kernel"]),
        "segmentor.no_memory_embedding": expected["segmentor.memory.no_memory_embedding"],
        "segmentor.class_predictor.logit_scale": expected["segmentor.decoder.class_predictor.logit_scale"],
        "bg_embeds.weight": expected["segmentor.decoder.class_predictor.bg_embeds"],
        "mlm_projector.model.2.weight": expected["mlm_projector.fc2.kernel"].T,
        "extra_projector.model.0.bias": expected["extra_projector.fc1.bias"],
        f"{llm}1.self_attn.q_proj.lora_A.default.weight": expected["vlm.language_model.layers.self_attn.q_proj.lora_a"][1].T,
        f"{llm}0.mlp.up_proj.lora_B.default.weight": expected["vlm.language_model.layers.mlp.up_proj.lora_b"][0].T,
        "vlm.base_model.model.model.visual.deepstack_merger_list.1.norm.weight":
            expected["vlm.visual.deepstack_merger_list.1.norm.scale"],
        "vlm.base_model.model.model.language_model.embed_tokens.weight":
            expected["vlm.language_model.embed_tokens.embedding"],
    }
    for key, value in pairs.items():
        np.testing.assert_array_equal(release[key], value, err_msg=key)


def test_convert_keeps_lora_and_reproduces_every_parameter(world, tmp_path, capsys):
    config, expected, base, *_ = world
    rc, dst = _convert(world, tmp_path)
    assert rc == 0, capsys.readouterr().err
    loaded_config, flat = _loaded_flat(dst)
    assert loaded_config == config   # vocab from the release, <SEG>/<p>/</p> last rows, LoRA kept, sequential
    assert loaded_config.vlm.position_mode == "sequential" and loaded_config.vlm.lora.rank == 4
    assert set(flat) == set(expected)
    worst = max(float(np.abs(flat[k] - expected[k]).max()) for k in expected)
    assert worst == 0.0, worst
    # the release overrides the base: merger and encoder values differ by 1 in the bases
    assert float(np.abs(flat[MERGER_KEY] - base[MERGER_KEY]).min()) > 0.5
    assert float(np.abs(flat[NECK_KEY] - base[NECK_KEY]).min()) > 0.5
    meta = json.loads((dst / "config.json").read_text())
    assert "segmentor.shared_image_embedding.positional_embedding" in meta["skipped_source_keys"]
    assert "prompt_encoder.point_embed.weight" in meta["skipped_source_keys"]
    assert "vlm.base_model.model.lm_head.weight" in meta["skipped_source_keys"]   # tied: same as embed
    assert meta["base_keys_overridden_by_release"] > 0
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<SEG>", "<p>", "</p>")] == [
        config.seg_token_id, config.p_start_token_id, config.p_end_token_id]


def test_merge_lora_folds_scale_a_b_into_the_kernels(world, tmp_path):
    config, expected, *_ = world
    rc, dst = _convert(world, tmp_path, extra=["--merge-lora"])
    assert rc == 0
    loaded_config, flat = _loaded_flat(dst)
    assert loaded_config.vlm.lora is None
    assert not [k for k in flat if k.endswith((".lora_a", ".lora_b"))]
    scale = config.vlm.lora.scale
    lora_bases = {k[: -len(".lora_a")] for k in expected if k.endswith(".lora_a")}
    merged, worst = 0, 0.0
    for key in expected:
        if key.endswith((".lora_a", ".lora_b")):
            continue
        base = key[: -len(".kernel")]
        if key.endswith(".kernel") and base in lora_bases:
            want = expected[key] + scale * np.einsum("lir,lro->lio", expected[f"{base}.lora_a"].astype(np.float64),
                                                     expected[f"{base}.lora_b"].astype(np.float64))
            worst = max(worst, float(np.abs(flat[key] - want).max()))
            merged += 1
        else:
            np.testing.assert_array_equal(flat[key], expected[key], err_msg=key)
    assert merged == 7
    assert worst < 1e-5, worst


def test_release_without_the_encoder_falls_back_to_the_sam2_base(world, tmp_path):
    _, expected, base, *_, release = world
    partial = {k: v for k, v in release.items() if not k.startswith("segmentor.encoder.")}
    rc, dst = _convert(world, tmp_path, release=partial)
    assert rc == 0
    _, flat = _loaded_flat(dst)
    np.testing.assert_array_equal(flat[NECK_KEY], base[NECK_KEY])
    key = "segmentor.encoder.backbone.blocks.0.attn.qkv.kernel"
    np.testing.assert_array_equal(flat[key], expected[key])


@pytest.mark.parametrize("problem", ["missing", "unknown", "misshaped"])
def test_bad_release_key_fails_naming_it_and_leaves_no_dst(world, tmp_path, problem, capsys):
    release = dict(world[-1])
    if problem == "missing":
        key = "segmentor.decoder.level_embed.weight"
        del release[key]
    elif problem == "unknown":
        key = "segmentor.decoder.decoder.layers.0.extra_gate.weight"
        release[key] = np.zeros((4,), np.float32)
    else:
        key = "mlm_projector.model.0.weight"
        release[key] = np.zeros((31, 64), np.float32)
    rc, dst = _convert(world, tmp_path, release=release)
    err = capsys.readouterr().err
    assert rc == 1
    assert key in err, err
    assert {"missing": "missing keys", "unknown": "unexpected keys", "misshaped": "shape mismatches"}[problem] in err
    assert _no_leftovers(dst)


def test_tied_head_that_differs_from_the_embedding_is_an_error(world, tmp_path):
    _, _, _, qwen_dir, sam2_dir, release = world
    release = dict(release)
    release["vlm.base_model.model.lm_head.weight"] = release["vlm.base_model.model.lm_head.weight"] + 1.0
    path = _save_release(release, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        conv.convert(qwen_dir, sam2_dir, path, tmp_path / "out", preset="tiny")
    assert _no_leftovers(tmp_path / "out")


def test_to_release_round_trips_the_trained_subset(world, tmp_path):
    import torch

    rc, dst = _convert(world, tmp_path)
    assert rc == 0
    out = tmp_path / "exported.bin"
    assert conv.main(["--to-release", str(dst), "--dst", str(out)]) == 0
    assert conv.main(["--to-release", str(dst), "--dst", str(out)]) == 1   # exists: needs --overwrite
    exported = torch.load(str(out), weights_only=True)
    release = {k: v for k, v in world[-1].items() if not k.startswith("segmentor.shared_image_embedding")}
    assert set(exported) == set(release)
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    worst = max(float(np.abs(exported[k].float().numpy() - release[k]).max()) for k in release)
    assert worst == 0.0, worst


def test_full_model_release_in_peft_names_is_accepted(world, tmp_path):
    """A ZeRO-3 consolidated save holds every weight (``q_proj.base_layer.weight`` etc.): the
    bases then contribute nothing and the result is still the model."""
    from x2sam_jax.conversion import export_tensors

    config, expected, *_ = world
    full = export_tensors(expected, conv.release_rules(config))
    assert "vlm.base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight" in full
    assert "vlm.base_model.model.model.language_model.layers.0.input_layernorm.weight" in full
    _, _, _, qwen_dir, sam2_dir, _ = world
    dst = tmp_path / "out"
    summary = conv.convert(qwen_dir, sam2_dir, _save_release(full, tmp_path / "full.bin"), dst, preset="tiny")
    assert "model.language_model.embed_tokens.weight" in summary["overridden"]
    assert "model.language_model.layers.1.mlp.down_proj.weight" in summary["overridden"]
    assert "vision_encoder.backbone.blocks.0.attn.qkv.weight" in summary["overridden"]
    _, flat = _loaded_flat(dst)
    worst = max(float(np.abs(flat[k] - expected[k]).max()) for k in expected)
    assert worst == 0.0, worst


def test_config_of_the_released_checkpoint_is_the_x2sam_4b_preset():
    """Hub Qwen3-VL-4B config.json + SAM2.1 Hiera-L + 151672 release rows -> the x2sam_4b preset."""
    from x2sam_jax.config import hiera_preset, x2sam_preset

    hub = copy.deepcopy(HUB_4B_CONFIG)
    config = conv.build_config(hub, hiera_preset("large"), 151672, "x2sam_4b")
    assert config == x2sam_preset("x2sam_4b")
    assert (config.seg_token_id, config.p_start_token_id, config.p_end_token_id) == (151669, 151670, 151671)


def test_x2sam_4b_rules_cover_every_parameter_and_point_at_real_ones():
    """At the released size (shapes only): every parameter of x2sam_4b has a base or release rule,
    and every rule targets a parameter (except the optional Qwen attention biases)."""
    from convert_weights import sam2
    from x2sam_jax.config import x2sam_preset
    from x2sam_jax.conversion import template_regex

    config = x2sam_preset("x2sam_4b")
    targets = conv.target_shapes(config)
    assert targets["vlm.language_model.embed_tokens.embedding"][0] == (151672, 2560)
    rules = (conv.qwen_base_rules(config)[0] + conv._under(sam2.sam2_rules("vision_encoder."), "segmentor.encoder.")
             + conv.release_rules(config))
    regexes = [(rule, template_regex(rule.target)) for rule in rules]
    assert [p for p in targets if not any(rx.match(p) for _, rx in regexes)] == []
    dangling = {r.target for r, rx in regexes if not any(rx.match(p) for p in targets)}
    assert dangling == {f"vlm.language_model.layers.self_attn.{n}_proj.bias" for n in "qkvo"}
    # LoRA on all seven projections of all 36 layers, rank 128
    lora = [p for p in targets if p.endswith(".lora_a")]
    assert len(lora) == 7 and all(targets[p][0][:1] == (36,) and targets[p][0][-1] == 128 for p in lora)


# --- bad input: named, refused, nothing of the user's touched (issue 13) ------------------------

def test_integer_bool_and_nan_release_tensors_are_refused_naming_them(world, tmp_path, capsys):
    """Before: the int tensor was cast into the float parameter and the NaN passed."""
    release = dict(world[-1])
    release["mlm_projector.model.0.bias"] = np.arange(release["mlm_projector.model.0.bias"].size, dtype=np.int32)
    release["segmentor.no_memory_embedding"] = np.ones(release["segmentor.no_memory_embedding"].shape, bool)
    nan = release["extra_projector.model.2.weight"].copy()
    nan[0, 0] = np.nan
    release["extra_projector.model.2.weight"] = nan
    path = tmp_path / "pytorch_model.bin"
    import torch
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype != np.float32 else
                torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in release.items()}, str(path))
    _, _, _, qwen_dir, sam2_dir, _ = world
    dst = tmp_path / "out"
    assert conv.main(["--qwen", str(qwen_dir), "--sam2", str(sam2_dir), "--release", str(path), "--dst", str(dst),
                      "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"non-float tensors for float parameters:\n  mlm_projector\.model\.0\.bias: int32", err), err
    assert "segmentor.no_memory_embedding: bool" in err
    assert re.search(r"non-finite weights:\n  extra_projector\.model\.2\.weight: 1 of \d+ values", err), err
    assert _no_leftovers(dst)


def test_truncated_release_is_one_line_naming_it(world, tmp_path, capsys):
    path = _save_release(world[-1], tmp_path / "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _, _, _, qwen_dir, sam2_dir, _ = world
    dst = tmp_path / "out"
    assert conv.main(["--qwen", str(qwen_dir), "--sam2", str(sam2_dir), "--release", str(path), "--dst", str(dst),
                      "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cannot read it as a torch state dict") and err.count("\n") == 1, err
    assert _no_leftovers(dst)


def test_overwrite_refuses_a_source_and_a_file_that_is_not_a_torch_archive(world, tmp_path, capsys):
    _, _, _, qwen_dir, sam2_dir, release = world
    path = _save_release(release, tmp_path / "pytorch_model.bin")
    before = sorted(p.name for p in qwen_dir.iterdir())
    assert conv.main(["--qwen", str(qwen_dir), "--sam2", str(sam2_dir), "--release", str(path),
                      "--dst", str(qwen_dir), "--preset", "tiny", "--overwrite"]) == 1
    assert "is the source" in capsys.readouterr().err
    assert sorted(p.name for p in qwen_dir.iterdir()) == before
    rc, dst = _convert(world, tmp_path)
    assert rc == 0
    notes = tmp_path / "notes.bin"
    notes.write_text("not a checkpoint")
    assert conv.main(["--to-release", str(dst), "--dst", str(notes), "--overwrite"]) == 1
    assert "replaces only a torch .bin file" in capsys.readouterr().err
    assert notes.read_text() == "not a checkpoint"
