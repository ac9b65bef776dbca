"""VideoGLaMM grounded conversation generation (GCG) video sources (all but ActivityNet-GCG, which
the official training mix drops for its quality).

"markup" captions (MeViS-GCG, YouTube-VOS-GCG): one {caption_dir}/{video}.json per video,
  {"caption": "... One [fox standing on a tube](1), while another [fox sitting](2, 3) ..."}:
  a bracketed phrase followed by the ids of the objects it grounds. Masks come from
  - MeViS: meta_expressions.json ({"videos": {vid: {"frames", "expressions": {e: {"obj_id": [..],
    "anno_id": [..]}}}}}) + mask_dict.json ({anno_id: [RLE or null per frame]}), or
  - YouTube-VOS: meta_expressions.json (frames) + palette PNGs {mask_dir}/{vid}/{frame}.png, or
  - VidSTG / HC-STVG: {vid}/frames/*.jpg and one binary PNG per object {vid}/masks/{obj:03d}/{frame}.png.
"dense_cap" instruction file (the BURST / YouTube-VIS "video_gcg" set):
  {"videos": [{"id", "file_names", "height", "width", "dataset_split"?, "dense_cap": {"caption", "token_pos": [word
   index, ...], "mask_id": [annotation id, ...]}}], "annotations": [{"id", "segmentations": [...]}]}
  the words at token_pos are the phrases (several mask ids on one word are merged).
Each phrase is one Instance (its objects' masks merged per frame; None where none is visible) and a
Phrase whose span is its [start, end) in the cleaned caption (markup removed).
"""

from __future__ import annotations

import os
import re

import numpy as np

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample
from x2sam_jax.data.sources.common import (
    Source,
    encode_mask,
    image_size,
    load_json,
    read_png,
    require_dir,
    rle_size,
    to_rle,
)

_MARKUP = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def parse_markup_caption(caption: str):
    """'a [red fox](1, 2) runs' -> ('a red fox runs', [('red fox', (2, 9), ['1', '2'])])."""
    out, phrases, pos = [], [], 0
    for m in _MARKUP.finditer(caption):
        out.append(caption[pos:m.start()])
        start = sum(len(s) for s in out)
        label = m.group(1).strip()
        out.append(label)
        phrases.append((label, (start, start + len(label)), [i.strip() for i in m.group(2).split(",")]))
        pos = m.end()
    out.append(caption[pos:])
    return "".join(out), phrases


class MarkupGcgVideoSource(Source):
    """MeViS-GCG (mask_file given) or YouTube-VOS-GCG (mask_dir given)."""

    def __init__(self, caption_dir: str, meta_file: str, image_dir: str, *, mask_file: str | None = None,
                 mask_dir: str | None = None, name: str = "mevis_gcg", task: str = "vgcg_seg"):
        if (mask_file is None) == (mask_dir is None):
            raise ValueError("give exactly one of mask_file (MeViS) or mask_dir (YouTube-VOS palette PNGs)")
        self.name, self.task, self.image_dir, self.mask_dir = name, task, image_dir, mask_dir
        self.caption_dir = require_dir(caption_dir, "GCG caption directory")
        self._videos = load_json(meta_file, "meta_expressions file")["videos"]
        self._masks = load_json(mask_file, "mask_dict file") if mask_file else None
        if mask_dir is not None:
            require_dir(mask_dir, "mask PNG directory")
        captions = {f[:-5] for f in os.listdir(caption_dir) if f.endswith(".json")}
        self._records = sorted(v for v in self._videos if v in captions)

    def _frame_names(self, vid):
        return list(self._videos[vid]["frames"])

    def _frame_path(self, vid, frame):
        return os.path.join(self.image_dir, vid, f"{frame}.jpg")

    def _frame_count(self, index):
        return len(self._frame_names(self._records[index]))

    def _object_frames(self, vid, frames, obj_id, index):
        """Per frame: the object's mask as RLE, or None."""
        if self._masks is not None:
            anno = {str(o): a for e in self._videos[vid]["expressions"].values()
                    for o, a in zip(e["obj_id"], e["anno_id"])}.get(str(obj_id))
            rles = self._masks.get(str(anno)) if anno is not None else None
            if rles is None:
                raise BadSample(f"{self.name}[{index}]: object {obj_id} of {vid} has no masks")
            if len(rles) != len(frames):
                raise BadSample(f"{self.name}[{index}]: masks of object {obj_id} cover {len(rles)} of {len(frames)} frames")
            return rles
        out = []
        for f in frames:
            path = os.path.join(self.mask_dir, vid, f"{f}.png")
            if not os.path.isfile(path):
                out.append(None)
                continue
            ids = read_png(path)
            m = (ids if ids.ndim == 2 else ids[..., 0]) == int(obj_id)
            out.append(encode_mask(m) if m.any() else None)
        return out

    def _build(self, index):
        vid = self._records[index]
        frames = self._frame_names(vid)
        if not frames:
            raise BadSample(f"{self.name}[{index}]: video {vid} has no frames")
        caption_raw = load_json(os.path.join(self.caption_dir, f"{vid}.json"), "GCG caption file")["caption"]
        caption, parsed = parse_markup_caption(caption_raw)
        if not parsed:
            raise BadSample(f"{self.name}[{index}]: caption of {vid} grounds no phrase")
        per_phrase = [[self._object_frames(vid, frames, o, index) for o in obj_ids] for _, _, obj_ids in parsed]
        size = next((rle_size(r) for objs in per_phrase for rles in objs for r in rles if r is not None), None)
        height, width = size or image_size(self._frame_path(vid, frames[0]))
        instances, phrases = [], []
        for k, ((label, span, _), objs) in enumerate(zip(parsed, per_phrase)):
            masks = []
            for t in range(len(frames)):
                pieces = [rles[t] for rles in objs if rles[t] is not None]
                masks.append(to_rle(pieces, height, width) if pieces else None)
            instances.append(Instance(masks=masks, instance_id=k))
            phrases.append(Phrase(text=label, instance_indices=[k], span=span))
        return Sample(dataset=self.name, task=self.task, sample_id=vid,
                      frames=[self._frame_path(vid, f) for f in frames], height=height,
                      width=width, instances=instances, phrases=phrases, caption=caption, meta={"video_id": vid})


class ObjectPngGcgVideoSource(MarkupGcgVideoSource):
    """VidSTG-GCG / HC-STVG-GCG: markup captions in {caption_dir}/{vid}.json, frames in
    {image_dir}/{vid}/frames/*{frame_suffix} (.jpg; VidSTG val's are .png), one binary (0/255) PNG
    per object and frame in {mask_dir}/{vid}/masks/{obj_id:03d}/{frame}.png (no PNG: the object is
    absent)."""

    def __init__(self, caption_dir: str, image_dir: str, mask_dir: str, *, name: str = "vidstg_gcg",
                 task: str = "vgcg_seg", frame_suffix: str = ".jpg"):
        self.name, self.task, self.image_dir, self.mask_dir = name, task, image_dir, mask_dir
        self.frame_suffix = frame_suffix
        self.caption_dir = require_dir(caption_dir, "GCG caption directory")
        require_dir(mask_dir, "object mask directory")
        self._masks = None
        self._records = sorted(f[:-5] for f in os.listdir(caption_dir) if f.endswith(".json"))
        self._frames_cache = {}

    def _frame_names(self, vid):
        if vid not in self._frames_cache:
            d = os.path.join(self.image_dir, vid, "frames")
            cut = len(self.frame_suffix)
            self._frames_cache[vid] = sorted(f[:-cut] for f in os.listdir(d) if f.endswith(self.frame_suffix)) \
                if os.path.isdir(d) else []
        return self._frames_cache[vid]

    def _frame_path(self, vid, frame):
        return os.path.join(self.image_dir, vid, "frames", f"{frame}{self.frame_suffix}")

    def _object_frames(self, vid, frames, obj_id, index):
        out = []
        for f in frames:
            path = os.path.join(self.mask_dir, vid, "masks", str(obj_id).zfill(3), f"{f}.png")
            if not os.path.isfile(path):
                out.append(None)
                continue
            m = read_png(path)
            m = (m if m.ndim == 2 else m[..., 0]) > 127
            out.append(encode_mask(m) if m.any() else None)
        return out


class DenseCapGcgVideoSource(Source):
    """The BURST / YouTube-VIS "video_gcg" instruction file (dense_cap token positions + mask ids)."""

    def __init__(self, ann_file: str, image_dir: str, *, split: str = "train", name: str = "video_gcg",
                 task: str = "vgcg_seg"):
        self.name, self.task, self.image_dir, self.split = name, task, image_dir, split
        data = load_json(ann_file, "video GCG instruction file")
        self._anns = {a["id"]: a for a in data["annotations"]}
        self._records = [v for v in data["videos"] if v.get("dense_cap")]

    def _frame_count(self, index):
        return len(self._records[index]["file_names"])

    def _build(self, index):
        video = self._records[index]
        dense = video["dense_cap"]
        token_pos, mask_ids, caption = dense["token_pos"], dense["mask_id"], dense["caption"]
        if len(token_pos) != len(mask_ids):
            raise BadSample(f"{self.name}[{index}]: {len(token_pos)} token positions for {len(mask_ids)} mask ids")
        words = caption.split(" ")
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        height, width = int(video["height"]), int(video["width"])
        files = sorted(video["file_names"])
        grouped = {}
        for pos, mid in zip(token_pos, mask_ids):
            grouped.setdefault(int(pos), []).append(mid)
        instances, phrases = [], []
        for k, (pos, mids) in enumerate(grouped.items()):
            if not 0 <= pos < len(words):
                raise BadSample(f"{self.name}[{index}]: token position {pos} outside the {len(words)}-word caption")
            tracks = []
            for mid in mids:
                ann = self._anns.get(mid)
                if ann is None or len(ann["segmentations"]) != len(files):
                    raise BadSample(f"{self.name}[{index}]: mask {mid} is missing or has the wrong frame count")
                tracks.append(ann["segmentations"])
            masks = []
            for t in range(len(files)):
                pieces = [seg[t] for seg in tracks if seg[t] is not None]
                masks.append(to_rle(pieces, height, width) if pieces else None)
            instances.append(Instance(masks=masks, instance_id=k))
            start = int(starts[pos])
            phrases.append(Phrase(text=words[pos], instance_indices=[k], span=(start, start + len(words[pos]))))
        # As the official layout: {image_dir}/yt19/train/JPEGImages/... or {image_dir}/{set}/{split}/...
        subset = video.get("dataset_split")
        prefix = "" if subset is None else (os.path.join(subset, "train", "JPEGImages") if subset == "yt19"
                                            else os.path.join(subset, self.split))
        return Sample(dataset=self.name, task=self.task, sample_id=str(video["id"]),
                      frames=[os.path.join(self.image_dir, prefix, f) for f in files], height=height, width=width,
                      instances=instances, phrases=phrases, caption=caption, meta={"video_id": video["id"]})


def mevis_gcg(root: str, split: str = "train", **kwargs) -> MarkupGcgVideoSource:
    """MeViS-GCG under {root} = official `video_glamm`: captions mevis_gcg/{split}/{vid}.json, masks
    and frames from mevis/{split}/{meta_expressions.json, mask_dict.json, JPEGImages}."""
    require_dir(root)
    mevis = os.path.join(root, "mevis", split)
    kwargs.setdefault("name", "mevis_gcg")
    return MarkupGcgVideoSource(os.path.join(root, "mevis_gcg", split), os.path.join(mevis, "meta_expressions.json"),
                                os.path.join(mevis, "JPEGImages"), mask_file=os.path.join(mevis, "mask_dict.json"),
                                **kwargs)


def ytvos_gcg(root: str, split: str = "train", **kwargs) -> MarkupGcgVideoSource:
    """YouTube-VOS-GCG under {root} = `video_glamm`: captions ytvos_gcg/{split}/{vid}.json, frames and
    palette masks from ytrvos21/{split}/{JPEGImages,Annotations} (a link to the Ref-YouTube-VOS tree)."""
    require_dir(root)
    yt = os.path.join(root, "ytrvos21")
    kwargs.setdefault("name", "ytvos_gcg")
    return MarkupGcgVideoSource(os.path.join(root, "ytvos_gcg", split),
                                os.path.join(yt, "meta_expressions", split, "meta_expressions.json"),
                                os.path.join(yt, split, "JPEGImages"), mask_dir=os.path.join(yt, split, "Annotations"),
                                **kwargs)


def glamm_video_gcg(root: str, split: str = "train", **kwargs) -> DenseCapGcgVideoSource:
    """BURST / YouTube-VIS GCG under {root} = `video_glamm`: video_gcg/instruction_data/{split}.json."""
    require_dir(root)
    base = os.path.join(root, "video_gcg")
    kwargs.setdefault("name", "video_gcg")
    return DenseCapGcgVideoSource(os.path.join(base, "instruction_data", f"{split}.json"), base,
                                  split="train" if split == "train" else "val", **kwargs)


def vidstg_gcg(root: str, split: str = "train", *, subset: str = "vidstg", **kwargs) -> ObjectPngGcgVideoSource:
    """VidSTG-GCG (subset vidstg) or HC-STVG-GCG (subset hcstvg) under {root} = `video_glamm`:
    {subset}_gcg/{split}_captions/{vid}.json, frames and masks in {subset}_gcg/{split}/{vid}/
    (`frame_suffix=".png"` for VidSTG val, whose frames are PNGs)."""
    require_dir(root)
    base = os.path.join(root, f"{subset}_gcg")
    kwargs.setdefault("name", f"{subset}_gcg")
    return ObjectPngGcgVideoSource(os.path.join(base, f"{split}_captions"), os.path.join(base, split),
                                   os.path.join(base, split), **kwargs)
