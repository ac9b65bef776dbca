"""LISA ReasonSeg (image reasoning segmentation).

Layout ({root} = the official `lisa` folder): {root}/{split}/{name}.jpg with {root}/{split}/{name}.json
beside it: {"text": [query, ...], "is_sentence": bool, "shapes": [{"label": str, "points": [[x, y], ...]}]}
(LabelMe-style polygons). Shapes labelled "flag" are dropped, shapes whose label contains "ignore"
mark an ignore region; shapes are painted largest first so smaller ones win, as the official code
does (it uses OpenCV's fillPoly + polylines; here PIL, which can differ on boundary pixels).
Optional explanations: {root}/explanatory/train.json [{"image": name, "outputs": str, ...}].

Indexing lists the JSON files only; a record is parsed (and the image header read for its size)
in `__getitem__`.
"""

from __future__ import annotations

import json
import os

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample
from x2sam_jax.data.sources.common import Source, encode_mask, image_size, load_json, rasterize_polygons, require_dir

IGNORE = 255


def lisa_masks(shapes, height: int, width: int):
    """(target mask, ignore mask) from LabelMe shapes, painted largest first."""
    shapes = [s for s in shapes if s["label"].lower() != "flag"]
    polygons = [s["points"] for s in shapes]
    areas = [int(rasterize_polygons([p], height, width).sum()) for p in polygons]
    order = sorted(range(len(shapes)), key=lambda k: -areas[k])  # stable: ties keep file order
    values = [IGNORE if "ignore" in s["label"].lower() else 1 for s in shapes]
    canvas = rasterize_polygons(polygons, height, width, values=values, order=order)
    return canvas == 1, canvas == IGNORE


class LisaReasonSegSource(Source):
    def __init__(self, root: str, split: str = "train", *, query_type: str = "all", explain_file: str | None = None,
                 name: str = "lisa", task: str = "reason_seg"):
        if query_type not in ("all", "sentence", "phrase"):
            raise ValueError(f"query_type must be all | sentence | phrase, got {query_type!r}")
        require_dir(root)
        self.name, self.task, self.query_type = name, task, query_type
        self.split_dir = require_dir(os.path.join(root, split), "LISA split directory")
        self._jsons = sorted(f for f in os.listdir(self.split_dir) if f.endswith(".json"))
        if query_type != "all":  # the filter needs is_sentence, so these records are read up front
            keep = []
            for f in self._jsons:
                try:
                    with open(os.path.join(self.split_dir, f), encoding="utf-8", errors="ignore") as fh:
                        is_sentence = bool(json.load(fh).get("is_sentence", False))
                except (OSError, ValueError):
                    keep.append(f)  # unreadable: __getitem__ reports it as BadSample
                    continue
                if is_sentence == (query_type == "sentence"):
                    keep.append(f)
            self._jsons = keep
        self._explain = {}
        if explain_file is not None:
            self._explain = {item["image"]: item.get("outputs") for item in load_json(explain_file, "LISA explanatory file")}

    def __len__(self):
        return len(self._jsons)

    def _build(self, index):
        json_name = self._jsons[index]
        path = os.path.join(self.split_dir, json_name)
        try:
            with open(path, encoding="utf-8", errors="ignore") as f:
                data = json.load(f)
        except ValueError as err:
            raise BadSample(f"{self.name}[{index}]: {path} is not valid JSON: {err}") from err
        image_name = json_name[: -len(".json")] + ".jpg"
        image_path = os.path.join(self.split_dir, image_name)
        height, width = image_size(image_path)
        queries = data["text"] if isinstance(data["text"], list) else [data["text"]]
        target, ignore = lisa_masks(data["shapes"], height, width)
        if not target.any():
            raise BadSample(f"{self.name}[{index}]: {path} has an empty target mask")
        meta = {"is_sentence": bool(data.get("is_sentence", False)), "ignore_mask": encode_mask(ignore),
                "json": path}
        if image_name in self._explain:
            meta["explain"] = self._explain[image_name]
        return Sample(
            dataset=self.name, task=self.task, sample_id=image_name, frames=[image_path], height=height, width=width,
            instances=[Instance(masks=[encode_mask(target)], instance_id=0)],
            phrases=[Phrase(text=q.strip(), instance_indices=[0]) for q in queries if q.strip()], meta=meta,
        )
