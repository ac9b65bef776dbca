"""Chat benchmarks (X2SAM's image / video chat table) read in the files their users download
(docs/data.md#chat-benchmarks).

Every reader yields `Sample`s of task "chat" (images) or "vchat" (videos) whose conversation is one
human turn (the prompt the benchmark's toolkit builds, media placeholder first) and one gpt turn
holding the ground-truth answer (an option letter or Yes / No: a teacher-forced forward scores
itself perfectly, evaluation replaces it by a generated answer). What the scores need sits in
`meta["bench"]`:

  benchmark   "mme" | "pope" | "mmbench" | "seed_bench" | "ai2d" | "videomme" | "mvbench" | "mlvu"
              | "longvideobench"
  kind        "yes_no" or "choice"
  answer      "yes" / "no", or the correct option letter
  options     {letter: option text} in letter order ({} for yes / no)
  fields      the sub-category fields the benchmark's score groups by (category, image pair,
              l2-category, circular group, duration, task type, ...)
  system      the toolkit's system prompt ("" when it has none); it is also written in front of
              the user prompt (`Turn`s have no system message)
  answer_prefix  text the toolkit puts at the start of the assistant's turn before generating
              ("" when none: the MVBench / MLVU "Best option:(" prefixes)

Images embedded in a VLMEvalKit TSV (base64) or a parquet file stay in memory and reach the
features as `meta["frame_bytes"]` (frames named tsv://<benchmark>/<index>); videos are
`meta["video_file"]` samples of `num_frames` uniformly sampled frames (64 in the paper), read by
transforms.load_video_frames (a video file or a folder of its frames); MVBench's bounded tasks keep
their (start, end) seconds in `meta["bound"]`, sampled within that clip
(transforms.bounded_frame_indices), and a frame folder's rate in `meta["fps"]`.

Prompts follow the path X2SAM's VLMEvalKit wrapper (x2sam/evaluation/vlmeval/x2sam_chat.py) takes:
image multiple choice: [hint \\n] question, "\\n{L}. {option}" per option, then "\\nAnswer with the
option's letter from the given choices directly."; yes / no: the question as the file has it (MME's
questions end with "Please answer yes or no."; POPE's get that sentence appended, `yes_no_suffix`);
videos: each dataset's own VLMEvalKit `build_prompt` (vlmeval/dataset/{videomme,mvbench,mlvu,
longvideobench}.py). Layouts (the field names, checked against those VLMEvalKit readers):

  MME        VLMEvalKit MME.tsv: index, image (base64), question, answer (Yes/No), category, image_path
             (the pair key: two questions per image); or the official release folder
             MME_Benchmark_release_version/<category>/ with <name>.jpg|png and <name>.txt side by side,
             or images/ + questions_answers_YN/<name>.txt (lines "question<TAB>Yes|No"); or lmms-lab/MME
             parquet (question_id = "<category>/<file>", image {bytes}, question, answer, category)
  POPE       official JSON lines output/coco/coco_pope_{adversarial,popular,random}.json
             ({"question_id", "image", "text", "label": yes|no}, the split from the file name, images in
             val2014/); or VLMEvalKit POPE.tsv (index, image, question, answer Yes/No, category: one
             split or several joined by ","), or lmms-lab/POPE parquet (same columns)
  MMBench    VLMEvalKit MMBench_DEV_EN(_V11).tsv: index, question, hint, A..D, answer, category,
             l2-category, image (base64, or the index of the row holding it), split; circular passes
             are rows index + k*1e6 of question `index % 1e6` (CircularEval: a question counts only
             when every pass is right)
  SEED-Bench VLMEvalKit SEEDBench_IMG.tsv (index, question, A..D, answer, category, image); or the
             official SEED-Bench.json {"question_type": {name: id}, "questions": [{"question_id",
             "question", "choice_a".."choice_d", "answer", "question_type_id", "data_id", "data_type"}]}
             with image questions (data_type "image") read from SEED-Bench-image/<data_id>
  AI2D       VLMEvalKit AI2D_TEST.tsv (index, question, A..D, answer, category?, image)
  VideoMME   lmms-lab/Video-MME videomme/test-00000-of-00001.parquet (or the same records as JSON):
             video_id, duration (short/medium/long), domain, sub_category, videoID, question_id,
             task_type, question, options ["A. ...", ...], answer (letter); videos <videoID>.mp4 in
             video/ (VLMEvalKit) or data/ (the unzipped chunks)
  MVBench    OpenGVLab/MVBench json/<task>.json [{"video", "question", "candidates", "answer" (the
             candidate's text), "start"?, "end"?}] with videos under video/<source>/ (`MVBENCH_TASKS`)
  MLVU       MLVU/json/<n>_<task>.json [{"video", "duration", "question", "candidates", "answer" (text),
             "question_type"}] with videos in MLVU/video/<n>_<task>/ (the seven multiple-choice tasks)
  LongVideoBench  lvb_val.json [{"id", "video_id", "video_path", "question", "candidates",
             "correct_choice" (index), "duration_group" (15/60/600/3600), "question_category",
             "duration", ...}] with videos in videos/<video_path>

Subtitles (Video-MME subtitle/<videoID>.srt, LongVideoBench subtitles/<subtitle_path>): off by
default (the "w/o subtitles" numbers); a source spec's `subtitles: True` puts the lines of
VLMEvalKit's subtitle frames into the prompt (`videomme_subtitles`, `longvideobench_subtitles`).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import string
import sys

from x2sam_jax.data.schema import BadSample, Sample
from x2sam_jax.data.sources.common import MalformedRecord, Source, image_size, load_json, require_dir, require_file

LETTERS = string.ascii_uppercase
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")

# The instruction sentences of the toolkits' prompts.
CHOICE_HINT = "Answer with the option's letter from the given choices directly."
YES_NO_HINT = "Please answer yes or no."
VIDEOMME_HINT = ("These are the frames of a video. Select the best answer to the following multiple-choice "
                 "question based on the video. Respond with only the letter (A, B, C, or D) of the correct option.")
MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                  "movement of objects, and the action and pose of persons. Based on your observations, select the "
                  "best option that accurately addresses the question.")
MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select "
               "the best option that accurately addresses the question.")
VIDEOMME_SUBTITLE_HINT = ("These are the frames of a video. This video's subtitles are listed below:\n{}\nSelect the "
                          "best answer to the following multiple-choice question based on the video. Respond with "
                          "only the letter (A, B, C, or D) of the correct option.")
BEST_OPTION = "\nOnly give the best option."
MVBENCH_PREFIX = "Best option:("      # vlmeval/dataset/mvbench.py, the assistant's turn
MLVU_PREFIX = "Best Option: ("       # vlmeval/vlm/base.py message_to_promptvideo_withrole, MCQ default

# MVBench: task -> (json file, video folder under video/, "video" | "frame" folders, clip bounds).
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}
MVBENCH_FRAME_FPS = 3          # the extracted-frame folders of "frame" tasks (TVQA)

# MLVU's multiple-choice tasks: task -> json file (videos in video/<file stem>/).
MLVU_TASKS = {
    "plotQA": "1_plotQA.json", "needle": "2_needle.json", "ego": "3_ego.json", "count": "4_count.json",
    "order": "5_order.json", "anomaly_reco": "6_anomaly_reco.json", "topic_reasoning": "7_topic_reasoning.json",
}

POPE_SPLITS = ("adversarial", "popular", "random")


# ------------------------------------------------------------------------------------ file readers
def read_tsv(path: str) -> list[dict]:
    """Rows of a VLMEvalKit TSV (pandas `to_csv(sep="\\t")`: a header line, quoted fields where needed)."""
    require_file(path, "benchmark TSV")
    csv.field_size_limit(sys.maxsize)      # base64 images are long fields
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter="\t")]


def read_parquet(path: str) -> list[dict]:
    """Rows of a parquet file, or of every *.parquet under a folder (sorted), as dicts (pyarrow)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(folder, n) for folder, _, names in os.walk(path) for n in names
                       if n.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no parquet files under {path}")
    else:
        files = [require_file(path, "benchmark parquet file")]
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow comes with the TFDS / grain stack
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
    rows = []
    for name in files:
        rows += pq.read_table(name).to_pylist()
    return rows


def read_records(path: str) -> list[dict]:
    """A benchmark file by its extension: .tsv, .parquet (or a folder of them), .json, .jsonl."""
    if path.endswith(".tsv"):
        return read_tsv(path)
    if path.endswith(".parquet") or os.path.isdir(path):
        return read_parquet(path)
    if path.endswith(".jsonl"):
        return read_json_lines(path)
    data = load_json(path, "benchmark annotation file")
    return data if isinstance(data, list) else list(data.values()) if isinstance(data, dict) else []


def read_json_lines(path: str) -> list[dict]:
    """One JSON object per line (POPE's files are named .json but are JSON lines); a JSON list works too."""
    require_file(path, "benchmark annotation file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {line_no} is not valid JSON: {err}") from err
    return rows


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and value == "")


def _text(value) -> str:
    return "" if _missing(value) else str(value).strip()


def _yes_no(value) -> str:
    answer = _text(value).lower()
    if answer not in ("yes", "no"):
        raise ValueError(f"answer {value!r} is not yes / no")
    return answer


def _image_bytes(value) -> bytes:
    """Encoded image bytes from a TSV base64 string or a parquet image struct {"bytes", "path"}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return base64.b64decode(value)
    raise BadSample("the row holds no image")


def _letters_of(row: dict) -> dict[str, str]:
    """The A, B, C, ... columns of a VLMEvalKit MCQ row that hold an option, in letter order."""
    return {k: _text(row[k]) for k in LETTERS if k in row and not _missing(row[k])}


def choice_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    """X2SAM's multiple-choice prompt: [hint \\n] question, the options one per line, the instruction."""
    text = (hint + "\n" if hint else "") + question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return text + "\n" + CHOICE_HINT


def yes_no_prompt(question: str, suffix: bool) -> str:
    if suffix and YES_NO_HINT.lower() not in question.lower():
        return f"{question} {YES_NO_HINT}"
    return question


def options_from_candidates(candidates, answer_text=None) -> tuple[dict[str, str], str | None]:
    """{letter: candidate} and the letter of `answer_text` (MVBench / MLVU give the answer as text)."""
    if isinstance(candidates, str):
        candidates = json.loads(candidates)
    options = {LETTERS[k]: str(c) for k, c in enumerate(candidates)}
    letter = None
    if answer_text is not None:
        matches = [k for k, c in options.items() if c == str(answer_text)]
        letter = matches[0] if matches else None
    return options, letter


# ------------------------------------------------------------------------------------ the source
class ChatBenchSource(Source):
    """One benchmark's questions (normalized records, see `_record`) as chat Samples.

    `num_frames`: frames sampled from each video (video benchmarks; the paper uses 64)."""

    def __init__(self, records: list, *, name: str, benchmark: str, video: bool = False, num_frames: int = 64):
        self.name, self.benchmark = name, benchmark
        self.task = "vchat" if video else "chat"
        self.num_frames = int(num_frames)
        self._records = records

    def _frame_count(self, index):
        return self.num_frames if self.task == "vchat" else 1

    def _prompt(self, rec) -> str:
        """The user prompt after the media and system lines (the subtitle variants build theirs
        from the video)."""
        return rec["prompt"]

    def _build(self, index):
        rec = self._records[index]
        where = f"{self.name}[{index}]"
        system = rec.get("system", "")
        media = "<video>\n" if self.task == "vchat" else "<image>\n"
        prompt = media + (system + "\n" if system else "") + self._prompt(rec)
        answer = rec["answer"]
        bench = {"benchmark": self.benchmark, "kind": "choice" if rec.get("options") else "yes_no",
                 "answer": answer, "options": dict(rec.get("options") or {}), "fields": dict(rec.get("fields") or {}),
                 "system": system, "answer_prefix": rec.get("answer_prefix", ""), "question": rec.get("question", "")}
        meta: dict = {"bench": bench}
        if self.task == "vchat":
            meta.update({"video_file": True, "num_frames": self.num_frames})
            for key in ("fps", "bound"):
                if rec.get(key) is not None:
                    meta[key] = rec[key]
            frames, (height, width) = [rec["video"]], (0, 0)
        elif rec.get("image_data") is not None:
            data = _image_bytes(rec["image_data"])
            try:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as img:
                    height, width = img.height, img.width
            except Exception as err:
                raise BadSample(f"{where}: the embedded image cannot be read ({err})", kind="corrupt_image") from err
            frames = [f"tsv://{self.name}/{rec['id']}"]
            meta["frame_bytes"] = [data]
        else:
            try:
                height, width = image_size(rec["image"])
            except FileNotFoundError as err:
                raise BadSample(f"{where}: missing image {rec['image']}", kind="missing_file") from err
            frames = [rec["image"]]
        conversation = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer.capitalize()
                                                              if bench["kind"] == "yes_no" else answer}]
        return Sample(dataset=self.name, task=self.task, sample_id=str(rec["id"]), frames=frames, height=height,
                      width=width, conversation=conversation, meta=meta)


def _record(rid, prompt: str, answer: str, *, options=None, fields=None, image=None, image_data=None, video=None,
            question: str = "", **extra) -> dict:
    out = {"id": str(rid), "prompt": prompt, "answer": answer, "options": options or {}, "fields": fields or {},
           "question": question}
    if image is not None:
        out["image"] = image
    if image_data is not None:
        out["image_data"] = image_data
    if video is not None:
        out["video"] = video
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _guarded(build, row, index):
    """A record from one row, or a MalformedRecord saying why not (one bad row is one counted skip)."""
    try:
        return build(row)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        return MalformedRecord(f"row {index}: {type(err).__name__}: {err}")


def _resolve_images(rows: list[dict]) -> None:
    """VLMEvalKit TSVs store an image once: a short `image` field (<= 64 chars) names the row holding it."""
    by_index = {str(r.get("index")): r.get("image") for r in rows}
    for r in rows:
        image = r.get("image")
        if isinstance(image, str) and 0 < len(image) <= 64 and image in by_index:
            r["image"] = by_index[image]


# ------------------------------------------------------------------------------------ image benchmarks
class MmeSource(ChatBenchSource):
    """MME (yes / no over image pairs): a VLMEvalKit TSV, an lmms-lab parquet, or the release folder."""

    def __init__(self, path: str, *, name: str = "mme", yes_no_suffix: bool = True):
        def from_row(row):
            category = _text(row["category"])
            if "image_path" in row and not _missing(row.get("image_path")):
                pair = _text(row["image_path"])
            elif not _missing(row.get("question_id")):             # parquet: "<category>/<file>"
                pair = _text(row["question_id"])
            else:
                raise KeyError("image_path")
            question = _text(row["question"])
            return _record(row.get("index", row.get("question_id")), yes_no_prompt(question, yes_no_suffix),
                           _yes_no(row["answer"]), fields={"category": category, "pair": f"{category}/{pair}"},
                           image_data=row["image"], question=question)

        if os.path.isdir(path) and not any(n.endswith(".parquet") for _, _, names in os.walk(path) for n in names):
            records = self._folder(path, yes_no_suffix)
        else:
            rows = read_records(path)
            _resolve_images(rows)
            records = [_guarded(from_row, row, i) for i, row in enumerate(rows)]
        super().__init__(records, name=name, benchmark="mme")

    @staticmethod
    def _folder(root: str, yes_no_suffix: bool) -> list:
        """The official release: one folder per subtask; each image has a .txt of "question<TAB>answer" lines."""
        records = []
        categories = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
        if not categories:
            raise FileNotFoundError(f"no MME subtask folders under {root}")
        for category in categories:
            folder = os.path.join(root, category)
            qa_dir = os.path.join(folder, "questions_answers_YN")
            image_dir = os.path.join(folder, "images") if os.path.isdir(qa_dir) else folder
            qa_dir = qa_dir if os.path.isdir(qa_dir) else folder
            images = {os.path.splitext(n)[0]: n for n in os.listdir(image_dir)
                      if n.lower().endswith((".jpg", ".jpeg", ".png"))}
            for txt in sorted(n for n in os.listdir(qa_dir) if n.endswith(".txt")):
                stem = os.path.splitext(txt)[0]
                with open(os.path.join(qa_dir, txt), encoding="utf-8") as f:
                    lines = [line.rstrip("\n") for line in f if line.strip()]
                for k, line in enumerate(lines):
                    where = f"{category}/{txt} line {k + 1}"
                    question, _, answer = line.rpartition("\t")
                    if stem not in images or not question:
                        records.append(MalformedRecord(f"{where}: no image for {stem} or no tab-separated answer"))
                        continue
                    try:
                        answer = _yes_no(answer)
                    except ValueError as err:
                        records.append(MalformedRecord(f"{where}: {err}"))
                        continue
                    records.append(_record(f"{category}/{stem}/{k}", yes_no_prompt(question.strip(), yes_no_suffix),
                                           answer, fields={"category": category, "pair": f"{category}/{images[stem]}"},
                                           image=os.path.join(image_dir, images[stem]), question=question.strip()))
        return records


class PopeSource(ChatBenchSource):
    """POPE (yes / no object probing): the official JSON-lines files (one per split) with an image
    folder, or a VLMEvalKit TSV / lmms-lab parquet (embedded images, `category` = split(s))."""

    def __init__(self, path: str, image_dir: str | None = None, *, name: str = "pope", yes_no_suffix: bool = True,
                 splits=POPE_SPLITS):
        records = []
        if path.endswith((".tsv", ".parquet")) or (os.path.isdir(path) and image_dir is None):
            rows = read_records(path)
            _resolve_images(rows)

            def from_row(row):
                question = _text(row["question"])
                return _record(row.get("index", row.get("question_id")), yes_no_prompt(question, yes_no_suffix),
                               _yes_no(row["answer"]), image_data=row["image"], question=question,
                               fields={"splits": [s.strip() for s in _text(row["category"]).split(",") if s.strip()]})

            records = [_guarded(from_row, row, i) for i, row in enumerate(rows)]
        else:
            if image_dir is None:
                raise ValueError("POPE JSON-lines files need image_dir (COCO val2014)")
            files = [path] if os.path.isfile(path) else [
                os.path.join(path, n) for n in sorted(os.listdir(require_dir(path, "POPE folder")))
                if n.endswith(".json") and any(n.endswith(f"_{s}.json") for s in splits)]
            if not files:
                raise FileNotFoundError(f"no POPE files (*_{{{','.join(splits)}}}.json) in {path}")
            for file in files:
                split = next((s for s in POPE_SPLITS if os.path.basename(file).endswith(f"_{s}.json")), "")

                def from_line(row, split=split, stem=os.path.basename(file)[:-5]):
                    question = _text(row["text"])
                    return _record(f"{stem}/{row['question_id']}", yes_no_prompt(question, yes_no_suffix),
                                   _yes_no(row["label"]), image=os.path.join(image_dir, row["image"]),
                                   question=question, fields={"splits": [split] if split else []})

                records += [_guarded(from_line, row, i) for i, row in enumerate(read_json_lines(file))]
        super().__init__(records, name=name, benchmark="pope")


class ChoiceTsvSource(ChatBenchSource):
    """A VLMEvalKit multiple-choice TSV (MMBench, SEEDBench_IMG, AI2D_TEST): index, question, hint?,
    A.., answer, category?, l2-category?, image. `circular`: group the passes of a question
    (index % 1e6) for CircularEval (MMBench)."""

    def __init__(self, path: str, *, name: str, benchmark: str, circular: bool = False):
        rows = read_tsv(path)
        _resolve_images(rows)

        def from_row(row):
            options = _letters_of(row)
            answer = _text(row["answer"]).upper()
            if answer not in options:
                raise ValueError(f"answer {row['answer']!r} is not one of the options {sorted(options)}")
            fields = {k: _text(row[k]) for k in ("category", "l2-category", "split") if not _missing(row.get(k))}
            index = int(float(row["index"])) if circular else row["index"]
            if circular:
                fields["group"] = index % 1_000_000
                fields["main"] = index == fields["group"]
            question = _text(row["question"])
            return _record(row["index"], choice_prompt(question, options, _text(row.get("hint"))), answer,
                           options=options, fields=fields, image_data=row["image"], question=question)

        records = [_guarded(from_row, row, i) for i, row in enumerate(rows)]
        super().__init__(records, name=name, benchmark=benchmark)


class SeedBenchSource(ChatBenchSource):
    """SEED-Bench's own SEED-Bench.json (image questions) with SEED-Bench-image/; the VLMEvalKit
    SEEDBench_IMG.tsv goes through `ChoiceTsvSource`."""

    def __init__(self, ann_file: str, image_dir: str, *, name: str = "seed_bench"):
        data = load_json(ann_file, "SEED-Bench annotation file")
        types = {int(v): k for k, v in (data.get("question_type") or {}).items()}

        def from_question(q):
            options = {letter: _text(q[f"choice_{letter.lower()}"]) for letter in "ABCD"
                       if not _missing(q.get(f"choice_{letter.lower()}"))}
            answer = _text(q["answer"]).upper()
            if answer not in options:
                raise ValueError(f"answer {q['answer']!r} is not one of the options {sorted(options)}")
            type_id = int(q["question_type_id"])
            question = _text(q["question"])
            return _record(q["question_id"], choice_prompt(question, options), answer, options=options,
                           fields={"category": types.get(type_id, str(type_id))},
                           image=os.path.join(image_dir, q["data_id"]), question=question)

        questions = [q for q in data.get("questions", []) if q.get("data_type", "image") == "image"]
        super().__init__([_guarded(from_question, q, i) for i, q in enumerate(questions)], name=name,
                         benchmark="seed_bench")


# ------------------------------------------------------------------------------------ subtitles
# VLMEvalKit's subtitle variants pick the lines shown at its own frame sampling of the video,
# int(i * frames / (n + 1)) for i = 1..n (`save_video_frames`, n = the benchmark's frame count),
# whatever frames the model itself samples.
_SRT_TIME = re.compile(r"(\d{1,2}):(\d{1,2}):(\d{1,2})[.,](\d{1,3})")
_SRT_TAGS = ("i", "s", "u", "b")          # pysubs2 turns these into SubStation tags


def _frame_count_and_rate(video: str) -> tuple[int, float]:
    from x2sam_jax.data.transforms import video_frame_count   # transforms imports the sources package

    return video_frame_count(video)


def subtitle_frame_indices(total: int, num_frames: int) -> list[int]:
    """VLMEvalKit's frames for subtitles: int(i * total / (num_frames + 1)), i = 1..num_frames."""
    step = total / (num_frames + 1)
    return [int(i * step) for i in range(1, num_frames + 1)]


def _srt_ms(groups) -> int:
    h, m, sec, frac = groups
    return int(frac) * 10 ** (3 - len(frac)) + int(sec) * 1000 + int(m) * 60_000 + int(h) * 3_600_000


def read_srt(path: str) -> list[tuple[int, int, str]]:
    """SubRip cues (start ms, end ms, text) as pysubs2 reads them for VLMEvalKit: a line with two
    timestamps starts a cue, the lines after it are its text (the next cue's number dropped),
    <i> <s> <u> <b> become SubStation tags ({\\i1} ... {\\i0}), other HTML tags are dropped; the
    line breaks become spaces (VLMEvalKit replaces pysubs2's \\N by a space)."""
    require_file(path, "subtitle file")
    cues, texts = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            stamps = _SRT_TIME.findall(line)
            if len(stamps) == 2:
                cues.append((_srt_ms(stamps[0]), _srt_ms(stamps[1])))
                texts.append([])
            elif cues:
                texts[-1].append(line)
    out = []
    for (start, end), lines in zip(cues, texts):
        if len(lines) >= 2 and all(not x.strip() for x in lines[:-1]) and lines[-1].strip().isdigit():
            text = ""                        # an empty cue followed by the next cue's number
        else:
            text = re.sub(r"\n+ *\d+ *$", "", "".join(lines).strip())
            for tag in _SRT_TAGS:
                text = re.sub(rf"< *{tag} *>", rf"{{\\{tag}1}}", text)
                text = re.sub(rf"< */ *{tag} *>", rf"{{\\{tag}0}}", text)
            text = re.sub(r"< */? *[a-zA-Z][^>]*>", "", text).replace("\n", " ")
        out.append((start, end, text))
    return out


def videomme_subtitles(srt_file: str, total: int, fps: float, num_frames: int) -> list[str]:
    """Video-MME's subtitle lines (VLMEvalKit videomme.py `build_prompt`): at each subtitle frame
    (`subtitle_frame_indices`), time round(index * 1000 / fps) ms, the first cue strictly around it;
    blank ones left out, repeats kept."""
    cues = read_srt(srt_file)
    lines = []
    for index in subtitle_frame_indices(total, num_frames):
        now = int(round(index * (1000 / fps)))
        text = next((t for start, end, t in cues if start < now < end), "")
        if text.strip():
            lines.append(text)
    return lines


def _clock_seconds(stamp: str) -> float:
    h, m, sec = str(stamp).split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def longvideobench_subtitles(json_file: str, frame_times, offset: float, duration: float) -> list[str]:
    """LongVideoBench's subtitle lines (VLMEvalKit longvideobench.py `insert_subtitles_into_frames`):
    entries {"timestamp": [start, end], "text"} or {"start": "H:M:S.f", "end", "line"}, shifted by
    the video's `starting_timestamp_for_subtitles`; a line is kept when a subtitle frame time lies
    strictly inside its span (spans under 1 s widened to 1 s around their middle). As VLMEvalKit, an
    end that is not a float (null, or an integer) means the video's end."""
    entries = load_json(json_file, "LongVideoBench subtitle file")
    lines = []
    for entry in entries:
        if "timestamp" in entry:
            start, end = entry["timestamp"]
            end = end if isinstance(end, float) else duration
            text = entry["text"]
        else:
            start, end, text = _clock_seconds(entry["start"]), _clock_seconds(entry["end"]), entry["line"]
        start, end = start - offset, end - offset
        if end - start < 1:
            middle = (start + end) / 2
            start, end = middle - 0.5, middle + 0.5
        if any(start < t < end for t in frame_times):
            lines.append(text)
    return lines


# ------------------------------------------------------------------------------------ video benchmarks
def _find_video(folders, stem_or_name: str) -> str:
    """The first existing folders[i]/name (as given, or with a video extension, or a frame folder);
    else the first candidate (a missing video is a BadSample when its frames are loaded)."""
    candidates = []
    for folder in folders:
        base = os.path.join(folder, stem_or_name)
        candidates += [base] + ([base + ext for ext in VIDEO_EXTENSIONS] if not os.path.splitext(base)[1] else [])
    return next((c for c in candidates if os.path.exists(c)), candidates[0])


class VideoMmeSource(ChatBenchSource):
    """Video-MME: the lmms-lab parquet (or JSON of its records) and the video folder(s).

    `subtitle_dir` (None: w/o subtitles, the default) runs the "w/ subtitles" variant as
    VLMEvalKit does: `subtitle_dir`/<videoID>.srt, its lines at VLMEvalKit's subtitle frames
    (`videomme_subtitles`) listed inside the instruction; a video without a subtitle file gets the
    same prompt with no lines. Which variant the paper's Video-MME number is, is not stated."""

    def __init__(self, ann_file: str, video_dirs, *, name: str = "videomme", num_frames: int = 64,
                 subtitle_dir: str | None = None):
        video_dirs = [video_dirs] if isinstance(video_dirs, str) else list(video_dirs)
        self.subtitle_dir = subtitle_dir

        def from_row(row):
            options = {}
            for k, text in enumerate(list(row["options"]) if not isinstance(row["options"], str)
                                     else json.loads(row["options"])):
                letter, _, rest = str(text).partition(". ")
                options[letter if letter in LETTERS and rest else LETTERS[k]] = rest if rest else str(text)
            answer = _text(row["answer"]).upper()
            if answer not in options:
                raise ValueError(f"answer {row['answer']!r} is not one of the options {sorted(options)}")
            question = _text(row["question"])
            lines = "\n".join(f"{k}. {v}" for k, v in options.items())
            prompt = f"Question: {question}\n{lines}\nAnswer: "
            if subtitle_dir is None:
                prompt = f"{VIDEOMME_HINT}\n{prompt}"
            fields = {k: _text(row[k]) for k in ("duration", "domain", "sub_category", "task_type") if k in row}
            return _record(row.get("question_id", row.get("index")), prompt, answer, options=options, fields=fields,
                           video=_find_video(video_dirs, _text(row["videoID"])), question=question,
                           subtitles=None if subtitle_dir is None else
                           os.path.join(subtitle_dir, _text(row["videoID"]) + ".srt"))

        rows = read_records(ann_file)
        super().__init__([_guarded(from_row, row, i) for i, row in enumerate(rows)], name=name, benchmark="videomme",
                         video=True, num_frames=num_frames)

    def _prompt(self, rec) -> str:
        if not rec.get("subtitles"):
            return rec["prompt"]
        lines = []
        if os.path.isfile(rec["subtitles"]):
            total, fps = _frame_count_and_rate(rec["video"])
            lines = videomme_subtitles(rec["subtitles"], total, fps, self.num_frames)
        return VIDEOMME_SUBTITLE_HINT.format("\n".join(lines)) + "\n" + rec["prompt"]


def _option_block(options: dict[str, str]) -> str:
    return "Options:\n" + "\n".join(f"({k}) {v}" for k, v in options.items())


class MvBenchSource(ChatBenchSource):
    """MVBench: json/<task>.json of each task in `MVBENCH_TASKS`, videos under video/<source>/.
    A task's json that is absent is skipped (the NTU RGB+D videos are not redistributed)."""

    def __init__(self, root: str, *, name: str = "mvbench", num_frames: int = 64, tasks=None):
        json_dir = require_dir(os.path.join(root, "json"), "MVBench json folder")
        records = []
        for task, (file, folder, kind, bounded) in MVBENCH_TASKS.items():
            if (tasks is not None and task not in tasks) or not os.path.isfile(os.path.join(json_dir, file)):
                continue

            def from_item(item, k, task=task, folder=folder, kind=kind, bounded=bounded, stem=file[:-5]):
                options, answer = options_from_candidates(item["candidates"], item["answer"])
                if answer is None:
                    raise ValueError(f"answer {item['answer']!r} is not one of the candidates")
                question = _text(item["question"])
                bound = (float(item["start"]), float(item["end"])) if bounded and "start" in item else None
                return _record(f"{stem}/{k}", f"Question: {question}\n{_option_block(options)}" + BEST_OPTION, answer,
                               options=options, fields={"task_type": task},
                               video=os.path.join(root, "video", folder, item["video"]), question=question,
                               system=MVBENCH_SYSTEM, answer_prefix=MVBENCH_PREFIX, bound=bound,
                               fps=MVBENCH_FRAME_FPS if kind == "frame" else None)

            items = load_json(os.path.join(json_dir, file), "MVBench task file")
            records += [_guarded(lambda item, i=i: from_item(item, i), item, i) for i, item in enumerate(items)]
        if not records:
            raise FileNotFoundError(f"no MVBench task files ({', '.join(v[0] for v in MVBENCH_TASKS.values())}) "
                                    f"in {json_dir}")
        super().__init__(records, name=name, benchmark="mvbench", video=True, num_frames=num_frames)


class MlvuSource(ChatBenchSource):
    """MLVU dev, multiple-choice tasks: json/<n>_<task>.json with videos in video/<n>_<task>/."""

    def __init__(self, root: str, *, name: str = "mlvu", num_frames: int = 64, tasks=None):
        json_dir = require_dir(os.path.join(root, "json"), "MLVU json folder")
        records = []
        for task, file in MLVU_TASKS.items():
            if (tasks is not None and task not in tasks) or not os.path.isfile(os.path.join(json_dir, file)):
                continue

            def from_item(item, k, task=task, stem=file[:-5]):
                options, answer = options_from_candidates(item["candidates"], item["answer"])
                if answer is None:
                    raise ValueError(f"answer {item['answer']!r} is not one of the candidates")
                question = _text(item["question"])
                fields = {"task_type": task}
                if not _missing(item.get("duration")):
                    fields["duration"] = float(item["duration"])
                return _record(f"{stem}/{k}", f"Question: {question}\n{_option_block(options)}" + BEST_OPTION, answer,
                               options=options, fields=fields,
                               video=os.path.join(root, "video", stem, item["video"]), question=question,
                               system=MLVU_SYSTEM, answer_prefix=MLVU_PREFIX)

            items = load_json(os.path.join(json_dir, file), "MLVU task file")
            records += [_guarded(lambda item, i=i: from_item(item, i), item, i) for i, item in enumerate(items)]
        if not records:
            raise FileNotFoundError(f"no MLVU multiple-choice files ({', '.join(MLVU_TASKS.values())}) in {json_dir}")
        super().__init__(records, name=name, benchmark="mlvu", video=True, num_frames=num_frames)


class LongVideoBenchSource(ChatBenchSource):
    """LongVideoBench validation: lvb_val.json, videos in videos/.

    `subtitle_dir` (None: w/o subtitles, the default) adds the video's subtitles
    (`subtitle_dir`/<subtitle_path>, `longvideobench_subtitles`): the lines VLMEvalKit interleaves
    with the frames of an image-frame model, here in their order after the video, before the
    question (one video block cannot be interleaved; VLMEvalKit gives a video LLM none). Which
    variant the paper's LongVideoBench number is, is not stated."""

    def __init__(self, ann_file: str, video_dir: str, *, name: str = "longvideobench", num_frames: int = 64,
                 subtitle_dir: str | None = None):
        def from_item(item):
            options, _ = options_from_candidates(item["candidates"])
            choice = int(item["correct_choice"])
            if not 0 <= choice < len(options):
                raise ValueError(f"correct_choice {choice} out of {len(options)} candidates")
            question = _text(item["question"])
            lines = "\n".join(f"{k}. {v}" for k, v in options.items())
            fields = {"duration_group": str(item["duration_group"]),
                      "question_category": _text(item.get("question_category"))}
            subtitles = None
            if subtitle_dir is not None:
                subtitles = {"file": os.path.join(subtitle_dir, item["subtitle_path"]),
                             "duration": float(item["duration"]),
                             "offset": float(item.get("starting_timestamp_for_subtitles") or 0)}
            return _record(item.get("id", item.get("video_id")), f"{question}\n{lines}\n{CHOICE_HINT}", LETTERS[choice],
                           options=options, fields=fields, video=os.path.join(video_dir, item["video_path"]),
                           question=question, subtitles=subtitles)

        items = load_json(ann_file, "LongVideoBench annotation file")
        super().__init__([_guarded(from_item, item, i) for i, item in enumerate(items)], name=name,
                         benchmark="longvideobench", video=True, num_frames=num_frames)

    def _prompt(self, rec) -> str:
        sub = rec.get("subtitles")
        if not sub:
            return rec["prompt"]
        total, fps = _frame_count_and_rate(rec["video"])
        times = [i / fps for i in subtitle_frame_indices(total, self.num_frames)]
        lines = longvideobench_subtitles(sub["file"], times, sub["offset"], sub["duration"])
        return "".join(line + "\n" for line in lines) + rec["prompt"]


# ------------------------------------------------------------------------------------ builders
def _first_existing(root: str, candidates, what: str) -> str:
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{what} not found under {root} (tried {', '.join(candidates)})")


def mme(root: str, ann_file: str | None = None, **kwargs) -> MmeSource:
    """MME under {root}: MME.tsv (VLMEvalKit LMUData) or MME_Benchmark_release_version/."""
    path = _first_existing(root, [ann_file] if ann_file else ["MME.tsv", "MME_Benchmark_release_version"], "MME")
    return MmeSource(path, **kwargs)


def pope(root: str, ann_file: str | None = None, image_dir: str = "val2014", **kwargs) -> PopeSource:
    """POPE under {root}: POPE.tsv (VLMEvalKit) or the official output/coco/ JSON lines + val2014/."""
    path = _first_existing(root, [ann_file] if ann_file else ["POPE.tsv", os.path.join("output", "coco"), "coco"],
                           "POPE")
    if path.endswith((".tsv", ".parquet")):
        return PopeSource(path, **kwargs)
    return PopeSource(path, require_dir(os.path.join(root, image_dir), "POPE image folder"), **kwargs)


def mmbench(root: str, ann_file: str = "MMBench_DEV_EN.tsv", *, circular: bool = True, **kwargs) -> ChoiceTsvSource:
    """MMBench dev (the split with public answers) as VLMEvalKit ships it, CircularEval by default."""
    path = _first_existing(root, [ann_file], "MMBench TSV")
    return ChoiceTsvSource(path, name=kwargs.pop("name", "mmbench"), benchmark="mmbench", circular=circular, **kwargs)


def seed_bench(root: str, ann_file: str | None = None, image_dir: str = "SEED-Bench-image", **kwargs):
    """SEED-Bench (image) under {root}: SEEDBench_IMG.tsv (VLMEvalKit) or SEED-Bench.json + SEED-Bench-image/."""
    path = _first_existing(root, [ann_file] if ann_file else ["SEEDBench_IMG.tsv", "SEED-Bench.json"], "SEED-Bench")
    name = kwargs.pop("name", "seed_bench")
    if path.endswith(".tsv"):
        return ChoiceTsvSource(path, name=name, benchmark="seed_bench", **kwargs)
    return SeedBenchSource(path, require_dir(os.path.join(root, image_dir), "SEED-Bench image folder"), name=name,
                           **kwargs)


def ai2d(root: str, ann_file: str = "AI2D_TEST.tsv", **kwargs) -> ChoiceTsvSource:
    """AI2D test as VLMEvalKit ships it (AI2D_TEST.tsv)."""
    path = _first_existing(root, [ann_file], "AI2D TSV")
    return ChoiceTsvSource(path, name=kwargs.pop("name", "ai2d"), benchmark="ai2d", **kwargs)


def videomme(root: str, ann_file: str | None = None, *, subtitles: bool = False, subtitle_dir: str = "subtitle",
             **kwargs) -> VideoMmeSource:
    """Video-MME under {root} (lmms-lab/Video-MME): videomme/test-00000-of-00001.parquet, videos in
    video/ (VLMEvalKit) or data/ (the unzipped videos_chunked_*.zip); `subtitles` True: the "w/
    subtitles" variant, <videoID>.srt files in {root}/`subtitle_dir` (the unzipped subtitle.zip)."""
    path = _first_existing(root, [ann_file] if ann_file else [os.path.join("videomme", "test-00000-of-00001.parquet"),
                                                              "videomme.json"], "Video-MME annotation")
    subs = require_dir(os.path.join(root, subtitle_dir), "Video-MME subtitle folder") if subtitles else None
    return VideoMmeSource(path, [os.path.join(root, "video"), os.path.join(root, "data")], subtitle_dir=subs, **kwargs)


def mvbench(root: str, **kwargs) -> MvBenchSource:
    """MVBench under {root} (OpenGVLab/MVBench): json/ and video/."""
    require_dir(root, "MVBench root")
    return MvBenchSource(root, **kwargs)


def mlvu(root: str, **kwargs) -> MlvuSource:
    """MLVU dev under {root} (the MLVU/ folder of MLVU/MVLU): json/ and video/."""
    require_dir(root, "MLVU root")
    return MlvuSource(root, **kwargs)


def longvideobench(root: str, ann_file: str = "lvb_val.json", video_dir: str = "videos", *, subtitles: bool = False,
                   subtitle_dir: str = "subtitles", **kwargs):
    """LongVideoBench validation under {root} (longvideobench/LongVideoBench): lvb_val.json, videos/;
    `subtitles` True: with the subtitle JSON files in {root}/`subtitle_dir`."""
    path = _first_existing(root, [ann_file], "LongVideoBench annotation")
    subs = require_dir(os.path.join(root, subtitle_dir), "LongVideoBench subtitle folder") if subtitles else None
    return LongVideoBenchSource(path, os.path.join(root, video_dir), subtitle_dir=subs, **kwargs)


FACTORIES = {
    "mme": mme, "pope": pope, "mmbench": mmbench, "seed_bench": seed_bench, "ai2d": ai2d,
    "videomme": videomme, "mvbench": mvbench, "mlvu": mlvu, "longvideobench": longvideobench,
}
