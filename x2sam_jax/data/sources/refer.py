"""Referring-expression image sources: RefCOCO / RefCOCO+ / RefCOCOg (REFER format) and gRefCOCO.

Layout ({root} = the official `refcocos` folder):
  {root}/{dataset}/refs({split_by}).p   REFER pickle: list of refs {ref_id, ann_id, image_id, split,
                                       sentences: [{sent, raw, tokens, sent_id}], category_id}
                                       (split_by = umd for refcocog, unc otherwise)
  {root}/{dataset}/instances.json       COCO images / annotations / categories
  {root}/images/train2014/               COCO 2014 train images
gRefCOCO (public release) uses `grefs(unc).json` (same fields; `ann_id` is a list, [-1] and
`no_target` mark expressions that match nothing); grefs(unc).p or refs(unc).p are read if no JSON.

Grouping: "image" (default, as the official code) gives one sample per image with every sentence
of every ref of that image as a Phrase; "ref" gives one sample per ref. A phrase's target is the
union of its instances' masks; an empty `instance_indices` is a no-target expression.
"""

from __future__ import annotations

import os

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample
from x2sam_jax.data.sources.common import (
    Source,
    clean_category_name,
    group_by_key,
    load_json,
    load_plain_pickle,
    require_dir,
    to_rle,
)


def _ann_ids(ref) -> list[int]:
    ids = ref["ann_id"]
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(i) for i in ids if int(i) >= 0]


class ReferSource(Source):
    def __init__(self, refs, instances: dict, image_dir: str, *, split: str, name: str, task: str = "ref_seg",
                 group: str = "image", include_no_target: bool = True, refs_path: str = "refs"):
        if group not in ("image", "ref"):
            raise ValueError(f"group must be 'image' or 'ref', got {group!r}")
        self.name, self.task, self.split, self.group = name, task, split, group
        self.image_dir = image_dir
        self._images = {img["id"]: img for img in instances["images"]}
        self._anns = {ann["id"]: ann for ann in instances["annotations"]}
        self._cats = {c["id"]: clean_category_name(c["name"]) for c in instances.get("categories", [])}
        refs = [r for r in refs if r.get("split") == split]
        if not include_no_target:
            refs = [r for r in refs if _ann_ids(r)]
        if not refs:
            raise ValueError(f"{refs_path}: no refs with split {split!r}")
        by_image, bad = group_by_key(refs, "image_id", "ref", refs_path)
        if group == "ref":
            self._records = [[r] for r in refs if isinstance(r, dict) and r.get("image_id") is not None] + bad
        else:
            self._records = [by_image[k] for k in sorted(by_image)] + bad

    def _build(self, index):
        refs = self._records[index]
        image_id = refs[0]["image_id"]
        image = self._images.get(image_id)
        if image is None:
            raise BadSample(f"{self.name}[{index}]: image {image_id} is not in instances.json")
        height, width = int(image["height"]), int(image["width"])
        instances, slot_of_ann, phrases = [], {}, []
        for ref in refs:
            slots = []
            for ann_id in _ann_ids(ref):
                if ann_id not in slot_of_ann:
                    ann = self._anns.get(ann_id)
                    if ann is None:
                        raise BadSample(f"{self.name}[{index}]: ref {ref.get('ref_id')} points at missing annotation {ann_id}")
                    try:
                        rle = to_rle(ann["segmentation"], height, width)
                    except ValueError as err:
                        raise BadSample(f"{self.name}[{index}]: annotation {ann_id}: {err}") from err
                    slot_of_ann[ann_id] = len(instances)
                    instances.append(Instance(masks=[rle], category=self._cats.get(ann.get("category_id")),
                                              category_id=ann.get("category_id"), iscrowd=bool(ann.get("iscrowd", 0)),
                                              instance_id=ann_id))
                slots.append(slot_of_ann[ann_id])
            seen = set()
            for sent in ref["sentences"]:
                text = sent["sent"].strip().lower()
                if text and text not in seen:
                    seen.add(text)
                    phrases.append(Phrase(text=text, instance_indices=list(slots)))
        if not phrases:
            raise BadSample(f"{self.name}[{index}]: no sentences")
        ref_ids = [r.get("ref_id") for r in refs]
        return Sample(
            dataset=self.name, task=self.task,
            sample_id=str(image_id) if self.group == "image" else str(ref_ids[0]),
            frames=[os.path.join(self.image_dir, image["file_name"])], height=height, width=width,
            instances=instances, phrases=phrases, meta={"image_id": image_id, "ref_ids": ref_ids},
        )


def refcoco(root: str, dataset: str = "refcoco", split: str = "train", *, split_by: str | None = None,
            image_dir: str | None = None, **kwargs) -> ReferSource:
    """RefCOCO ('refcoco'), RefCOCO+ ('refcoco+' or 'refcocop'), RefCOCOg ('refcocog')."""
    require_dir(root)
    data_dir = require_dir(os.path.join(root, dataset))
    split_by = split_by or ("umd" if dataset == "refcocog" else "unc")
    refs_path = os.path.join(data_dir, f"refs({split_by}).p")
    refs = load_plain_pickle(refs_path, "REFER refs pickle")
    instances = load_json(os.path.join(data_dir, "instances.json"), "REFER instances file")
    kwargs.setdefault("name", dataset.replace("+", "p"))
    return ReferSource(refs, instances, image_dir or os.path.join(root, "images", "train2014"), split=split,
                       refs_path=refs_path, **kwargs)


def grefcoco(root: str, split: str = "train", *, image_dir: str | None = None, **kwargs) -> ReferSource:
    """gRefCOCO: multi-target and no-target expressions ({root}/grefcoco/grefs(unc).json)."""
    require_dir(root)
    data_dir = require_dir(os.path.join(root, "grefcoco"))
    # The public release ships grefs(unc).json (its G_REFER API also accepts grefs(unc).p); the
    # official X2SAM tree keeps a refs(unc).p. No-target refs have ann_id == [-1].
    candidates = [os.path.join(data_dir, f) for f in ("grefs(unc).json", "grefs(unc).p", "refs(unc).p")]
    refs_path = next((c for c in candidates if os.path.isfile(c)), None)
    if refs_path is None:
        raise FileNotFoundError(f"gRefCOCO refs file not found: none of {candidates}")
    if refs_path.endswith(".json"):
        refs = load_json(refs_path, "gRefCOCO refs file")
    else:
        refs = load_plain_pickle(refs_path, "gRefCOCO refs pickle")
    for ref in refs:  # an explicit no_target flag wins over whatever ann_id holds
        if ref.get("no_target"):
            ref["ann_id"] = []
    instances = load_json(os.path.join(data_dir, "instances.json"), "gRefCOCO instances file")
    kwargs.setdefault("name", "grefcoco")
    return ReferSource(refs, instances, image_dir or os.path.join(root, "images", "train2014"), split=split,
                       refs_path=refs_path, **kwargs)
