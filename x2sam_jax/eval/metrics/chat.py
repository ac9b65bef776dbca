"""Answer matching and scores of the chat benchmarks (MME, POPE, multiple choice), usable on their own.

Answer extraction works on the generated text alone (no LLM judge: VLMEvalKit's "exact_matching"
setting). An answer that cannot be read counts as wrong and is counted (`unparsed`).

  extract_yes_no    VLMEvalKit's rule (vlmeval/dataset/utils/yorn.py): lower-cased words without
                    punctuation; "yes" without "no" -> yes, "no" without "yes" -> no, else unreadable
  extract_option    an option letter from a free answer, tried in this order:
                    1. the answer starts with the letter: "B", "B.", "(B)", "B) cat", "[B]", "B: cat"
                    2. a stated choice: "The answer is B", "correct option: (C)", "Answer: **D**"
                    3. exactly one option letter stands alone as a word ("I think C"); "A" / "I"
                       read as a word ("A cat sits", "I think") do not count
                    4. the text of exactly one option appears in the answer as whole words (when
                       several do, one whose text lies inside another's is dropped: "red" in
                       "dark red")
                    else unreadable. Matching is case-sensitive for the letters (a lower-case "a"
                    is a word), case-insensitive for the option texts.

Scores (fractions; `format_markdown` prints them x100):

  mme_scores     per subtask acc (questions) and acc+ (images whose questions are all right), the
                 subtask score acc + acc+ (in [0, 2]: x100 it is MME's 0-200 points), perception =
                 the sum over the perception subtasks present, cognition over the cognition ones
                 (x100: MME's 2000 / 800 point totals)
  pope_scores    per split and overall: acc, precision / recall / F1 of "yes", yes_ratio (VLMEvalKit
                 POPE_rating: a question listed under several splits counts once per split and once
                 per listing overall; an unreadable answer is wrong for acc and a non-"yes" for
                 precision / recall, as there)
  choice_scores  accuracy overall and per value of each grouping field (category, duration, ...);
                 `circular`: a question of several passes (MMBench CircularEval) is right only when
                 every pass is, and its categories are those of its first pass
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

_SPECIAL_TOKENS = re.compile(r"<\|[^<>|]*\|>")
_THINK = re.compile(r"<think>.*?</think>", re.S)
_WRAP = "()[]{}.,:;!?*#\"'`"


def clean_answer(text: str | None) -> str:
    """The answer without chat special tokens (<|im_end|>, ...), reasoning blocks and extra spaces."""
    text = _THINK.sub(" ", text or "")
    text = _SPECIAL_TOKENS.sub(" ", text).replace("<think>", " ").replace("</think>", " ")
    return " ".join(text.split())


# ------------------------------------------------------------------------------------ yes / no
def extract_yes_no(text: str | None) -> str | None:
    """"yes" / "no", or None when the answer says both or neither."""
    words = re.sub(r"[^\w\s]", " ", clean_answer(text).lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes == no:
        return None
    return "yes" if yes else "no"


# ------------------------------------------------------------------------------------ option letters
def _leading_letter(text: str, letters) -> str | None:
    m = re.match(r"[\(\[\{]\s*\**([A-Z])\**\s*[\)\]\}]", text) or re.match(r"\**([A-Z])\**\s*(?:[\)\]\.:,]|$)", text)
    return m.group(1) if m and m.group(1) in letters else None


_STATED = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be|will\s+be))?\s*[:\-]?\s*"
                     r"[\(\[]?\s*\**([A-Z])\**\s*[\)\]]?(?![\w])")


def _stated_letter(text: str, letters) -> str | None:
    found = {m.group(1) for m in _STATED.finditer(text) if m.group(1) in letters}
    return found.pop() if len(found) == 1 else None


def _standalone_letter(text: str, letters) -> str | None:
    raw = text.split()
    found = set()
    for k, token in enumerate(raw):
        core = token.strip(_WRAP)
        if core not in letters:
            continue
        wrapped = core != token
        following = raw[k + 1] if k + 1 < len(raw) else ""
        if core in ("A", "I") and not wrapped and following[:1].islower():     # the article, the pronoun
            continue
        found.add(core)
    return found.pop() if len(found) == 1 else None


def _option_text(text: str, options: Mapping[str, str]) -> str | None:
    answer = text.lower()
    hits = {}
    for letter, option in options.items():
        option = str(option).strip().rstrip(".").strip().lower()
        if option and re.search(r"(?<!\w)" + re.escape(option) + r"(?!\w)", answer):
            hits[letter] = option
    if len(hits) > 1:   # drop an option whose text lies inside another matched one
        hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def extract_option(text: str | None, options: Mapping[str, str]) -> str | None:
    """The option letter a free answer picks (rules in the module docstring), or None."""
    text = clean_answer(text)
    letters = set(options)
    if not text or not letters:
        return None
    for rule in (_leading_letter, _stated_letter, _standalone_letter):
        letter = rule(text, letters)
        if letter is not None:
            return letter
    return _option_text(text, options)


# ------------------------------------------------------------------------------------ scores
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def mme_scores(items: Iterable[Mapping]) -> dict:
    """MME from items {"category", "pair" (the image), "correct", "parsed"}: `acc/<subtask>`,
    `acc+/<subtask>`, `score/<subtask>` (acc + acc+), `perception`, `cognition`, `unparsed`."""
    by_category: dict = defaultdict(lambda: defaultdict(list))
    unparsed: dict = defaultdict(int)
    for item in items:
        by_category[item["category"]][item["pair"]].append(bool(item["correct"]))
        unparsed[item["category"]] += 0 if item.get("parsed", True) else 1
    out: dict = {}
    for category in sorted(by_category):
        images = by_category[category]
        acc = _mean(c for answers in images.values() for c in answers)
        acc_plus = _mean(all(answers) for answers in images.values())
        out[f"acc/{category}"], out[f"acc+/{category}"], out[f"score/{category}"] = acc, acc_plus, acc + acc_plus
        out[f"unparsed/{category}"] = unparsed[category]
    for total, subtasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in subtasks if c in by_category]
        if present:
            out[total] = sum(out[f"score/{c}"] for c in present)
    out["unparsed"] = sum(unparsed.values())
    return out


def _yes_no_stats(items) -> dict:
    n = len(items)
    tp = sum(1 for i in items if i["answer"] == "yes" and i["pred"] == "yes")
    fp = sum(1 for i in items if i["answer"] != "yes" and i["pred"] == "yes")
    fn = sum(1 for i in items if i["answer"] == "yes" and i["pred"] != "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"acc": _mean(i["pred"] == i["answer"] for i in items), "precision": precision, "recall": recall,
            "F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(1 for i in items if i["pred"] == "yes") / n if n else float("nan"),
            "unparsed": sum(1 for i in items if i["pred"] is None)}


def pope_scores(items: Iterable[Mapping]) -> dict:
    """POPE from items {"splits": [...], "answer": yes|no, "pred": yes|no|None}: F1, acc, precision,
    recall, yes_ratio, unparsed overall and as `<metric>/<split>`."""
    rows, per_split = [], defaultdict(list)
    for item in items:
        splits = list(item.get("splits") or []) or [""]
        for split in splits:      # a question listed under several splits counts under each
            rows.append(item)
            if split:
                per_split[split].append(item)
    out = _yes_no_stats(rows)
    for split in sorted(per_split):
        out.update({f"{k}/{split}": v for k, v in _yes_no_stats(per_split[split]).items()})
    return out


def choice_scores(items: Iterable[Mapping], by: Iterable[str] = ("category",), *, circular: bool = False,
                  mean_over: str | None = None) -> dict:
    """Multiple-choice accuracy from items {"correct", "parsed", "fields": {...}}: `acc`, `unparsed`
    and `acc/<field>=<value>`, `unparsed/<field>=<value>` for each field of `by` an item has.
    `circular`: items sharing fields["group"] are the passes of one question (see module docstring);
    `acc_passes` is then the plain accuracy over all passes. `mean_over`: also `acc_mean`, the mean
    of the per-value accuracies of that field (MLVU's task average)."""
    items = list(items)
    questions = []
    if circular:
        groups: dict = defaultdict(list)
        for item in items:
            groups[item["fields"]["group"]].append(item)
        for key in sorted(groups, key=str):
            passes = sorted(groups[key], key=lambda i: not i["fields"].get("main", False))   # the main pass first
            questions.append({"correct": all(p["correct"] for p in passes), "fields": passes[0]["fields"],
                              "unparsed": sum(0 if p.get("parsed", True) else 1 for p in passes)})
    else:
        questions = [{"correct": i["correct"], "fields": i.get("fields", {}), "unparsed": 0 if i.get("parsed", True)
                      else 1} for i in items]
    out = {"acc": _mean(q["correct"] for q in questions), "unparsed": sum(q["unparsed"] for q in questions)}
    if circular:
        out["acc_passes"] = _mean(bool(i["correct"]) for i in items)
    for field in by:
        values: dict = defaultdict(list)
        for q in questions:
            if field in q["fields"] and q["fields"][field] not in (None, ""):
                values[str(q["fields"][field])].append(q)
        for value in sorted(values):
            out[f"acc/{field}={value}"] = _mean(q["correct"] for q in values[value])
            out[f"unparsed/{field}={value}"] = sum(q["unparsed"] for q in values[value])
        if field == mean_over and values:
            out["acc_mean"] = _mean(out[f"acc/{field}={value}"] for value in values)
    return out
