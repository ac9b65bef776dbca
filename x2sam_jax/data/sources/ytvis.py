"""YouTube-VIS 2019 / 2021 video instance sources (also OVIS-style files of the same format).

Layout (official X2SAM tree): {root}/{split}/JPEGImages/{video}/{frame}.jpg and the annotation file
{root}/{split}/{split}.json (2019: `instances_train_sub.json` renamed), gt.json or instances.json
(2021), or give `ann_file` directly.
JSON: videos [{id, file_names, height, width, length}], annotations [{id, video_id, category_id,
iscrowd, segmentations: per frame RLE (uncompressed `counts` list or compressed) or null, areas}],
categories [{id, name}]. One sample per whole video; clip sampling happens in the transforms.
The valid / test files ship without annotations (the server scores them): such a file yields every
video as a sample without targets (`Sample.has_targets` False), for the results JSON of
eval/submissions.py.
"""

from __future__ import annotations

import os

from x2sam_jax.data.schema import BadSample, Instance, Sample
from x2sam_jax.data.sources.common import (
    Source,
    clean_category_name,
    group_by_key,
    load_json,
    require_dir,
    to_rle,
)


class YouTubeVisSource(Source):
    """One sample per video. `skip_empty` (default: automatic) drops videos without annotations,
    right for training; a file with no annotations at all is an evaluation split whose ground truth
    is withheld, and then every video is kept, as a sample without targets (a source of 0 samples
    would silently produce no predictions). `skip_empty=False` keeps empty videos of an annotated
    file (they have targets: none)."""

    def __init__(self, ann_file: str, image_dir: str, *, task: str = "vgen_seg", name: str = "ytvis19",
                 skip_empty: bool | None = None, categories: list | None = None):
        self.name, self.task, self.image_dir = name, task, image_dir
        data = load_json(ann_file, "YouTube-VIS annotation file")
        # A valid/test file may list only videos; `categories` ([{id, name}], e.g. the train file's) fills in.
        cats = sorted(data.get("categories") or categories or [], key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{ann_file}: no 'categories' (pass categories=, e.g. those of the train file)")
        self.categories = [clean_category_name(c["name"]) for c in cats]
        self._category_ids = [int(c["id"]) for c in cats]
        self._cat_name = dict(zip(self._category_ids, self.categories))
        self.has_targets = bool(data.get("annotations"))
        anns, bad = group_by_key(data.get("annotations"), "video_id", "annotation", ann_file)
        if skip_empty is None:
            skip_empty = self.has_targets
        self._records = [(v, anns.get(v["id"], [])) for v in sorted(data["videos"], key=lambda v: v["id"])
                         if not skip_empty or anns.get(v["id"])] + bad

    def _frame_count(self, index):
        return len(self._records[index][0]["file_names"])

    def _build(self, index):
        video, anns = self._records[index]
        height, width = int(video["height"]), int(video["width"])
        n = len(video["file_names"])
        instances = []
        for ann in anns:
            segs = ann["segmentations"]
            if len(segs) != n:
                raise BadSample(f"{self.name}[{index}]: track {ann.get('id')} has {len(segs)} masks for {n} frames")
            cat_id = int(ann["category_id"])
            if cat_id not in self._cat_name:
                raise BadSample(f"{self.name}[{index}]: track {ann.get('id')} has unknown category {cat_id}")
            try:
                masks = [None if s is None else to_rle(s, height, width) for s in segs]
            except ValueError as err:
                raise BadSample(f"{self.name}[{index}]: track {ann.get('id')}: {err}") from err
            instances.append(Instance(masks=masks, category=self._cat_name[cat_id], category_id=cat_id,
                                      iscrowd=bool(ann.get("iscrowd", 0)), instance_id=int(ann.get("id", -1))))
        return Sample(
            dataset=self.name, task=self.task, sample_id=str(video["id"]),
            frames=[os.path.join(self.image_dir, f) for f in video["file_names"]], height=height, width=width,
            instances=instances, categories=list(self.categories),
            meta={"video_id": video["id"], "category_ids": list(self._category_ids)},
            has_targets=self.has_targets,
        )


def youtube_vis(root: str, split: str = "train", *, ann_file: str | None = None, **kwargs) -> YouTubeVisSource:
    """YouTube-VIS 2019 (name 'ytvis19', task vgen_seg) or 2021 (pass name='ytvis21', task='vov_seg').

    The annotation file is the first of {split}/{split}.json (2019, renamed as the official tree does),
    {split}/gt.json (the official 2021 evaluation file) and {split}/instances.json (2021 release).
    A valid/test file without "categories" takes those of the train file of the same root."""
    require_dir(root)
    split_dir = require_dir(os.path.join(root, split))
    if ann_file is None:
        ann_file = _find_ann_file(root, split)
        if ann_file is None:
            raise FileNotFoundError(f"YouTube-VIS annotation file not found: none of {_candidates(root, split)}")
    if "categories" not in kwargs and split != "train" and not load_json(ann_file).get("categories"):
        train_file = _find_ann_file(root, "train")  # the valid/test file lists only videos
        if train_file is not None:
            kwargs["categories"] = load_json(train_file, "YouTube-VIS annotation file").get("categories")
    return YouTubeVisSource(ann_file, os.path.join(split_dir, "JPEGImages"), **kwargs)


def _candidates(root: str, split: str) -> list[str]:
    return [os.path.join(root, split, f) for f in (f"{split}.json", "gt.json", "instances.json")]


def _find_ann_file(root: str, split: str) -> str | None:
    return next((c for c in _candidates(root, split) if os.path.isfile(c)), None)
