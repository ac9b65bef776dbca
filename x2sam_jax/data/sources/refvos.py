"""Video object sources driven by per-video metadata: Ref-YouTube-VOS, Ref-DAVIS17, ReVOS, YouTube-VOS.

Ref-YouTube-VOS 2021 ({root} = official `ytrvos21`):
  {root}/meta_expressions/{split}/meta_expressions.json
      {"videos": {vid: {"expressions": {"0": {"exp": str, "obj_id": "1"}, ...}, "frames": ["00000", ...]}}}
  {root}/{split}/JPEGImages/{vid}/{frame}.jpg
  {root}/{split}/Annotations/{vid}/{frame}.png   palette PNG, pixel value = object id (train only)
  The released valid/test meta files give each expression only its text ({"exp": str}, no
  "obj_id"): their ground truth is withheld and scored by the challenge server, so those samples
  carry the expressions and no targets (`Sample.has_targets` False), and evaluation writes the
  server's PNGs (eval/submissions.py). The valid meta file also lists the 305 test videos; the
  usual protocol (ReferFormer and its successors) drops the videos of meta_expressions/test, which
  `ref_youtube_vos(split="valid")` does when that file is there (202 videos remain).
  A per-expression mask folder {root}/{split}/Annotations/{vid}/{exp_id}/{frame}.png (binary,
  0 / 255: the submission layout, which X2SAM's evaluation reads as valid ground truth) gives that
  expression's target; it wins over "obj_id".
Ref-DAVIS17 uses the same meta_expressions structure (the official code converts DAVIS's text
annotations to it) with {root}/davis_supervised/{JPEGImages,Annotations}/480p; ReasonVOS too
({root}/meta_expressions.json, JPEGImages/, Annotations/).
ReVOS ({root} = official `revos`): {root}/annotations/meta_expressions_{split}.json
  ({"videos": {vid: {"expressions": {eid: {"exp", "obj_id": [..], "anno_id": [..]}}, "frames": [..]}}})
  and {root}/annotations/mask_dict.json ({anno_id: [RLE or null per frame]}); frames in {root}/JPEGImages.
YouTube-VOS 2019 ({root} = official `ytvos19`): {root}/{split}/meta.json
  ({"videos": {vid: {"objects": {oid: {"category": str, "frames": [..]}}}}}), JPEGImages/, Annotations/.
  A video's frames are the union of its objects' frames (the frames the benchmark evaluates; in
  valid, each object's list runs from its first appearance to the end of the video). The released
  valid (and test) Annotations hold only each object's first-frame mask (the PNG of the frame where
  an object appears shows the objects that appear there); the rest is scored by the challenge
  server, so a split whose Annotations hold no PNG beyond its objects' first frames carries the
  first-frame masks as prompts and no targets (`has_targets` False, every other frame None), and
  evaluation writes the server's palette PNGs (eval/submissions.py). A split with more annotations
  (train, or a fully annotated valid as the synthetic data writes) has targets.

In a frame that has an annotation PNG, an object that is not visible gets an empty RLE (annotated,
no pixels); frames without a PNG give None.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample, VisualPrompt
from x2sam_jax.data.sources.common import (
    Source,
    encode_mask,
    image_size,
    load_json,
    read_png,
    require_dir,
    require_file,
    to_rle,
)


class _PaletteVideoMixin:
    """Reads palette PNGs of one video: frame -> object-id map (or None where not annotated)."""

    mask_dir: str | None
    image_dir: str
    image_suffix = ".jpg"

    def _read_id_maps(self, vid, frames):
        maps = []
        for frame in frames:
            path = os.path.join(self.mask_dir, vid, f"{frame}.png") if self.mask_dir else None
            if path and os.path.isfile(path):
                ids = read_png(path)
                maps.append(ids if ids.ndim == 2 else ids[..., 0])
            else:
                maps.append(None)
        shapes = {m.shape for m in maps if m is not None}
        if len(shapes) > 1:
            raise BadSample(f"{self.name}: video {vid} has masks of several sizes {sorted(shapes)}")
        if shapes:
            height, width = shapes.pop()
        else:  # no annotations (validation split): the size comes from the first frame's header
            height, width = image_size(os.path.join(self.image_dir, vid, f"{frames[0]}{self.image_suffix}"))
        return maps, height, width

    @staticmethod
    def _object_masks(maps, obj_id: int):
        return [None if m is None else encode_mask(m == obj_id) for m in maps]


class RefVosSource(_PaletteVideoMixin, Source):
    """Ref-YouTube-VOS / Ref-DAVIS17: referring expressions over palette-PNG object masks (or
    per-expression binary PNGs); expressions without any ground truth give a sample without targets."""

    def __init__(self, meta_file: str, image_dir: str, mask_dir: str | None, *, object_meta_file: str | None = None,
                 name: str = "ref_ytvos", task: str = "vref_seg", group: str = "video", exclude_videos=()):
        if group not in ("video", "expression"):
            raise ValueError(f"group must be 'video' or 'expression', got {group!r}")
        self.name, self.task, self.group = name, task, group
        self.image_dir = image_dir
        self.mask_dir = mask_dir if mask_dir and os.path.isdir(mask_dir) else None
        self.has_targets = self.mask_dir is not None
        videos = load_json(meta_file, "meta_expressions file")["videos"]
        excluded = set(exclude_videos)
        self._videos = videos = {vid: v for vid, v in videos.items() if vid not in excluded}
        # Optional {split}/meta.json ({"videos": {vid: {"objects": {id: {"category"}}}}}): object categories.
        objects = load_json(object_meta_file, "object meta file")["videos"] if object_meta_file else {}
        self._category = {(vid, str(oid)): o.get("category") for vid, v in objects.items()
                          for oid, o in (v.get("objects") or {}).items()}
        if group == "video":
            self._records = [(vid, sorted(v["expressions"], key=_natural)) for vid, v in sorted(videos.items())
                             if v.get("expressions")]
        else:
            self._records = [(vid, [eid]) for vid, v in sorted(videos.items())
                             for eid in sorted(v.get("expressions") or {}, key=_natural)]

    def _frame_count(self, index):
        return len(self._videos[self._records[index][0]]["frames"])

    def _expression_masks(self, vid, eid, frames, height, width):
        """Per-frame RLEs from {mask_dir}/{vid}/{eid}/{frame}.png (binary, any nonzero = object; a
        mask of another size is resized nearest, as the official loader does), or None when that
        folder does not exist. A frame without its PNG is None (not annotated)."""
        folder = os.path.join(self.mask_dir, vid, str(eid)) if self.mask_dir else None
        if folder is None or not os.path.isdir(folder):
            return None
        masks = []
        for frame in frames:
            path = os.path.join(folder, f"{frame}.png")
            if not os.path.isfile(path):
                masks.append(None)
                continue
            with Image.open(path) as img:
                img = img.convert("L")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.NEAREST)
                masks.append(encode_mask(np.asarray(img) > 0))
        return masks

    def _build(self, index):
        vid, exp_ids = self._records[index]
        video = self._videos[vid]
        frames = list(video["frames"])
        if not frames:
            raise BadSample(f"{self.name}[{index}]: video {vid} lists no frames")
        maps, height, width = self._read_id_maps(vid, frames)
        has_palette = any(m is not None for m in maps)
        instances, slot_of_obj, phrases, without_truth = [], {}, [], []
        for eid in exp_ids:
            exp = video["expressions"][eid]
            text = exp["exp"].strip()
            own = self._expression_masks(vid, eid, frames, height, width)
            if own is not None:
                instances.append(Instance(masks=own, instance_id=-1))
                phrases.append(Phrase(text=text, instance_indices=[len(instances) - 1]))
            elif has_palette and exp.get("obj_id") is not None:
                obj_id = int(exp["obj_id"])
                if obj_id not in slot_of_obj:
                    slot_of_obj[obj_id] = len(instances)
                    instances.append(Instance(masks=self._object_masks(maps, obj_id), instance_id=obj_id,
                                              category=self._category.get((vid, str(obj_id)))))
                phrases.append(Phrase(text=text, instance_indices=[slot_of_obj[obj_id]]))
            else:  # ground truth withheld (valid/test): the expression is a prompt without a target
                without_truth.append(eid)
                phrases.append(Phrase(text=text, instance_indices=[]))
        if without_truth and len(without_truth) != len(exp_ids):
            raise BadSample(f"{self.name}[{index}]: video {vid}: expressions {without_truth} have no mask "
                            f"(no obj_id with palette PNGs, no Annotations/{vid}/<exp_id>/ folder) while others do")
        return Sample(
            dataset=self.name, task=self.task, sample_id=vid if self.group == "video" else f"{vid}/{exp_ids[0]}",
            frames=[os.path.join(self.image_dir, vid, f"{f}{self.image_suffix}") for f in frames],
            height=height, width=width, instances=instances, phrases=phrases,
            meta={"video_id": vid, "expression_ids": list(exp_ids), "frame_names": frames},
            has_targets=not without_truth,
        )


def _natural(key):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


def ref_youtube_vos(root: str, split: str = "train", *, exclude_test_videos: bool = True, **kwargs) -> RefVosSource:
    """Ref-YouTube-VOS 2021. For split "valid", the videos listed in meta_expressions/test are left
    out when that file exists (the valid meta file holds valid + test videos; the challenge's
    valid phase scores the 202 others); `exclude_test_videos=False` keeps them."""
    require_dir(root)
    split_dir = os.path.join(root, split)
    mask_dir = os.path.join(split_dir, "Annotations")
    kwargs.setdefault("name", "ref_ytvos")
    object_meta = os.path.join(split_dir, "meta.json")
    kwargs.setdefault("object_meta_file", object_meta if os.path.isfile(object_meta) else None)
    test_meta = os.path.join(root, "meta_expressions", "test", "meta_expressions.json")
    if split == "valid" and exclude_test_videos and "exclude_videos" not in kwargs and os.path.isfile(test_meta):
        kwargs["exclude_videos"] = set(load_json(test_meta, "meta_expressions file")["videos"])
    return RefVosSource(os.path.join(root, "meta_expressions", split, "meta_expressions.json"),
                        os.path.join(split_dir, "JPEGImages"), mask_dir, **kwargs)


def ref_davis17(root: str, split: str = "val", *, meta_file: str | None = None, **kwargs) -> RefVosSource:
    """Ref-DAVIS17: {root}/meta_expressions/{train|val}/meta_expressions.json; frames and masks in
    {root}/davis_supervised/{JPEGImages,Annotations}/480p (the official tree) or {root}/{...}/480p."""
    require_dir(root)
    base = os.path.join(root, "davis_supervised") if os.path.isdir(os.path.join(root, "davis_supervised")) else root
    kwargs.setdefault("name", "ref_davis17")
    return RefVosSource(meta_file or os.path.join(root, "meta_expressions", split, "meta_expressions.json"),
                        os.path.join(base, "JPEGImages", "480p"), os.path.join(base, "Annotations", "480p"), **kwargs)


def reason_vos(root: str, **kwargs) -> RefVosSource:
    """ReasonVOS ({root} = official `reason_vos`): meta_expressions.json (Ref-YouTube-VOS structure with
    one obj_id per expression), JPEGImages/{vid}/, Annotations/{vid}/ palette PNGs."""
    require_dir(root)
    kwargs.setdefault("name", "reason_vos")
    kwargs.setdefault("task", "vreason_seg")
    return RefVosSource(os.path.join(root, "meta_expressions.json"), os.path.join(root, "JPEGImages"),
                        os.path.join(root, "Annotations"), **kwargs)


class ReVosSource(Source):
    """ReVOS: reasoning / referring expressions, targets as merged per-frame RLEs from mask_dict.json."""

    def __init__(self, meta_file: str, mask_file: str, image_dir: str, *, name: str = "revos",
                 query_type: str = "all", group: str = "video"):
        if query_type not in ("all", "reasoning", "referring"):
            raise ValueError(f"query_type must be all | reasoning | referring, got {query_type!r}")
        if group not in ("video", "expression"):
            raise ValueError(f"group must be 'video' or 'expression', got {group!r}")
        self.name, self.group, self.image_dir = name, group, image_dir
        self.task = "vref_seg" if query_type == "referring" else "vreason_seg"
        self._videos = load_json(meta_file, "ReVOS meta_expressions file")["videos"]
        self._masks = load_json(mask_file, "ReVOS mask_dict file")
        # The dataset's type field is unreliable; the official code calls a question ("?") reasoning.
        def keep(exp):
            q = exp["exp"].strip().endswith("?")
            return query_type == "all" or (q if query_type == "reasoning" else not q)

        self._records = []
        for vid, video in sorted(self._videos.items()):
            exp_ids = [e for e in sorted(video.get("expressions") or {}, key=_natural) if keep(video["expressions"][e])]
            if group == "video" and exp_ids:
                self._records.append((vid, exp_ids))
            elif group == "expression":
                self._records.extend((vid, [e]) for e in exp_ids)

    def _frame_count(self, index):
        return len(self._videos[self._records[index][0]]["frames"])

    def _build(self, index):
        vid, exp_ids = self._records[index]
        video = self._videos[vid]
        frames = sorted(video["frames"])
        size = None
        instances, phrases = [], []
        for eid in exp_ids:
            exp = video["expressions"][eid]
            per_anno = []
            for anno_id in exp["anno_id"]:
                rles = self._masks.get(str(anno_id))
                if rles is None:
                    raise BadSample(f"{self.name}[{index}]: expression {eid} of {vid} points at missing mask {anno_id}")
                if len(rles) != len(frames):
                    raise BadSample(f"{self.name}[{index}]: mask {anno_id} has {len(rles)} frames, video has {len(frames)}")
                per_anno.append(rles)
                for r in rles:
                    if r is not None and size is None:
                        size = (int(r["size"][0]), int(r["size"][1]))
            instances.append(per_anno)
            phrases.append(Phrase(text=exp["exp"].strip(), instance_indices=[len(phrases)]))
        if size is None:
            size = image_size(os.path.join(self.image_dir, vid, f"{frames[0]}.jpg"))
        height, width = size
        built = []
        for k, per_anno in enumerate(instances):
            masks = []
            for t in range(len(frames)):
                pieces = [rles[t] for rles in per_anno if rles[t] is not None]
                masks.append(to_rle(pieces, height, width) if pieces else encode_mask(np.zeros((height, width), np.uint8)))
            built.append(Instance(masks=masks, instance_id=k))
        return Sample(
            dataset=self.name, task=self.task, sample_id=vid if self.group == "video" else f"{vid}/{exp_ids[0]}",
            frames=[os.path.join(self.image_dir, vid, f"{f}.jpg") for f in frames], height=height, width=width,
            instances=built, phrases=phrases,
            meta={"video_id": vid, "expression_ids": list(exp_ids),
                  "is_question": [video["expressions"][e]["exp"].strip().endswith("?") for e in exp_ids]},
        )


def revos(root: str, split: str = "train", **kwargs) -> ReVosSource:
    require_dir(root)
    ann_dir = require_dir(os.path.join(root, "annotations"), "ReVOS annotations directory")
    meta = os.path.join(ann_dir, f"meta_expressions_{split}_.json")
    if not os.path.isfile(meta):
        meta = os.path.join(ann_dir, f"meta_expressions_{split}.json")
    return ReVosSource(meta, os.path.join(ann_dir, "mask_dict.json"), os.path.join(root, "JPEGImages"), **kwargs)


class YouTubeVosSource(_PaletteVideoMixin, Source):
    """YouTube-VOS 2019 object segmentation: each object's first annotated mask is its mask prompt.

    Without targets (the released valid / test splits: `has_targets` None finds out from the
    Annotations folder, see `annotated_beyond_first_frames`) only those first-frame masks are read,
    the instances carry them on their first frame and None elsewhere, and the samples have no targets."""

    def __init__(self, meta_file: str, image_dir: str, mask_dir: str, *, name: str = "ytvos19", task: str = "vobj_seg",
                 has_targets: bool | None = None):
        self.name, self.task, self.image_dir, self.mask_dir = name, task, image_dir, mask_dir
        self._videos = load_json(meta_file, "YouTube-VOS meta file")["videos"]
        self._records = sorted(vid for vid, v in self._videos.items() if v.get("objects"))
        self.has_targets = self.annotated_beyond_first_frames() if has_targets is None else bool(has_targets)

    def annotated_beyond_first_frames(self) -> bool:
        """Whether some video has an annotation PNG on a frame that is no object's first frame (a
        split with ground truth; the released valid / test splits have none). Stops at the first."""
        for vid in self._records:
            folder = os.path.join(self.mask_dir, vid)
            if not os.path.isdir(folder):
                continue
            firsts = {min(obj["frames"]) for obj in self._videos[vid]["objects"].values() if obj.get("frames")}
            if any(name.endswith(".png") and name[:-4] not in firsts for name in os.listdir(folder)):
                return True
        return False

    def _frames(self, vid):
        objects = self._videos[vid]["objects"]
        return sorted({f for obj in objects.values() for f in obj["frames"]})

    def object_frames(self, vid) -> dict:
        """{object id: the frames meta.json lists for it} of one video."""
        return {str(oid): sorted(obj["frames"]) for oid, obj in self._videos[vid]["objects"].items()}

    def _frame_count(self, index):
        return len(self._frames(self._records[index]))

    def _build(self, index):
        vid = self._records[index]
        objects = self._videos[vid]["objects"]
        frames = self._frames(vid)
        maps, height, width = self._read_id_maps(vid, frames)
        instances, prompts = [], []
        for k, oid in enumerate(sorted(objects, key=_natural)):
            obj = objects[oid]
            masks = self._object_masks(maps, int(oid))
            first = frames.index(min(obj["frames"]))
            if masks[first] is None:
                raise BadSample(f"{self.name}[{index}]: object {oid} of {vid} has no mask on its first frame {frames[first]}")
            if not self.has_targets:   # withheld: the first-frame mask is the prompt, nothing else is known
                masks = [m if t == first else None for t, m in enumerate(masks)]
            instances.append(Instance(masks=masks, category=obj.get("category"), instance_id=int(oid)))
            prompts.append(VisualPrompt(kind="mask", frame=first, mask=masks[first], instance_indices=[k]))
        return Sample(
            dataset=self.name, task=self.task, sample_id=vid,
            frames=[os.path.join(self.image_dir, vid, f"{f}{self.image_suffix}") for f in frames],
            height=height, width=width, instances=instances, visual_prompts=prompts,
            meta={"video_id": vid, "frame_names": frames}, has_targets=self.has_targets,
        )


def youtube_vos(root: str, split: str = "train", **kwargs) -> YouTubeVosSource:
    """YouTube-VOS 2019 {root}/{split}. The released valid and test splits (first-frame masks only)
    have no targets; `has_targets` True / False overrides what the Annotations folder shows."""
    require_dir(root)
    split_dir = require_dir(os.path.join(root, split))
    return YouTubeVosSource(require_file(os.path.join(split_dir, "meta.json"), "YouTube-VOS meta file"),
                            os.path.join(split_dir, "JPEGImages"), os.path.join(split_dir, "Annotations"), **kwargs)
