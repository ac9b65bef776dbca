"""Task prompts and templated answers (docs/data.md#task-templates), one family per task.

A task becomes a list of `Turn`s (user prompt, assistant answer). The first prompt starts with
the visual placeholder `<image>` / `<video>`; conditions are wrapped as `<p>...</p>` (a region
condition is `<p><region></p>`); every answer that asks for masks carries one `<SEG>`.
The lists follow the structure of the official map_fns (several paraphrases per task, image and
video variants, a short/long/explanatory split for reasoning); the wording is our own.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

SEG = "<SEG>"
P_START = "<p>"
P_END = "</p>"
IMAGE = "<image>"
VIDEO = "<video>"
REGION = "<region>"


@dataclasses.dataclass
class Turn:
    prompt: str
    answer: str


def tag(text: str) -> str:
    return f"{P_START}{text}{P_END}"


REGION_CONDITION = tag(REGION)

# {media} is "image" or "video" everywhere below.
VOCABULARY_QUESTIONS = (
    "Can you segment the {media} based on the following categories: {conditions}? Please output the segmentation masks.",
    "Please produce segmentation masks for this {media} covering these categories: {conditions}.",
    "Could you generate segmentation masks of the {media} for the listed categories: {conditions}? Please give the masks.",
    "Segment this {media} according to the categories {conditions}, and output the segmentation masks.",
    "Which regions of this {media} belong to the categories {conditions}? Please respond with segmentation masks.",
    "Could you provide segmentation masks for this {media} using these categories: {conditions}? Please return the masks.",
)
VOCABULARY_ANSWERS = (
    f"{SEG}.",
    f"It is {SEG}.",
    f"Sure, {SEG}.",
    f"Sure, it is {SEG}.",
    f"Sure, the segmentation result is {SEG}.",
)

REFERRING_QUESTIONS = (
    "Please segment {phrase} in this {media}.",
    "Please identify and segment {phrase} in this {media}.",
    "Can you segment {phrase} in this {media}? Please output the segmentation mask.",
    "Where is {phrase} in this {media}? Please respond with the segmentation mask.",
    "Could you give me a segmentation mask of {phrase} in this {media}?",
    "Highlight {phrase} in this {media} with a segmentation mask, please.",
    "What part of this {media} is {phrase}? Please output the corresponding segmentation mask.",
)
REFERRING_ANSWERS = (
    f"{SEG}.",
    f"It is {SEG}.",
    f"Sure, {SEG}.",
    f"Sure, it is {SEG}.",
    f"Sure, the segmentation mask is {SEG}.",
)

REASONING_SHORT_QUESTIONS = (
    "Can you segment {query} in this {media}? Please output the segmentation mask.",
    "What is {query} in this {media}? Please respond with the segmentation mask.",
    "Please highlight {query} in this {media} and output its segmentation mask.",
    "Could you give the segmentation mask of {query} in this {media}?",
)
REASONING_LONG_QUESTIONS = (
    "{query} Please output the corresponding segmentation mask.",
    "{query} Please respond with the segmentation mask.",
    "{query} Please segment the {media}.",
    "{query} Please give the answer as a segmentation mask.",
)
REASONING_EXPLAIN_QUESTIONS = (
    "{query} Please explain why, then output the corresponding segmentation mask.",
    "{query} Please give the reason and output the segmentation mask.",
    "{query} Please explain your answer and respond with the segmentation mask.",
)
REASONING_ANSWERS = REFERRING_ANSWERS
REASONING_EXPLAIN_ANSWERS = (
    f"{SEG}.",
    f"It is {SEG}.",
    f"And {SEG}.",
    f"And it is {SEG}.",
    f"And the segmentation mask is {SEG}.",
)

GCG_QUESTIONS = (
    "Could you give me a brief description of the {media}? Please respond with interleaved segmentation masks for the corresponding phrases.",
    "Please briefly describe this {media}, and respond with interleaved segmentation masks for the phrases you mention.",
    "Can you provide a short description of this {media}? Please output interleaved segmentation masks for the corresponding phrases.",
    "Briefly explain what can be seen in this {media}, with interleaved segmentation masks for the corresponding parts of the answer.",
)
GCG_ANSWER_TAILS = (
    f"{SEG}.",
    f"And {SEG}.",
    f"The segmentation mask is {SEG}.",
    f"And the segmentation mask is {SEG}.",
)

REGION_QUESTIONS = (
    "Can you segment the {media} based on the following regions: {conditions}? Please output the corresponding segmentation mask.",
    "Please produce segmentation masks for this {media} based on these regions: {conditions}.",
    "Could you generate segmentation masks of the {media} for the given regions: {conditions}? Please give the masks.",
    "Segment this {media} according to the regions {conditions}, and output the segmentation masks.",
    "Which parts of this {media} match the regions {conditions}? Please respond with segmentation masks.",
)
SINGLE_REGION_QUESTIONS = (
    "Can you segment the {conditions} in this {media}? Please output the corresponding segmentation mask.",
    "Please segment the object marked by {conditions} in this {media}.",
    "What is {conditions} in this {media}? Please respond with the segmentation mask.",
    "Could you give me the segmentation mask of {conditions} in this {media}?",
)
REGION_ANSWERS = VOCABULARY_ANSWERS


def clean_category(name: str) -> str:
    """COCO-style names to plain words: 'wall-other-merged' -> 'wall', 'playingfield' stays."""
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.replace(suffix, "")
    return name.replace("-", " ").replace("_", " ").strip().lower()


def _pick(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _media(video: bool) -> str:
    return "video" if video else "image"


def _with_visual(turns: list[Turn], video: bool) -> list[Turn]:
    """The first prompt opens with the visual placeholder (unless it already holds one)."""
    if turns and IMAGE not in turns[0].prompt and VIDEO not in turns[0].prompt:
        turns[0].prompt = (VIDEO if video else IMAGE) + turns[0].prompt
    return turns


def sample_categories(
    vocabulary: list[str], positives: list[str], rng: np.random.Generator, train: bool, max_categories: int = 128
) -> list[str]:
    """Training: every positive plus random negatives up to `max_categories`, shuffled.
    Evaluation: the whole vocabulary in dataset order."""
    if not train:
        return list(vocabulary)
    positive_set = set(positives)
    negatives = [c for c in vocabulary if c not in positive_set]
    n_negative = max(0, min(len(negatives), max_categories - len(positive_set)))
    picked = [negatives[i] for i in rng.permutation(len(negatives))[:n_negative]]
    in_vocabulary = set(vocabulary)
    chosen = [c for c in vocabulary if c in positive_set]
    chosen += [p for p in dict.fromkeys(positives) if p not in in_vocabulary] + picked
    return [chosen[i] for i in rng.permutation(len(chosen))]


def vocabulary_turns(categories: list[str], rng, video: bool = False) -> list[Turn]:
    conditions = ", ".join(tag(clean_category(c)) for c in categories)
    prompt = _pick(VOCABULARY_QUESTIONS, rng).format(media=_media(video), conditions=conditions)
    return _with_visual([Turn(prompt, _pick(VOCABULARY_ANSWERS, rng))], video)


def referring_turns(phrases: list[str], rng, video: bool = False) -> list[Turn]:
    """One turn per expression, each answered with its own <SEG>."""
    turns = [
        Turn(
            _pick(REFERRING_QUESTIONS, rng).format(phrase=tag(p.strip().lower()), media=_media(video)),
            _pick(REFERRING_ANSWERS, rng),
        )
        for p in phrases
    ]
    return _with_visual(turns, video)


def is_sentence(text: str) -> bool:
    """Reasoning queries that read as full sentences get the long templates."""
    return text.strip().endswith(("?", ".", "!")) or len(text.split()) > 8


def reasoning_turns(queries: list[str], rng, video: bool = False, explanations=None) -> list[Turn]:
    explanations = explanations or [None] * len(queries)
    turns = []
    for query, explanation in zip(queries, explanations):
        long_form = is_sentence(query)
        questions = REASONING_LONG_QUESTIONS if long_form else REASONING_SHORT_QUESTIONS
        answer = _pick(REASONING_ANSWERS, rng)
        if explanation and rng.random() < 0.5:
            questions = REASONING_EXPLAIN_QUESTIONS
            answer = explanation.strip() + " " + _pick(REASONING_EXPLAIN_ANSWERS, rng)
        text = query.strip() if long_form else query.strip().lower()
        turns.append(Turn(_pick(questions, rng).format(query=tag(text), media=_media(video)), answer))
    return _with_visual(turns, video)


def tag_caption(caption: str, spans: list[tuple[int, int]]) -> str:
    """Wrap each character span [start, end) of the caption in <p>...</p> (spans must not overlap)."""
    ordered = sorted(spans)
    for (s0, e0), (s1, _) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise ValueError(f"overlapping caption spans {(s0, e0)} and {s1}")
    out, cursor = [], 0
    for start, end in ordered:
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"caption span {(start, end)} outside a caption of length {len(caption)}")
        out += [caption[cursor:start], tag(caption[start:end])]
        cursor = end
    out.append(caption[cursor:])
    return "".join(out)


def gcg_turns(caption: str, spans: list[tuple[int, int]], rng, video: bool = False) -> list[Turn]:
    """The answer is the caption with its phrases tagged, then the <SEG> tail."""
    caption = caption.rstrip()
    tagged = tag_caption(caption, spans)
    if not tagged.endswith("."):
        tagged += "."
    answer = tagged + " " + _pick(GCG_ANSWER_TAILS, rng)
    return _with_visual([Turn(_pick(GCG_QUESTIONS, rng).format(media=_media(video)), answer)], video)


def region_turns(num_regions: int, rng, video: bool = False) -> list[Turn]:
    """VGD / interactive / object prompts: every region is a <p><region></p> condition."""
    conditions = ", ".join([REGION_CONDITION] * num_regions)
    questions = SINGLE_REGION_QUESTIONS if num_regions == 1 else REGION_QUESTIONS
    prompt = _pick(questions, rng).format(media=_media(video), conditions=conditions)
    return _with_visual([Turn(prompt, _pick(REGION_ANSWERS, rng))], video)


def chat_turns(conversation: list[dict], video: bool = False) -> list[Turn]:
    """LLaVA-style [{"from": "human"|"gpt", "value"}] -> turns; leading gpt messages are dropped."""
    messages = list(conversation)
    while messages and messages[0].get("from") != "human":
        messages = messages[1:]
    turns, pending = [], None
    for message in messages:
        if message.get("from") == "human":
            pending = message["value"] if pending is None else pending + "\n" + message["value"]
        elif message.get("from") == "gpt":
            if pending is None:
                continue
            turns.append(Turn(pending, message["value"]))
            pending = None
        else:
            raise ValueError(f"conversation message from {message.get('from')!r}; expected 'human' or 'gpt'")
    for turn in turns:  # the media placeholder sits at the very start, as in the official data
        for placeholder in (IMAGE, VIDEO):
            if placeholder in turn.prompt:
                turn.prompt = placeholder + re.sub(r"\s*" + re.escape(placeholder) + r"\s*", "", turn.prompt, count=1)
    return _with_visual(turns, video)
