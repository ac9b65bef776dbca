"""Video panoptic / semantic sources: VIPSeg (PNG per frame + JSON) and VSPW (semantic PNG per frame).

VIPSeg ({root} = official `vipseg_720p`):
  {root}/panoptic_gt_VIPSeg_{split}.json
      {"videos": [{"video_id", "images": [{"id", "file_name", "height", "width"}]}],
       "annotations": [{"video_id", "annotations": [{"image_id", "file_name"?, "segments_info":
                        [{"id", "category_id", "iscrowd"}]}]}],
       "categories": [{"id", "name", "isthing"}]}
  {root}/panomasksRGB/{video_id}/{frame}.png   RGB-encoded segment ids (R + 256 G + 256^2 B);
  segment ids are tracks (stable across the frames of a video). Frames: {root}/images/{video_id}/.
  VIPSeg's own conversion script (create_panoptic_video_labels.py) names every frame after its
  mask ("00000000.png", string ids) while the frames on disk are .jpg; X2SAM's loader opens
  {video}/{file_name} as written. Both work: when the named frame is absent, the file with the
  same stem and another image extension is used (resolved once per video).
VSPW ({root} = official `vspw_480p`): {root}/{split}.txt (video names), {root}/label_num_dic_final.json
  ({name: id}), {root}/images/{video}/{frame}.jpg, {root}/semmasks/{video}/{frame}.png (pixel = class
  id). As the official config (label_shift=-1), 0 ("others") and 255 are ignored.
An instance is absent (None) in frames where it does not appear.
"""

from __future__ import annotations

import os

import numpy as np

from x2sam_jax.data.schema import BadSample, Instance, Sample
from x2sam_jax.data.sources.common import (
    Source,
    clean_category_name,
    encode_mask,
    group_by_key,
    load_json,
    read_png,
    require_dir,
    require_file,
    rgb_to_id,
)


FRAME_EXTENSIONS = (".jpg", ".png", ".jpeg")


class VipSegSource(Source):
    def __init__(self, ann_file: str, png_dir: str, image_dir: str, *, name: str = "vipseg", task: str = "vgen_seg"):
        self.name, self.task, self.png_dir, self.image_dir = name, task, png_dir, image_dir
        data = load_json(ann_file, "VIPSeg annotation file")
        require_dir(png_dir, "VIPSeg panoptic PNG directory")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = [clean_category_name(c["name"]) for c in cats]
        self._cat = {c["id"]: c for c in cats}
        per_video, bad = group_by_key(data["annotations"], "video_id", "video annotation", ann_file)
        self._records = [(v, per_video[v["video_id"]][0]["annotations"])
                         for v in sorted(data["videos"], key=lambda v: str(v["video_id"]))
                         if per_video.get(v["video_id"]) and per_video[v["video_id"]][0].get("annotations")] + bad
        self._frame_suffix: dict = {}  # video -> extension of its frames on disk (resolved once)

    def _frame_count(self, index):
        return len(self._records[index][0]["images"])

    def _frame_paths(self, vid, names: list[str]) -> list[str]:
        """Frame files of a video: the names as given, or their stems with the extension the files
        on disk have (.png in the JSON, .jpg on disk), decided on the first frame, once per video."""
        folder = os.path.join(self.image_dir, str(vid))
        suffix = self._frame_suffix.get(vid)
        if suffix is None:
            first = os.path.join(folder, names[0])
            if os.path.isfile(first):
                suffix = ""  # as written
            else:
                stem = os.path.splitext(first)[0]
                suffix = next((ext for ext in FRAME_EXTENSIONS if os.path.isfile(stem + ext)), None)
                if suffix is None:
                    tried = ", ".join(stem + ext for ext in FRAME_EXTENSIONS if stem + ext != first)
                    raise BadSample(f"{self.name}: missing image file {first} (also tried {tried})",
                                    kind="missing_file")
            self._frame_suffix[vid] = suffix
        if not suffix:
            return [os.path.join(folder, n) for n in names]
        return [os.path.join(folder, os.path.splitext(n)[0] + suffix) for n in names]

    def _build(self, index):
        video, frame_anns = self._records[index]
        vid = video["video_id"]
        images = sorted(video["images"], key=lambda x: x["id"])
        frame_anns = sorted(frame_anns, key=lambda x: x["image_id"])
        if [i["id"] for i in images] != [a["image_id"] for a in frame_anns]:
            raise BadSample(f"{self.name}[{index}]: video {vid}: image ids and annotation image ids differ")
        height, width = int(images[0]["height"]), int(images[0]["width"])
        n = len(images)
        tracks = {}
        for t, (img, ann) in enumerate(zip(images, frame_anns)):
            png = os.path.splitext(ann.get("file_name") or img["file_name"])[0] + ".png"
            ids = rgb_to_id(read_png(os.path.join(self.png_dir, str(vid), png)))
            if ids.shape != (height, width):
                raise BadSample(f"{self.name}[{index}]: {vid}/{png} is {ids.shape}, video is {(height, width)}")
            for seg in ann["segments_info"]:
                cat = self._cat.get(seg["category_id"])
                if cat is None:
                    raise BadSample(f"{self.name}[{index}]: {vid}/{png}: unknown category {seg['category_id']}")
                if seg["id"] not in tracks:
                    tracks[seg["id"]] = Instance(masks=[None] * n, category=clean_category_name(cat["name"]),
                                                 category_id=int(cat["id"]), is_thing=bool(cat.get("isthing", 1)),
                                                 iscrowd=bool(seg.get("iscrowd", 0)), instance_id=int(seg["id"]))
                tracks[seg["id"]].masks[t] = encode_mask(ids == seg["id"])
        return Sample(dataset=self.name, task=self.task, sample_id=str(vid),
                      frames=self._frame_paths(vid, [i["file_name"] for i in images]),
                      height=height, width=width, instances=list(tracks.values()), categories=list(self.categories),
                      meta={"video_id": vid, "category_ids": sorted(self._cat)})


def vipseg(root: str, split: str = "train", **kwargs) -> VipSegSource:
    require_dir(root)
    return VipSegSource(os.path.join(root, f"panoptic_gt_VIPSeg_{split}.json"), os.path.join(root, "panomasksRGB"),
                        os.path.join(root, "images"), **kwargs)


class VspwSource(Source):
    def __init__(self, root: str, split: str = "train", *, image_dir: str | None = None, mask_dir: str | None = None,
                 label_file: str | None = None, ignore_ids=(0, 255), name: str = "vspw", task: str = "vgen_seg"):
        require_dir(root)
        self.name, self.task = name, task
        self.image_dir = image_dir or os.path.join(root, "images")
        self.mask_dir = require_dir(mask_dir or os.path.join(root, "semmasks"), "VSPW mask directory")
        labels = load_json(label_file or os.path.join(root, "label_num_dic_final.json"), "VSPW label file")
        self.ignore_ids = set(int(i) for i in ignore_ids)
        ordered = sorted((int(v), k) for k, v in labels.items() if int(v) not in self.ignore_ids)
        self._category_ids = [i for i, _ in ordered]
        self.categories = [clean_category_name(k) for _, k in ordered]
        self._name_of = dict(zip(self._category_ids, self.categories))
        with open(require_file(os.path.join(root, f"{split}.txt"), "VSPW split file")) as f:
            self._videos = sorted(line.strip() for line in f if line.strip())
        self._frames_cache = {}

    def __len__(self):
        return len(self._videos)

    def _frames(self, vid):
        if vid not in self._frames_cache:
            d = os.path.join(self.mask_dir, vid)
            if not os.path.isdir(d):
                raise BadSample(f"{self.name}: no mask directory for video {vid}: {d}")
            self._frames_cache[vid] = sorted(os.path.splitext(f)[0] for f in os.listdir(d) if f.endswith(".png"))
        return self._frames_cache[vid]

    def _frame_count(self, index):
        try:
            return len(self._frames(self._videos[index]))
        except BadSample:
            return 0  # __getitem__ reports the missing directory

    def _build(self, index):
        vid = self._videos[index]
        frames = self._frames(vid)
        if not frames:
            raise BadSample(f"{self.name}[{index}]: video {vid} has no mask PNGs")
        maps = [read_png(os.path.join(self.mask_dir, vid, f"{f}.png")) for f in frames]
        if len({m.shape for m in maps}) != 1 or maps[0].ndim != 2:
            raise BadSample(f"{self.name}[{index}]: video {vid} masks are not single-channel maps of one size")
        height, width = maps[0].shape
        present = sorted({int(c) for m in maps for c in np.unique(m)} - self.ignore_ids)
        unknown = [c for c in present if c not in self._name_of]
        if unknown:
            raise BadSample(f"{self.name}[{index}]: video {vid} has class ids {unknown} missing from the label file")
        instances = []
        for c in present:
            masks = [encode_mask(m == c) if (m == c).any() else None for m in maps]
            instances.append(Instance(masks=masks, category=self._name_of[c], category_id=c, is_thing=False,
                                      instance_id=c))
        return Sample(dataset=self.name, task=self.task, sample_id=vid,
                      frames=[os.path.join(self.image_dir, vid, f"{f}.jpg") for f in frames],
                      height=int(height), width=int(width), instances=instances, categories=list(self.categories),
                      meta={"video_id": vid, "category_ids": list(self._category_ids)})


def vspw(root: str, split: str = "train", **kwargs) -> VspwSource:
    return VspwSource(root, split, **kwargs)
