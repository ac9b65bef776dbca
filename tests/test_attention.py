"""x2sam_jax.layers.attention: every backend against a float64 reference on every mask kind, the
automatic choice, the Pallas splash kernel (interpret mode on CPU; the real kernel on TPU), cuDNN
on GPU, sharding constraints on 8 CPU devices, named remat policies and renamed config fields."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import assert_equal_up_to_reordering, assert_trees_equal_up_to_reordering
from x2sam_jax.layers.attention import choose_implementation, dot_product_attention

B, LQ, LK, H, KV, D = 2, 37, 45, 4, 2, 8
# Every backend computes the same sums in another order (blocks, tiles, online rescaling): they
# must agree with the float64 reference up to float32 reordering noise (tests/_tolerance.py). A
# wrong mask moves outputs (convex combinations of values of size ~1) by ~0.1.


def _inputs(seed=0, lq=LQ, lk=LK, heads=H, kv_heads=KV, dim=D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, lq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((B, lk, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((B, lk, kv_heads, dim)).astype(np.float32)
    key_mask = rng.random((B, lk)) > 0.3
    key_mask[1, :] = False                 # every query of example 1 is fully masked
    segments = (rng.integers(0, 3, (B, lq)), rng.integers(0, 3, (B, lk)))
    mask = rng.random((B, 1, lq, lk)) > 0.5
    mask[0, 0, 3] = False                  # one fully masked row
    return q, k, v, key_mask, segments, mask


def reference(q, k, v, *, causal=False, query_offset=0, key_mask=None, segment_ids=None, mask=None):
    """Plain float64 softmax attention; rows without any allowed key are zero."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = np.repeat(k.astype(np.float64), heads // kv_heads, 2)
    v = np.repeat(v.astype(np.float64), heads // kv_heads, 2)
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    lq, lk = q.shape[1], k.shape[1]
    allowed = np.ones((q.shape[0], heads, lq, lk), bool)
    if causal:
        allowed &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + query_offset
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    if segment_ids is not None:
        allowed &= (segment_ids[0][:, :, None] == segment_ids[1][:, None, :])[:, None]
    if mask is not None:
        allowed &= mask
    logits = np.where(allowed, logits, -np.inf)
    peak = logits.max(-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(-1, keepdims=True)
    probs = np.where(total > 0, weights / np.maximum(total, 1e-300), 0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _mask_kinds(key_mask, segments, mask):
    return {
        "none": {},
        "causal": dict(causal=True, query_offset=8),
        "key_padding": dict(key_mask=key_mask),
        "segment_ids": dict(segment_ids=segments),
        "boolean": dict(mask=mask),
        "all": dict(causal=True, query_offset=8, key_mask=key_mask, segment_ids=segments, mask=mask),
    }


def _as_jax(kwargs):
    out = {}
    for name, value in kwargs.items():
        if name == "segment_ids":
            value = tuple(jnp.asarray(x) for x in value)
        elif isinstance(value, np.ndarray):
            value = jnp.asarray(value)
        out[name] = value
    return out


@pytest.mark.parametrize("kind", ["none", "causal", "key_padding", "segment_ids", "boolean", "all"])
def test_xla_and_chunked_forms_equal_the_reference(kind):
    q, k, v, key_mask, segments, mask = _inputs()
    kwargs = _mask_kinds(key_mask, segments, mask)[kind]
    want = reference(q, k, v, **kwargs)
    # Blocks of 10 of the 37 queries and tiles of 16 of the 45 keys (online softmax): both padded.
    for implementation, chunk, key_chunk in (("xla", 0, 0), ("query_chunked", 10, 16), ("query_chunked", 0, 0)):
        got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                               implementation=implementation, query_chunk=chunk,
                                               key_chunk=key_chunk, **_as_jax(kwargs)))
        assert_equal_up_to_reordering(got, want, what=f"{kind} {implementation} {chunk}x{key_chunk}")
    if kind in ("key_padding", "all"):
        assert np.all(got[1] == 0.0)       # fully masked rows are exactly zero
    if kind == "boolean":
        assert np.all(got[0, 3] == 0.0)


def test_chunked_gradients_equal_one_shot_and_a_traced_cache_offset_works():
    q, k, v, key_mask, segments, mask = _inputs(1)
    kwargs = _as_jax(dict(causal=True, key_mask=key_mask, segment_ids=segments, mask=mask))

    def loss(implementation, offset):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, implementation=implementation, query_chunk=8, key_chunk=16,
                                        query_offset=offset, **kwargs)
            return jnp.sum(jnp.sin(out))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))

    (a, grads_a), (b, grads_b) = loss("xla", 8), loss("query_chunked", jnp.int32(8))  # traced offset
    assert_equal_up_to_reordering(b, a, what="loss")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads_b)
    assert_trees_equal_up_to_reordering(grads_b, grads_a, what="gradients")


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, *_ = _inputs(2, lq=64, lk=512)
    want = reference(q.astype(jnp.bfloat16).astype(np.float32), k.astype(jnp.bfloat16).astype(np.float32),
                     v.astype(jnp.bfloat16).astype(np.float32))
    for implementation in ("xla", "query_chunked"):
        got = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                                    implementation=implementation)
        assert got.dtype == jnp.bfloat16
        # bf16 probabilities (8 bits) times bf16 values, accumulated in float32 over 512 keys:
        # ~2^-8 relative per term, averaging out; the output itself is rounded to bf16 (2^-8).
        err = float(np.abs(np.asarray(got, np.float32) - want).max())
        assert err <= 2e-2, (implementation, err)


def test_dropout_is_keyed_and_unbiased():
    q, k, v, *_ = _inputs(3, lq=16, lk=16)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    plain = dot_product_attention(q, k, v)

    def dropped(key):
        return dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=key, implementation="query_chunked",
                                     query_chunk=4, key_chunk=8)

    keys = jax.random.split(jax.random.key(0), 1000)
    outs = jax.jit(jax.vmap(dropped))(keys)
    assert not bool(jnp.allclose(outs[0], plain, atol=1e-3))
    assert_equal_up_to_reordering(dropped(keys[0]), outs[0], what="same key, same mask")
    # Inverted dropout keeps the expectation: the mean of 1000 draws is within a few standard
    # errors (per-draw spread ~0.25 over 16 keys, so ~0.01) of the plain output; a missing
    # 1 / (1 - rate) rescale would be off by half the output (~0.3).
    assert float(jnp.abs(outs.mean(0) - plain).max()) <= 0.1


def test_automatic_choice_by_platform_and_shape():
    q, k = (1, 4096, 8, 64), (1, 4096, 8, 64)
    assert choose_implementation(q, k, jnp.bfloat16, platform="gpu") == "cudnn"
    assert choose_implementation(q, k, jnp.bfloat16, platform="gpu", dropout=True) != "cudnn"
    assert choose_implementation((1, 4096, 8, 160), (1, 4096, 8, 160), jnp.bfloat16, platform="gpu") != "cudnn"
    assert choose_implementation(q, k, jnp.float32, platform="gpu") == "query_chunked"  # 512 MiB of logits
    assert choose_implementation((1, 512, 8, 64), (1, 512, 8, 64), jnp.float32, platform="gpu") == "xla"
    assert choose_implementation(q, k, jnp.bfloat16, platform="tpu") == "splash"
    assert choose_implementation(q, k, jnp.bfloat16, platform="tpu", dense_mask=True) != "splash"
    assert choose_implementation(q, k, jnp.bfloat16, platform="tpu", static_offset=False) != "splash"
    assert choose_implementation((1, 100, 8, 64), k, jnp.bfloat16, platform="tpu") != "splash"
    assert choose_implementation((1024, 64, 1, 96), (1024, 64, 1, 96), jnp.float32, platform="cpu") == "xla"  # windows
    assert choose_implementation((1, 1, 32, 128), (1, 2080, 8, 128), jnp.float32, platform="cpu") == "xla"  # decode
    assert choose_implementation((1, 4096, 4, 96), (1, 4096, 4, 96), jnp.float32, platform="cpu") == "query_chunked"
    assert choose_implementation((1, 64, 4, 32), (1, 64, 4, 32), jnp.float32, platform="cpu",
                                 query_chunk=16) == "query_chunked"


def test_splash_kernel_in_interpret_mode_equals_xla():
    """The TPU kernel's code path, run by the Pallas interpreter on CPU."""
    rng = np.random.default_rng(4)
    length, heads, kv_heads, dim = 128, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((2, length, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    key_mask = np.ones((2, length), bool)
    key_mask[1, :40] = False                # left padding: the first 40 queries of example 1 see no key
    segments = tuple(jnp.asarray(np.sort(rng.integers(0, 3, (2, length)), 1)) for _ in range(2))
    kwargs = dict(causal=True, key_mask=jnp.asarray(key_mask), segment_ids=(segments[0], segments[0]))

    def f(implementation):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, implementation=implementation, splash_interpret=True, **kwargs)
            return jnp.sum(jnp.sin(out)), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, splash_out), splash_grads = f("splash")
    (_, xla_out), xla_grads = f("xla")
    assert_equal_up_to_reordering(splash_out, xla_out, what="splash output")
    assert bool(jnp.all(splash_out[1, :40] == 0))
    assert_trees_equal_up_to_reordering(splash_grads, xla_grads, what="splash gradients")
    with pytest.raises(ValueError, match="splash"):
        dot_product_attention(q, k, v, mask=jnp.ones((1, 1, length, length), bool), implementation="splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN)")
def test_cudnn_equals_xla_on_gpu():
    q, k, v, key_mask, segments, mask = _inputs(5, lq=128, lk=128, dim=64)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    for kwargs in _mask_kinds(key_mask, segments, mask[..., :128, :128]).values():
        kwargs = _as_jax(kwargs)
        got = dot_product_attention(q, k, v, implementation="cudnn", **kwargs).astype(jnp.float32)
        want = dot_product_attention(q, k, v, implementation="xla", **kwargs).astype(jnp.float32)
        assert float(jnp.abs(got - want).max()) <= 2e-2   # bf16 outputs (2^-8 relative)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Pallas splash kernel)")
def test_splash_equals_xla_on_tpu():
    q, k, v, key_mask, segments, _ = _inputs(6, lq=256, lk=256, dim=128)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    for kwargs in (dict(causal=True), dict(causal=True, key_mask=key_mask), dict(segment_ids=segments)):
        kwargs = _as_jax(kwargs)
        got = dot_product_attention(q, k, v, implementation="splash", **kwargs).astype(jnp.float32)
        want = dot_product_attention(q, k, v, implementation="xla", **kwargs).astype(jnp.float32)
        assert float(jnp.abs(got - want).max()) <= 2e-2


def test_bad_arguments_are_named():
    q, k, v, *_ = (jnp.asarray(x) for x in _inputs()[:3])
    with pytest.raises(ValueError, match="not a multiple"):
        dot_product_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="mask"):
        dot_product_attention(q, k, v, mask=jnp.ones((B, 1, LQ, LK)))
    with pytest.raises(ValueError, match="key_mask"):
        dot_product_attention(q, k, v, key_mask=jnp.ones((B, LK + 1), bool))
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="dropout"):
        dot_product_attention(q, k, v, dropout_rate=0.1, dropout_key=jax.random.key(0), implementation="cudnn")


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from x2sam_jax.layers.attention import dot_product_attention
from x2sam_jax.sharding import constrain, make_mesh

x = jnp.ones((4, 6))
assert constrain(x, ("batch", "embed")) is x            # no mesh: nothing happens
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((4, 128, 4, 8)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((4, 128, 2, 8)), jnp.float32) for _ in range(2))
mask = np.asarray(rng.random((4, 128)) > 0.2)
mask[1, :30] = False
f = jax.jit(lambda q, k, v, m, impl: dot_product_attention(q, k, v, causal=True, key_mask=m, implementation=impl,
                                                           query_chunk=16, key_chunk=32, splash_interpret=True),
            static_argnums=4)
want = f(q, k, v, mask, "xla")
mesh = make_mesh(data=2, fsdp=2, tensor=2)
with jax.set_mesh(mesh):
    got = f(q, k, v, mask, "query_chunked")
    splash = f(q, k, v, mask, "splash")            # the Pallas kernel per device, inside shard_map
print("SPEC", tuple(got.sharding.spec), tuple(splash.sharding.spec))
print("MAXABS", float(jnp.abs(got - want).max()), float(jnp.abs(splash - want).max()))
print("SCALE", float(jnp.abs(want).max()))
"""


def test_sharding_constraints_on_8_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    specs = result.stdout.split("SPEC")[1].split("\n")[0].strip()
    # batch over data x fsdp, heads over tensor: the output is really split that way.
    expected = str((("data", "fsdp"), None, "tensor"))
    assert specs == f"{expected} {expected}", specs
    errors = [float(e) for e in result.stdout.split("MAXABS")[1].split("\n")[0].split()]
    scale = float(result.stdout.split("SCALE")[1])
    assert max(errors) <= 64 * np.finfo(np.float32).eps * scale, (errors, scale)   # tests/_tolerance.py's bound


# ----------------------------------------------------------------------------------------------
# Remat policies by checkpoint name (x2sam_jax.layers.scan)
# ----------------------------------------------------------------------------------------------


def _tiny_text(**overrides):
    from flax import nnx

    from x2sam_jax.config import Qwen3TextConfig
    from x2sam_jax.models.qwen3_text import Qwen3TextModel

    config = Qwen3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, mrope_section=(2, 1, 1), **overrides)
    return nnx.jit(lambda: Qwen3TextModel(config, rngs=nnx.Rngs(0)))()  # one compile, not one per init op


def test_named_remat_policies_keep_what_they_name_and_leave_gradients_unchanged():
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    from x2sam_jax.layers.scan import remat_policy

    embeds = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 32)), jnp.float32)

    model = _tiny_text()
    base = model.config

    def grads(policy):  # the policy is read from the config at call time
        model.config = dataclasses.replace(base, remat_policy=policy)
        return nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.tanh(m(embeds)[0]))))(model)

    plain = nnx.to_pure_dict(grads("none"))
    for policy in ("names:attention=save,mlp_out=offload",):  # same arithmetic, recomputed
        assert_trees_equal_up_to_reordering(nnx.to_pure_dict(grads(policy)), plain, what=policy)

    # What each policy keeps for the backward pass of one decoder layer.
    from x2sam_jax.models.qwen3_text import DecoderLayer, rotary_cos_sin

    config = base
    graphdef, state = nnx.split(nnx.jit(lambda: DecoderLayer(config, None, rngs=nnx.Rngs(0)))())
    cos, sin = rotary_cos_sin(jnp.broadcast_to(jnp.arange(6), (3, 2, 6)), config, jnp.float32)
    valid = jnp.ones((2, 6), bool)

    def kept(policy):
        def f(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x, cos, sin, valid, 0)[0])
        names = [d for _, d in saved_residuals(jax.checkpoint(f, policy=remat_policy(policy)), state, embeds)]
        return {n for n in ("qkv_proj", "attention", "attention_out", "mlp_hidden", "mlp_out")
                if any(f"named '{n}'" in d for d in names)}

    assert kept("save_attention") == {"qkv_proj", "attention"}
    # mlp_out only feeds the residual add, whose backward needs nothing: not a residual at all.
    assert kept("save_out_proj") == {"attention_out"}
    assert kept("full") == set()
    with pytest.raises(ValueError, match="remat_policy"):
        remat_policy("names:attention=keep")
    with pytest.raises(ValueError, match="remat_policy"):
        remat_policy("everything")


# ----------------------------------------------------------------------------------------------
# One naming scheme for the scan / remat / attention config fields
# ----------------------------------------------------------------------------------------------


def test_config_fields_have_one_spelling():
    from x2sam_jax.config import HieraConfig, MemoryConfig, PixelDecoderConfig, X2SAMConfig, from_dict

    # The names of before the one naming scheme are unknown fields, as any other.
    for cls, old in ((HieraConfig, "scan_blocks"), (HieraConfig, "remat"), (MemoryConfig, "query_chunk_size"),
                     (X2SAMConfig, "frame_remat")):
        with pytest.raises(ValueError, match="unknown config fields"):
            from_dict(cls, {old: None})
    # Every model config spells the fields the same way.
    for cls in (HieraConfig, MemoryConfig, PixelDecoderConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert "remat_policy" in fields and "remat" not in fields
