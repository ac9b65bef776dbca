"""Chat benchmarks: the readers on small files in each benchmark's published layout, the answer
matching on each benchmark's answer formats (right, wrong, unreadable), the scores computed by
hand (MME sums and acc+, POPE F1, CircularEval) and the evaluator on rows of a collated batch."""

import base64
import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from x2sam_jax.data import sources
from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources import chat_bench as cb
from x2sam_jax.eval import chat, tasks
from x2sam_jax.eval.metrics import chat as cm


# ------------------------------------------------------------------------------------ file writers
def _png(h=12, w=20, value=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(h=12, w=20, value=0) -> str:
    return base64.b64encode(_png(h, w, value)).decode()


def _write_tsv(path, rows):
    """As pandas' DataFrame.to_csv(sep="\\t", index=False) writes VLMEvalKit's TSVs."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, keys, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_image(path, h=12, w=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path, format="JPEG")   # SEED's files have no suffix


def _source_records(src):
    return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------------------------ MME
MME_ROWS = [  # VLMEvalKit MME.tsv: two questions per image (image_path), answers Yes / No
    {"index": 0, "image": _b64(12, 20), "question": "Is there a dog in this image? Please answer yes or no.",
     "answer": "Yes", "category": "existence", "image_path": "000000006040.jpg"},
    {"index": 1, "image": "0", "question": "Is there a cat in this image? Please answer yes or no.",
     "answer": "No", "category": "existence", "image_path": "000000006040.jpg"},
    {"index": 2, "image": _b64(8, 8), "question": "Is there a train in this image? Please answer yes or no.",
     "answer": "Yes", "category": "existence", "image_path": "000000008277.jpg"},
    {"index": 3, "image": "2", "question": "Is there a bus in this image? Please answer yes or no.",
     "answer": "No", "category": "existence", "image_path": "000000008277.jpg"},
    {"index": 4, "image": _b64(8, 8), "question": "Is the output of the code 5? Please answer yes or no.",
     "answer": "Yes", "category": "code_reasoning", "image_path": "0001.png"},
    {"index": 5, "image": "4", "question": "Is the output of the code 6? Please answer yes or no.",
     "answer": "No", "category": "code_reasoning", "image_path": "0001.png"},
]


def test_mme_tsv_reader(tmp_path):
    _write_tsv(tmp_path / "MME.tsv", MME_ROWS)
    src = sources.build_source({"type": "mme", "root": str(tmp_path)})
    assert src.task == "chat" and len(src) == 6 and src.frame_count(0) == 1
    s = src[1]
    assert (s.height, s.width) == (12, 20)   # the image of row 0 (row 1 names it)
    assert s.meta["frame_bytes"][0] == _png(12, 20) and s.frames == ["tsv://mme/1"]
    assert s.conversation == [
        {"from": "human", "value": "<image>\nIs there a cat in this image? Please answer yes or no."},
        {"from": "gpt", "value": "No"}]                                   # the suffix is not doubled
    bench = s.meta["bench"]
    assert bench["kind"] == "yes_no" and bench["answer"] == "no" and bench["options"] == {}
    assert bench["fields"] == {"category": "existence", "pair": "existence/000000006040.jpg"}

    from x2sam_jax.data.features import load_frames
    frames, _ = load_frames(s)
    assert frames[0].shape == (12, 20, 3)


def test_mme_release_folder(tmp_path):
    """MME_Benchmark_release_version: <name>.txt beside the image, or images/ + questions_answers_YN/."""
    root = tmp_path / "MME_Benchmark_release_version"
    _write_image(root / "count" / "000000001.jpg")
    (root / "count" / "000000001.txt").write_text("Are there two dogs in the image? Please answer yes or no.\tYes\n"
                                                  "Are there three dogs in the image? Please answer yes or no.\tNo\n")
    _write_image(root / "artwork" / "images" / "10002.jpg", 6, 7)
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Lucas? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tmaybe\n")
    src = cb.mme(str(tmp_path))
    assert len(src) == 4
    first = src[0]
    assert first.frames == [str(root / "artwork" / "images" / "10002.jpg")] and (first.height, first.width) == (6, 7)
    assert first.meta["bench"]["fields"] == {"category": "artwork", "pair": "artwork/10002.jpg"}
    with pytest.raises(BadSample, match="maybe"):   # one bad line is one skipped question
        src[1]
    assert [src[i].meta["bench"]["answer"] for i in (2, 3)] == ["yes", "no"]
    assert src[3].meta["bench"]["fields"]["pair"] == "count/000000001.jpg"


# ------------------------------------------------------------------------------------ POPE
def test_pope_official_json_lines(tmp_path):
    folder = tmp_path / "output" / "coco"
    folder.mkdir(parents=True)
    for split, label in (("adversarial", "yes"), ("random", "no")):
        lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the "
                  "image?", "label": label}, {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
                                              "text": "Is there a dog in the image?", "label": "no"}]
        (folder / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _write_image(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg", 9, 11)
    src = cb.pope(str(tmp_path))
    assert len(src) == 4
    s = src[0]
    assert s.conversation[0]["value"] == "<image>\nIs there a snowboard in the image? Please answer yes or no."
    assert s.meta["bench"]["fields"] == {"splits": ["adversarial"]} and s.meta["bench"]["answer"] == "yes"
    assert src[2].meta["bench"]["fields"] == {"splits": ["random"]} and src[2].sample_id == "coco_pope_random/1"
    assert (s.height, s.width) == (9, 11)
    raw = cb.PopeSource(str(folder), str(tmp_path / "val2014"), yes_no_suffix=False)
    assert raw[0].conversation[0]["value"] == "<image>\nIs there a snowboard in the image?"


def test_pope_tsv_lists_several_splits(tmp_path):
    _write_tsv(tmp_path / "POPE.tsv", [
        {"index": 0, "image": _b64(), "question": "Is there a car in the image?", "answer": "Yes",
         "category": "adversarial,popular,random"},
        {"index": 1, "image": "0", "question": "Is there a pizza in the image?", "answer": "No", "category": "random"}])
    src = cb.pope(str(tmp_path))
    assert src[0].meta["bench"]["fields"]["splits"] == ["adversarial", "popular", "random"]
    assert src[1].meta["bench"]["answer"] == "no" and src[1].meta["frame_bytes"][0] == _png()


# ------------------------------------------------------------------------------------ MMBench, SEED, AI2D
MMB_ROWS = [  # VLMEvalKit MMBench_DEV_EN.tsv: pass k of question q is row q + k * 1e6
    {"index": 241, "question": "What animal is this?", "hint": "Look closely.", "A": "cat", "B": "dog", "C": "bird",
     "D": "fish", "answer": "B", "category": "object_localization", "image": _b64(),
     "l2-category": "Fine-grained Perception (instance-level)", "split": "dev"},
    {"index": 1000241, "question": "What animal is this?", "hint": "Look closely.", "A": "dog", "B": "bird",
     "C": "fish", "D": "cat", "answer": "A", "category": "object_localization", "image": "241",
     "l2-category": "Fine-grained Perception (instance-level)", "split": "dev"},
    {"index": 7, "question": "Which season is shown?", "hint": "", "A": "winter", "B": "summer", "C": "",
     "D": "", "answer": "A", "category": "image_scene", "image": _b64(), "l2-category": "Coarse Perception",
     "split": "dev"},
    {"index": 1000007, "question": "Which season is shown?", "hint": "", "A": "summer", "B": "winter", "C": "",
     "D": "", "answer": "B", "category": "image_scene", "image": "7", "l2-category": "Coarse Perception",
     "split": "dev"},
]


def test_mmbench_tsv_with_circular_passes(tmp_path):
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_ROWS)
    src = cb.mmbench(str(tmp_path))
    assert len(src) == 4
    s = src[1]
    assert s.conversation[0]["value"] == ("<image>\nLook closely.\nWhat animal is this?\nA. dog\nB. bird\nC. fish\n"
                                          "D. cat\nAnswer with the option's letter from the given choices directly.")
    bench = s.meta["bench"]
    assert bench["answer"] == "A" and bench["options"] == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    assert bench["fields"]["group"] == 241 and bench["fields"]["main"] is False and src[0].meta["bench"]["fields"]["main"]
    assert s.meta["frame_bytes"] == src[0].meta["frame_bytes"]
    two = src[2].meta["bench"]
    assert two["options"] == {"A": "winter", "B": "summer"}                    # empty C / D are no options
    assert src[2].conversation[0]["value"] == ("<image>\nWhich season is shown?\nA. winter\nB. summer\n"
                                               "Answer with the option's letter from the given choices directly.")


def test_seed_bench_json_and_tsv(tmp_path):
    data = {"question_type": {"Scene Understanding": 1, "Instances Counting": 5},
            "questions": [
                {"answer": "B", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
                 "data_id": "1454426_2591111986", "data_type": "image", "question": "How many towels are in the "
                 "image?", "question_id": "101669", "question_type_id": 5},
                {"answer": "A", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
                 "data_id": "v1.mp4", "data_type": "video", "question": "What happens?", "question_id": "9",
                 "question_type_id": 10}]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    _write_image(tmp_path / "SEED-Bench-image" / "1454426_2591111986")
    src = cb.seed_bench(str(tmp_path))
    assert len(src) == 1                                                   # image questions only
    s = src[0]
    assert s.sample_id == "101669" and s.frames == [str(tmp_path / "SEED-Bench-image" / "1454426_2591111986")]
    assert s.meta["bench"]["fields"] == {"category": "Instances Counting"}
    assert s.conversation[0]["value"].endswith("How many towels are in the image?\nA. One\nB. Two\nC. Three\n"
                                               "D. Four\nAnswer with the option's letter from the given choices "
                                               "directly.")
    _write_tsv(tmp_path / "SEEDBench_IMG.tsv", [{"index": 3, "question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d",
                                                 "answer": "C", "category": "Scene Understanding", "image": _b64()}])
    tsv = cb.seed_bench(str(tmp_path))                                     # the TSV comes first
    assert tsv[0].meta["bench"]["answer"] == "C" and "group" not in tsv[0].meta["bench"]["fields"]


def test_ai2d_tsv_and_a_bad_row(tmp_path):
    _write_tsv(tmp_path / "AI2D_TEST.tsv", [
        {"index": 0, "question": "Which stage is the egg?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D",
         "image": _b64()},
        {"index": 1, "question": "Broken", "A": "a", "B": "b", "C": "", "D": "", "answer": "C", "image": _b64()}])
    src = sources.FACTORIES["ai2d"](str(tmp_path))
    assert src[0].meta["bench"]["answer"] == "D" and src[0].meta["bench"]["fields"] == {}
    with pytest.raises(BadSample, match="not one of the options"):
        src[1]


# ------------------------------------------------------------------------------------ videos
def test_videomme_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "videomme").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fFjv93ACGo8.mp4").write_bytes(b"")
    pq.write_table(pa.Table.from_pylist([{
        "video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
        "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
        "initially decorated with apples, candles and berries, which kind of the decoration has the largest number?",
        "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
        "answer": "C"}]), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    src = cb.videomme(str(tmp_path), num_frames=16)
    s = src[0]
    assert s.task == "vchat" and s.frames == [str(tmp_path / "data" / "fFjv93ACGo8.mp4")] and src.frame_count(0) == 16
    assert s.meta["video_file"] and s.meta["num_frames"] == 16
    assert s.conversation[0]["value"] == (
        "<video>\n" + cb.VIDEOMME_HINT + "\nQuestion: When demonstrating the Germany modern Christmas tree is initially"
        " decorated with apples, candles and berries, which kind of the decoration has the largest number?\n"
        "A. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.\nAnswer: ")
    bench = s.meta["bench"]
    assert bench["answer"] == "C" and bench["options"]["B"] == "Candles."
    assert bench["fields"] == {"duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                               "task_type": "Counting Problem"}


def test_mvbench_tasks_bounds_and_frame_folders(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.",
                        "Took the box."], "answer": "Ate the medicine.", "start": 11.1, "end": 19.6}]))
    (tmp_path / "json" / "episodic_reasoning.json").write_text(json.dumps([
        {"video": "castle_s07e04_seg02_clip_14", "question": "Who is talking?", "candidates": ["Beckett", "Castle"],
         "answer": "Castle", "start": 0.0, "end": 12.3},
        {"video": "x", "question": "Broken?", "candidates": ["a", "b"], "answer": "c"}]))
    src = cb.mvbench(str(tmp_path))
    assert len(src) == 3
    s = src[0]
    assert s.frames == [str(tmp_path / "video" / "star" / "Charades_v1_480" / "ZS9XR.mp4")]
    assert s.meta["bound"] == (11.1, 19.6) and "fps" not in s.meta
    assert s.conversation[0]["value"] == (
        "<video>\n" + cb.MVBENCH_SYSTEM + "\nQuestion: What happened after the person took the food?\nOptions:\n"
        "(A) Ate the medicine.\n(B) Tidied up the blanket.\n(C) Put down the cup/glass/bottle.\n(D) Took the box.\n"
        "Only give the best option.")
    bench = s.meta["bench"]
    assert bench["answer"] == "A" and bench["answer_prefix"] == "Best option:(" and bench["system"] == cb.MVBENCH_SYSTEM
    assert bench["fields"] == {"task_type": "Action Sequence"}
    tv = src[1]
    assert tv.meta["fps"] == 3 and tv.meta["bench"]["answer"] == "B"
    assert tv.frames == [str(tmp_path / "video" / "tvqa" / "frames_fps3_hq" / "castle_s07e04_seg02_clip_14")]
    with pytest.raises(BadSample, match="not one of the candidates"):
        src[2]


def test_mvbench_bounds_cut_the_clip_before_sampling(tmp_path):
    """MVBench's (start, end) through load_frames as X2SAM's VLMEvalKit run applies them (the clip
    cut out, then sampled uniformly; its times start at 0), on videos whose frame k has the value
    6k. A 40-frame file at 10 fps, bound (1, 3) s: the clip is frames 10..29, 4 uniform frames of
    it linspace(0, 19, 4).round() = 0, 6, 13, 19 -> frames 10, 16, 23, 29. An end past the video
    stops at its last frame (3..100 s: frames 30..39 -> 30, 33, 36, 39). A TVQA frame folder
    (00001.jpg..., 3 fps by the task), bound (1, 2.5) s: frames 3..7 -> 3, 4, 6, 7. A bound after the
    video's end is a BadSample naming the file; unbounded tasks sample the whole video."""
    from x2sam_jax.data.features import load_frames
    from x2sam_jax.data.transforms import write_video_file

    def frame(k):
        return np.full((16, 16, 3), 6 * k, np.uint8)

    video_dir = tmp_path / "video" / "star" / "Charades_v1_480"
    video_dir.mkdir(parents=True)
    write_video_file(str(video_dir / "v.mp4"), [frame(k) for k in range(40)], fps=10)
    folder = tmp_path / "video" / "tvqa" / "frames_fps3_hq" / "clip"
    folder.mkdir(parents=True)
    for k in range(12):
        Image.fromarray(frame(k)).save(folder / f"{k + 1:05d}.jpg", quality=100)
    (tmp_path / "video" / "ssv2_video").mkdir()
    write_video_file(str(tmp_path / "video" / "ssv2_video" / "v.mp4"), [frame(k) for k in range(40)], fps=10)
    (tmp_path / "json").mkdir()
    item = {"video": "v.mp4", "question": "?", "candidates": ["a", "b"], "answer": "a"}
    (tmp_path / "json" / "action_sequence.json").write_text(json.dumps([
        item | {"start": 1.0, "end": 3.0}, item | {"start": 3.0, "end": 100.0}, item | {"start": 5.0, "end": 9.0}]))
    (tmp_path / "json" / "episodic_reasoning.json").write_text(json.dumps([
        item | {"video": "clip", "start": 1.0, "end": 2.5}]))
    (tmp_path / "json" / "action_antonym.json").write_text(json.dumps([item | {"start": 1.0, "end": 3.0}]))
    src = cb.mvbench(str(tmp_path), num_frames=4, tasks=("Action Sequence", "Episodic Reasoning", "Action Antonym"))

    def shown(index):
        frames, sample = load_frames(src[index])
        return [int(round(f.mean() / 6)) for f in frames], sample.frame_times

    assert shown(0) == ([10, 16, 23, 29], pytest.approx([0.0, 0.6, 1.3, 1.9]))
    assert shown(1)[0] == [30, 33, 36, 39]
    with pytest.raises(BadSample, match=r"v\.mp4: clip bound \(5\.0, 9\.0\) s holds no frame"):
        load_frames(src[2])
    assert "bound" not in src[3].meta and shown(3)[0] == [0, 13, 26, 39]   # ssv2: no bounds, the whole video
    indices, times = shown(4)
    assert [src[4].meta["fps"], indices] == [3, [3, 4, 6, 7]] and times == pytest.approx([0, 1 / 3, 1, 4 / 3])


def test_subtitle_files_read_as_vlmevalkit_reads_them(tmp_path):
    """SubRip through pysubs2's rules (a one-digit millisecond field is tenths, tags, an empty cue,
    the next cue's number not part of the text), Video-MME's cue per subtitle frame, and
    LongVideoBench's clock-time entries shifted by the video's start."""
    srt = tmp_path / "v.srt"
    srt.write_text("1\n00:00:01,000 --> 00:00:02,500\n<i>Hello</i> there\nsecond <font color=\"red\">line</font>\n\n"
                   "2\n00:00:03,5 --> 00:00:04,000\n\n3\n00:00:05,000 --> 00:00:06,000\nend\n")
    assert cb.read_srt(str(srt)) == [(1000, 2500, "{\\i1}Hello{\\i0} there second line"), (3500, 4000, ""),
                                     (5000, 6000, "end")]
    assert cb.subtitle_frame_indices(100, 4) == [20, 40, 60, 80]
    # frames 20, 40, 60, 80 of a 100-frame 20 fps video: 1 s (cue 1's start: not inside), 2 s (cue 1), 3 s, 4 s (none)
    assert cb.videomme_subtitles(str(srt), 100, 20.0, 4) == ["{\\i1}Hello{\\i0} there second line"]
    lvb = tmp_path / "v.json"
    lvb.write_text(json.dumps([{"start": "00:01:00.5", "end": "00:01:02.0", "line": "kept"},
                               {"start": "00:01:03.0", "end": "00:01:05.0", "line": "no frame inside"}]))
    assert cb.longvideobench_subtitles(str(lvb), [1.5, 6.0], offset=59.5, duration=10.0) == ["kept"]


def test_mlvu_and_longvideobench(tmp_path):
    mlvu_root = tmp_path / "MLVU"
    (mlvu_root / "json").mkdir(parents=True)
    (mlvu_root / "json" / "1_plotQA.json").write_text(json.dumps([
        {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the "
         "video?", "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"}]))
    src = cb.mlvu(str(mlvu_root))
    s = src[0]
    assert s.frames == [str(mlvu_root / "video" / "1_plotQA" / "movie101_66.mp4")]
    assert s.meta["bench"]["answer"] == "A" and s.meta["bench"]["answer_prefix"] == "Best Option: ("
    assert s.meta["bench"]["fields"] == {"task_type": "plotQA", "duration": 246.0}
    assert s.conversation[0]["value"].startswith("<video>\n" + cb.MLVU_SYSTEM + "\nQuestion: What color")

    lvb = tmp_path / "lvb"
    lvb.mkdir()
    (lvb / "lvb_val.json").write_text(json.dumps([
        {"video_id": "86CxyhFV9MI", "question": "What is the man doing at the beginning?", "question_wo_referring_query":
         "x", "candidates": ["Running", "Cooking", "Sleeping", "Reading", "Writing"], "correct_choice": 3,
         "position": [1], "topic_category": "NP-News-Programs", "question_category": "TOS", "level": "L2-Relation",
         "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4", "subtitle_path": "86CxyhFV9MI_en.json",
         "duration_group": 600, "starting_timestamp_for_subtitles": 0, "duration": 527.1}]))
    src = cb.longvideobench(str(lvb))
    s = src[0]
    assert s.sample_id == "86CxyhFV9MI_0" and s.frames == [str(lvb / "videos" / "86CxyhFV9MI.mp4")]
    assert s.meta["bench"]["answer"] == "D" and s.meta["bench"]["options"]["E"] == "Writing"
    assert s.meta["bench"]["fields"] == {"duration_group": "600", "question_category": "TOS"}
    assert s.conversation[0]["value"] == ("<video>\nWhat is the man doing at the beginning?\nA. Running\nB. Cooking\n"
                                          "C. Sleeping\nD. Reading\nE. Writing\nAnswer with the option's letter from "
                                          "the given choices directly.")


def test_every_benchmark_factory_names_the_missing_path(tmp_path):
    for name in cb.FACTORIES:
        assert sources.FACTORIES[name] is cb.FACTORIES[name]
        missing = tmp_path / f"no_{name}"
        with pytest.raises(FileNotFoundError, match=f"no_{name}"):
            cb.FACTORIES[name](str(missing))
        missing.mkdir()
        with pytest.raises(FileNotFoundError, match=f"no_{name}"):
            cb.FACTORIES[name](str(missing))


# ------------------------------------------------------------------------------------ answer matching
ABCD = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("yes.", "yes"), ("No, there is no dog in the image.", "no"),
    ("Yes, there is a snowboard.<|im_end|>", "yes"), ("There is a dog.", None), ("Yes and no.", None), ("", None),
    ("Nothing", None)])
def test_yes_no_extraction(text, expected):
    assert cm.extract_yes_no(text) == expected


@pytest.mark.parametrize("text, options, expected", [
    ("B", ABCD, "B"), ("(B)", ABCD, "B"), ("B.", ABCD, "B"), ("B. dog", ABCD, "B"), ("B) dog", ABCD, "B"),
    ("[C]", ABCD, "C"), ("**D**", ABCD, "D"), ("The answer is B", ABCD, "B"), ("The correct option is (C).", ABCD, "C"),
    ("Answer: D", ABCD, "D"), ("I think C is right.", ABCD, "C"), ("dog", ABCD, "B"),
    ("It is a dog.", ABCD, "B"),                                   # the option's text
    ("A cat sits on the mat.", ABCD, "A"),                         # "A" the article; "cat" is option A's text
    ("A bird flies.", ABCD, "C"),
    ("I think E fits.", dict(zip("ABCDEFGHI", "rstuvwxyz")), "E"),   # "I" the pronoun, not option I
    ("the dark red one", {"A": "red", "B": "dark red", "C": "blue"}, "B"),
    ("There are 10 apples.", {"A": "0", "B": "1", "C": "10"}, "C"),
    ("B or C", ABCD, None), ("I don't know.", ABCD, None), ("a dog and a cat", ABCD, None), ("", ABCD, None),
    ("E", ABCD, None), ("C<|im_end|>", ABCD, "C"), ("<think>maybe A</think> B", ABCD, "B")])
def test_option_extraction(text, options, expected):
    assert cm.extract_option(text, options) == expected


# One (right, wrong, unreadable) answer per benchmark, in the form its prompt asks for.
ANSWER_FORMATS = {
    "mme": ({"kind": "yes_no", "answer": "yes"}, ("Yes", "No", "I cannot tell.")),
    "pope": ({"kind": "yes_no", "answer": "no"}, ("No, there is no car.", "Yes, there is a car.", "A car.")),
    "mmbench": ({"kind": "choice", "answer": "B", "options": ABCD}, ("B", "A", "Hmm.")),
    "seed_bench": ({"kind": "choice", "answer": "D", "options": {"A": "One", "B": "Two", "C": "Three", "D": "Four"}},
                   ("D. Four", "Two", "Several")),
    "ai2d": ({"kind": "choice", "answer": "A", "options": {"A": "egg", "B": "larva", "C": "pupa", "D": "adult"}},
             ("(A)", "The answer is C.", "Not sure")),
    "videomme": ({"kind": "choice", "answer": "C", "options": {"A": "Apples.", "B": "Candles.", "C": "Berries.",
                                                                "D": "Same."}}, ("C.", "B", "unknown")),
    "mvbench": ({"kind": "choice", "answer": "A", "options": {"A": "Ate the medicine.", "B": "Took the box."}},
                ("A) Ate the medicine.", "B) Took the box.", "??")),
    "mlvu": ({"kind": "choice", "answer": "B", "options": {"A": "Yellow", "B": "Red"}},
             ("B) Red", "(A) Yellow", "Purple")),
    "longvideobench": ({"kind": "choice", "answer": "E", "options": dict(zip("ABCDE", "vwxyz"))},
                       ("E", "D", "none of them")),
}


@pytest.mark.parametrize("name", sorted(ANSWER_FORMATS))   # (not "benchmark": pytest-benchmark's fixture)
def test_each_benchmark_judges_right_wrong_and_unreadable(name):
    bench, (right, wrong, unreadable) = ANSWER_FORMATS[name]
    bench = {"benchmark": name, "options": {}, "fields": {}, **bench}
    judged = [chat.judge(bench, text) for text in (right, wrong, unreadable)]
    assert [(j["correct"], j["parsed"]) for j in judged] == [(True, True), (False, True), (False, False)]


# ------------------------------------------------------------------------------------ scores by hand
def test_mme_scores_by_hand():
    # existence: image a both right, image b one right  -> acc 3/4, acc+ 1/2 -> 1.25 (125 points)
    # count:     image c both wrong (one unreadable)   -> acc 0, acc+ 0    -> 0
    # code_reasoning: image d both right               -> 2.0 (200 points)
    items = [("existence", "a", True), ("existence", "a", True), ("existence", "b", True), ("existence", "b", False),
             ("count", "c", False), ("count", "c", False), ("code_reasoning", "d", True), ("code_reasoning", "d", True)]
    scores = cm.mme_scores([{"category": c, "pair": p, "correct": ok, "parsed": k != 5}
                            for k, (c, p, ok) in enumerate(items)])
    assert scores["acc/existence"] == 0.75 and scores["acc+/existence"] == 0.5 and scores["score/existence"] == 1.25
    assert scores["score/count"] == 0 and scores["unparsed/count"] == 1 and scores["unparsed"] == 1
    assert scores["perception"] == 1.25 and scores["cognition"] == 2.0


def test_pope_scores_by_hand():
    # split r: gt yes,yes,no,no  pred yes,no,yes,None -> tp1 fp1 fn1: P = R = F1 = 1/2, acc 1/4, yes 2/4
    # split p: gt yes,no          pred yes,no          -> P = R = F1 = 1, acc 1, yes 1/2
    # the first question is listed under both splits (counts twice overall)
    items = [{"splits": ["random", "popular"], "answer": "yes", "pred": "yes"},
             {"splits": ["random"], "answer": "yes", "pred": "no"},
             {"splits": ["random"], "answer": "no", "pred": "yes"},
             {"splits": ["random"], "answer": "no", "pred": None},
             {"splits": ["popular"], "answer": "no", "pred": "no"}]
    s = cm.pope_scores(items)
    assert s["F1/random"] == 0.5 and s["acc/random"] == 0.25 and s["yes_ratio/random"] == 0.5
    assert s["unparsed/random"] == 1 and s["F1/popular"] == 1.0 and s["acc/popular"] == 1.0
    # overall rows: the 4 random + 2 popular: tp 2, fp 1, fn 1 -> P = R = 2/3, F1 2/3; acc 3/6
    assert math.isclose(s["F1"], 2 / 3) and math.isclose(s["precision"], 2 / 3) and s["acc"] == 0.5
    assert s["unparsed"] == 1 and s["yes_ratio"] == 0.5


def test_circular_and_grouped_accuracy_by_hand():
    def item(group, main, correct, parsed=True, category="c1"):
        return {"correct": correct, "parsed": parsed, "fields": {"group": group, "main": main, "category": category}}

    items = [item(1, True, True), item(1, False, True),                  # both passes right -> right
             item(2, False, False, parsed=False, category="ignored"), item(2, True, True, category="c2"),
             item(3, True, True, category="c2")]                         # one pass only, right
    s = cm.choice_scores(items, ("category",), circular=True)
    assert math.isclose(s["acc"], 2 / 3) and s["acc_passes"] == 0.8 and s["unparsed"] == 1
    assert s["acc/category=c1"] == 1.0 and s["acc/category=c2"] == 0.5 and s["unparsed/category=c2"] == 1
    assert "acc/category=ignored" not in s                                # categories of the main pass
    plain = cm.choice_scores([{"correct": ok, "fields": {"task_type": t}} for t, ok in
                              (("x", True), ("x", True), ("x", False), ("y", False))], ("task_type",),
                             mean_over="task_type")
    assert plain["acc"] == 0.5 and math.isclose(plain["acc/task_type=x"], 2 / 3) and plain["acc/task_type=y"] == 0
    assert math.isclose(plain["acc_mean"], 1 / 3) and plain["unparsed"] == 0


# ------------------------------------------------------------------------------------ the evaluator
class _Tokenizer:
    """Characters as token ids; ids >= 1000 are special tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<|im_end|>" if i >= 1000 else chr(i) for i in ids if not (skip_special_tokens and i >= 1000))


def _generated_batch(indices, answers, width=24):
    labels = np.full((len(indices) + 1, width), -100, np.int64)
    for b, text in enumerate(answers):
        ids = [ord(c) for c in text] + [1000]
        labels[b, 4:4 + len(ids)] = ids
    return {"labels": labels, "sample_valid": np.array([True] * len(indices) + [False]),
            "sample_index": np.array(list(indices) + [0]), "clip_index": np.zeros(len(indices) + 1, np.int32)}


def test_evaluator_scores_mme_rows_of_a_batch(tmp_path):
    _write_tsv(tmp_path / "MME.tsv", MME_ROWS)
    src = cb.mme(str(tmp_path))
    evaluator = tasks.evaluator_for(src)
    assert isinstance(evaluator, chat.ChatBench) and "chat" in tasks.GENERATION_TASKS
    # existence: image 1 right + right, image 2 right + unreadable; code_reasoning: wrong + right
    answers = ["Yes", "No.", "Yes, it is.", "Maybe", "No", "No"]
    records = []
    for row in chat.answer_rows(_generated_batch(range(6), answers), src, _Tokenizer()):
        record, visual = evaluator.process(row)
        assert visual is None
        records.append({"index": row.index, "clip": row.clip, **record})
    assert len(records) == 6 and records[3]["pred"] is None and records[1]["text"] == "No."
    scores = evaluator.finalize(records)
    assert scores["acc/existence"] == 0.75 and scores["acc+/existence"] == 0.5
    assert scores["score/code_reasoning"] == 0.5 and scores["unparsed"] == 1
    assert scores["perception"] == 1.25 and scores["cognition"] == 0.5


def test_evaluator_mmbench_circular_rows(tmp_path):
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_ROWS)
    src = cb.mmbench(str(tmp_path))
    evaluator = tasks.evaluator_for(src)
    # question 241: pass 0 right (B), pass 1 wrong (B where A is right); question 7: both right
    rows = chat.answer_rows(_generated_batch(range(4), ["B", "(B) bird", "A. winter", "The answer is B"]), src,
                            _Tokenizer())
    records = [evaluator.process(row)[0] for row in rows]
    scores = evaluator.finalize(records)
    assert scores["acc"] == 0.5 and scores["acc_passes"] == 0.75 and scores["unparsed"] == 0
    assert scores["acc/l2-category=Coarse Perception"] == 1.0
    assert scores["acc/category=object_localization"] == 0.0
    vanilla = chat.ChatBench(src, {"circular": False}).finalize(records)
    assert vanilla["acc"] == 0.75


def test_evaluator_refuses_a_chat_training_sample_and_mixed_benchmarks():
    from types import SimpleNamespace

    evaluator = chat.ChatBench(SimpleNamespace(name="llava", task="chat"))
    row = SimpleNamespace(sample=SimpleNamespace(meta={}, dataset="llava", sample_id="1"), answer="hi")
    with pytest.raises(ValueError, match="not a chat benchmark sample"):
        evaluator.process(row)
    with pytest.raises(ValueError, match="several benchmarks"):
        evaluator.finalize([{"benchmark": "mme"}, {"benchmark": "pope"}])


def test_features_of_a_benchmark_sample(tmp_path):
    """The TSV sample through make_features: the prompt is the user turn, the answer the labels."""
    from x2sam_jax.data import features as F
    from x2sam_jax.data import tokenizer as tk
    from x2sam_jax.data import transforms as tf

    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_ROWS)
    sample = cb.mmbench(str(tmp_path))[0]
    tokenizer = tk.build_tiny_tokenizer()
    config = F.FeatureConfig(qwen=tf.QwenVisionPreprocessConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 64))
    f = F.make_features(sample, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0), config=config)
    assert "sam_pixel_values" not in f and len(f["cond_spans"]) == 0
    assert tokenizer.decode(f["input_ids"][f["labels"] != tk.IGNORE_LABEL]) == "B<|im_end|>"
    assert "Answer with the option's letter from the given choices directly." in tokenizer.decode(f["input_ids"])


def test_evaluate_with_the_ground_truth_as_answers(tmp_path):
    """eval.evaluate end to end with `oracle` (no model: the teacher-forced answer is the ground
    truth): image TSVs and a video benchmark (MVBench frame folders) score 1, nothing is skipped."""
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.eval import evaluate
    from x2sam_jax.sharding import make_mesh

    (tmp_path / "mme").mkdir()
    _write_tsv(tmp_path / "mme" / "MME.tsv", MME_ROWS)
    (tmp_path / "mmb").mkdir()
    _write_tsv(tmp_path / "mmb" / "MMBench_DEV_EN.tsv", MMB_ROWS)
    (tmp_path / "mvbench" / "json").mkdir(parents=True)
    (tmp_path / "mvbench" / "json" / "episodic_reasoning.json").write_text(json.dumps([
        {"video": "clip_a", "question": "Who talks?", "candidates": ["Beckett", "Castle"], "answer": "Castle",
         "start": 0.0, "end": 1.0},
        {"video": "clip_a", "question": "Who is silent?", "candidates": ["Beckett", "Castle"], "answer": "Beckett",
         "start": 0.0, "end": 1.0}]))
    for t in range(1, 6):
        _write_image(tmp_path / "mvbench" / "video" / "tvqa" / "frames_fps3_hq" / "clip_a" / f"{t:05d}.jpg", 32, 32)
    config = {"data_root": str(tmp_path), "batch_size": 2, "sam_size": 64, "region_tokens": 4, "datasets": {
        "mme": {"source": {"type": "mme", "root": "mme"}}, "mmbench": {"source": {"type": "mmbench", "root": "mmb"}},
        "mvbench": {"source": {"type": "mvbench", "root": "mvbench", "num_frames": 4}}}}
    results = evaluate(None, build_tiny_tokenizer(), config, mesh=make_mesh(data=1, fsdp=-1), oracle=True)
    assert results["mme"]["perception"] == 2.0 and results["mme"]["cognition"] == 2.0
    assert results["mmbench"]["acc"] == 1.0 and results["mmbench"]["samples"] == 4
    assert results["mvbench"]["acc"] == 1.0 and results["mvbench"]["samples"] == 2
    assert all(r["skipped"] == 0 and r["unparsed"] == 0 for r in results.values())
