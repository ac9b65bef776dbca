"""Qwen3VLModel logits against transformers' Qwen3VLForConditionalGeneration (float32, highest
matmul precision), on tiny random checkpoints saved in >= 3 safetensors shards and converted
through the real CLI. Tolerance: 1e-4 max-abs on the logits of every real token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import x2sam_jax
from _qwen3_vl_helpers import (IMAGE_ID, convert_cli, image_tokens, make_hf_model, pixels, text_ids,
                               torch_logits, video_tokens)
from _tolerance import assert_equal_up_to_reordering

TOL = 1e-4


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3vl_tied")
    hf, src = make_hf_model(tmp, tie=True)
    assert len(list(src.glob("*.safetensors"))) >= 3
    convert_cli(src, tmp / "jax")
    return hf, x2sam_jax.load(tmp / "jax"), tmp / "jax"


def _max_abs(ours, ref, mask=None):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ours, ref = ours[keep], ref[keep]
    return float(np.abs(ours - ref).max())


def _case(name):
    """(input_ids, attention_mask, kwargs) built as the processor would."""
    if name == "text":
        return np.array([text_ids(12, 0)]), None, {}
    if name == "image":
        grid = [1, 4, 6]
        ids = text_ids(3, 1) + image_tokens(grid) + text_ids(5, 2)
        return np.array([ids]), None, dict(pixel_values=pixels([grid], 3), image_grid_thw=np.array([grid]))
    if name == "two_images":
        g1, g2 = [1, 4, 4], [1, 6, 8]
        ids = text_ids(2, 4) + image_tokens(g1) + text_ids(3, 5) + image_tokens(g2) + text_ids(4, 6)
        return np.array([ids]), None, dict(pixel_values=pixels([g1, g2], 7), image_grid_thw=np.array([g1, g2]))
    if name == "video":
        grid = [3, 4, 6]  # 3 temporal patches = 6 frames, each group prefixed by its timestamp text
        ids = text_ids(3, 8) + video_tokens(grid) + text_ids(4, 9)
        return np.array([ids]), None, dict(pixel_values_videos=pixels([grid], 10), video_grid_thw=np.array([grid]))
    if name == "image_and_video":
        gi, gv = [1, 4, 4], [2, 4, 4]
        ids = text_ids(2, 11) + image_tokens(gi) + text_ids(2, 12) + video_tokens(gv) + text_ids(3, 13)
        return np.array([ids]), None, dict(pixel_values=pixels([gi], 14), image_grid_thw=np.array([gi]),
                                           pixel_values_videos=pixels([gv], 15), video_grid_thw=np.array([gv]))
    if name == "padded_batch":  # left padding; the shorter row has an image, the longer is text
        grid = [1, 4, 4]
        a = text_ids(2, 16) + image_tokens(grid) + text_ids(3, 17)
        b = text_ids(len(a) + 5, 18)
        ids = np.array([[0] * 5 + a, b])
        mask = np.array([[0] * 5 + [1] * len(a), [1] * len(b)])
        return ids, mask, dict(pixel_values=pixels([grid], 19), image_grid_thw=np.array([grid]))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["text", "image", "two_images", "video", "image_and_video", "padded_batch"])
def test_mrope_logits_match_transformers(tied, name):
    hf, model, _ = tied
    ids, mask, kw = _case(name)
    ref = torch_logits(hf, ids, mask, **kw)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    err = _max_abs(out.logits, ref, mask)
    assert err <= TOL, f"{name}: max-abs {err}"


def test_sequential_positions_match_transformers_with_1d_positions(tied):
    hf, _, path = tied
    model = x2sam_jax.load(path, position_mode="sequential")
    assert model.config.position_mode == "sequential"
    for name in ("image", "padded_batch"):
        ids, mask, kw = _case(name)
        m = np.ones_like(ids) if mask is None else mask
        positions = np.maximum(np.cumsum(m, 1) - 1, 0) * m
        ref = torch_logits(hf, ids, mask, position_ids=positions, **kw)
        out = model(input_ids=ids, attention_mask=mask, **kw)
        err = _max_abs(out.logits, ref, mask)
        assert err <= TOL, f"{name}: max-abs {err}"
        # and the modes really differ when images are present
        mrope = torch_logits(hf, ids, mask, **kw)
        assert _max_abs(out.logits, mrope, mask) > 1e-3


def test_untied_lm_head_and_hidden_states(tmp_path):
    import torch

    hf, src = make_hf_model(tmp_path, tie=False, seed=1, layers=2)
    assert len(list(src.glob("*.safetensors"))) >= 3
    convert_cli(src, tmp_path / "jax")
    model = x2sam_jax.load(tmp_path / "jax")
    assert model.lm_head is not None and not model.config.text.tie_word_embeddings
    ids, mask, kw = _case("image")
    ref = torch_logits(hf, ids, mask, **kw)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    assert _max_abs(out.logits, ref) <= TOL
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(kw["pixel_values"]),
                          image_grid_thw=torch.tensor(kw["image_grid_thw"]),
                          mm_token_type_ids=torch.tensor((ids == IMAGE_ID).astype(np.int64))).last_hidden_state
    assert _max_abs(out.hidden_states, hidden.numpy()) <= TOL


def test_pieces_compose_to_the_forward(tied):
    """language_model / embed_tokens / lm_logits / encode_images, as X2SAM drives them."""
    import jax.numpy as jnp

    _, model, _ = tied
    ids, mask, kw = _case("image")
    full = model(input_ids=ids, **kw)
    rows, deepstack = model.encode_images(kw["pixel_values"], kw["image_grid_thw"])
    embeds = np.asarray(model.embed_tokens(ids)).copy()
    vis = ids == IMAGE_ID
    embeds[vis] = np.asarray(rows)
    positions, _ = model.position_ids(ids, None, kw["image_grid_thw"])
    hidden, cache = model.language_model(jnp.asarray(embeds), None, positions, vis, deepstack)
    assert cache is None
    assert_equal_up_to_reordering(model.lm_logits(hidden), full.logits, what="logits")


def test_placeholder_count_mismatch_is_a_clear_error(tied):
    _, model, _ = tied
    ids, _, kw = _case("image")
    with pytest.raises(ValueError, match="image"):
        model(input_ids=ids[:, :-8], **kw)  # drops some image pad tokens
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(input_ids=ids)  # image tokens but no grid


def test_config_round_trips_through_json(tied):
    from x2sam_jax import config as config_lib

    _, model, _ = tied
    cfg = model.config
    assert config_lib.from_dict(type(cfg), config_lib.to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="position_mode"):
        dataclasses.replace(cfg, position_mode="1d")
