"""The assembled X2SAM: jitted forward/backward on image and video batches, the frame scan with the
real decoders against the reference loop, and the parameter budget of the x2sam_4b preset."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2sam_jax.config import x2sam_preset
from x2sam_jax.conversion import flatten
from x2sam_jax.models.x2sam import X2SAM, is_trainable, parameter_counts, place_rows
from x2sam_jax.sharding import create_sharded, make_mesh

SAM = 128           # the tiny preset's mask-encoder input size
PATCH_DIM = 3 * 2 * 16 * 16
FAST = {"xla_backend_optimization_level": 0}


def fast_jit(fn):
    """``fn(model, *args)`` jitted with XLA's backend optimisation off (the tiny X2SAM compiles about
    twice as fast on CPU; these tests check shapes, gradients and paths, not speed)."""
    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
    def run(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return lambda model, *args: run(*nnx.split(model), *args)


@pytest.fixture(scope="module")
def tiny():
    config = x2sam_preset("tiny")
    mesh = make_mesh(devices=jax.devices()[:1])      # a jitted initialiser: 2x faster than eager here
    return config, create_sharded(lambda: X2SAM(config, rngs=nnx.Rngs(0)), mesh, compiler_options=FAST)


def make_batch(config, rng, *, frames, conditions, regions, seq_len=64, max_conditions=3, max_regions=2):
    """A padded batch of two samples whose real sizes differ (conditions, regions, tokens)."""
    batch = 2
    ids = rng.integers(10, 500, size=(batch, seq_len)).astype(np.int32)
    mask = np.ones((batch, seq_len), bool)
    mask[1, seq_len - 7:] = False                       # sample 1 is shorter
    grid = np.zeros((batch, 1, 3), np.int32)
    grid[:, 0] = (2 if frames > 1 else 1, 4, 4)         # 16 or 32 patches -> 4 or 8 merged tokens
    patches = int(grid[0, 0].prod())
    pixel_values = rng.normal(size=(batch, patches, PATCH_DIM)).astype(np.float32)
    visual = patches // 4
    ids[:, 1:1 + visual] = config.vlm.image_token_id if frames == 1 else config.vlm.video_token_id
    cursor = 2 + visual
    spans = np.zeros((batch, max_conditions, 2), np.int32)
    cond_valid = np.zeros((batch, max_conditions), bool)
    region_masks = np.zeros((batch, max_regions, SAM, SAM), bool)
    region_valid = np.zeros((batch, max_regions), bool)
    per_region = config.region_tokens
    for b in range(batch):
        pos = cursor
        for c in range(conditions[b]):
            ids[b, pos] = config.p_start_token_id
            if c < regions[b]:                          # a visual prompt inside this condition
                ids[b, pos + 1:pos + 1 + per_region] = config.region_token_id
                y, x = rng.integers(0, SAM - 30, size=2)
                region_masks[b, c, y:y + 20 + 5 * c, x:x + 25] = True
                region_valid[b, c] = True
                end = pos + 1 + per_region
            else:
                end = pos + 3
            ids[b, end] = config.p_end_token_id
            spans[b, c] = (pos, end)
            cond_valid[b, c] = True
            pos = end + 2
        ids[b, pos] = config.seg_token_id
        ids[b, pos + 1:] = np.where(mask[b, pos + 1:], ids[b, pos + 1:], 0)
    seg = np.array([[np.flatnonzero(ids[b] == config.seg_token_id)[0]] for b in range(batch)], np.int32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, grid_thw=grid,
                sam_pixel_values=rng.normal(size=(batch, frames, SAM, SAM, 3)).astype(np.float32),
                cond_spans=spans, cond_valid=cond_valid, seg_positions=seg, region_masks=region_masks,
                region_valid=region_valid, region_frame=np.zeros((batch, max_regions), np.int32))


def test_place_rows_writes_each_samples_rows_in_order():
    mask = jnp.array([[False, True, True, False], [True, False, False, True]])
    rows = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 1) + 1
    out = place_rows(mask, rows, jnp.zeros((2, 4, 1)))
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 2, 0], [4, 0, 0, 5]])


@pytest.mark.parametrize("frames", [1, 3])
def test_jitted_forward_and_gradient_on_ragged_batches(tiny, frames):
    config, model = tiny
    rng = np.random.default_rng(frames)
    first = make_batch(config, rng, frames=frames, conditions=(3, 1), regions=(1, 0))
    second = make_batch(config, rng, frames=frames, conditions=(2, 3), regions=(2, 1))
    traces = []

    @fast_jit
    def loss_and_grads(model, batch):
        traces.append(1)

        def loss_fn(model):
            out = model(**batch, all_predictions=True)
            valid = batch["cond_valid"][None, :, None, None, :]
            class_term = jnp.where(jnp.concatenate([valid, jnp.ones_like(valid[..., :1])], -1),
                                   out.all_class_logits, 0.0).mean()
            return (out.all_mask_logits ** 2).mean() + class_term + out.text_logits.std(), out

        return nnx.value_and_grad(loss_fn, has_aux=True)(model)

    (loss1, out1), grads = loss_and_grads(model, first)
    (loss2, out2), _ = loss_and_grads(model, second)
    assert len(traces) == 1, "a second batch of the same padded shape recompiled"
    p = config.mask_decoder.num_layers + 1
    q = config.mask_decoder.num_queries
    assert out1.all_mask_logits.shape == (p, 2, frames, q, SAM // 4, SAM // 4)
    assert out1.class_logits.shape == (2, frames, q, 3 + 1)
    for value in (loss1, loss2):
        assert np.isfinite(float(value))
    # padded condition slots are pushed to -1e6, real ones are finite cosine logits
    assert float(out1.class_logits[1, 0, 0, 1]) < -1e5 and abs(float(out1.class_logits[0, 0, 0, 2])) <= 50
    flat = flatten(nnx.to_pure_dict(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())

    def grad_norm(fragment):
        return sum(float(jnp.abs(g).sum()) for k, g in flat.items() if fragment in k)

    # gradients reach every trained branch: decoder, memory, projectors (via regions and the
    # condition embeddings), the ViT merger, the SAM encoder, and the LoRA B matrices
    for fragment in ("segmentor.decoder.", "segmentor.pixel_decoder.", "segmentor.encoder.", "mlm_projector.",
                     "extra_projector.", "visual.merger.", "lora_b"):
        assert grad_norm(fragment) > 0, fragment
    if frames > 1:
        assert grad_norm("segmentor.memory.memory_attention.") > 0
        assert grad_norm("segmentor.memory.memory_encoder.") > 0


def test_frame_scan_matches_reference_loop_with_real_decoders(tiny):
    config, model = tiny
    batch = make_batch(config, np.random.default_rng(7), frames=4, conditions=(2, 1), regions=(1, 0))
    forward = fast_jit(lambda model, batch: model(**batch))
    scanned = forward(model, batch)
    looped_model = nnx.merge(*nnx.split(model))
    looped_model.config = dataclasses.replace(config, scan_frames=False)
    looped = forward(looped_model, batch)
    np.testing.assert_allclose(scanned.mask_logits, looped.mask_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scanned.class_logits, looped.class_logits, atol=1e-4, rtol=1e-4)
    # frames differ from each other (the memory and the inputs matter)
    assert float(jnp.abs(scanned.mask_logits[:, 1] - scanned.mask_logits[:, 0]).max()) > 1e-3


def test_x2sam_4b_parameter_budget_from_abstract_model():
    config = x2sam_preset("x2sam_4b")
    counts = parameter_counts(nnx.eval_shape(lambda: X2SAM(config, rngs=nnx.Rngs(0))))
    text = config.vlm.text
    q, kv = text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    shapes = [(text.hidden_size, q), (text.hidden_size, kv), (text.hidden_size, kv), (q, text.hidden_size),
              (text.hidden_size, text.intermediate_size), (text.hidden_size, text.intermediate_size),
              (text.intermediate_size, text.hidden_size)]
    lora = text.num_layers * sum(config.vlm.lora.rank * (i + o) for i, o in shapes)
    embed = text.vocab_size * text.hidden_size
    assert counts["Qwen3 LLM"]["trainable"] == lora + embed
    base = text.num_layers * sum(i * o for i, o in shapes)
    assert counts["Qwen3 LLM"]["frozen"] > base                     # + norms
    assert 3.5e9 < counts["Qwen3 LLM"]["frozen"] < 3.7e9
    assert 2.0e8 < counts["SAM2 mask encoder"]["trainable"] < 2.3e8   # Hiera-L + FPN (~212M)
    assert counts["SAM2 mask encoder"]["frozen"] == 0
    assert 4.0e8 < sum(counts["Qwen3-VL vision encoder"].values()) < 4.3e8
    assert counts["total"]["trainable"] + counts["total"]["frozen"] == sum(
        c["trainable"] + c["frozen"] for name, c in counts.items() if name != "total")


def test_mask_decoder_wider_than_the_pixel_features():
    # The decoder may be wider than the pixel decoder / memory (1x1 input projections per level);
    # the widths that must agree are named when they do not.
    from x2sam_jax.models.x2sam import ClassAgnosticSegmentor

    base = x2sam_preset("tiny")
    wide = dict(mask_decoder=dataclasses.replace(base.mask_decoder, hidden_size=64, feature_size=32, ffn_dim=128),
                projector=dataclasses.replace(base.projector, decoder_hidden_size=64))
    model = create_sharded(lambda: ClassAgnosticSegmentor(x2sam_preset("tiny", **wide), rngs=nnx.Rngs(0)),
                           make_mesh(devices=jax.devices()[:1]), compiler_options=FAST)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, SAM, SAM, 3)), jnp.float32)
    out = fast_jit(lambda model, images: model(images))(model, images)
    assert out.mask_logits.shape == (1, 2, base.mask_decoder.num_queries, SAM // 4, SAM // 4)
    assert np.isfinite(np.asarray(out.mask_logits)).all()
    assert model.segmentor.decoder.input_projections[0].kernel.shape == (1, 1, 32, 64)
    with pytest.raises(ValueError, match="mask decoder's feature_size"):
        x2sam_preset("tiny", mask_decoder=dataclasses.replace(base.mask_decoder, hidden_size=64),
                     projector=wide["projector"])
    with pytest.raises(ValueError, match="mask_feature_size"):
        x2sam_preset("tiny", mask_decoder=dataclasses.replace(base.mask_decoder, mask_feature_size=64))


def test_trainable_split_follows_the_recipe():
    assert not is_trainable("vlm.visual.blocks.attn.qkv.kernel")
    assert is_trainable("vlm.visual.merger.linear_fc1.kernel")
    assert is_trainable("vlm.visual.deepstack_merger_list.0.norm.scale")
    assert not is_trainable("vlm.language_model.layers.self_attn.q_proj.kernel")
    assert is_trainable("vlm.language_model.layers.self_attn.q_proj.lora_a")
    assert is_trainable("vlm.language_model.embed_tokens.embedding")
    assert is_trainable("segmentor.encoder.backbone.patch_embed.projection.kernel")


def test_bfloat16_pixels_give_the_bfloat16_encoders_outputs_bit_for_bit():
    """Why training sends pixels in the encoders' compute dtype (``runs.pixel_dtype``): bfloat16
    encoders (ViT, Hiera) cast their pixels to bfloat16 first, so pixels rounded on the host (the
    collator's ml_dtypes cast, to nearest even as XLA's convert) give their outputs to the bit."""
    from x2sam_jax.config import with_compute_dtype
    from x2sam_jax.data.batching import BucketConfig, Collator
    from x2sam_jax.runs import pixel_dtype

    from _train_helpers import random_module

    config = with_compute_dtype(x2sam_preset("tiny"), "bfloat16")
    assert pixel_dtype(config) == "bfloat16" and pixel_dtype(x2sam_preset("tiny")) == "float32"
    model = random_module(lambda: X2SAM(config, rngs=nnx.Rngs(0)), 0)
    batch = make_batch(config, np.random.default_rng(3), frames=1, conditions=(2, 1), regions=(1, 0))
    sam = batch["sam_pixel_values"][:1]
    collator = Collator(BucketConfig(), sam_size=SAM, pixel_dtype="bfloat16")
    feature = {"input_ids": np.ones(4, np.int32), "labels": np.ones(4, np.int32), "sam_pixel_values": sam[0],
               "sam_valid_hw": np.full((1, 2), SAM, np.int32), "pixel_values": batch["pixel_values"][0]}
    collated = collator([feature])
    assert collated["sam_pixel_values"].dtype == collated["pixel_values"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(collated["sam_pixel_values"][0, :1], np.asarray(jnp.asarray(sam[0]).astype(jnp.bfloat16)))
    frames = nnx.jit(lambda m, x: m.encode_frames(x))
    visual = nnx.jit(lambda m, x, g: m.encode_visual(x, g))
    for got, want in ((frames(model, sam.astype(jnp.bfloat16)), frames(model, sam)),
                      (visual(model, batch["pixel_values"].astype(jnp.bfloat16), batch["grid_thw"]),
                       visual(model, batch["pixel_values"], batch["grid_thw"]))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
