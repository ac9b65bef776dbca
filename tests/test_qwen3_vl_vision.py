"""Qwen3-VL vision encoder: parity with transformers' Qwen3VLVisionModel (weights moved through
the real rule table), jit with traced grid_thw, padding, scanned == unscanned, config/presets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights.qwen3_vl_vision import VISION_SKIP, vision_rules
from x2sam_jax.config import Qwen3VLVisionConfig, from_dict, to_dict
from x2sam_jax.conversion import ConversionError, export_tensors, flatten, load_tensors, unflatten
from x2sam_jax.models.qwen3_vl_vision import Qwen3VLVisionModel

from _tolerance import assert_equal_up_to_reordering

transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4   # float32, highest matmul precision (tests/conftest.py)

HF_TINY = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, hidden_act="gelu_pytorch_tanh",
               patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=24,
               num_position_embeddings=64, deepstack_visual_indexes=[0, 2],
               initializer_range=0.15)  # large enough that outputs are O(1)


def _hf_model(seed: int = 0):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig as HFConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFModel

    torch.manual_seed(seed)
    hf_config = HFConfig(**HF_TINY)
    hf_config._attn_implementation = "eager"
    model = HFModel(hf_config).eval()
    # Random (not default-initialised) norms and biases, so a swapped scale/bias would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model, hf_config


def _converted(hf_model, hf_config, **overrides) -> Qwen3VLVisionModel:
    """A JAX model filled from the HF state dict, as a Qwen3VLForConditionalGeneration would store it."""
    config = Qwen3VLVisionConfig.from_hf(hf_config.to_dict(), **overrides)
    abstract = nnx.eval_shape(lambda: Qwen3VLVisionModel(config, rngs=nnx.Rngs(0)))
    targets = {k: (v.shape, v.dtype) for k, v in flatten(nnx.to_pure_dict(nnx.state(abstract))).items()}
    tensors = ((f"model.visual.{k}", v.detach().numpy()) for k, v in hf_model.state_dict().items())
    flat, skipped = load_tensors(targets, tensors, vision_rules(), VISION_SKIP)
    assert skipped == []
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def pair():
    hf_model, hf_config = _hf_model()
    return hf_model, _converted(hf_model, hf_config), hf_config


def _patches(grid_thw, seed=0):
    n = int(np.prod(np.asarray(grid_thw), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 4 * 4)).astype(np.float32)


def _hf_outputs(hf_model, pixel_values, grid_thw):
    with torch.no_grad():
        out = hf_model(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grid_thw))
    return out.pooler_output.numpy(), np.stack([d.numpy() for d in out.deepstack_features])


@nnx.jit
def _encode(model, pixel_values, grid_thw):
    return model(pixel_values, grid_thw)


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("grid_thw", [
    [[1, 6, 8]],                      # one image
    [[1, 4, 6], [1, 8, 4]],           # two images of different sizes in one call
    [[3, 4, 4], [1, 2, 2]],           # a video (3 temporal patches) and an image
    [[1, 12, 10]],                    # grid larger than the 8 x 8 position table (upsampling)
])
def test_parity_with_transformers(pair, grid_thw):
    hf_model, model, _ = pair
    pixel_values = _patches(grid_thw)
    ref_embeds, ref_deepstack = _hf_outputs(hf_model, pixel_values, grid_thw)
    embeds, deepstack = _encode(model, jnp.asarray(pixel_values), jnp.asarray(grid_thw))
    assert embeds.shape == ref_embeds.shape and deepstack.shape == ref_deepstack.shape == (2,) + embeds.shape
    assert _max_abs(embeds, ref_embeds) <= PARITY_TOL
    assert _max_abs(deepstack, ref_deepstack) <= PARITY_TOL


def test_parity_on_image_processor_output(pair):
    """Rows exactly as the Qwen-VL image processor lays them out (two real images)."""
    hf_model, model, _ = pair
    processor = transformers.Qwen2VLImageProcessor(patch_size=4, temporal_patch_size=2, merge_size=2,
                                                   min_pixels=16 * 16, max_pixels=48 * 48)
    rng = np.random.default_rng(3)
    images = [(rng.random((40, 56, 3)) * 255).astype(np.uint8), (rng.random((30, 22, 3)) * 255).astype(np.uint8)]
    batch = processor(images=images, return_tensors="np")
    pixel_values, grid_thw = batch["pixel_values"].astype(np.float32), np.asarray(batch["image_grid_thw"])
    ref_embeds, ref_deepstack = _hf_outputs(hf_model, pixel_values, grid_thw.tolist())
    embeds, deepstack = _encode(model, jnp.asarray(pixel_values), jnp.asarray(grid_thw))
    assert _max_abs(embeds, ref_embeds) <= PARITY_TOL
    assert _max_abs(deepstack, ref_deepstack) <= PARITY_TOL


def test_jit_traced_grid_thw_compiles_once_and_padding_is_inert(pair):
    hf_model, model, _ = pair
    traces = []

    @nnx.jit
    def encode(m, pixel_values, grid_thw):
        traces.append(1)
        return m(pixel_values, grid_thw)

    n_static = 64
    grids = [[[1, 4, 8], [0, 0, 0]],              # 32 real patches, one padding grid row
             [[1, 4, 4], [1, 2, 6]]]              # 28 real patches, two images
    for seed, grid in enumerate(grids):
        real_grid = [g for g in grid if g[0]]
        real = _patches(real_grid, seed)
        padded = np.concatenate([real, 50.0 * np.ones((n_static - len(real), real.shape[1]), np.float32)])
        embeds, deepstack = encode(model, jnp.asarray(padded), jnp.asarray(grid, jnp.int32))
        ref_embeds, ref_deepstack = _hf_outputs(hf_model, real, real_grid)
        k = len(real) // 4
        assert _max_abs(embeds[:k], ref_embeds) <= PARITY_TOL
        assert _max_abs(deepstack[:, :k], ref_deepstack) <= PARITY_TOL
        # Padding rows come out as exact zeros.
        assert float(jnp.abs(embeds[k:]).max()) == 0.0 and float(jnp.abs(deepstack[:, k:]).max()) == 0.0
        # And padding does not change the real rows relative to the unpadded call.
        unpadded_embeds, _ = _encode(model, jnp.asarray(real), jnp.asarray(real_grid))
        assert _max_abs(embeds[:k], unpadded_embeds) <= 1e-5
    assert len(traces) == 1


def test_scanned_equals_unscanned_remat_and_query_chunks(pair):
    """Scan vs unrolled, a remat policy and chunked queries (20 does not divide N = 56) agree."""
    hf_model, _, hf_config = pair
    grid = [[2, 4, 4], [1, 4, 6]]
    pixel_values = jnp.asarray(_patches(grid, 7))
    outputs = {}
    for scan, remat, chunk in [(True, "none", 0), (False, "none", 0), (True, "full", 0), (True, "none", 20)]:
        model = _converted(hf_model, hf_config, scan_layers=scan, remat_policy=remat, attention_query_chunk=chunk)
        outputs[scan, remat, chunk] = _encode(model, pixel_values, jnp.asarray(grid))
    base = outputs[True, "none", 0]
    scale = float(jnp.abs(base[1]).max())
    assert scale > 1.0
    for key, out in outputs.items():  # different XLA fusions: equal up to float32 summation order
        assert_equal_up_to_reordering(out[0], base[0], what=f"tokens {key}")
        assert_equal_up_to_reordering(out[1], base[1], what=f"deepstack {key}")


def test_rule_table_round_trip_and_strict_errors(pair):
    hf_model, model, _ = pair
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()}
    exported = export_tensors(flat, vision_rules())
    original = {f"model.visual.{k}": v.numpy() for k, v in hf_model.state_dict().items()}
    assert sorted(exported) == sorted(original)
    assert max(_max_abs(exported[k], original[k]) for k in original) == 0.0

    targets = {k: (v.shape, v.dtype) for k, v in flat.items()}
    broken = dict(original)
    del broken["model.visual.blocks.1.attn.qkv.weight"]
    broken["model.visual.merger.linear_fc2.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ConversionError) as err:
        load_tensors(targets, broken.items(), vision_rules(), VISION_SKIP)
    message = str(err.value)
    assert "model.visual.blocks.1.attn.qkv.weight" in message and "model.visual.merger.linear_fc2.weight" in message


def test_config_from_hf_presets_and_round_trip():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig as HFConfig

    # The published 4B vision_config (Qwen/Qwen3-VL-4B-Instruct config.json).
    hub_4b = dict(depth=24, hidden_act="gelu_pytorch_tanh", hidden_size=1024, in_channels=3,
                  initializer_range=0.02, intermediate_size=4096, model_type="qwen3_vl", num_heads=16,
                  num_position_embeddings=2304, out_hidden_size=2560, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, deepstack_visual_indexes=[5, 11, 17])
    assert Qwen3VLVisionConfig.from_hf(hub_4b) == Qwen3VLVisionConfig.preset("4b")
    config = Qwen3VLVisionConfig.from_hf(HFConfig(**HF_TINY).to_dict())
    assert config.rope_theta == 10000.0 and config.deepstack_visual_indexes == (0, 2)
    assert from_dict(Qwen3VLVisionConfig, to_dict(config)) == config
    eight = Qwen3VLVisionConfig.preset("8b")
    assert (eight.depth, eight.hidden_size, eight.out_hidden_size, eight.deepstack_visual_indexes) == \
        (27, 1152, 4096, (8, 16, 24))
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        dataclasses.replace(config, deepstack_visual_indexes=(3,))
    with pytest.raises(ValueError, match="pixel_values"):
        # Shape checks run before any parameter is touched, so an abstract model suffices.
        abstract = nnx.eval_shape(lambda: Qwen3VLVisionModel(config, rngs=nnx.Rngs(0)))
        abstract(jnp.zeros((6, 96)), jnp.asarray([[1, 2, 3]]))


def test_every_parameter_has_logical_axis_names():
    from x2sam_jax.sharding import LOGICAL_AXIS_RULES

    config = Qwen3VLVisionConfig.from_hf(HF_TINY)
    abstract = nnx.eval_shape(lambda: Qwen3VLVisionModel(config, rngs=nnx.Rngs(0)))
    known = dict(LOGICAL_AXIS_RULES)
    params = nnx.state(abstract, nnx.Param).flat_state()
    assert len(params) == 33
    for path, variable in params:
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.get_value().ndim, path
        assert all(n in known for n in names), (path, names)
        assert (names[0] == "layers") == (path[0] == "blocks"), (path, names)


def test_bfloat16_compute_tracks_float32(pair):
    hf_model, model, hf_config = pair
    grid = [[1, 4, 6], [2, 2, 4]]
    pixel_values = jnp.asarray(_patches(grid, 11))
    reference = _encode(model, pixel_values, jnp.asarray(grid))
    low = _converted(hf_model, hf_config, dtype="bfloat16")
    out = _encode(low, pixel_values, jnp.asarray(grid))
    assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.bfloat16
    scale = float(jnp.abs(reference[0]).max())
    # bf16 has an 8-bit mantissa; three blocks and two mergers stay within a few percent of scale.
    assert _max_abs(out[0].astype(jnp.float32), reference[0]) <= 0.05 * scale
    assert _max_abs(out[1].astype(jnp.float32), reference[1]) <= 0.05 * scale
