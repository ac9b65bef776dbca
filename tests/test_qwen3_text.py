"""Qwen3 text model pieces: M-RoPE tables and positions against transformers, scanned vs unrolled
stacks, remat, deepstack forms, and the KV cache against a cache-free forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _qwen3_vl_helpers import IMAGE_ID, VIDEO_ID, image_tokens, text_ids, tiny_hf_config, video_tokens
from x2sam_jax.config import Qwen3TextConfig
from x2sam_jax.models.qwen3_text import Qwen3TextModel, init_cache, rotary_cos_sin
from x2sam_jax.models.qwen3_vl import get_rope_index

from _tolerance import (EPS32, VALUE_ULPS, assert_equal_up_to_reordering, assert_trees_equal_up_to_reordering,
                        reorder_bound)

TINY = Qwen3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=32, mrope_section=(6, 5, 5))


def test_rotary_tables_match_transformers():
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    hf = Qwen3VLTextRotaryEmbedding(tiny_hf_config().text_config)
    positions = np.random.default_rng(0).integers(0, 3000, (3, 2, 7))
    cos_ref, sin_ref = hf(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    cos, sin = rotary_cos_sin(jnp.asarray(positions), TINY, jnp.float32)
    assert np.abs(np.asarray(cos) - cos_ref.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(sin) - sin_ref.numpy()).max() <= 1e-5
    # equal rows (sequential mode) reduce to plain 1-D RoPE
    flat = np.broadcast_to(positions[:1], positions.shape)
    cos1, _ = rotary_cos_sin(jnp.asarray(flat), TINY, jnp.float32)
    inv = 1.0 / (5e6 ** (np.arange(0, 32, 2) / 32))
    angles = positions[0][..., None] * inv
    assert np.abs(np.asarray(cos1) - np.cos(np.concatenate([angles, angles], -1))).max() <= 1e-4


def test_rope_index_matches_transformers_on_a_padded_mixed_batch():
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    gi1, gi2, gv = [1, 4, 6], [1, 8, 4], [2, 4, 4]
    a = text_ids(2, 0) + image_tokens(gi1) + text_ids(3, 1) + video_tokens(gv) + text_ids(2, 2)
    b = text_ids(4, 3) + image_tokens(gi2) + text_ids(1, 4)
    length = max(len(a), len(b)) + 2
    ids = np.array([[0] * (length - len(a)) + a, b + [0] * (length - len(b))])
    mask = np.array([[0] * (length - len(a)) + [1] * len(a), [1] * len(b) + [0] * (length - len(b))])
    mm = np.where(ids == IMAGE_ID, 1, np.where(ids == VIDEO_ID, 2, 0))
    config = tiny_hf_config()
    hf_model = Qwen3VLModel.__new__(Qwen3VLModel)  # get_rope_index only reads the config
    torch.nn.Module.__init__(hf_model)
    hf_model.config = config
    ref, deltas = hf_model.get_rope_index(torch.tensor(ids), torch.tensor(mm), torch.tensor([gi1, gi2]),
                                          torch.tensor([gv]), torch.tensor(mask))
    ours, next_pos = get_rope_index(ids, mask, np.array([gi1, gi2]), np.array([gv]), image_token_id=IMAGE_ID,
                                    video_token_id=VIDEO_ID, spatial_merge_size=2)
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(next_pos, deltas.numpy()[:, 0] + mask.sum(1))
    with pytest.raises(ValueError, match="image_grid_thw"):
        get_rope_index(ids, mask, np.array([gi1]), np.array([gv]), image_token_id=IMAGE_ID,
                       video_token_id=VIDEO_ID, spatial_merge_size=2)


def _inputs(batch=2, length=9, seed=0):
    rng = np.random.default_rng(seed)
    embeds = jnp.asarray(rng.standard_normal((batch, length, TINY.hidden_size)), jnp.float32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :3] = 0  # left padding in row 1
    vis = np.zeros((batch, length), bool)
    vis[0, 2:5] = True
    vis[1, 4:6] = True
    deep = jnp.asarray(rng.standard_normal((2, int(vis.sum()), TINY.hidden_size)), jnp.float32)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return embeds, jnp.asarray(mask), jnp.asarray(positions), jnp.asarray(vis), deep


def _model(**overrides):
    return Qwen3TextModel(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0))


def test_scanned_unrolled_and_remat_give_identical_outputs():
    args = _inputs()
    scanned, _ = _model(scan_layers=True)(*args)
    unrolled, _ = _model(scan_layers=False)(*args)
    remat, _ = _model(scan_layers=True, remat_policy="full")(*args)
    assert_equal_up_to_reordering(unrolled, scanned, what="unrolled")
    assert_equal_up_to_reordering(remat, scanned, what="remat")
    swapped = _model(scan_layers=False)  # a real bug (layers in the wrong order) is far outside the bound
    nnx.update(swapped.layers, jax.tree.map(lambda x: x[::-1], nnx.state(swapped.layers, nnx.Param)))
    assert float(jnp.abs(swapped(*args)[0] - scanned).max()) > 100 * reorder_bound(scanned)
    # and gradients through the remat'd scan agree too
    def loss(m):
        return jnp.sum(m(*args)[0] ** 2)
    g_plain = nnx.grad(loss)(_model(scan_layers=True))
    g_remat = nnx.grad(loss)(_model(scan_layers=True, remat_policy="full"))
    assert_trees_equal_up_to_reordering(nnx.to_pure_dict(g_remat), nnx.to_pure_dict(g_plain), what="gradient with remat")


def test_deepstack_compact_and_placed_forms_agree_and_matter():
    embeds, mask, positions, vis, deep = _inputs()
    model = _model()
    compact, _ = model(embeds, mask, positions, vis, deep)
    placed = np.zeros((2,) + vis.shape + (TINY.hidden_size,), np.float32)
    placed[:, np.asarray(vis)] = np.asarray(deep)
    dense, _ = model(embeds, mask, positions, vis, jnp.asarray(placed))
    without, _ = model(embeds, mask, positions)
    assert float(jnp.abs(compact - dense).max()) <= 1e-6
    assert float(jnp.abs(compact - without).max()) > 1e-2


def test_kv_cache_prefill_and_decode_match_the_full_forward():
    embeds, mask, positions, vis, deep = _inputs(length=10)
    model = _model()
    full, _ = model(embeds, mask, positions, vis, deep)
    prompt = 7
    cache = init_cache(TINY, 2, 12)
    vis_prompt = vis[:, :prompt]
    deep_prompt = deep[:, : int(vis_prompt.sum())]  # visual rows all lie in the prompt
    assert int(vis_prompt.sum()) == int(vis.sum())
    hidden, cache = model(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt], vis_prompt, deep_prompt, cache)
    steps = [hidden]
    for i in range(prompt, 10):
        h, cache = model(embeds[:, i:i + 1], mask[:, i:i + 1], positions[:, i:i + 1], cache=cache)
        steps.append(h)
    assert int(cache["index"]) == 10
    incremental = jnp.concatenate(steps, axis=1)
    keep = np.asarray(mask).astype(bool)
    assert float(jnp.abs(incremental - full)[keep].max()) <= 1e-5


def test_parameters_carry_logical_axis_names():
    model = nnx.eval_shape(lambda: _model())
    state = nnx.state(model, nnx.Param)
    names = {".".join(map(str, path)): var.get_metadata().get("out_sharding")
             for path, var in nnx.to_flat_state(state)}
    assert names["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert names["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert names["embed_tokens.embedding"] == ("vocab", "embed")
    assert all(n for n in names.values()), [k for k, n in names.items() if not n]


def test_bfloat16_compute_stays_close_to_float32():
    embeds, mask, positions, vis, deep = _inputs()
    f32, _ = _model()(embeds, mask, positions, vis, deep)
    bf16, _ = _model(dtype="bfloat16")(embeds, mask, positions, vis, deep)
    assert bf16.dtype == jnp.bfloat16
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16.astype(jnp.float32) - f32).max()) <= 0.05 * scale


_SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp, numpy as np
from flax import nnx
import x2sam_jax
from x2sam_jax.config import LoRAConfig, Qwen3TextConfig
from x2sam_jax.models.qwen3_text import Qwen3TextModel
from x2sam_jax.sharding import create_sharded, make_mesh
cfg = Qwen3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, mrope_section=(4, 2, 2))
make = lambda: Qwen3TextModel(cfg, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(0))
mesh = make_mesh(data=2, fsdp=2, tensor=2)
sharded = create_sharded(make, mesh)
assert tuple(sharded.layers.self_attn.q_proj.kernel[...].sharding.spec) == (None, "fsdp", "tensor")
assert tuple(sharded.layers.self_attn.q_proj.lora_b[...].sharding.spec) == (None, "fsdp", "tensor")  # rank -> fsdp
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 64)), jnp.float32)
forward = nnx.jit(lambda m, x: m(x)[0])
with jax.set_mesh(mesh):
    a = forward(sharded, x)
b = forward(make(), x)
print("MAXABS", float(jnp.abs(a - b).max()), "SCALE", float(jnp.abs(b).max()))
"""


def test_sharded_on_8_cpu_devices_matches_single_device():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    err, scale = (float(v) for v in result.stdout.split("MAXABS")[1].split("SCALE"))
    assert scale > 0.1 and err <= VALUE_ULPS * EPS32 * scale, (err, scale)
