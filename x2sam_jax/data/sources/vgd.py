"""Visual-prompt sources: COCO-VGD, COCO-Interactive (PSALM) and the X2SAM video VGD files.

COCO-VGD ({root} = official `coco_vgd`): annotations/img_vgdseg_coco_{split}.json, prepared by the
official code (also on the hub as hao9610/X-SAM vgdseg_annotations):
  [{"image_file", "image_id", "image_size": [h, w], "annotations": [{"id", "category_id",
    "segmentation": RLE, "visual_prompts": {"point_visual_prompt": RLE, "scribble_visual_prompt": RLE,
    "box_visual_prompt": RLE, "mask_visual_prompt": RLE}}]}]
  category names from the COCO instances file (coco2017/annotations/instances_{split}.json).
COCO-Interactive (PSALM_data: coco_interactive_{train,val}_psalm.json):
  [{"image": file, "image_info": {"id", "file_name", "height", "width"}, "anns": [{"id", "category_id",
    "bbox", "iscrowd", "segmentation", "point_visual_prompt_mask", "scribble_visual_prompt_mask",
    "box_visual_prompt_mask", "mask_visual_prompt_mask"}]}]
  (the official code dilates point / scribble prompt masks with radius 10 / 5 pixels; the radii are
  given in Sample.meta["prompt_dilation"] for the transforms.)
Video VGD (hub hao9610/VideoVGD: vid_vgdseg_{yt19,vipseg}_{split}.json):
  [{"video_id", "image_files": [...], "image_sizes": [[h, w], ...], "annotations": per frame
    [{"id": track_id * 100 + frame, "category_id", "segmentation": RLE, "visual_prompts": {...}}]}]
  categories from the source YouTube-VIS / VIPSeg file. Frames are grouped into tracks by id // 100.

Each instance gets one VisualPrompt per prompt kind the file gives (empty prompt masks dropped);
`prompt_kinds` restricts them (evaluation uses one kind). The transforms pick one per instance.
"""

from __future__ import annotations

import os

from x2sam_jax.data.schema import VISUAL_PROMPT_KINDS, BadSample, Instance, Sample, VisualPrompt
from x2sam_jax.data.sources.common import Source, clean_category_name, load_json, require_dir, rle_area, to_rle

PROMPT_DILATION = {"point": 10, "scribble": 5}


def _category_names(categories_file):
    if categories_file is None:
        return {}, []
    cats = sorted(load_json(categories_file, "categories file")["categories"], key=lambda c: c["id"])
    return {c["id"]: clean_category_name(c["name"]) for c in cats}, [clean_category_name(c["name"]) for c in cats]


def _check_kinds(prompt_kinds):
    kinds = tuple(prompt_kinds)
    bad = [k for k in kinds if k not in VISUAL_PROMPT_KINDS]
    if bad or not kinds:
        raise ValueError(f"prompt_kinds must be a non-empty subset of {VISUAL_PROMPT_KINDS}, got {kinds}")
    return kinds


def _prompts(ann_prompts: dict, key_format: str, kinds, height, width, frame, instance):
    out = []
    for kind in kinds:
        seg = ann_prompts.get(key_format.format(kind))
        if seg is None:
            continue
        rle = to_rle(seg, height, width)
        if rle_area(rle) > 0:
            out.append(VisualPrompt(kind=kind, frame=frame, mask=rle, instance_indices=[instance]))
    return out


class CocoVgdSource(Source):
    def __init__(self, ann_file: str, image_dir: str, *, categories_file: str | None = None,
                 prompt_kinds=VISUAL_PROMPT_KINDS, name: str = "coco_vgd", task: str = "vgd_seg"):
        self.name, self.task, self.image_dir = name, task, image_dir
        self.prompt_kinds = _check_kinds(prompt_kinds)
        self._records = load_json(ann_file, "COCO-VGD annotation file")
        self._cat_name, self.categories = _category_names(categories_file)

    def _build(self, index):
        rec = self._records[index]
        height, width = (int(v) for v in rec["image_size"])
        instances, prompts = [], []
        for ann in rec["annotations"]:
            k = len(instances)
            got = _prompts(ann["visual_prompts"], "{}_visual_prompt", self.prompt_kinds, height, width, 0, k)
            if not got:  # as the official code: an annotation without a usable prompt is left out
                continue
            cat = ann["category_id"]
            instances.append(Instance(masks=[to_rle(ann["segmentation"], height, width)], category_id=cat,
                                      category=self._cat_name.get(cat), iscrowd=bool(ann.get("iscrowd", 0)),
                                      instance_id=int(ann.get("id", k))))
            prompts.extend(got)
        if not instances:
            raise BadSample(f"{self.name}[{index}]: no annotation has a {'/'.join(self.prompt_kinds)} prompt")
        return Sample(dataset=self.name, task=self.task, sample_id=str(rec.get("image_id", index)),
                      frames=[os.path.join(self.image_dir, rec["image_file"])], height=height, width=width,
                      instances=instances, visual_prompts=prompts, categories=list(self.categories),
                      meta={"image_id": rec.get("image_id")})


def coco_vgd(root: str, split: str = "train", **kwargs) -> CocoVgdSource:
    coco_split = {"train": "train2017", "val": "val2017"}[split]
    categories = os.path.join(root, "coco2017", "annotations", f"instances_{coco_split}.json")
    kwargs.setdefault("categories_file", categories if os.path.isfile(categories) else None)
    return CocoVgdSource(os.path.join(root, "annotations", f"img_vgdseg_coco_{split}.json"),
                         os.path.join(root, "coco2017", coco_split), **kwargs)


class CocoInteractiveSource(Source):
    def __init__(self, ann_file: str, image_dir: str, *, prompt_kinds=VISUAL_PROMPT_KINDS,
                 name: str = "coco_interactive", task: str = "inter_seg"):
        self.name, self.task, self.image_dir = name, task, image_dir
        self.prompt_kinds = _check_kinds(prompt_kinds)
        self._records = load_json(ann_file, "COCO-Interactive annotation file")

    def _build(self, index):
        rec = self._records[index]
        info = rec["image_info"]
        height, width = int(info["height"]), int(info["width"])
        instances, prompts = [], []
        for ann in rec["anns"]:
            k = len(instances)
            got = _prompts(ann, "{}_visual_prompt_mask", self.prompt_kinds, height, width, 0, k)
            if not got:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"]) if ann.get("bbox") else (0.0, 0.0, 0.0, 0.0)
            for p in got:
                if p.kind == "box":
                    p.box = (x, y, x + w, y + h)
            instances.append(Instance(masks=[to_rle(ann["segmentation"], height, width)],
                                      category_id=ann.get("category_id"), iscrowd=bool(ann.get("iscrowd", 0)),
                                      instance_id=int(ann.get("id", k))))
            prompts.extend(got)
        if not instances:
            raise BadSample(f"{self.name}[{index}]: no annotation has a {'/'.join(self.prompt_kinds)} prompt")
        return Sample(dataset=self.name, task=self.task, sample_id=str(info["id"]),
                      frames=[os.path.join(self.image_dir, rec.get("image") or info["file_name"])],
                      height=height, width=width, instances=instances, visual_prompts=prompts,
                      meta={"image_id": info["id"], "prompt_dilation": dict(PROMPT_DILATION)})


def prompt_frame(frame_category_sets) -> int:
    """The official choice of the prompt frame in a clip: the frame showing the largest set of
    categories, ties broken towards the categories that occur most often across the clip's
    annotations (first frame wins among equal sets). `frame_category_sets`: per frame, the list of
    category ids of its annotations (with repeats)."""
    all_ids = [c for frame in frame_category_sets for c in frame]
    if not all_ids:
        return 0
    order = sorted(set(all_ids), key=all_ids.count, reverse=True)
    rank = {c: i for i, c in enumerate(order)}
    keys = [(-len(set(f)), sorted(rank[c] for c in set(f))) for f in frame_category_sets]
    return min(range(len(keys)), key=lambda i: (keys[i], i))


class VideoVgdSource(Source):
    def __init__(self, ann_file: str, image_dir: str, *, categories_file: str | None = None,
                 prompt_kinds=VISUAL_PROMPT_KINDS, name: str = "ytvis19_vgd", task: str = "vvgd_seg"):
        self.name, self.task, self.image_dir = name, task, image_dir
        self.prompt_kinds = _check_kinds(prompt_kinds)
        self._records = load_json(ann_file, "video VGD annotation file")
        self._cat_name, self.categories = _category_names(categories_file)

    def _frame_count(self, index):
        return len(self._records[index]["image_files"])

    def _build(self, index):
        rec = self._records[index]
        files, per_frame = rec["image_files"], rec["annotations"]
        if len(files) != len(per_frame):
            raise BadSample(f"{self.name}[{index}]: {len(files)} frames but {len(per_frame)} annotation lists")
        sizes = rec.get("image_sizes") or [[rec["video_info"]["height"], rec["video_info"]["width"]]]
        height, width = (int(v) for v in sizes[0])
        slot_of_track, instances, prompts = {}, [], []
        for t, anns in enumerate(per_frame):
            for ann in anns:
                track = int(ann["id"]) // 100
                if track not in slot_of_track:
                    slot_of_track[track] = len(instances)
                    cat = ann["category_id"]
                    instances.append(Instance(masks=[None] * len(files), category_id=cat,
                                              category=self._cat_name.get(cat), instance_id=track))
                k = slot_of_track[track]
                instances[k].masks[t] = to_rle(ann["segmentation"], height, width)
                prompts.extend(_prompts(ann.get("visual_prompts", {}), "{}_visual_prompt", self.prompt_kinds,
                                        height, width, t, k))
        if not prompts:
            raise BadSample(f"{self.name}[{index}]: no {'/'.join(self.prompt_kinds)} prompt in any frame")
        return Sample(dataset=self.name, task=self.task, sample_id=str(rec.get("video_id", index)),
                      frames=[os.path.join(self.image_dir, f) for f in files], height=height, width=width,
                      instances=instances, visual_prompts=prompts, categories=list(self.categories),
                      meta={"video_id": rec.get("video_id"),
                            "frame_category_ids": [[a["category_id"] for a in anns] for anns in per_frame]})


def coco_interactive(root: str, split: str = "train", **kwargs) -> CocoInteractiveSource:
    """COCO-Interactive under {root} = official `coco_int`: annotations/coco_interactive_{split}_psalm.json,
    image paths in the file are relative to {root}/coco2017 (e.g. "train2017/000000000009.jpg")."""
    require_dir(root)
    return CocoInteractiveSource(os.path.join(root, "annotations", f"coco_interactive_{split}_psalm.json"),
                                 os.path.join(root, "coco2017"), **kwargs)


def video_vgd(root: str, dataset: str = "yt19", split: str = "train", **kwargs) -> VideoVgdSource:
    """Video VGD under {root} = official `ytvis_vgd` (dataset yt19) or `vipseg_vgd` (dataset vipseg):
    annotations/vid_vgdseg_{dataset}_{split}.json; categories and frames from the linked source set."""
    require_dir(root)
    ann = os.path.join(root, "annotations", f"vid_vgdseg_{dataset}_{split}.json")
    if dataset == "yt19":
        vis_split = "train" if split == "train" else "valid"
        cats, frames = (os.path.join(root, "ytvis19", vis_split, f"{vis_split}.json"),
                        os.path.join(root, "ytvis19", vis_split, "JPEGImages"))
    elif dataset == "vipseg":
        cats, frames = (os.path.join(root, "vipseg_720p", f"panoptic_gt_VIPSeg_{split}.json"),
                        os.path.join(root, "vipseg_720p", "images"))
    else:
        raise ValueError(f"dataset must be yt19 or vipseg, got {dataset!r}")
    kwargs.setdefault("categories_file", cats if os.path.isfile(cats) else None)
    kwargs.setdefault("name", f"{dataset}_vgd")
    return VideoVgdSource(ann, frames, **kwargs)
