"""COCO-format image sources: panoptic (JSON + PNG; COCO and ADE20K) and instances (JSON).

Layouts (as the official X2SAM data tree, docs/mds/datasets.md):
  COCO panoptic:  {root}/annotations/panoptic_{split}.json, PNGs in {root}/panoptic_{split}/,
                  images in {root}/{split}/ (split = train2017 | val2017)
  ADE20K panoptic (evaluation): {root}/ade20k_panoptic_{split}.json, PNGs in
                  {root}/ade20k_panoptic_{split}/, images in {root}/images/{training|validation}/
  COCO instances: {root}/annotations/instances_{split}.json, images in {root}/{split}/
Panoptic PNGs encode the segment id as R + 256 G + 256^2 B; `segments_info` lists each segment's
category and crowd flag, and the category's `isthing` separates things from stuff.
"""

from __future__ import annotations

import os

from x2sam_jax.data.schema import BadSample, Instance, Sample
from x2sam_jax.data.sources.common import (
    MalformedRecord,
    Source,
    clean_category_name,
    encode_mask,
    group_by_key,
    load_json,
    read_png,
    require_dir,
    rgb_to_id,
    to_rle,
)


def _id_order(image_id):
    return (0, image_id, "") if isinstance(image_id, int) else (1, 0, str(image_id))


def _unannotated_sample(source, image: dict, height: int, width: int, panoptic: bool = False) -> Sample:
    """An image of a split without annotations (test-dev): the vocabulary, no targets."""
    file_name = image.get("file_name") or image.get("coco_url", "").split("/")[-1]
    meta = {"image_id": image["id"], "category_ids": [int(c["id"]) for c in source._categories]}
    if panoptic:
        meta["is_thing"] = [bool(c.get("isthing", 1)) for c in source._categories]
    return Sample(dataset=source.name, task=source.task, sample_id=str(image["id"]),
                  frames=[os.path.join(source.image_dir, file_name)], height=height, width=width,
                  categories=list(source.categories), has_targets=False, meta=meta)


def _category_tables(categories: list, where: str):
    if not categories:
        raise ValueError(f"{where}: no 'categories'")
    ordered = sorted(categories, key=lambda c: c["id"])
    names = [clean_category_name(c["name"]) for c in ordered]
    by_id = {c["id"]: c for c in ordered}
    return ordered, names, by_id


class CocoPanopticSource(Source):
    """One sample per image: every segment of the PNG (things and stuff) as an Instance."""

    def __init__(self, ann_file: str, png_dir: str, image_dir: str, *, task: str = "gen_seg",
                 name: str = "coco_panoptic", skip_empty: bool = True):
        self.name, self.task = name, task
        self.ann_file, self.png_dir, self.image_dir = ann_file, png_dir, image_dir
        data = load_json(ann_file, "panoptic annotation file")
        self._categories, self.categories, self._cat_by_id = _category_tables(data.get("categories"), ann_file)
        # A test-dev image-info file has no "annotations": every image, without targets.
        self.has_targets = "annotations" in data
        if not self.has_targets:
            self._records = [(img, None) for img in sorted(data["images"], key=lambda x: x["id"])]
            return
        require_dir(png_dir, "panoptic PNG directory")
        images = {img["id"]: img for img in data["images"]}
        by_image, bad = group_by_key(data["annotations"], "image_id", "annotation", ann_file)
        good = []
        for image_id in sorted(by_image, key=_id_order):
            for ann in by_image[image_id]:
                if skip_empty and not ann.get("segments_info"):
                    continue
                image = images.get(image_id)
                good.append((image, ann) if image is not None else
                            MalformedRecord(f"{ann_file}: annotation for unknown image_id {image_id!r}"))
        self._records = good + bad

    def _build(self, index):
        image, ann = self._records[index]
        height, width = int(image["height"]), int(image["width"])
        if ann is None:
            return _unannotated_sample(self, image, height, width, panoptic=True)
        png_name = ann.get("file_name") or os.path.splitext(image["file_name"])[0] + ".png"
        ids = rgb_to_id(read_png(os.path.join(self.png_dir, png_name)))
        if ids.shape != (height, width):
            raise BadSample(f"{self.name}[{index}]: PNG {png_name} is {ids.shape}, image is {(height, width)}")
        instances = []
        for seg in ann["segments_info"]:
            cat = self._cat_by_id.get(seg["category_id"])
            if cat is None:
                raise BadSample(f"{self.name}[{index}]: segment {seg['id']} has unknown category {seg['category_id']}")
            instances.append(Instance(
                masks=[encode_mask(ids == seg["id"])],
                category=clean_category_name(cat["name"]),
                category_id=int(cat["id"]),
                is_thing=bool(cat.get("isthing", 1)),
                iscrowd=bool(seg.get("iscrowd", 0)),
                instance_id=int(seg["id"]),
            ))
        return Sample(
            dataset=self.name, task=self.task, sample_id=str(image["id"]),
            frames=[os.path.join(self.image_dir, image["file_name"])], height=height, width=width,
            instances=instances, categories=list(self.categories),
            meta={"image_id": image["id"], "category_ids": [int(c["id"]) for c in self._categories],
                  "is_thing": [bool(c.get("isthing", 1)) for c in self._categories]},
        )


def coco_panoptic(root: str, split: str = "train2017", **kwargs) -> CocoPanopticSource:
    require_dir(root)
    return CocoPanopticSource(os.path.join(root, "annotations", f"panoptic_{split}.json"),
                              os.path.join(root, f"panoptic_{split}"), os.path.join(root, split), **kwargs)


def ade20k_panoptic(root: str, split: str = "val", **kwargs) -> CocoPanopticSource:
    require_dir(root)
    image_split = {"train": "training", "val": "validation"}[split]
    kwargs.setdefault("name", "ade20k_panoptic")
    kwargs.setdefault("task", "ov_seg")
    return CocoPanopticSource(os.path.join(root, f"ade20k_panoptic_{split}.json"),
                              os.path.join(root, f"ade20k_panoptic_{split}"),
                              os.path.join(root, "images", image_split), **kwargs)


class CocoInstancesSource(Source):
    """One sample per image with at least one annotation: polygons / RLEs -> compressed RLE."""

    def __init__(self, ann_file: str, image_dir: str, *, task: str = "gen_seg", name: str = "coco_instances",
                 skip_empty: bool = True):
        self.name, self.task = name, task
        self.ann_file, self.image_dir = ann_file, image_dir
        data = load_json(ann_file, "instances annotation file")
        self._categories, self.categories, self._cat_by_id = _category_tables(data.get("categories"), ann_file)
        # A test-dev image-info file has no "annotations": every image, without targets.
        self.has_targets = "annotations" in data
        anns_by_image, bad = group_by_key(data.get("annotations"), "image_id", "annotation", ann_file)
        skip_empty = skip_empty and self.has_targets
        self._records = [
            (img, anns_by_image.get(img["id"], []))
            for img in sorted(data["images"], key=lambda x: x["id"])
            if not skip_empty or anns_by_image.get(img["id"])
        ] + bad

    def _build(self, index):
        image, anns = self._records[index]
        height, width = int(image["height"]), int(image["width"])
        if not self.has_targets:
            return _unannotated_sample(self, image, height, width)
        instances = []
        for ann in anns:
            cat = self._cat_by_id.get(ann["category_id"])
            if cat is None:
                raise BadSample(f"{self.name}[{index}]: annotation {ann.get('id')} has unknown category {ann['category_id']}")
            seg = ann["segmentation"]
            if isinstance(seg, list) and seg and isinstance(seg[0], list) and not any(
                    len(p) >= 6 and len(p) % 2 == 0 for p in seg):
                continue  # as the official loader: an annotation without a usable polygon is ignored
            try:
                rle = to_rle(seg, height, width)
            except ValueError as err:
                raise BadSample(f"{self.name}[{index}]: annotation {ann.get('id')}: {err}") from err
            instances.append(Instance(
                masks=[rle], category=clean_category_name(cat["name"]), category_id=int(cat["id"]),
                is_thing=bool(cat.get("isthing", 1)), iscrowd=bool(ann.get("iscrowd", 0)),
                instance_id=int(ann.get("id", -1)),
            ))
        file_name = image.get("file_name") or image.get("coco_url", "").split("/")[-1]
        return Sample(
            dataset=self.name, task=self.task, sample_id=str(image["id"]),
            frames=[os.path.join(self.image_dir, file_name)], height=height, width=width,
            instances=instances, categories=list(self.categories),
            meta={"image_id": image["id"], "category_ids": [int(c["id"]) for c in self._categories]},
        )


def coco_instances(root: str, split: str = "train2017", **kwargs) -> CocoInstancesSource:
    require_dir(root)
    return CocoInstancesSource(os.path.join(root, "annotations", f"instances_{split}.json"),
                               os.path.join(root, split), **kwargs)
