"""Chat sources: LLaVA-style image instruction JSON and VideoInstruct-100K (Video-ChatGPT).

LLaVA (.json list or .jsonl): [{"id", "image"?: relative path, "conversations": [{"from": "human"|"gpt",
  "value": str}, ...]}]; the first human turn carries "<image>". Records without an image are
  pure-text and skipped unless `exclude_pure_text=False` (then `frames` is empty).
VideoInstruct100K.json: [{"video_id", "q", "a"}, ...]; the official code groups the questions of one
  video into a multi-turn conversation (first turn prefixed "<video>\\n") and finds the video file as
  {video_folder}/{video_id}{.mp4|.mkv|.avi|.webm}. The file (or, preferred, a directory
  {video_folder}/{video_id}/ of its extracted frames) is the single entry of `frames`,
  meta["video_file"] is True and meta["num_frames"] the frame count to sample: the features
  sample its frames uniformly (transforms.load_video_frames: PyAV, or a directory of frames).
LLaVA image sizes come from the image header in `__getitem__` (a missing image is a BadSample);
VideoInstruct sizes are unknown (height = width = 0) until the transforms decode the video.
"""

from __future__ import annotations

import json
import os

from x2sam_jax.data.schema import BadSample, Sample
from x2sam_jax.data.sources.common import Source, image_size, load_json, require_file

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")


def _load_json_or_jsonl(path):
    if path.endswith(".jsonl"):
        require_file(path, "chat annotation file")
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {line_no} is not valid JSON: {err}") from err
        return records
    return load_json(path, "chat annotation file")


def _check_conversation(conv, where):
    if not isinstance(conv, list) or not conv:
        raise BadSample(f"{where}: empty conversation")
    out = []
    for turn in conv:
        if turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            raise BadSample(f"{where}: bad turn {turn!r} (need from: human|gpt and a string value)")
        out.append({"from": turn["from"], "value": turn["value"]})
    return out


class LlavaChatSource(Source):
    def __init__(self, ann_file: str, image_dir: str, *, exclude_pure_text: bool = True, name: str = "llava",
                 task: str = "chat"):
        self.name, self.task, self.image_dir = name, task, image_dir
        records = _load_json_or_jsonl(ann_file)
        self._records = [r for r in records if not exclude_pure_text or r.get("image")]

    def _frame_count(self, index):
        return 1 if self._records[index].get("image") else 0

    def _build(self, index):
        rec = self._records[index]
        where = f"{self.name}[{index}]"
        frames = [os.path.join(self.image_dir, rec["image"])] if rec.get("image") else []
        conversation = _check_conversation(rec["conversations"], where)
        # The size comes from the image header (no pixel decoding); a missing image is a BadSample.
        height, width = image_size(frames[0]) if frames else (0, 0)
        return Sample(dataset=self.name, task=self.task, sample_id=str(rec.get("id", index)), frames=frames,
                      height=height, width=width, conversation=conversation)


class VideoInstructSource(Source):
    def __init__(self, ann_file: str, video_dir: str, *, num_frames: int = 8, name: str = "videochatgpt",
                 task: str = "vchat"):
        self.name, self.task, self.video_dir, self.num_frames = name, task, video_dir, num_frames
        grouped = {}
        for qa in load_json(ann_file, "VideoInstruct annotation file"):
            grouped.setdefault(str(qa.get("video_id")), []).append(qa)
        self._records = sorted(grouped.items())

    def _frame_count(self, index):
        return self.num_frames  # frames are sampled from the video file by the transforms

    def _build(self, index):
        video_id, qas = self._records[index]
        conversation = []
        for i, qa in enumerate(qas):
            q, a = qa["q"], qa["a"]
            if not isinstance(q, str) or not isinstance(a, str):
                raise BadSample(f"{self.name}[{index}]: question/answer of {video_id} are not strings")
            conversation += [{"from": "human", "value": f"<video>\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
        # A directory of extracted frames ({video_dir}/{video_id}/) wins over the video file (both
        # are read by transforms.load_video_frames).
        frame_dir = os.path.join(self.video_dir, video_id)
        path = frame_dir if os.path.isdir(frame_dir) else next(
            (os.path.join(self.video_dir, video_id + ext) for ext in VIDEO_EXTENSIONS
             if os.path.isfile(os.path.join(self.video_dir, video_id + ext))),
            os.path.join(self.video_dir, video_id + VIDEO_EXTENSIONS[0]))
        return Sample(dataset=self.name, task=self.task, sample_id=video_id, frames=[path], height=0, width=0,
                      conversation=conversation, meta={"video_file": True, "num_frames": self.num_frames})


def llava(root: str, ann_file: str = "LLaVA-Instruct-150K/llava_v1_5_mix665k.json", **kwargs) -> LlavaChatSource:
    """LLaVA-1.5 instruction mix under {root} = official `llava` (images in {root}/llava_images)."""
    return LlavaChatSource(os.path.join(root, ann_file), os.path.join(root, "llava_images"), **kwargs)


def video_chatgpt(root: str, **kwargs) -> VideoInstructSource:
    """VideoInstruct-100K under {root} = official `video_chatgpt` (videos in ActivityNet/train)."""
    return VideoInstructSource(os.path.join(root, "VideoInstruct100K.json"), os.path.join(root, "ActivityNet", "train"),
                               **kwargs)
