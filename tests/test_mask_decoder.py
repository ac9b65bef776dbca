"""MaskDecoder against transformers' Mask2FormerTransformerModule (float32), the X2SAM additions
(text cross-attention, <SEG> add) against the same module extended with hooks that reproduce
X2SAM's ``forward_post`` order, and the cosine class head against its formula.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert_weights.mask_decoder import mask_decoder_rules
from x2sam_jax.config import MaskDecoderConfig
from x2sam_jax.conversion import flatten, load_tensors, unflatten
from x2sam_jax.models.mask_decoder import MaskDecoder

from _tolerance import assert_equal_up_to_reordering, assert_trees_equal_up_to_reordering

TOL = 1e-4  # max-abs, float32
D, Q, HEADS, FFN = 64, 12, 4, 128
LEVEL_SIZES = ((4, 3), (8, 6), (16, 12))   # lowest resolution first
MASK_SIZE = (32, 24)
LAYERS = 6   # two rounds of the 3-level scan (X2SAM: 9); transformers' decoder_layers = LAYERS + 1


def torch_module(seed=0, in_features=D):
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

    config = Mask2FormerConfig(hidden_dim=D, feature_size=in_features, mask_feature_size=D,
                               num_attention_heads=HEADS, dim_feedforward=FFN, decoder_layers=LAYERS + 1,
                               num_queries=Q)
    module = Mask2FormerTransformerModule(in_features=in_features, config=config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))   # fan-in (also of 1x1 convs)
    return module


def ours(scan=True, text=True, layers=LAYERS, **overrides):
    cfg = MaskDecoderConfig(hidden_size=D, num_queries=Q, num_heads=HEADS, ffn_dim=FFN, mask_feature_size=D,
                            num_layers=layers, use_text_cross_attn=text, scan_layers=scan, **overrides)
    return cfg, MaskDecoder(cfg, rngs=nnx.Rngs(0))


def load_weights(model, cfg, tensors: dict, keep: tuple[str, ...] = ()):
    """Fills every parameter from the torch tensors except those under the ``keep`` prefixes."""
    state = nnx.state(model)
    flat = flatten(nnx.to_pure_dict(state))
    targets = {k: (tuple(v.shape), v.dtype) for k, v in flat.items() if not k.startswith(keep)}
    values, skipped = load_tensors(targets, tensors.items(), mask_decoder_rules(cfg))
    assert skipped == []
    flat.update({k: jnp.asarray(v) for k, v in values.items()})
    nnx.replace_by_pure_dict(state, unflatten(flat))
    nnx.update(model, state)


def inputs(seed=0, batch=2, channels=D):
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(batch, h, w, channels)).astype(np.float32) for h, w in LEVEL_SIZES]
    mask_features = rng.normal(size=(batch, *MASK_SIZE, D)).astype(np.float32)
    return feats, mask_features


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def compare_outputs(got, expected):
    masks = np.stack([m.numpy() for m in expected.masks_queries_logits])          # [P, B, Q, H, W]
    queries = np.stack([q.transpose(0, 1).numpy() for q in expected.intermediate_hidden_states])
    assert got.mask_logits.shape == masks.shape == (LAYERS + 1, 2, Q, *MASK_SIZE)
    mask_err = float(np.abs(np.asarray(got.mask_logits) - masks).max())
    query_err = float(np.abs(np.asarray(got.queries) - queries).max())
    return mask_err, query_err


def assert_matches_torch(model, module, feats, mask_features):
    """Our decoder and the torch module on the same inputs agree within TOL; returns torch's output."""
    with torch.no_grad():
        expected = module([nchw(f) for f in feats], nchw(mask_features))
    got = nnx.jit(lambda m, f, mf: m(f, mf))(model, feats, mask_features)
    mask_err, query_err = compare_outputs(got, expected)
    print(f"max-abs masks {mask_err:.2e} queries {query_err:.2e}")
    assert mask_err <= TOL and query_err <= TOL, (mask_err, query_err)
    return expected


@pytest.mark.parametrize("scan", [True, False])
def test_matches_transformers_without_text_and_seg(scan):
    module = torch_module()
    cfg, model = ours(scan=scan)
    # Strict: every torch key is used and every parameter but the X2SAM additions is filled.
    load_weights(model, cfg, {k: v.numpy() for k, v in module.state_dict().items()},
                 keep=("layers.text_cross_attn", "class_predictor"))
    feats, mask_features = inputs()
    expected = assert_matches_torch(model, module, feats, mask_features)
    # The masked attention really masks: some keys are blocked in some layers.
    assert (np.stack([m.numpy() for m in expected.masks_queries_logits]) < 0).mean() > 0.1


def test_narrower_pixel_features_go_through_input_projections_as_in_transformers():
    # feature_size != hidden_size: a 1x1 conv per level first (transformers' input_projections).
    module = torch_module(in_features=D // 2)
    assert any(k.startswith("input_projections.") for k in module.state_dict())
    cfg, model = ours(text=False, feature_size=D // 2)
    load_weights(model, cfg, {k: v.numpy() for k, v in module.state_dict().items()}, keep=("class_predictor",))
    feats, mask_features = inputs(channels=D // 2)
    assert_matches_torch(model, module, feats, mask_features)
    with pytest.raises(ValueError, match=f"must be \\[B, h, w, {D // 2}\\]"):
        model(inputs()[0], mask_features)


def x2sam_reference(module, text_layers, seg_embed, tokens, token_valid):
    """Hooks turning transformers' decoder into X2SAM's: <SEG> added to the content queries, and
    after each cross_attn_layer_norm: LN_t(h + MHA(h + query_pos, tokens, tokens, padding))."""
    query_pos = module.queries_embedder.weight[:, None].repeat(1, tokens.shape[0], 1)
    tokens_sbd = tokens.transpose(0, 1)
    handles = []

    def add_seg(_, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + seg_embed[None]
        return args, kwargs

    handles.append(module.decoder.register_forward_pre_hook(add_seg, with_kwargs=True))
    for layer, (attn, norm) in zip(module.decoder.layers, text_layers):
        def text_block(_, __, hidden, attn=attn, norm=norm):
            out, _ = attn(hidden + query_pos, tokens_sbd, tokens_sbd, key_padding_mask=~token_valid)
            return norm(hidden + out)
        handles.append(layer.cross_attn_layer_norm.register_forward_hook(text_block))
    return handles


def test_matches_x2sam_decoder_with_text_cross_attention_and_seg_embed():
    module = torch_module(seed=1)
    gen = torch.Generator().manual_seed(2)
    text_layers = []
    for _ in range(LAYERS):
        attn = torch.nn.MultiheadAttention(D, HEADS).eval()
        norm = torch.nn.LayerNorm(D)
        with torch.no_grad():
            for p in attn.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / (math.sqrt(p.shape[-1]) if p.ndim > 1 else 10))
            norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=gen))
            norm.bias.copy_(0.1 * torch.randn(D, generator=gen))
        text_layers.append((attn, norm))
    tensors = {k: v.numpy() for k, v in module.state_dict().items()}
    for i, (attn, norm) in enumerate(text_layers):
        tensors.update({f"decoder.layers.{i}.text_cross_attn.{k}": v.numpy() for k, v in attn.state_dict().items()})
        tensors.update({f"decoder.layers.{i}.text_cross_attn_layer_norm.{k}": v.numpy()
                        for k, v in norm.state_dict().items()})
    cfg, model = ours()
    load_weights(model, cfg, tensors, keep=("class_predictor",))
    # ... and the same table exports the weights back to exactly the torch keys and values.
    from x2sam_jax.conversion import export_tensors
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()
            if not k.startswith("class_predictor")}
    exported = export_tensors(flat, mask_decoder_rules(cfg))
    assert exported.keys() == tensors.keys()
    assert all(np.array_equal(exported[k], tensors[k]) for k in tensors)

    feats, mask_features = inputs(seed=3)
    rng = np.random.default_rng(4)
    seg = rng.normal(size=(2, D)).astype(np.float32)
    tokens = rng.normal(size=(2, 5, D)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    handles = x2sam_reference(module, text_layers, torch.from_numpy(seg), torch.from_numpy(tokens),
                              torch.from_numpy(valid))
    try:
        with torch.no_grad():
            expected = module([nchw(f) for f in feats], nchw(mask_features))
    finally:
        for h in handles:
            h.remove()
    got = nnx.jit(lambda m, *a: m(a[0], a[1], seg_embed=a[2], cond_tokens=a[3], cond_token_mask=a[4]))(
        model, feats, mask_features, seg, tokens, valid)
    mask_err, query_err = compare_outputs(got, expected)
    print(f"max-abs masks {mask_err:.2e} queries {query_err:.2e}")
    assert mask_err <= TOL and query_err <= TOL, (mask_err, query_err)


# Behaviour tests use one round of layers (3) and share compiled functions to stay fast on CPU.
run_tokens = nnx.jit(lambda m, f, mf, t, v: m(f, mf, cond_tokens=t, cond_token_mask=v).mask_logits)
run_plain = nnx.jit(lambda m, f, mf: m(f, mf).mask_logits)


def test_zero_initialised_text_cross_attention_ignores_tokens_until_trained():
    cfg, model = ours(layers=3)
    feats, mask_features = inputs(seed=5, batch=1)
    rng = np.random.default_rng(6)
    tokens_a, tokens_b = (rng.normal(size=(1, 4, D)).astype(np.float32) for _ in range(2))
    valid = np.ones((1, 4), bool)
    a = np.asarray(run_tokens(model, feats, mask_features, tokens_a, valid))
    b = np.asarray(run_tokens(model, feats, mask_features, tokens_b, valid))
    assert np.abs(a - b).max() == 0.0          # zero output projection: tokens cannot matter
    # Skipping the block differs only by the extra LayerNorm of an already normalised state.
    skipped = np.asarray(run_plain(model, feats, mask_features))
    assert np.abs(a - skipped).max() < 1e-3 * np.abs(a).max()
    # Once the output projection is non-zero, the tokens change the masks.
    kernel = model.layers.text_cross_attn.out_proj.kernel
    kernel[...] = jnp.asarray(rng.normal(size=kernel.shape).astype(np.float32) * 0.1)
    a = np.asarray(run_tokens(model, feats, mask_features, tokens_a, valid))
    b = np.asarray(run_tokens(model, feats, mask_features, tokens_b, valid))
    assert np.abs(a - b).max() > 1e-2
    # A sample whose tokens are all padding gets a finite result (torch would give NaN).
    none_valid = np.zeros((1, 4), bool)
    assert np.isfinite(np.asarray(run_tokens(model, feats, mask_features, tokens_a, none_valid))).all()


def test_last_prediction_only_and_class_logits_of_every_prediction():
    cfg, model = ours(layers=3)
    feats, mask_features = inputs(seed=8, batch=2)
    conds = jnp.asarray(np.random.default_rng(11).normal(size=(2, 3, D)).astype(np.float32))
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    run = nnx.jit(lambda m, last: m(feats, mask_features, cond_embeds=conds, cond_valid=valid,
                                    all_predictions=not last), static_argnums=1)
    full, last = run(model, False), run(model, True)
    assert full.mask_logits.shape == (4, 2, Q, *MASK_SIZE) and full.class_logits.shape == (4, 2, Q, 4)
    assert last.mask_logits.shape == (1, 2, Q, *MASK_SIZE) and last.class_logits.shape == (1, 2, Q, 4)
    assert_equal_up_to_reordering(last.mask_logits[0], full.mask_logits[-1], what="last mask logits")
    # Padded condition slots hold -1e6 (checked exactly below), which would set the scale: compare
    # the real slots and the background.
    real = np.concatenate([np.asarray(valid), np.ones((2, 1), bool)], 1)[:, None, :]
    assert_equal_up_to_reordering(np.where(real, last.class_logits[0], 0), np.where(real, full.class_logits[-1], 0),
                                  what="last class logits")
    again = model.classify(full.queries[2:3], conds, valid)[0]
    assert_equal_up_to_reordering(np.where(real, again, 0), np.where(real, full.class_logits[2], 0),
                                  what="class logits of prediction 2")
    assert (np.asarray(full.class_logits[:, 0, :, 2]) == -1e6).all()
    assert (np.asarray(last.class_logits[:, 0, :, 2]) == -1e6).all()


# --- class head -------------------------------------------------------------------------------

def official_class_logits(queries, conds, valid, logit_scale, bg):
    """The official ClassPredictor ("learn") after X2SAM appends bg_embeds with a valid mask of 1."""
    conds = torch.cat([conds, bg[None].repeat(conds.shape[0], 1, 1)], 1)
    valid = torch.cat([valid, torch.ones(valid.shape[0], 1, dtype=torch.bool)], 1)
    logits = logit_scale.exp() * torch.einsum("bqd,bcd->bqc", F.normalize(queries, dim=-1),
                                              F.normalize(conds, dim=-1))
    return torch.clamp(logits, min=-50, max=50).masked_fill(~valid[:, None], -1e6)


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), math.log(1000.0)])
def test_class_head_matches_official_formula(logit_scale):
    cfg, model = ours(layers=3)
    model.class_predictor.logit_scale[...] = jnp.full((1,), logit_scale, jnp.float32)
    rng = np.random.default_rng(9)
    queries = rng.normal(size=(2, Q, D)).astype(np.float32)
    conds = rng.normal(size=(2, 4, D)).astype(np.float32)
    conds[1, 0] = queries[1, 3] * 2.0                      # cosine exactly 1 for one pair
    valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    got = np.asarray(model.classify(queries[None], conds, valid))[0]
    expected = official_class_logits(torch.from_numpy(queries), torch.from_numpy(conds), torch.from_numpy(valid),
                                     torch.tensor([logit_scale], dtype=torch.float32),
                                     torch.from_numpy(np.array(model.class_predictor.bg_embeds[...]))).numpy()
    assert got.shape == (2, Q, 5)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got[0, :, 2:4] == -1e6).all()                    # padded slots
    assert (got[:, :, -1] > -1e6).all()                      # background is last and always valid
    if logit_scale > math.log(60):                          # temperature 1000: the clamp is active
        assert got[1, 3, 0] == 50.0 and got.max() == 50.0 and got[got > -1e6].min() >= -50.0
    else:
        np.testing.assert_allclose(got[1, 3, 0], 1 / 0.07, rtol=1e-5)


def test_default_config_is_the_released_x2sam_layout_with_logical_axis_names():
    from x2sam_jax.sharding import logical_to_mesh

    model = nnx.eval_shape(lambda: MaskDecoder(MaskDecoderConfig(), rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shapes = {".".join(map(str, k)): tuple(v.get_value().shape) for k, v in params.items()}
    assert shapes["queries_features.embedding"] == (200, 256)
    assert shapes["layers.cross_attn.in_proj.kernel"] == (9, 256, 768)
    assert shapes["layers.text_cross_attn.out_proj.kernel"] == (9, 256, 256)
    assert shapes["layers.fc1.kernel"] == (9, 256, 2048)
    assert shapes["class_predictor.logit_scale"] == (1,) and shapes["class_predictor.bg_embeds"] == (1, 256)
    for path, variable in params.items():
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.get_value().ndim, path
        logical_to_mesh(names)
    # The X2SAM rule table covers every parameter, with the official key names.
    rules = mask_decoder_rules(MaskDecoderConfig(), "segmentor.decoder.",
                               class_predictor_prefix="segmentor.class_predictor.", bg_embeds_key="bg_embeds.weight")
    from x2sam_jax.conversion import export_tensors
    exported = export_tensors({k: np.zeros(s, np.float32) for k, s in shapes.items()}, rules)
    assert exported["segmentor.decoder.decoder.layers.8.cross_attn.in_proj_weight"].shape == (768, 256)
    assert exported["segmentor.decoder.decoder.mask_predictor.mask_embedder.2.0.weight"].shape == (256, 256)
    assert "bg_embeds.weight" in exported and "segmentor.class_predictor.logit_scale" in exported
    assert len(exported) == 5 + 6 + 9 * 28 + 2


@pytest.mark.slow  # ~80 s on a loaded 2-core CPU (two gradient compiles)
def test_gradients_flow_end_to_end_and_remat_does_not_change_them():
    from x2sam_jax.config import PixelDecoderConfig
    from x2sam_jax.models.pixel_decoder import PixelDecoder

    rng = np.random.default_rng(12)
    feats = [rng.normal(size=(1, s, s, 32)).astype(np.float32) for s in (8, 4, 2)]
    conds = rng.normal(size=(1, 3, D)).astype(np.float32)
    valid = np.ones((1, 3), bool)

    def grads(remat):
        pixel = PixelDecoder(PixelDecoderConfig(feature_channels=(32, 32, 32), hidden_size=D, mask_feature_size=D,
                                                num_layers=2, num_heads=HEADS, ffn_dim=FFN, remat_policy=remat,
                                                attention_query_chunk=32), rngs=nnx.Rngs(1))
        _, decoder = ours(layers=3, remat_policy=remat)

        def loss(pixel, decoder):
            out = pixel(feats)
            pred = decoder(out.multi_scale_features, out.mask_features, cond_embeds=conds, cond_valid=valid)
            return jnp.mean(jnp.tanh(pred.mask_logits)) + jnp.mean(jax.nn.log_softmax(pred.class_logits))

        return nnx.jit(nnx.grad(loss, argnums=(0, 1)))(pixel, decoder)

    plain, remat = grads("none"), grads("full")
    assert_trees_equal_up_to_reordering(nnx.to_pure_dict(nnx.state(remat)), nnx.to_pure_dict(nnx.state(plain)),
                                        what="gradient with remat")
    pixel_grads, decoder_grads = plain
    # The deformable sampling locations receive gradients (through the bilinear weights) ...
    assert np.abs(np.asarray(pixel_grads.encoder_layers.self_attn.sampling_offsets.kernel[...])).max() > 0
    # ... and so does the class head's temperature.
    assert np.abs(np.asarray(decoder_grads.class_predictor.logit_scale[...])).max() > 0
