"""The chat benchmarks' evaluator: a generated answer per row -> the extracted yes / no or option
letter -> the benchmark's scores (eval/metrics/chat.py).

Rows come from sources of `data/sources/chat_bench.py` (task "chat" / "vchat"): the sample's
`meta["bench"]` holds the ground truth, the options and the grouping fields; the row's `answer`
is the generated text (special tokens are dropped before matching). Nothing is segmented, so the
row's mask arrays are not read (`answer_rows` builds rows from a generated batch without running
the segmentation forward).

Results per benchmark (fractions, counts as integers; every accuracy has its unparsed count beside it):

  mme              perception, cognition (x100 = MME points), score/acc/acc+/unparsed per subtask
  pope             F1, acc, precision, recall, yes_ratio, unparsed, overall and per split
  mmbench          acc (CircularEval when the TSV holds the passes), acc_passes, per l2-category
                   and category
  seed_bench, ai2d acc, per category
  videomme         acc, per duration (short / medium / long), domain, task type
  mvbench, mlvu    acc (pooled), acc_mean (mean over tasks), per task
  longvideobench   acc, per duration group and question category

Options: "by" (the grouping fields, replacing the benchmark's), "circular" (MMBench, default: on
when the rows carry circular groups).
"""

from __future__ import annotations

import numpy as np

from x2sam_jax.data.tokenizer import IGNORE_LABEL
from x2sam_jax.eval.metrics import chat as chat_metrics
from x2sam_jax.eval.tasks import Row, TaskEvaluator

# benchmark -> (kind, grouping fields, the field whose per-value accuracies are also averaged)
BENCHMARKS = {
    "mme": ("yes_no", (), None),
    "pope": ("yes_no", (), None),
    "mmbench": ("choice", ("l2-category", "category"), None),
    "seed_bench": ("choice", ("category",), None),
    "ai2d": ("choice", ("category",), None),
    "videomme": ("choice", ("duration", "domain", "task_type"), None),
    "mvbench": ("choice", ("task_type",), "task_type"),
    "mlvu": ("choice", ("task_type",), "task_type"),
    "longvideobench": ("choice", ("duration_group", "question_category"), None),
}
CHAT_TASKS = ("chat", "vchat")


def judge(bench: dict, answer: str) -> dict:
    """One answer against a sample's `meta["bench"]`: the record `finalize` reads."""
    text = chat_metrics.clean_answer(answer)
    if bench["kind"] == "yes_no":
        pred = chat_metrics.extract_yes_no(text)
    else:
        pred = chat_metrics.extract_option(text, bench["options"])
    return {"benchmark": bench["benchmark"], "answer": bench["answer"], "pred": pred,
            "correct": pred is not None and pred == bench["answer"], "parsed": pred is not None,
            "fields": dict(bench.get("fields") or {}), "text": text[:200]}


class ChatBench(TaskEvaluator):
    """Image / video chat benchmarks: accuracy-type scores of generated answers."""

    family = "chat"

    def process(self, row: Row, visual: bool = False):
        bench = row.sample.meta.get("bench")
        if not bench:
            raise ValueError(f"{row.sample.dataset}[{row.sample.sample_id}]: not a chat benchmark sample (no "
                             "meta['bench']); chat training sets (LLaVA, VideoInstruct) have no scores")
        if bench["benchmark"] not in BENCHMARKS:
            raise ValueError(f"unknown chat benchmark {bench['benchmark']!r}; known: {sorted(BENCHMARKS)}")
        return judge(bench, row.answer), None

    def missed(self, sample, frames):   # no answer: unparsed, wrong
        bench = sample.meta.get("bench")
        return judge(bench, "") if bench and bench.get("benchmark") in BENCHMARKS else None

    def sample_scores(self, record):
        return {"correct": bool(record["correct"]), "pred": record["pred"], "answer": record["text"]}

    def finalize(self, records):
        names = {r["benchmark"] for r in records}
        if len(names) > 1:
            raise ValueError(f"one dataset holds records of several benchmarks: {sorted(names)}")
        if not names:
            return {}
        name = names.pop()
        kind, by, mean_over = BENCHMARKS[name]
        by = tuple(self.options.get("by", by))
        if name == "mme":
            return chat_metrics.mme_scores({"category": r["fields"]["category"], "pair": r["fields"]["pair"],
                                            "correct": r["correct"], "parsed": r["parsed"]} for r in records)
        if name == "pope":
            return chat_metrics.pope_scores({"splits": r["fields"].get("splits"), "answer": r["answer"],
                                             "pred": r["pred"]} for r in records)
        circular = bool(self.options.get("circular", all("group" in r["fields"] for r in records)))
        return chat_metrics.choice_scores(records, by, circular=circular, mean_over=mean_over)


def answer_text(tokenizer, labels) -> str:
    """A row's answer: its label tokens (the generated ones after `inference.with_answers`), decoded
    without special tokens."""
    labels = np.asarray(labels)
    return tokenizer.decode(labels[labels != IGNORE_LABEL].tolist(), skip_special_tokens=True)


def answer_rows(batch: dict, source, tokenizer):
    """The valid rows of a chat batch as tasks.Row with their answers and empty mask outputs (chat
    batches carry no SAM frames; nothing is segmented)."""
    for b in np.flatnonzero(batch["sample_valid"]):
        index = int(batch["sample_index"][b])
        sample = source[index]
        yield Row(index=index, clip=int(batch["clip_index"][b]) if "clip_index" in batch else 0,
                  frames=np.arange(sample.num_frames), sample=sample, num_conditions=0, condition_instances=(),
                  mask_logits=np.zeros((0, 0, 0, 0), np.float32), class_logits=np.zeros((0, 0, 1), np.float32),
                  sam_size=0, sam_valid_hw=np.zeros((0, 2), np.int32), region_masks=np.zeros((0, 0, 0), bool),
                  region_frame=np.zeros((0,), np.int32), labels=[], answer=answer_text(tokenizer, batch["labels"][b]))
