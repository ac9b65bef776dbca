"""Tokenization: special tokens, the Qwen chat template, placeholder expansion, spans.

Chat template (no system turn, no BOS), per turn
(docs/architecture.md#special-tokens-chat-template-and-condition-spans):
    <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n   (no loss)
    {answer}<|im_end|>                                               (loss)
    \n                                                               (no loss)
Placeholders in prompts: `<image>` -> <|vision_start|> <|image_pad|> x n <|vision_end|> with n the
merged visual tokens; `<video>` -> for every temporal group "<{t:.1f} seconds>" then
<|vision_start|> <|image_pad|> x n_group <|vision_end|>; `<region>` -> 64 region placeholder
tokens (<|vision_pad|>, a Qwen special token no processor emits; the model swaps in region
embeddings). `<SEG>`, `<p>`, `</p>` are added vocabulary tokens (the official code appends them
and resizes the embedding to len(tokenizer)).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from x2sam_jax.data.templates import IMAGE, P_END, P_START, REGION, SEG, VIDEO, Turn

IGNORE_LABEL = -100      # the label of a token without loss (the LM loss skips it); one place for every module
X2SAM_TOKENS = (SEG, P_START, P_END)
REGION_PLACEHOLDER = "<|vision_pad|>"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# A small English corpus in the register of the templates, so the tiny BPE has sensible merges.
_TINY_CORPUS = """
Can you segment the image based on the following categories? Please output the segmentation masks.
Please segment the person in this image. Sure, it is the segmentation result. It is done.
Where is the red circle left of the blue square in this picture? Please respond with the mask.
Could you give me a brief description of the video? A man rides a bicycle on the road near a tree.
A dog runs across the grass while a cat sleeps on the sofa. Two kids are playing on the bed.
What can be used to warm clothes? Please explain why and output the corresponding segmentation mask.
The green triangle moves to the right, the yellow star stays at the top of the frame.
Which regions of this video match the given regions? Please produce segmentation masks.
seconds describe object objects background wall floor sky building car bus truck boat
airplane horse sheep cow elephant bear zebra giraffe bottle cup chair table laptop phone book
clock vase scissors banana apple sandwich orange pizza cake umbrella handbag tie suitcase
0 1 2 3 4 5 6 7 8 9 10 11 12 0.5 1.0 2.0 3.5 circle square triangle star ellipse hexagon
red green blue yellow purple orange white black gray pink brown cyan magenta left right top bottom
"""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    seg: int
    p_start: int
    p_end: int
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    region: int
    im_start: int
    im_end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        def token_id(token: str) -> int:
            idx = tokenizer.convert_tokens_to_ids(token)
            if idx is None or idx == tokenizer.unk_token_id or not isinstance(idx, int):
                raise KeyError(f"tokenizer has no token {token!r}; call add_x2sam_tokens first")
            return idx

        return cls(
            seg=token_id(SEG),
            p_start=token_id(P_START),
            p_end=token_id(P_END),
            image_pad=token_id("<|image_pad|>"),
            video_pad=token_id("<|video_pad|>"),
            vision_start=token_id("<|vision_start|>"),
            vision_end=token_id("<|vision_end|>"),
            region=token_id(REGION_PLACEHOLDER),
            im_start=token_id("<|im_start|>"),
            im_end=token_id("<|im_end|>"),
            pad=token_id("<|endoftext|>"),
        )


def add_x2sam_tokens(tokenizer) -> int:
    """Adds <SEG>, <p>, </p> as special tokens (idempotent); returns how many were new."""
    missing = [t for t in X2SAM_TOKENS if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def build_tiny_tokenizer(vocab_size: int = 600):
    """A real byte-level BPE tokenizer trained offline on a built-in corpus, with Qwen's special
    tokens and the X2SAM tokens; deterministic (same ids on every call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in _TINY_CORPUS.splitlines() if line.strip()], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right"
    )
    add_x2sam_tokens(tokenizer)
    return tokenizer


def load_tokenizer(path: str):
    """The Qwen3-VL tokenizer from a local checkpoint dir (no hub), with the X2SAM tokens added.
    ``path`` holds the tokenizer files, or a ``tokenizer/`` folder that does (a training workdir,
    a model directory)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tokenizer_files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    has_files = lambda d: any(os.path.exists(os.path.join(d, f)) for f in tokenizer_files)  # noqa: E731
    if not has_files(path) and has_files(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    if not has_files(path):
        raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json / vocab.json), nor a tokenizer/ "
                                "folder with them")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="right")
    add_x2sam_tokens(tokenizer)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """One <video>: a timestamp per temporal group and the merged tokens of each group."""

    group_times: tuple[float, ...]
    tokens_per_group: int


_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(t) for t in (IMAGE, VIDEO, REGION)) + ")")


class _Encoder:
    def __init__(self, tokenizer, ids: SpecialIds, image_tokens, videos, region_tokens):
        self.tokenizer, self.ids, self.region_tokens = tokenizer, ids, region_tokens
        self.image_tokens, self.videos = list(image_tokens), list(videos)

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def prompt(self, text: str) -> list[int]:
        out = []
        for piece in _PLACEHOLDER_RE.split(text):
            if piece == IMAGE:
                if not self.image_tokens:
                    raise ValueError("prompt has more <image> placeholders than images")
                out += [self.ids.vision_start] + [self.ids.image_pad] * self.image_tokens.pop(0) + [self.ids.vision_end]
            elif piece == VIDEO:
                if not self.videos:
                    raise ValueError("prompt has more <video> placeholders than videos")
                video = self.videos.pop(0)
                for t in video.group_times:
                    out += self.text(f"<{t:.1f} seconds>")
                    out += [self.ids.vision_start] + [self.ids.image_pad] * video.tokens_per_group
                    out += [self.ids.vision_end]
            elif piece == REGION:
                out += [self.ids.region] * self.region_tokens
            else:
                out += self.text(piece)
        return out


def encode_turns(
    turns: list[Turn],
    tokenizer,
    ids: SpecialIds | None = None,
    *,
    image_tokens: list[int] = (),
    videos: list[VideoLayout] = (),
    region_tokens: int = 64,
    generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [L] int32, labels [L] int32): loss only on answers and their <|im_end|>.
    With generation_prompt, the last turn stops after "<|im_start|>assistant\\n"."""
    ids = ids or SpecialIds.from_tokenizer(tokenizer)
    enc = _Encoder(tokenizer, ids, image_tokens, videos, region_tokens)
    input_ids: list[int] = []
    labels: list[int] = []

    def add(tokens, with_loss):
        input_ids.extend(tokens)
        labels.extend(tokens if with_loss else [IGNORE_LABEL] * len(tokens))

    for k, turn in enumerate(turns):
        add([ids.im_start] + enc.text("user\n") + enc.prompt(turn.prompt) + [ids.im_end], False)
        add(enc.text("\n") + [ids.im_start] + enc.text("assistant\n"), False)
        if generation_prompt and k == len(turns) - 1:
            break
        add(enc.text(turn.answer) + [ids.im_end], True)
        add(enc.text("\n"), False)
    if enc.image_tokens or enc.videos:
        raise ValueError(
            f"{len(enc.image_tokens)} image(s) and {len(enc.videos)} video(s) have no placeholder in the prompts"
        )
    return np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)


def condition_spans(input_ids: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """[C, 2] int32: token index of each <p> and its </p> (inclusive), in sequence order."""
    spans, open_at = [], None
    for position, token in enumerate(np.asarray(input_ids).tolist()):
        if token == ids.p_start:
            if open_at is not None:
                raise ValueError(f"nested <p> at token {position} (previous <p> at {open_at})")
            open_at = position
        elif token == ids.p_end:
            if open_at is None:
                raise ValueError(f"</p> at token {position} without an opening <p>")
            spans.append((open_at, position))
            open_at = None
    if open_at is not None:
        raise ValueError(f"<p> at token {open_at} is never closed")
    return np.asarray(spans, np.int32).reshape(-1, 2)


def seg_positions(input_ids: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """[G] int32: token index of each <SEG>."""
    return np.flatnonzero(np.asarray(input_ids) == ids.seg).astype(np.int32)
