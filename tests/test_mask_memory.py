"""Mask memory: parity of its SAM2 pieces with transformers, the memory-encoder guide against a
torch rendering of the official forward, the scanned FIFO loop against the official list-based
loop, the K-frame window, and compile time independent of the clip length."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from x2sam_jax.config import MemoryConfig
from x2sam_jax.conversion import flatten, unflatten
from x2sam_jax.models.mask_memory import (DownSampler, MaskMemory, MemoryAttention, MemoryEncoder,
                                          MemoryFuser, axial_rope, temporal_encoding)

from transformers.models.sam2_video import modeling_sam2_video as tv
from transformers.models.sam2_video.configuration_sam2_video import Sam2VideoConfig

from _tolerance import assert_equal_up_to_reordering

TOL = 1e-4  # float32 parity, highest matmul precision (tests/conftest.py)


def _np(t):
    return t.detach().cpu().numpy()


def _assign(module, values: dict[str, np.ndarray]):
    """Overwrites parameters of ``module`` by flat dotted path; every path must exist."""
    state = nnx.state(module, nnx.Param)
    flat = flatten(nnx.to_pure_dict(state))
    unknown = set(values) - set(flat)
    assert not unknown, f"unknown parameter paths {sorted(unknown)}"
    for path, value in values.items():
        assert flat[path].shape == value.shape, (path, flat[path].shape, value.shape)
        flat[path] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    nnx.update(module, state)


def _torch_layer_values(prefix, module: torch.nn.Module, mapping, stacked_index=None):
    """Flat JAX values from a torch module: mapping torch-suffix -> (jax-suffix, kind)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if name not in mapping:
            continue
        target, kind = mapping[name]
        value = _np(tensor)
        if kind == "linear":
            value = value.T
        elif kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        out[prefix + target] = value
    return out


def _stack_values(per_layer: list[dict]) -> dict:
    return {k: np.stack([d[k] for d in per_layer]) for k in per_layer[0]}


# --- transformers parity: memory attention ------------------------------------------------

def _attention_mapping(torch_cross_name):
    mapping = {}
    for torch_name, jax_name in (("self_attn", "self_attn"), (torch_cross_name, "cross_attn")):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapping[f"{torch_name}.{proj}.weight"] = (f"{jax_name}.{proj}.kernel", "linear")
            mapping[f"{torch_name}.{proj}.bias"] = (f"{jax_name}.{proj}.bias", None)
    for lin in ("linear1", "linear2"):
        mapping[f"{lin}.weight"] = (f"{lin}.kernel", "linear")
        mapping[f"{lin}.bias"] = (f"{lin}.bias", None)
    for norm in ("layer_norm1", "layer_norm2", "layer_norm3"):
        mapping[f"{norm}.weight"] = (f"{norm}.scale", None)
        mapping[f"{norm}.bias"] = (f"{norm}.bias", None)
    return mapping


def _memory_attention_pair(height, width, rope_on_memory_keys, seed=0):
    torch.manual_seed(seed)
    hidden, layers = 32, 2
    tcfg = Sam2VideoConfig(memory_attention_hidden_size=hidden, memory_attention_num_layers=layers,
                           memory_attention_feed_forward_hidden_size=48,
                           memory_attention_rope_feat_sizes=[width, height],
                           memory_attention_dropout=0.0, memory_attention_rope_dropout=0.0)
    torch_module = tv.Sam2VideoMemoryAttention(tcfg).eval()
    with torch.no_grad():  # non-trivial norms
        for p in torch_module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    # transformers hard-codes the memory width of cross_attn_image to 64.
    cfg = MemoryConfig(hidden_size=hidden, memory_dim=64, num_layers=layers, mlp_dim=48, dropout=0.0,
                       attention_dropout=0.0, rope_on_memory_keys=rope_on_memory_keys)
    module = MemoryAttention(cfg, rngs=nnx.Rngs(0))
    mapping = _attention_mapping("cross_attn_image")
    values = _stack_values([_torch_layer_values("layers.", layer, mapping) for layer in torch_module.layers])
    values["layer_norm.scale"] = _np(torch_module.layer_norm.weight)
    values["layer_norm.bias"] = _np(torch_module.layer_norm.bias)
    _assign(module, values)
    return torch_module, module


@pytest.mark.parametrize("rope_on_memory_keys", [True, False], ids=["sam2_keys_rotated", "x2sam_keys_plain"])
def test_memory_attention_matches_transformers(rope_on_memory_keys):
    height, width, batch = 3, 5, 2
    length = height * width
    memory_length = 2 * length if rope_on_memory_keys else 23
    torch_module, module = _memory_attention_pair(height, width, rope_on_memory_keys)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(length, batch, 32, generator=g)
    pos = torch.randn(length, 1, 32, generator=g).expand(length, batch, 32)
    memory = torch.randn(memory_length, batch, 64, generator=g)
    memory_pos = torch.randn(memory_length, batch, 64, generator=g)
    with torch.no_grad():
        # X2SAM passes no key RoPE: in transformers that is excluding every key from RoPE.
        expected = torch_module(feats, memory, pos, memory_pos,
                                num_object_pointer_tokens=0 if rope_on_memory_keys else memory_length)
    expected = _np(expected).reshape(batch, height, width, 32)

    got = module(jnp.asarray(_np(feats.transpose(0, 1)).reshape(batch, height, width, 32)),
                 jnp.asarray(_np(memory.transpose(0, 1))), jnp.asarray(_np(memory_pos.transpose(0, 1))),
                 query_pos=jnp.asarray(_np(pos[:, 0])))
    err = float(np.abs(np.asarray(got) - expected).max())
    assert err <= TOL, err
    if rope_on_memory_keys:  # the switch matters: without key RoPE the result is different
        with torch.no_grad():
            plain = torch_module(feats, memory, pos, memory_pos, num_object_pointer_tokens=memory_length)
        assert np.abs(np.asarray(got) - _np(plain).reshape(got.shape)).max() > 1e-3


def test_memory_attention_chunked_and_masked_keys_equal_plain():
    height, width = 4, 4
    _, module = _memory_attention_pair(height, width, False)
    cfg_chunked = MemoryConfig(**{**module.config.__dict__, "attention_query_chunk": 6,
                                  "attention_implementation": "query_chunked"})
    chunked = MemoryAttention(cfg_chunked, rngs=nnx.Rngs(0))
    nnx.update(chunked, nnx.state(module, nnx.Param))
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2, height, width, 32)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(2, 20, 64)), jnp.float32)
    pos = jnp.asarray(rng.normal(size=(1, 20, 64)), jnp.float32)
    plain = module(feats, memory[:, :12], pos[:, :12])
    # Extra keys that are masked out must not matter; chunking (16 queries in chunks of 6) neither.
    mask = jnp.arange(20)[None] < 12
    masked = chunked(feats, memory.at[:, 12:].set(100.0), pos, mask)
    assert_equal_up_to_reordering(masked, plain, what="chunked, masked")
    # The same through jax.nn.dot_product_attention (the cuDNN route on GPU), with the mask.
    fused = MemoryAttention(MemoryConfig(**{**module.config.__dict__, "attention_implementation": "xla"}),
                            rngs=nnx.Rngs(0))
    nnx.update(fused, nnx.state(module, nnx.Param))
    assert_equal_up_to_reordering(fused(feats, memory.at[:, 12:].set(100.0), pos, mask), plain, what="xla")


def test_axial_rope_and_temporal_encoding_follow_the_official_formulas():
    cos, sin = axial_rope(3, 5, 8, 10000.0)
    # Official Sam2VisionRotaryEmbedding (X2SAM copy): x = idx % end_x, y = idx // end_x.
    dim = 8
    freqs = 1.0 / (10000.0 ** (np.arange(0, dim, 4)[: dim // 4].astype(np.float32) / dim))
    idx = np.arange(15)
    angles = np.concatenate([np.outer(idx % 5, freqs), np.outer(idx // 5, freqs)], -1).repeat(2, -1)
    assert np.abs(np.asarray(cos) - np.cos(angles)).max() < 1e-6
    assert np.abs(np.asarray(sin) - np.sin(angles)).max() < 1e-6
    # XSegmentor.get_temporal_encoding.
    gap, dim = 3, 16
    f = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2))
    expected = np.concatenate([np.sin(gap * f), np.cos(gap * f)])
    assert np.abs(np.asarray(temporal_encoding(jnp.asarray(gap), dim)) - expected).max() < 1e-6


# --- transformers parity: mask downsampler, fuser; official memory encoder -----------------

def _encoder_torch_config(hidden):
    return Sam2VideoConfig(memory_encoder_hidden_size=hidden, mask_downsampler_embed_dim=hidden,
                           mask_downsampler_total_stride=4, memory_fuser_embed_dim=hidden,
                           memory_fuser_intermediate_dim=24, memory_fuser_num_layers=2)


_DOWN_LAYER = {"conv.weight": ("conv.kernel", "conv"), "conv.bias": ("conv.bias", None),
               "layer_norm.weight": ("layer_norm.scale", None), "layer_norm.bias": ("layer_norm.bias", None)}
_FUSER = {"depthwise_conv.weight": ("depthwise_conv.kernel", "conv"),
          "depthwise_conv.bias": ("depthwise_conv.bias", None),
          "layer_norm.weight": ("layer_norm.scale", None), "layer_norm.bias": ("layer_norm.bias", None),
          "pointwise_conv1.weight": ("pointwise_conv1.kernel", "linear"),
          "pointwise_conv1.bias": ("pointwise_conv1.bias", None),
          "pointwise_conv2.weight": ("pointwise_conv2.kernel", "linear"),
          "pointwise_conv2.bias": ("pointwise_conv2.bias", None), "scale": ("scale", None)}


def _downsampler_values(prefix, layers, final_conv):
    values = {}
    for j, layer in enumerate(layers):
        values.update(_torch_layer_values(f"{prefix}layers.{j}.", layer, _DOWN_LAYER))
    values[prefix + "final_conv.kernel"] = _np(final_conv.weight).transpose(2, 3, 1, 0)
    values[prefix + "final_conv.bias"] = _np(final_conv.bias)
    return values


def _randomise(module: torch.nn.Module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5))


def test_mask_downsampler_and_fuser_match_transformers():
    hidden = 16
    tcfg = _encoder_torch_config(hidden)
    t_down = tv.Sam2VideoMaskDownSampler(tcfg).eval()
    t_fuser = tv.Sam2VideoMemoryFuser(tcfg).eval()
    _randomise(t_down, 0)
    _randomise(t_fuser, 1)  # includes the layer scale, which would make the block ~identity
    cfg = MemoryConfig(hidden_size=hidden, memory_dim=hidden, fuser_mlp_dim=24, mask_stride=4)
    down = DownSampler(cfg, 1, hidden, 4, rngs=nnx.Rngs(0))
    fuser = MemoryFuser(cfg, rngs=nnx.Rngs(0))
    _assign(down, _downsampler_values("", t_down.layers, t_down.final_conv))
    _assign(fuser, _stack_values([_torch_layer_values("layers.", b, _FUSER) for b in t_fuser.layers]))

    g = torch.Generator().manual_seed(2)
    masks = torch.randn(2, 1, 12, 12, generator=g) * 5
    feats = torch.randn(2, hidden, 3, 3, generator=g)
    with torch.no_grad():
        want_down = _np(t_down(masks)).transpose(0, 2, 3, 1)
        want_fuser = _np(t_fuser(feats)).transpose(0, 2, 3, 1)
    got_down = np.asarray(down(jnp.asarray(_np(masks).transpose(0, 2, 3, 1))))
    got_fuser = np.asarray(fuser(jnp.asarray(_np(feats).transpose(0, 2, 3, 1))))
    assert got_down.shape == (2, 3, 3, hidden)
    err_down, err_fuser = np.abs(got_down - want_down).max(), np.abs(got_fuser - want_fuser).max()
    print(f"mask downsampler max-abs {err_down:.2e}, memory fuser max-abs {err_fuser:.2e}")
    assert err_down <= TOL and err_fuser <= TOL


def test_memory_encoder_matches_official_forward():
    """The official Sam2MemoryEncoder (X2SAM) rendered in torch from transformers pieces."""
    hidden, stride, queries, classes = 8, 2, 5, 4
    tcfg = _encoder_torch_config(hidden)
    torch.manual_seed(0)
    vd_layers = torch.nn.ModuleList([tv.Sam2VideoMaskDownSamplerLayer(tcfg, hidden, hidden * 4)])
    vd_final = torch.nn.Conv2d(hidden * 4, hidden, 1)
    mask_down = tv.Sam2VideoMaskDownSampler(tcfg)
    fuser = tv.Sam2VideoMemoryFuser(tcfg)
    projection = torch.nn.Conv2d(hidden, hidden, 1)
    for i, m in enumerate((vd_layers, vd_final, mask_down, fuser, projection)):
        _randomise(m, 10 + i)

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, hidden, 8, 8, generator=g)             # scale 1: 8x8 -> 4x4
    class_logits = torch.randn(2, queries, classes + 1, generator=g) * 3
    mask_logits = torch.randn(2, queries, 16, 16, generator=g) * 4  # mask_features res, stride 4 -> 4x4
    with torch.no_grad():
        x = feats
        for layer in vd_layers:
            x = layer(x)
        x = vd_final(x)
        scores = class_logits.softmax(dim=-1)[..., :-1].max(dim=-1).values
        weights = (mask_logits + torch.log(scores.clamp_min(1e-6))[..., None, None]).softmax(dim=1)
        guide = (weights * mask_logits.sigmoid()).sum(dim=1, keepdim=True) * 20.0 - 10.0
        x = projection(fuser(x + mask_down(guide)))
    want = _np(x).transpose(0, 2, 3, 1)

    cfg = MemoryConfig(hidden_size=hidden, memory_dim=hidden, fuser_mlp_dim=24, feature_strides=(1, stride))
    encoder = MemoryEncoder(cfg, rngs=nnx.Rngs(0))
    values = _downsampler_values("vision_downsampler.1.", vd_layers, vd_final)
    values.update(_downsampler_values("mask_downsampler.", mask_down.layers, mask_down.final_conv))
    values.update(_stack_values([_torch_layer_values("memory_fuser.layers.", b, _FUSER)
                                 for b in fuser.layers]))
    values["projection.kernel"] = _np(projection.weight).transpose(2, 3, 1, 0)
    values["projection.bias"] = _np(projection.bias)
    _assign(encoder, values)
    got = encoder(jnp.asarray(_np(feats).transpose(0, 2, 3, 1)), jnp.asarray(_np(class_logits)),
                  jnp.asarray(_np(mask_logits)), scale_index=1)
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"memory encoder max-abs {err:.2e}")
    assert err <= TOL, err


def test_parameter_paths_follow_the_official_layout():
    mem = nnx.eval_shape(lambda: MaskMemory(MemoryConfig(), rngs=nnx.Rngs(0)))
    flat = flatten(nnx.to_pure_dict(nnx.state(mem, nnx.Param)))
    assert flat["no_memory_embedding"].shape == (1, 1, 256)
    assert flat["memory_attention.layers.cross_attn.k_proj.kernel"].shape == (4, 256, 256)
    assert flat["memory_attention.layers.linear1.kernel"].shape == (4, 256, 2048)
    assert flat["memory_encoder.vision_downsampler.2.layers.1.conv.kernel"].shape == (3, 3, 1024, 4096)
    assert flat["memory_encoder.vision_downsampler.2.final_conv.kernel"].shape == (1, 1, 4096, 256)
    assert "memory_encoder.vision_downsampler.0.layers.0.conv.kernel" not in flat  # stride 1: no layer
    assert flat["memory_encoder.mask_downsampler.layers.1.conv.kernel"].shape == (3, 3, 4, 16)
    assert flat["memory_encoder.memory_fuser.layers.depthwise_conv.kernel"].shape == (2, 7, 7, 1, 256)
    assert flat["memory_encoder.memory_fuser.layers.scale"].shape == (2, 256)


# --- the loop over frames ----------------------------------------------------------------

C = 8


class _PixelDecoder(nnx.Module):
    """Stand-in: SAM levels (high-res first) -> (mask_features, scales low-res first)."""

    def __init__(self, rngs):
        self.proj = nnx.List([nnx.Linear(C, C, rngs=rngs) for _ in range(3)])
        self.mask_proj = nnx.Linear(C, C, rngs=rngs)

    def __call__(self, levels):
        return self.mask_proj(levels[0]), tuple(p(l) for p, l in zip(self.proj, levels[::-1]))


class _MaskDecoder(nnx.Module):
    """Stand-in: queries pooled from the (memory-refined) scales -> mask / class logits.

    With ``guide_from_refined=False`` the logits that feed the memory encoder ignore the
    refined features, so a frame's memory depends on that frame alone (for the window test).
    """

    def __init__(self, rngs, guide_from_refined=True, dropout=0.0):
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (3, C)))
        self.cls = nnx.Linear(C, 4, rngs=rngs)
        self.guide_from_refined = guide_from_refined
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def __call__(self, refined, mask_features):
        pooled = sum(r.mean((1, 2))[:, None] for r in refined)
        q = self.queries[...][None] + (pooled if self.guide_from_refined else 0 * pooled)
        masks = self.dropout(jnp.einsum("bqc,bhwc->bqhw", q, mask_features) / C ** 0.5)
        outputs = {"masks": masks, "refined": refined[0], "pooled": pooled,
                   "mask_features": mask_features}
        return outputs, masks, self.cls(q)


def _build(k, guide_from_refined=True, dropout=0.0):
    cfg = MemoryConfig(hidden_size=C, memory_dim=C, num_memory_frames=k, num_layers=2, mlp_dim=16,
                       fuser_mlp_dim=16, dropout=dropout, attention_dropout=dropout)
    rngs = nnx.Rngs(0)
    memory = MaskMemory(cfg, rngs=rngs)
    decoders = (_PixelDecoder(rngs), _MaskDecoder(rngs, guide_from_refined, dropout))
    return memory, decoders


def _levels(t, batch=2, seed=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(keys[i], (batch, t, s, s, C)) for i, s in enumerate((16, 8, 4))]


def _pixel_decode(decoders, levels, _):
    return decoders[0](levels)


def _mask_decode(decoders, refined, mask_features, _):
    return decoders[1](refined, mask_features)


def _runner(memory, decoders, scan):
    graphdef, state = nnx.split((memory, decoders))

    @jax.jit
    def run(state, levels):
        mem, dec = nnx.merge(graphdef, state)
        return mem.run_video(dec, _pixel_decode, _mask_decode, levels, scan=scan)

    return lambda levels: run(state, levels), (run, state)


LOOP_CASES = [(1, 1), (1, 2), (1, 5), (3, 1), (3, 2), (3, 5), (8, 1), (8, 2), (8, 5)]
FAST_CASES = {(1, 2), (3, 2), (8, 5)}


@pytest.mark.parametrize("frames,k", [c if c in FAST_CASES else pytest.param(*c, marks=pytest.mark.slow)
                                      for c in LOOP_CASES])
def test_scanned_bank_equals_official_list_loop(frames, k):
    memory, decoders = _build(k)
    levels = _levels(frames)
    scanned, _ = _runner(memory, decoders, scan=True)
    looped, _ = _runner(memory, decoders, scan=False)
    a, b = scanned(levels), looped(levels)
    for name in a:
        assert a[name].shape[:2] == (2, frames)
        assert_equal_up_to_reordering(a[name], b[name], what=name)
    if frames > 1:  # memory changes later frames: frame 1 differs from a memory-less run
        first_only = scanned([lv[:, 1:2] for lv in levels])
        assert float(jnp.abs(first_only["refined"][:, 0] - a["refined"][:, 1]).max()) > 1e-3


@pytest.mark.slow
def test_gradients_of_scan_equal_gradients_of_loop():
    memory, decoders = _build(2)
    levels = _levels(3, batch=1)

    def loss(modules, scan):
        mem, dec = modules
        out = mem.run_video(dec, _pixel_decode, _mask_decode, levels, scan=scan)
        return jnp.sum(out["masks"] ** 2) + jnp.sum(out["refined"] ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)), static_argnums=1)
    g_scan, g_loop = grad((memory, decoders), True), grad((memory, decoders), False)
    def flat(grads):
        leaves = jax.tree_util.tree_leaves_with_path(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
                (leaf[...] if isinstance(leaf, nnx.Variable) else leaf) for path, leaf in leaves}

    flat_scan, flat_loop = flat(g_scan), flat(g_loop)
    assert flat_scan.keys() == flat_loop.keys()
    for path in flat_scan:
        scale = max(1.0, float(jnp.abs(flat_loop[path]).max()))
        err = float(jnp.abs(flat_scan[path] - flat_loop[path]).max()) / scale
        assert err <= 1e-4, (path, err)
    # The memory modules are trained through the loop.
    assert float(jnp.abs(flat_scan["0.memory_encoder.projection.kernel"]).max()) > 0
    assert float(jnp.abs(flat_scan["0.memory_attention.layers.cross_attn.v_proj.kernel"]).max()) > 0


def test_frame_sees_exactly_the_last_k_frames():
    k, frames, t = 2, 6, 4
    memory, decoders = _build(k, guide_from_refined=False)
    run, _ = _runner(memory, decoders, scan=True)
    levels = _levels(frames)
    base = run(levels)["refined"][:, t]

    def perturbed(frame):
        return run([lv.at[:, frame].add(1.0) for lv in levels])["refined"][:, t]

    assert float(jnp.abs(perturbed(t - k - 1) - base).max()) == 0.0      # evicted
    assert float(jnp.abs(perturbed(t - k) - base).max()) > 1e-3            # oldest kept entry
    assert float(jnp.abs(perturbed(t - 1) - base).max()) > 1e-3
    assert float(jnp.abs(perturbed(t + 1) - base).max()) == 0.0          # causal


def test_no_memory_embedding_only_at_frame_zero():
    memory, decoders = _build(2)
    memory.no_memory_embedding[...] = jnp.full((1, 1, C), 3.0)
    run, _ = _runner(memory, decoders, scan=True)
    levels = _levels(3)
    got = run(levels)["mask_features"]            # depends on the frame's own input only
    embed = memory.no_memory_embedding[...].reshape(C)
    for t in range(3):
        want = decoders[0].mask_proj(levels[0][:, t] + (embed if t == 0 else 0.0))
        assert float(jnp.abs(got[:, t] - want).max()) <= 1e-5, t
    assert float(jnp.abs(got[:, 0] - decoders[0].mask_proj(levels[0][:, 0])).max()) > 1e-2


def test_dropout_state_advances_through_the_scan():
    memory, decoders = _build(2, dropout=0.5)
    memory.train()
    decoders[1].train()
    count = lambda: int(decoders[1].dropout.rngs.count[...])  # noqa: E731
    before = count()
    out = memory.run_video(decoders, _pixel_decode, _mask_decode, _levels(3, batch=1), scan=True)
    assert count() == before + 3            # one draw per frame, written back after the scan
    masks = out["masks"][0]
    assert bool(jnp.any(masks == 0.0))      # dropout was active
    assert not bool(jnp.array_equal(masks[0] == 0, masks[1] == 0))  # fresh mask per frame


def test_the_program_does_not_grow_with_clip_length():
    """One scanned program for any clip length: the lowered and the compiled (XLA-optimised, so no
    unrolled loop) programs of 8 and 32 frames differ only in the trip count and the scanned shapes.
    Sizes, not compile seconds: a timing would be the machine's load."""
    memory, decoders = _build(5)
    _, (run, state) = _runner(memory, decoders, scan=True)
    sizes = {}
    for frames in (8, 32):
        lowered = run.lower(state, _levels(frames, batch=1))
        sizes[frames] = (len(lowered.as_text()), len(lowered.compile().as_text()))
    for stage, (short, long) in zip(("lowered", "compiled"), zip(sizes[8], sizes[32])):
        assert abs(long - short) <= 0.01 * short, (stage, sizes)


def test_padded_frames_are_not_written_to_the_bank():
    memory, _ = _build(2)
    bank = memory.init_bank(2, [4])
    entry = lambda v: (jnp.full((2, 4, C), v, jnp.float32),)  # noqa: E731
    bank = memory.push(bank, jnp.int32(0), entry(1.0), jnp.array([True, True]))
    bank = memory.push(bank, jnp.int32(1), entry(2.0), jnp.array([True, False]))   # sample 1: padding
    bank = memory.push(bank, jnp.int32(2), entry(3.0), jnp.array([True, True]))
    np.testing.assert_array_equal(bank.count, [3, 2])
    # Sample 0 wrapped around (slots hold frames 2, 1); sample 1 holds frames 0 and 2, frame 1 never.
    np.testing.assert_array_equal(bank.frame_index[:, 0], [2, 1])
    np.testing.assert_array_equal(bank.frame_index[:, 1], [0, 2])
    np.testing.assert_array_equal(bank.memory[0][:, 1, 0, 0], [1.0, 3.0])
    assert bool(bank.valid.all())


def test_trailing_padded_frames_leave_real_frames_unchanged_and_unread():
    memory, decoders = _build(2)
    graphdef, state = nnx.split((memory, decoders))

    @jax.jit
    def run(state, levels, frame_valid):
        mem, dec = nnx.merge(graphdef, state)
        return mem.run_video(dec, _pixel_decode, _mask_decode, levels, frame_valid=frame_valid)

    levels = _levels(4)
    valid = jnp.array([[True] * 4, [True, True, False, False]])
    out = run(state, levels, valid)
    alone = run(state, [lv[1:, :2] for lv in levels], jnp.ones((1, 2), bool))
    for name in ("masks", "refined"):
        np.testing.assert_allclose(out[name][1, :2], alone[name][0], atol=1e-5)
    # A padded frame in the middle is skipped: frame 2 of sample 1 reads only frames 0 and 1 ...
    gap = run(state, levels, jnp.array([[True] * 4, [True, True, False, True]]))
    # ... so changing the padded frame's pixels changes nothing at the real frame after it.
    changed = run(state, [lv.at[1, 2].add(5.0) for lv in levels], jnp.array([[True] * 4, [True, True, False, True]]))
    np.testing.assert_allclose(gap["refined"][1, 3], changed["refined"][1, 3], atol=1e-6)
    with_frame = run(state, [lv.at[1, 2].add(5.0) for lv in levels], jnp.ones((2, 4), bool))
    assert float(jnp.abs(with_frame["refined"][1, 3] - gap["refined"][1, 3]).max()) > 1e-3


@pytest.mark.slow
def test_clips_with_the_bank_carried_equal_one_pass_and_reset_clips_equal_separate_runs():
    """A video streamed clip by clip (x2sam_jax.streaming): with the bank leaving a clip entering
    the next one and the frames counted from the video's start, the frames are those of one scan
    over the whole video; with an empty bank and frames from 0 (reset), each clip is a video of
    its own. The bank leaving a clip holds its last K real frames (the last one too). Slow (the
    modules' build and two compiles: 58 s on the loaded 2-core machine): test_predict's
    streaming test checks the hand-over in the default run."""
    memory, decoders = _build(2)
    graphdef, state = nnx.split((memory, decoders))

    @jax.jit
    def whole(state, levels):
        mem, dec = nnx.merge(graphdef, state)
        return mem.run_video(dec, _pixel_decode, _mask_decode, levels)

    @jax.jit
    def clip(state, levels, valid, bank, first_frame):
        mem, dec = nnx.merge(graphdef, state)
        return mem.run_video(dec, _pixel_decode, _mask_decode, levels, frame_valid=valid, bank=bank,
                             first_frame=first_frame, keep_bank=True)

    levels = _levels(7, batch=1)
    one_pass = whole(state, levels)
    part = lambda a, b: [lv[:, a:b] for lv in levels]  # noqa: E731
    # Clips of 3 frames, the last one padded (frame 6 and two padding frames).
    last = [jnp.concatenate([lv, jnp.zeros_like(lv), jnp.zeros_like(lv)], axis=1) for lv in part(6, 7)]
    valid = jnp.ones((1, 3), bool)
    empty = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),      # no valid entry
                         jax.eval_shape(clip, state, part(0, 3), valid, None, 0)[1])
    bank, carried = empty, []
    for frames, real, start, kept in [(part(0, 3), 3, 0, [1, 2]), (part(3, 6), 3, 3, [4, 5]), (last, 1, 6, [5, 6])]:
        out, bank = clip(state, frames, jnp.arange(3)[None] < real, bank, start)
        assert sorted(np.asarray(bank.frame_index[:, 0]).tolist()) == kept and bool(bank.valid.all())
        carried.append(jax.tree.map(lambda a: a[:, :real], out))
    assert int(bank.count[0]) == 7                       # the padding frames wrote nothing
    for name in ("masks", "refined"):
        streamed = jnp.concatenate([c[name] for c in carried], axis=1)
        np.testing.assert_allclose(streamed, one_pass[name], rtol=1e-5, atol=1e-5)

    # reset: the bank entering every clip is empty, and frames count from 0: frames 3-5 as the
    # start of a video of their own (frames after them change nothing before them).
    out, _ = clip(state, part(3, 6), valid, empty, 0)
    alone = whole(state, [jnp.concatenate([a, b], axis=1) for a, b in zip(part(3, 6), part(0, 4))])
    np.testing.assert_allclose(out["refined"], alone["refined"][:, :3], rtol=1e-5, atol=1e-5)
    # ... which differs from the carried clip (its frame 3 remembers frames 1 and 2).
    assert float(jnp.abs(out["refined"] - carried[1]["refined"]).max()) > 1e-3
