"""Grounded conversation generation (GCG) image sources: the GLaMM GranD-f annotation files.

Files (official tree {root} = `grand_f`, annotations/train/ and annotations/val_test/):
  GranDf_HA_GCG_train.json, OpenPsgGCG_train.json  ("grandf" flavour)
      [{"image_id", "file_name", "caption", "groundings": {phrase: {"token_positives": [s, e],
        "rle_masks": [RLE, ...]}}, "height"?, "width"?}]
  RefCOCOg_GCG_train.json  ("refcocog" flavour)
      [{key: {"img_file_name", "caption", "refs": [{"sentence", "segmentation"}], "height"?, "width"?}}]
  flickr_mergedGT_GCG_train.json  ("flickr" flavour, COCO layout)
      {"images": [{"id", "file_name", "caption", "height", "width"}],
       "annotations": [{"image_id", "tokens_positive": [[s, e]], "sam_mask": RLE}]}
  val/test files ("val" flavour): {split}_gcg_coco_mask_gt.json (COCO: "images" [{"id", "file_name",
  "height", "width"}], "annotations" [{"image_id", "segmentation"}], one mask per grounded phrase)
  and beside it {split}_gcg_coco_caption_gt.json ("annotations" [{"image_id", "caption", "labels":
  [phrase, ...]}]), GLaMM's evaluation ground truth: the i-th mask of an image grounds its i-th
  label. With both files a sample carries the reference caption, its phrases and their masks
  (what GCG evaluation scores against); without the caption file (or `caption_file=False`) the
  images only. GCG evaluation generates the caption.
As the official code: captions and phrases are lower-cased and stripped of quotes, a phrase must
occur in the caption, phrases are ordered by their start, and an interval that overlaps the
previous kept one is dropped. Phrase.span is the [start, end) character span in Sample.caption.
"""

from __future__ import annotations

import os

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample
from x2sam_jax.data.sources.common import Source, group_by_key, image_size, load_json, require_dir, rle_size, to_rle

FLAVOURS = ("grandf", "refcocog", "flickr", "val")


def detect_flavour(data) -> str:
    if isinstance(data, dict) and "images" in data:
        anns = data.get("annotations") or []
        return "flickr" if anns and "tokens_positive" in anns[0] else "val"
    if isinstance(data, list) and data:
        first = data[0]
        if "groundings" in first:
            return "grandf"
        if len(first) == 1 and isinstance(next(iter(first.values())), dict) and "refs" in next(iter(first.values())):
            return "refcocog"
    raise ValueError("cannot tell the GCG file's flavour (expected GranD-f, RefCOCOg-GCG, Flickr-GCG or val layout)")


def _clean(text: str) -> str:
    return text.strip('"').strip().lower()


def keep_non_overlapping(items):
    """items: [(start, end, payload)] -> kept items sorted by start, as the official reducer."""
    kept = []
    for item in sorted(items, key=lambda x: x[0]):
        if not kept or item[0] > kept[-1][1]:
            kept.append(item)
    return [x for x in kept if 0 <= x[0] < x[1]]


class GcgSource(Source):
    def __init__(self, ann_file: str, image_dir: str, *, flavour: str | None = None, name: str = "gcg",
                 task: str = "gcg_seg", caption_file: str | bool | None = None):
        self.name, self.task, self.image_dir = name, task, image_dir
        data = load_json(ann_file, "GCG annotation file")
        self.flavour = flavour or detect_flavour(data)
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        if self.flavour == "flickr":
            by_image, bad = group_by_key(data["annotations"], "image_id", "annotation", ann_file)
            self._records = [(img, by_image[img["id"]]) for img in sorted(data["images"], key=lambda x: x["id"])
                             if len(_clean(img.get("caption", "")).split(" ")) >= 3 and by_image.get(img["id"])] + bad
        elif self.flavour == "val":
            self._records = self._val_records(ann_file, data, caption_file)
        elif self.flavour == "refcocog":
            self._records = [next(iter(d.values())) for d in data]
        else:
            self._records = list(data)

    @staticmethod
    def _val_records(ann_file, data, caption_file):
        """(image, its masks in file order, its caption record or None) per image of a val/test file."""
        if caption_file is None:
            sibling = ann_file.replace("_mask_gt", "_caption_gt")
            caption_file = sibling if sibling != ann_file and os.path.isfile(sibling) else False
        captions = {}
        if caption_file:
            for ann in load_json(caption_file, "GCG caption ground-truth file").get("annotations") or []:
                captions.setdefault(ann.get("image_id"), ann)
        masks, _ = group_by_key(data.get("annotations") or [], "image_id", "annotation", ann_file) \
            if captions else ({}, [])
        return [(img, masks.get(img["id"], []), captions.get(img["id"])) for img in data["images"]]

    def _val_phrases(self, index, caption_rec, masks):
        """(caption, [(start, end, (phrase, segmentation))]) from the caption ground truth: the
        i-th label grounded by the image's i-th mask, found in the caption left to right."""
        caption = _clean(caption_rec["caption"])
        labels = [_clean(p) for p in caption_rec.get("labels") or []]
        if len(labels) != len(masks):
            raise BadSample(f"{self.name}[{index}]: {len(labels)} labels for {len(masks)} ground-truth masks")
        items, pos = [], 0
        for phrase, ann in zip(labels, masks):
            start = caption.find(phrase, pos)
            if start < 0:
                start = caption.find(phrase)
            if start >= 0 and phrase:
                items.append((start, start + len(phrase), (phrase, ann["segmentation"])))
                pos = start + len(phrase)
        return caption, items

    def _size(self, record, file_name, segmentations):
        if record.get("height") is not None and record.get("width") is not None:
            return int(record["height"]), int(record["width"])
        for seg in segmentations:
            size = rle_size(seg)
            if size is not None:
                return size
        return image_size(os.path.join(self.image_dir, file_name))

    def _build(self, index):
        rec = self._records[index]
        if self.flavour == "grandf":
            file_name, image_id, caption = rec["file_name"], rec.get("image_id"), _clean(rec["caption"])
            items = []
            for phrase, g in sorted(rec["groundings"].items(), key=lambda kv: kv[1]["token_positives"][0]):
                phrase = _clean(phrase)
                if phrase in caption:
                    s, e = (int(v) for v in g["token_positives"])
                    items.append((s, e, (phrase, g["rle_masks"])))
        elif self.flavour == "refcocog":
            file_name, image_id, caption = rec["img_file_name"], rec.get("image_id", index), _clean(rec["caption"])
            items = []
            for ref in rec["refs"]:
                phrase = _clean(ref["sentence"])
                if phrase in caption:
                    start = caption.find(phrase)
                    items.append((start, start + len(phrase), (phrase, ref["segmentation"])))
        elif self.flavour == "flickr":
            img, anns = rec
            rec = img
            file_name, image_id, caption = img["file_name"], img["id"], _clean(img["caption"])
            items = []
            for ann in sorted(anns, key=lambda a: a["tokens_positive"][0][0]):
                s, e = (int(v) for v in ann["tokens_positive"][0])
                items.append((s, e, (caption[s:e], ann["sam_mask"])))
        else:
            img, masks, caption_rec = rec
            file_name = img.get("file_name") or f"{img['id']}.jpg"
            if caption_rec is not None:      # the evaluation ground truth
                rec, image_id = img, img["id"]
                caption, items = self._val_phrases(index, caption_rec, masks)
                return self._grounded(index, rec, file_name, image_id, caption, items)
            height, width = self._size(img, file_name, [])
            return Sample(dataset=self.name, task=self.task, sample_id=str(img["id"]),
                          frames=[os.path.join(self.image_dir, file_name)], height=height, width=width,
                          meta={"image_id": img["id"]})

        return self._grounded(index, rec, file_name, image_id, caption, items)

    def _grounded(self, index, rec, file_name, image_id, caption, items):
        kept = keep_non_overlapping(items)
        if not kept:
            raise BadSample(f"{self.name}[{index}]: no grounded phrase occurs in the caption")
        height, width = self._size(rec, file_name, [seg for _, _, (_, seg) in kept])
        instances, phrases = [], []
        for k, (s, e, (phrase, seg)) in enumerate(kept):
            try:
                rle = to_rle(seg, height, width)
            except ValueError as err:
                raise BadSample(f"{self.name}[{index}]: phrase {phrase!r}: {err}") from err
            instances.append(Instance(masks=[rle], instance_id=k))
            phrases.append(Phrase(text=phrase, instance_indices=[k], span=(s, e)))
        return Sample(dataset=self.name, task=self.task, sample_id=str(image_id),
                      frames=[os.path.join(self.image_dir, file_name)], height=height, width=width,
                      instances=instances, phrases=phrases, caption=caption, meta={"image_id": image_id})


# The official file names under {root} = `grand_f` (docs/mds/datasets.md and the X2SAM configs).
_GCG_FILES = {
    "grandf": ("annotations/train/GranDf_HA_GCG_train.json", "images/GranDf_HA_images/train"),
    "refcocog": ("annotations/train/RefCOCOg_GCG_train.json", "images/coco2014/train2014"),
    "psg": ("annotations/train/OpenPsgGCG_train.json", "images/coco2017"),
    "flickr": ("annotations/train/flickr_mergedGT_GCG_train.json", "images/flickr30k/images/train"),
    "val": ("annotations/val_test/val_gcg_coco_mask_gt.json", "images/GranDf_HA_images/val_test"),
    "test": ("annotations/val_test/test_gcg_coco_mask_gt.json", "images/GranDf_HA_images/val_test"),
}


def grand_f(root: str, subset: str = "grandf", **kwargs) -> GcgSource:
    """A GranD-f subset: grandf | refcocog | psg | flickr (training) or val | test (images only)."""
    require_dir(root)
    if subset not in _GCG_FILES:
        raise ValueError(f"subset must be one of {sorted(_GCG_FILES)}, got {subset!r}")
    ann, images = _GCG_FILES[subset]
    kwargs.setdefault("name", f"{subset}_gcg")
    return GcgSource(os.path.join(root, ann), os.path.join(root, images), **kwargs)
