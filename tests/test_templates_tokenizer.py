"""Templates, the tiny tokenizer, the chat template, placeholder expansion, spans and labels."""

import numpy as np
import pytest

from x2sam_jax.data import templates as tpl
from x2sam_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def tokenizer():
    return tk.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tk.SpecialIds.from_tokenizer(tokenizer)


def test_tiny_tokenizer_is_deterministic_with_single_token_specials(tokenizer, ids):
    again = tk.build_tiny_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    for token in tk.QWEN_SPECIAL_TOKENS + tk.X2SAM_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert len({ids.seg, ids.p_start, ids.p_end, ids.region, ids.image_pad, ids.im_start, ids.im_end}) == 7
    text = "Sure, the segmentation mask is <SEG>."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode("hello", add_special_tokens=False)
    assert tk.add_x2sam_tokens(tokenizer) == 0  # idempotent


def test_load_tokenizer_from_a_saved_dir(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = tk.load_tokenizer(str(tmp_path / "tok"))
    assert tk.SpecialIds.from_tokenizer(loaded) == tk.SpecialIds.from_tokenizer(tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tk.load_tokenizer(str(tmp_path / "empty"))


def _decode_labelled(tokenizer, input_ids, labels):
    """Contiguous runs of labelled tokens, decoded."""
    runs, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != tk.IGNORE_LABEL:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chat_template_labels_only_answers(tokenizer, ids):
    rng = np.random.default_rng(0)
    turns = tpl.referring_turns(["the left man", "a red CAR"], rng)
    input_ids, labels = tk.encode_turns(turns, tokenizer, ids, image_tokens=[12])
    text = tokenizer.decode(input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>")
    expected = "".join(
        f"<|im_start|>user\n{t.prompt}<|im_end|>\n<|im_start|>assistant\n{t.answer}<|im_end|>\n" for t in turns
    ).replace("<image>", "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>")
    assert text == expected
    assert _decode_labelled(tokenizer, input_ids, labels) == [t.answer + "<|im_end|>" for t in turns]
    assert input_ids.dtype == labels.dtype == np.int32
    prompt_only, prompt_labels = tk.encode_turns(turns, tokenizer, ids, image_tokens=[12], generation_prompt=True)
    assert tokenizer.decode(prompt_only).endswith("<|im_start|>assistant\n")
    assert (prompt_labels[: len(prompt_only)] == labels[: len(prompt_only)]).all()


def test_spans_cover_bracketed_conditions_and_seg_positions(tokenizer, ids):
    rng = np.random.default_rng(1)
    categories = ["person", "tree", "wall-other-merged", "dining table"]
    turns = tpl.vocabulary_turns(categories, rng)
    input_ids, labels = tk.encode_turns(turns, tokenizer, ids, image_tokens=[4])
    spans = tk.condition_spans(input_ids, ids)
    assert spans.shape == (4, 2) and spans.dtype == np.int32
    decoded = [tokenizer.decode(input_ids[s : e + 1]) for s, e in spans]
    assert decoded == ["<p>person</p>", "<p>tree</p>", "<p>wall</p>", "<p>dining table</p>"]
    seg = tk.seg_positions(input_ids, ids)
    assert len(seg) == 1 and input_ids[seg[0]] == ids.seg and labels[seg[0]] == ids.seg


def test_region_and_video_placeholders_expand(tokenizer, ids):
    rng = np.random.default_rng(2)
    turns = tpl.region_turns(3, rng, video=True)
    layout = tk.VideoLayout(group_times=(0.25, 1.0, 1.75), tokens_per_group=6)
    input_ids, _ = tk.encode_turns(turns, tokenizer, ids, videos=[layout], region_tokens=64)
    assert (input_ids == ids.region).sum() == 3 * 64
    assert (input_ids == ids.image_pad).sum() == 3 * 6
    assert (input_ids == ids.vision_start).sum() == 3
    text = tokenizer.decode(input_ids)
    assert "<0.2 seconds><|vision_start|>" in text and "<1.0 seconds>" in text and "<1.8 seconds>" in text
    spans = tk.condition_spans(input_ids, ids)
    assert len(spans) == 3 and all(e - s + 1 == 66 for s, e in spans)  # <p> + 64 + </p>
    with pytest.raises(ValueError, match="more <image> placeholders"):
        tk.encode_turns(tpl.vocabulary_turns(["a"], rng), tokenizer, ids)
    with pytest.raises(ValueError, match="have no placeholder"):
        tk.encode_turns([tpl.Turn("no media", "ok")], tokenizer, ids, image_tokens=[3])


def test_unbalanced_condition_brackets_are_errors(tokenizer, ids):
    for text in ("<p>a<p>b</p></p>", "a</p>", "<p>open"):
        input_ids, _ = tk.encode_turns([tpl.Turn(text, "x")], tokenizer, ids)
        with pytest.raises(ValueError):
            tk.condition_spans(input_ids, ids)


def test_category_sampling_train_and_eval():
    vocabulary = [f"c{i}" for i in range(300)]
    positives = ["c5", "c17", "c299"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = tpl.sample_categories(vocabulary, positives, rng, train=True, max_categories=128)
        assert len(picked) == 128 == len(set(picked)) and set(positives) <= set(picked)
    assert tpl.sample_categories(vocabulary, positives, rng, train=False) == vocabulary
    small = tpl.sample_categories(["a", "b", "c"], ["b"], rng, train=True)
    assert sorted(small) == ["a", "b", "c"]
    many_positive = tpl.sample_categories(vocabulary, vocabulary[:200], rng, train=True, max_categories=128)
    assert set(many_positive) == set(vocabulary[:200])  # positives are never dropped


def test_gcg_answer_interleaves_phrases_then_seg():
    caption = "A man rides a bicycle near a tree"
    spans = [(27, 33), (0, 5), (12, 21)]
    assert tpl.tag_caption(caption, spans) == "<p>A man</p> rides <p>a bicycle</p> near <p>a tree</p>"
    (turn,) = tpl.gcg_turns(caption, spans, np.random.default_rng(0))
    assert turn.prompt.startswith("<image>")
    assert turn.answer.startswith("<p>A man</p> rides <p>a bicycle</p> near <p>a tree</p>. ")
    assert turn.answer.endswith("<SEG>.") and turn.answer.count("<SEG>") == 1
    with pytest.raises(ValueError, match="overlapping"):
        tpl.tag_caption(caption, [(0, 5), (3, 8)])
    with pytest.raises(ValueError, match="outside"):
        tpl.tag_caption(caption, [(30, 99)])


def test_template_families_have_one_seg_per_answer_and_media_words():
    rng = np.random.default_rng(3)
    for video in (False, True):
        media, other = ("video", "image") if video else ("image", "video")
        families = [
            tpl.vocabulary_turns(["cat"], rng, video),
            tpl.referring_turns(["the cat"], rng, video),
            tpl.reasoning_turns(["What animal is sleeping on the sofa?"], rng, video, ["The cat is."]),
            tpl.reasoning_turns(["the sleeping animal"], rng, video),
            tpl.region_turns(1, rng, video),
            tpl.region_turns(4, rng, video),
        ]
        for turns in families:
            assert turns[0].prompt.startswith("<video>" if video else "<image>")
            assert all(t.answer.count("<SEG>") == 1 for t in turns)
            assert all(other not in t.prompt.replace("<image>", "").replace("<video>", "") for t in turns)
        assert tpl.region_turns(4, rng, video)[0].prompt.count("<p><region></p>") == 4
    assert tpl.clean_category("wall-other-merged") == "wall" and tpl.clean_category("Traffic-Light") == "traffic light"


def test_chat_turns_pair_messages_and_place_media_first():
    conversation = [
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Black."},
    ]
    turns = tpl.chat_turns(conversation)
    assert [(t.prompt, t.answer) for t in turns] == [("<image>What is this?", "A cat."), ("Color?", "Black.")]
    plain = tpl.chat_turns([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], video=True)
    assert plain[0].prompt == "<video>Hi"
    with pytest.raises(ValueError, match="expected 'human' or 'gpt'"):
        tpl.chat_turns([{"from": "system", "value": "x"}, {"from": "human", "value": "a"}, {"from": "robot", "value": "b"}])
