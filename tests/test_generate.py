"""x2sam_jax.generate: greedy decoding token-identical to transformers' generate; padding, stop
tokens and sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import x2sam_jax
from _qwen3_vl_helpers import IMAGE_ID, convert_cli, image_tokens, make_hf_model, pixels, text_ids
from x2sam_jax.generate import generate, sample_logits

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3vl_generate")
    hf, src = make_hf_model(tmp, tie=True, seed=5, layers=2, init_std=0.3)
    convert_cli(src, tmp / "jax")
    return hf, x2sam_jax.load(tmp / "jax"), tmp / "jax"


GRID = [1, 4, 6]
ROW_A = text_ids(3, 1) + image_tokens(GRID) + text_ids(4, 2)   # with an image
ROW_B = text_ids(6, 7)                                         # text only, shorter


def _batch(side):
    pad = len(ROW_A) - len(ROW_B)
    if side == "left":
        ids = np.array([ROW_A, [0] * pad + ROW_B])
        mask = np.array([[1] * len(ROW_A), [0] * pad + [1] * len(ROW_B)])
    else:
        ids = np.array([ROW_A, ROW_B + [0] * pad])
        mask = np.array([[1] * len(ROW_A), [1] * len(ROW_B) + [0] * pad])
    return ids, mask, dict(pixel_values=pixels([GRID], 3), image_grid_thw=np.array([GRID]))


@pytest.fixture(scope="module")
def left_tokens(models):
    _, model, _ = models
    ids, mask, kw = _batch("left")
    return np.asarray(generate(model, ids, mask, max_new_tokens=NEW_TOKENS, **kw).tokens)


def test_greedy_matches_transformers_generate(models, left_tokens):
    import torch

    hf, _, _ = models
    ids, mask, kw = _batch("left")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(kw["pixel_values"]),
                          image_grid_thw=torch.tensor(kw["image_grid_thw"]),
                          mm_token_type_ids=torch.tensor((ids == IMAGE_ID).astype(np.int64)),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    assert ref.shape == (2, NEW_TOKENS)
    assert len(set(ref[0].tolist())) >= 3, "degenerate fixture: greedy output should vary"
    np.testing.assert_array_equal(left_tokens, ref)


def test_right_padding_and_single_rows_give_the_same_tokens(models, left_tokens):
    _, model, _ = models
    ids, mask, kw = _batch("right")
    right = np.asarray(generate(model, ids, mask, max_new_tokens=NEW_TOKENS, **kw).tokens)
    np.testing.assert_array_equal(right, left_tokens)
    alone = np.asarray(generate(model, np.array([ROW_B]), max_new_tokens=NEW_TOKENS).tokens)
    np.testing.assert_array_equal(alone[0], left_tokens[1])


def test_stop_tokens_pad_the_rest_and_set_lengths(models, left_tokens):
    _, model, _ = models
    ids, mask, kw = _batch("left")
    stop = int(left_tokens[0, 2])
    first_a = int(np.argmax(left_tokens[0] == stop))
    hits_b = np.nonzero(left_tokens[1] == stop)[0]
    out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop], pad_token_id=-1, **kw)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert lengths[0] == first_a + 1
    np.testing.assert_array_equal(tokens[0, :first_a + 1], left_tokens[0, :first_a + 1])
    assert (tokens[0, first_a + 1:] == -1).all()
    expected_b = hits_b[0] + 1 if hits_b.size else NEW_TOKENS
    assert lengths[1] == expected_b
    np.testing.assert_array_equal(tokens[1, :expected_b], left_tokens[1, :expected_b])


def test_sequential_mode_decoding_matches_full_forwards(models):
    """The cached decode loop equals re-running the whole sequence each step (no cache)."""
    _, _, path = models
    model = x2sam_jax.load(path, position_mode="sequential")
    ids, mask, kw = _batch("left")
    tokens = np.asarray(generate(model, ids, mask, max_new_tokens=3, **kw).tokens)
    seq, m = ids, mask
    for step in range(3):
        logits = np.asarray(model(input_ids=seq, attention_mask=m, **kw).logits)
        nxt = logits[:, -1].argmax(-1)
        np.testing.assert_array_equal(nxt, tokens[:, step])
        seq = np.concatenate([seq, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((2, 1), m.dtype)], 1)


def test_sampling_with_top_k_1_is_greedy(models, left_tokens):
    _, model, _ = models
    ids, mask, kw = _batch("left")
    out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, temperature=0.7, top_k=1,
                   rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), left_tokens)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    top_p = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.75)[0])(keys))
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.75; the tail is never drawn
    top_k = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=3)[0])(keys))
    assert set(top_k.tolist()) == {0, 1, 2}
    free = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0)[0])(keys))
    assert abs((free == 0).mean() - 0.5) < 0.05 and set(free.tolist()) == {0, 1, 2, 3, 4}
    assert int(sample_logits(logits, keys[0])[0]) == 0


def test_bad_arguments_are_named(models):
    _, model, _ = models
    with pytest.raises(ValueError, match="rng"):
        generate(model, np.array([ROW_B]), temperature=1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, np.array([ROW_B]), np.zeros((1, len(ROW_B))))


def test_prompts_of_one_length_bucket_share_one_compile(models, monkeypatch):
    import x2sam_jax.generate as gen

    _, model, _ = models
    traces = []
    real_init_cache = gen.init_cache
    monkeypatch.setattr(gen, "init_cache", lambda *a, **k: traces.append(a[2]) or real_init_cache(*a, **k))
    short, longer = np.array([text_ids(5, 11)]), np.array([text_ids(9, 12)])
    first = generate(model, short, max_new_tokens=3)
    second = generate(model, longer, max_new_tokens=3)
    assert traces == [gen.prompt_bucket(9) + 3] and gen.prompt_bucket(5) == gen.prompt_bucket(9) == 32
    # Padding to the bucket changes no token: the exact-length program gives the same ones.
    for ids, out in ((short, first), (longer, second)):
        exact = generate(model, ids, max_new_tokens=3, prompt_buckets=())
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(exact.tokens))
    assert traces[1:] == [5 + 3, 9 + 3]
    assert gen.prompt_bucket(33) == 64 and gen.prompt_bucket(33, (40, 80)) == 40
    assert gen.prompt_bucket(100, (40, 80)) == 100
