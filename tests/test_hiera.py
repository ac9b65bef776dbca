"""SAM2 Hiera encoder + FPN neck against transformers' Sam2VisionModel (weights copied in memory;
the checkpoint CLI path is tested in test_convert_sam2.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _sam2_helpers import TINY_A, TINY_B, hf_vision_model, max_abs, torch_fpn
from convert_weights.sam2 import config_from_hf, sam2_rules, target_shapes
from x2sam_jax.config import from_dict, hiera_preset, to_dict, HieraConfig
from x2sam_jax.conversion import export_tensors, load_tensors, unflatten
from x2sam_jax.models.hiera import Sam2VisionEncoder

from _tolerance import assert_equal_up_to_reordering

TOL = 1e-4  # float32, highest matmul precision; observed ~1e-5


def jax_from_torch(hf_model, **overrides):
    config = config_from_hf(hf_model.config.to_dict())
    config = dataclasses.replace(config, **overrides)
    tensors = ((k, v.detach().numpy()) for k, v in hf_model.state_dict().items())
    arrays, skipped = load_tensors(target_shapes(config), tensors, sam2_rules(prefix=""))
    assert skipped == []
    model = Sam2VisionEncoder(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, unflatten(arrays))
    nnx.update(model, params)
    return model


def run(model, pixels):
    return jax.jit(lambda m, x: m(x))(model, jnp.asarray(pixels))


@pytest.mark.parametrize("backbone,size,batch", [(TINY_A, (128, 96), 2), (TINY_B, (224, 224), 1)])
def test_matches_transformers(backbone, size, batch):
    hf = hf_vision_model(backbone, seed=1)
    pixels = np.random.default_rng(0).standard_normal((batch, *size, 3)).astype(np.float32)
    fpn, pos, trunk = torch_fpn(hf, pixels)
    out = run(jax_from_torch(hf), pixels)
    assert len(out.fpn_hidden_states) == 3 and len(out.trunk_hidden_states) == 4
    for level, (got, want) in enumerate(zip(out.fpn_hidden_states, fpn)):
        assert got.shape == want.shape, level
        assert max_abs(got, want) <= TOL, (level, max_abs(got, want))
    for got, want in zip(out.fpn_position_encoding, pos):
        assert got.shape == want.shape and max_abs(got, want) <= 1e-5
    for got, want in zip(out.trunk_hidden_states, trunk):
        assert got.shape == want.shape and max_abs(got, want) <= TOL
    # Strides 4/8/16 of the input, highest resolution first.
    assert [o.shape[1:3] for o in out.fpn_hidden_states] == [(size[0] // s, size[1] // s) for s in (4, 8, 16)]


def test_feature_levels_and_top_down_variants():
    """Other neck settings: 2 levels returned, top-down fusion into levels 1-3."""
    hf = hf_vision_model(TINY_A, seed=2, num_feature_levels=2, fpn_top_down_levels=[1, 2, 3])
    pixels = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    fpn, _, _ = torch_fpn(hf, pixels)
    out = run(jax_from_torch(hf), pixels)
    assert len(out.fpn_hidden_states) == 2
    for got, want in zip(out.fpn_hidden_states, fpn):
        assert max_abs(got, want) <= TOL


@pytest.mark.parametrize("implementation", ["query_chunked", "xla"])
def test_each_attention_form_matches_transformers(implementation):
    """The shared attention's CPU forms (x2sam_jax.layers.attention), each forced on."""
    rng = np.random.default_rng(5)
    hf = hf_vision_model(TINY_A, seed=7)
    pixels = rng.standard_normal((1, 256, 256, 3)).astype(np.float32)
    fpn, _, _ = torch_fpn(hf, pixels)
    out = run(jax_from_torch(hf, attention_implementation=implementation), pixels)
    for got, want in zip(out.fpn_hidden_states, fpn):
        assert max_abs(got, want) <= TOL


def test_scanned_blocks_equal_unrolled():
    hf = hf_vision_model(TINY_B, seed=3)
    pixels = np.random.default_rng(2).standard_normal((2, 128, 128, 3)).astype(np.float32)
    plain = run(jax_from_torch(hf), pixels)
    scanned_model = jax_from_torch(hf, scan_layers=True, remat_policy="full")
    assert any(len(r) > 1 for r in scanned_model.backbone._runs())  # something is actually scanned
    scanned = run(scanned_model, pixels)
    for a, b in zip(plain.fpn_hidden_states + plain.trunk_hidden_states,
                    scanned.fpn_hidden_states + scanned.trunk_hidden_states):
        assert_equal_up_to_reordering(b, a, what="scanned")  # same math; XLA fuses the scanned body differently


def test_bfloat16_compute_close_to_float32():
    hf = hf_vision_model(TINY_A, seed=4)
    pixels = np.random.default_rng(3).standard_normal((1, 64, 64, 3)).astype(np.float32)
    ref = run(jax_from_torch(hf), pixels)
    out = run(jax_from_torch(hf, dtype="bfloat16"), pixels)
    for a, b in zip(out.fpn_hidden_states, ref.fpn_hidden_states):
        assert a.dtype == jnp.bfloat16
        scale = float(np.abs(np.asarray(b)).max())
        assert max_abs(a, b) <= 0.05 * scale, (max_abs(a, b), scale)


def test_presets_match_transformers_parameter_shapes():
    """Each preset, exported to a transformers config, has exactly transformers' parameter shapes."""
    import torch
    from transformers import Sam2VisionModel

    from convert_weights.sam2 import hf_vision_config

    for name in ("tiny", "small", "base_plus", "large"):
        config = hiera_preset(name)
        assert from_dict(HieraConfig, to_dict(config)) == config
        assert config_from_hf(hf_vision_config(config).to_dict()) == config
        with torch.device("meta"):
            hf = Sam2VisionModel(hf_vision_config(config))
        want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        # Export zero-stride placeholders of our shapes through the table: HF keys and layouts.
        placeholders = {path: np.broadcast_to(np.zeros((), np.int8), shape)
                        for path, (shape, _) in target_shapes(config).items()}
        got = {k: tuple(v.shape) for k, v in export_tensors(placeholders, sam2_rules(prefix="")).items()}
        assert got == want, name
    # Hub numbers spelled out for the released sizes.
    large = target_shapes(hiera_preset("large"))
    assert large["backbone.pos_embed"][0] == (7, 7, 144)
    assert large["backbone.pos_embed_window"][0] == (8, 8, 144)
    assert large["neck.convs.1.kernel"][0] == (1, 1, 576, 256)
    assert len([k for k in large if k.endswith("attn.qkv.kernel")]) == 48
    assert target_shapes(hiera_preset("base_plus"))["backbone.pos_embed"][0] == (14, 14, 112)


def test_bad_inputs_are_named():
    config = HieraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_A.items()},
                         fpn_hidden_size=32)
    model = nnx.eval_shape(lambda: Sam2VisionEncoder(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="multiple of 32"):
        model(jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match="embed_dim_per_stage"):
        Sam2VisionEncoder(HieraConfig(embed_dim_per_stage=(96, 192, 384)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown SAM2 Hiera preset"):
        hiera_preset("huge")
