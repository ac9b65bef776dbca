"""PixelDecoder against transformers' Mask2FormerPixelDecoder, weights converted through the rule table.

What is matched: the official X2SAM builds its pixel decoder as Mask2FormerPixelDecoder with
feature_channels=[256, 256, 256], num_feature_levels=3 and the default feature_strides
[4, 8, 16, 32], and calls it with the three SAM2 FPN maps, highest resolution first. Then
``features[::-1][:3]`` (all three, lowest resolution first) enter the deformable encoder and
``features[:1]`` (the highest-resolution map; num_fpn_levels = log2(8) - log2(4) = 1) gets the
FPN step. transformers' class does the same with the same arguments, so the reference here is
``Mask2FormerPixelDecoder(config, feature_channels=[c0, c1, c2])`` fed [f_hi, f_mid, f_lo]
(distinct channel counts so a level mix-up cannot pass). The plain Mask2Former layout (4 maps:
3 to the encoder, the first to the FPN) is checked as well.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights.pixel_decoder import pixel_decoder_rules
from x2sam_jax.config import PixelDecoderConfig
from x2sam_jax.conversion import flatten, load_tensors, unflatten
from x2sam_jax.models.pixel_decoder import PixelDecoder

from _tolerance import assert_equal_up_to_reordering, reorder_bound

TOL = 1e-4  # max-abs, float32


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (transformers leaves level_embed uninitialised, offsets at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1 and ("norm" in name or name.endswith(".1.weight")):
                param.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                fan_in = int(np.prod(param.shape[1:])) if "level_embed" not in name else 1
                param.copy_(noise / np.sqrt(fan_in) * (0.5 if "level_embed" in name else 1.0))


def load_torch_weights(model: nnx.Module, state_dict: dict, rules) -> None:
    state = nnx.state(model)
    flat = flatten(nnx.to_pure_dict(state))
    targets = {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}
    tensors = ((k, v.detach().numpy()) for k, v in state_dict.items())
    values, skipped = load_tensors(targets, tensors, rules)
    assert skipped == []
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in values.items()}))
    nnx.update(model, state)


def reference(channels, seed=0):
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    config = Mask2FormerConfig(feature_size=64, mask_feature_size=64, encoder_layers=2, num_attention_heads=4,
                               encoder_feedforward_dim=128, common_stride=4)
    decoder = Mask2FormerPixelDecoder(config, feature_channels=list(channels)).eval()
    randomize_(decoder, seed)
    return decoder


def ours(channels, num_encoder_levels=3, scan=True):
    cfg = PixelDecoderConfig(feature_channels=tuple(channels), num_encoder_levels=num_encoder_levels,
                             num_fpn_levels=1, hidden_size=64, mask_feature_size=64, num_layers=2, num_heads=4,
                             num_points=4, ffn_dim=128, scan_layers=scan)
    return cfg, PixelDecoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layout", ["x2sam_3_levels", "mask2former_4_levels"])
def test_pixel_decoder_matches_transformers(layout):
    if layout == "x2sam_3_levels":
        channels, sizes, enc_levels = (48, 40, 32), ((16, 12), (8, 6), (4, 3)), 3
    else:
        channels, sizes, enc_levels = (24, 48, 40, 32), ((32, 24), (16, 12), (8, 6), (4, 3)), 3
    torch_decoder = reference(channels)
    cfg, model = ours(channels, enc_levels)
    load_torch_weights(model, torch_decoder.state_dict(), pixel_decoder_rules(cfg))

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, channels)]
    with torch.no_grad():
        expected = torch_decoder([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats])
    got = nnx.jit(lambda m, f: m(f))(model, feats)

    exp_mask = expected.mask_features.permute(0, 2, 3, 1).numpy()
    assert got.mask_features.shape == exp_mask.shape == (2, *sizes[0], 64)
    err = float(np.abs(np.asarray(got.mask_features) - exp_mask).max())
    print(f"{layout}: mask_features max-abs {err:.2e}")
    assert err <= TOL, err
    assert len(got.multi_scale_features) == 3
    for g, e in zip(got.multi_scale_features, expected.multi_scale_features):
        e = e.permute(0, 2, 3, 1).numpy()
        assert g.shape == e.shape
        err = float(np.abs(np.asarray(g) - e).max())
        print(f"{layout}: level {tuple(g.shape[1:3])} max-abs {err:.2e}")
        assert err <= TOL, err
    # Lowest resolution first, as the mask decoder consumes them.
    assert got.multi_scale_features[0].shape[1:3] == sizes[-1]


def test_scanned_and_unrolled_encoder_agree():
    channels = (48, 40, 32)
    _, scanned = ours(channels, scan=True)
    _, unrolled = ours(channels, scan=False)
    nnx.update(unrolled, nnx.state(scanned))
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(1, s, s, c)).astype(np.float32) for s, c in zip((8, 4, 2), channels)]
    a, b = scanned(feats), unrolled(feats)
    assert_equal_up_to_reordering(b.mask_features, a.mask_features, what="mask_features")
    for got, want in zip(b.multi_scale_features, a.multi_scale_features):
        assert_equal_up_to_reordering(got, want, what="multi_scale_features")
    # The bound still catches a real bug: the two encoder layers run in swapped order.
    swapped = jax.tree.map(lambda x: x[::-1], nnx.state(scanned.encoder_layers, nnx.Param))
    nnx.update(unrolled.encoder_layers, swapped)
    err = float(np.abs(np.asarray(unrolled(feats).mask_features) - np.asarray(a.mask_features)).max())
    assert err > 100 * reorder_bound(a.mask_features), err


def test_pixel_decoder_names_the_bad_input():
    _, model = ours((48, 40, 32))
    with pytest.raises(ValueError, match=r"features\[1\]"):
        model([jnp.zeros((1, 8, 8, 48)), jnp.zeros((1, 4, 4, 41)), jnp.zeros((1, 2, 2, 32))])


def test_default_config_is_the_released_x2sam_layout_with_logical_axis_names():
    from x2sam_jax.sharding import logical_to_mesh

    model = nnx.eval_shape(lambda: PixelDecoder(PixelDecoderConfig(), rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shapes = {".".join(map(str, k)): tuple(v.get_value().shape) for k, v in params.items()}
    assert shapes["encoder_layers.self_attn.sampling_offsets.kernel"] == (6, 256, 8 * 3 * 4 * 2)
    assert shapes["encoder_layers.fc1.kernel"] == (6, 256, 1024)
    assert shapes["input_projections.2.conv.kernel"] == (1, 1, 256, 256)
    assert shapes["layer_1.conv.kernel"] == (3, 3, 256, 256) and shapes["level_embed"] == (3, 256)
    for path, variable in params.items():
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.get_value().ndim, path
        logical_to_mesh(names)  # every name has a rule
