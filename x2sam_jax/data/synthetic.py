"""The built-in synthetic dataset: coloured shapes over textured backgrounds, in real on-disk formats.

`generate(root, ...)` writes, deterministically for a seed:

  {root}/coco/{train2017,val2017}/*.jpg                      images
  {root}/coco/annotations/panoptic_{split}.json + {root}/coco/panoptic_{split}/*.png   COCO panoptic
  {root}/coco/annotations/instances_{split}.json             COCO instances (things only, RLE)
  {root}/refcocos/refcoco/refs(unc).p + instances.json       REFER format (splits train / val)
  {root}/refcocos/images/train2014 -> ../../coco/train2017 and val2017 images (symlinks)
  {root}/ytvis19/{train,valid}/JPEGImages/{vid}/{frame}.jpg + {split}/{split}.json   YouTube-VIS
  {root}/ytrvos21/meta_expressions/{split}/meta_expressions.json and
  {root}/ytrvos21/{split}/{JPEGImages -> ytvis frames, Annotations/{vid}/{frame}.png}   Ref-YouTube-VOS
  {root}/ytrvos21/{split}/meta.json                        YouTube-VOS object list (also read as VOS)
  {root}/coco_vgd/annotations/img_vgdseg_coco_{train,val}.json   COCO-VGD (point/scribble/box/mask
      prompt RLEs per instance; images and categories linked from coco/ under coco_vgd/coco2017/)
  {root}/coco_int/annotations/coco_interactive_{train,val}_psalm.json   COCO-Interactive (PSALM
      layout, the same prompts; images linked under coco_int/coco2017/)
  {root}/grand_f/annotations/{train,val}/GranDf_HA_GCG_{train,val}.json   GCG captions in the GranD-f
      layout ("a red circle and two blue squares on the grass below the sky."; every phrase grounded)

so that the real sources (`coco_panoptic`, `coco_instances`, `refcoco`, `youtube_vis`,
`ref_youtube_vos`, `youtube_vos`, `coco_vgd`, `coco_interactive`, `GcgSource`) read them. Thing
categories are "<colour> <shape>" ("red circle"); stuff is the two-band background ("sky"/"wall"
above, "grass"/"sand"/"water" below). Each colour comes in one shape (six thing categories), and
objects do not overlap. Referring expressions name their target's category and add, where needed,
its left/right order among objects of that category ("the leftmost red circle") or its side
relative to the nearest other object ("the red circle on the left"); video expressions add the
motion ("the red circle moving right").
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from x2sam_jax.data import prompts
from x2sam_jax.data.sources.coco import coco_instances, coco_panoptic
from x2sam_jax.data.sources.common import decode_rle, encode_mask, id_to_rgb, rgb_to_id
from x2sam_jax.data.sources.gcg import GcgSource
from x2sam_jax.data.sources.refer import refcoco
from x2sam_jax.data.sources.refvos import ref_youtube_vos, youtube_vos
from x2sam_jax.data.sources.vgd import coco_interactive, coco_vgd
from x2sam_jax.data.sources.ytvis import youtube_vis

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "black": (25, 25, 25), "white": (245, 245, 245)}
# Each colour comes in one shape, so a category is told apart by its colour: with every colour in
# every shape (15 categories) the tiny model had not learned the shapes after 1000 image steps
# (thing PQ 0.04, its class probability split evenly over the three shapes of the right colour).
THING_KINDS = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "square"),
               ("black", "triangle"), ("white", "circle"))
TOP_STUFF = {"sky": (150, 200, 240), "wall": (190, 180, 170)}
BOTTOM_STUFF = {"grass": (90, 150, 70), "sand": (210, 190, 140), "water": (60, 110, 160)}

THING_CATEGORIES = [f"{c} {s}" for c, s in THING_KINDS]
STUFF_CATEGORIES = list(TOP_STUFF) + list(BOTTOM_STUFF)
MIN_AREA = 16  # objects whose visible area is smaller are dropped from the annotations


def _categories():
    cats = [{"id": i + 1, "name": n, "isthing": 1, "supercategory": "shape"} for i, n in enumerate(THING_CATEGORIES)]
    base = len(cats) + 1
    cats += [{"id": base + i, "name": n, "isthing": 0, "supercategory": "background"}
             for i, n in enumerate(STUFF_CATEGORIES)]
    return cats


CATEGORIES = _categories()
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}


# ----------------------------------------------------------------------------------- drawing
def _shape_mask(shape, cx, cy, r, height, width):
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng, height, width):
    """Two textured stuff bands; returns the RGB image and the stuff label map (category ids)."""
    top, bottom = rng.choice(list(TOP_STUFF)), rng.choice(list(BOTTOM_STUFF))
    horizon = int(rng.integers(height // 3, 2 * height // 3))
    img = np.empty((height, width, 3), np.float32)
    img[:horizon] = TOP_STUFF[top]
    img[horizon:] = BOTTOM_STUFF[bottom]
    yy, xx = np.mgrid[0:height, 0:width]
    freq = rng.uniform(0.2, 0.6, size=2)
    img += (12 * np.sin(freq[0] * xx + freq[1] * yy))[..., None]  # texture stripes
    img += rng.normal(0, 6, size=img.shape)
    labels = np.where(yy < horizon, CATEGORY_ID[top], CATEGORY_ID[bottom]).astype(np.int32)
    return img, labels


def _random_objects(rng, height, width, count, radius=(0.08, 0.18), frames=1, tries=50):
    """`count` objects that do not overlap in any of `frames` frames (position cx + vx * t):
    occlusion is left out of the scenes, since the tiny model in its CPU budget segments an occluded
    shape whole. An object that finds no free place in `tries` draws keeps its last one."""
    objs, taken = [], np.zeros((frames, height, width), bool)
    for _ in range(count):
        r = float(rng.uniform(*radius) * min(height, width))
        color, shape = THING_KINDS[int(rng.integers(len(THING_KINDS)))]
        for _ in range(tries):
            obj = {"color": color, "shape": shape, "r": r,
                   "cx": float(rng.uniform(r, width - r)), "cy": float(rng.uniform(r, height - r)),
                   "vx": float(rng.uniform(-0.06, 0.06) * width), "vy": float(rng.uniform(-0.04, 0.04) * height)}
            masks = np.stack([_shape_mask(shape, obj["cx"] + obj["vx"] * t, obj["cy"] + obj["vy"] * t, r, height, width)
                              for t in range(frames)])
            if not (masks & taken).any():
                break
        taken |= masks
        objs.append(obj)
    return objs


def _render(rng, background, stuff_labels, objs, t, height, width):
    """Paint objects (later ones occlude earlier ones) at time t; returns RGB uint8 and object-index map."""
    img = background.copy()
    obj_map = np.full((height, width), -1, np.int32)
    for k, o in enumerate(objs):
        m = _shape_mask(o["shape"], o["cx"] + o["vx"] * t, o["cy"] + o["vy"] * t, o["r"], height, width)
        obj_map[m] = k
        img[m] = np.asarray(COLORS[o["color"]], np.float32) + rng.normal(0, 4, size=(int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), obj_map


# ----------------------------------------------------------------------------------- expressions
def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _expressions(objs, masks, rng, motion=False):
    """Referring expressions for each visible object (index -> list of sentences)."""
    visible = [k for k, m in enumerate(masks) if m is not None]
    cents = {k: _centroid(masks[k]) for k in visible}
    out = {}
    for k in visible:
        o = objs[k]
        name = f"{o['color']} {o['shape']}"
        same = [j for j in visible if f"{objs[j]['color']} {objs[j]['shape']}" == name]
        sents = []
        if len(same) == 1:
            sents.append(f"the {name}")
        else:
            order = sorted(same, key=lambda j: cents[j][0])
            if k == order[0]:
                sents.append(f"the leftmost {name}")
            elif k == order[-1]:
                sents.append(f"the rightmost {name}")
        others = [j for j in visible if j != k]
        if others:
            j = min(others, key=lambda j: (cents[j][0] - cents[k][0]) ** 2 + (cents[j][1] - cents[k][1]) ** 2)
            dx, dy = cents[j][0] - cents[k][0], cents[j][1] - cents[k][1]
            # The phrase names its target, not the nearest other object: the class head compares
            # the mean of the phrase's token states, which the tiny LLM did not learn to pull away
            # from a second name ("the circle left of the green square" picked the square), nor
            # could it tell the two colours of a shape word apart ("the circle on the left": 0.53
            # cIoU, chance between two objects).
            side = ("on the left" if dx > 0 else "on the right") if abs(dx) >= abs(dy) else \
                ("at the top" if dy > 0 else "at the bottom")
            sents.append(f"the {name} {side}")
        if motion:
            vx, vy = o["vx"], o["vy"]
            direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
            sents.append(f"the {name} moving {direction}")
        if sents:
            out[k] = sents
    return out


# ----------------------------------------------------------------------------------- writers
def replace_tree(tmp: str, root: str) -> None:
    """Puts the finished folder ``tmp`` at ``root`` (an older one there is replaced)."""
    if os.path.exists(root):
        shutil.rmtree(root)
    os.replace(tmp, root)


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, sort_keys=True)


def _save_jpeg(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, quality=92)


def _save_png(path, array, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    if palette:
        img = img.convert("P") if img.mode != "P" else img
        pal = np.zeros((256, 3), np.uint8)
        pal[1:] = np.asarray([(37 * i % 256, 91 * i % 256, 151 * i % 256) for i in range(1, 256)], np.uint8)
        img.putpalette(pal.reshape(-1).tolist())
    img.save(path)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _image_split(root, split, image_ids, rng, height, width, ann_counter, num_objects, radius):
    """Writes the images and returns (panoptic json, instances json, refs list) for one split."""
    pan_images, pan_anns, inst_anns, refs = [], [], [], []
    for image_id in image_ids:
        file_name = f"{image_id:012d}.jpg"
        background, stuff = _background(rng, height, width)
        objs = _random_objects(rng, height, width, int(rng.integers(num_objects[0], num_objects[1] + 1)), radius)
        rgb, obj_map = _render(rng, background, stuff, objs, 0.0, height, width)
        _save_jpeg(os.path.join(root, "coco", split, file_name), rgb)

        seg_ids = np.zeros((height, width), np.int64)
        segments, masks = [], []
        for k, o in enumerate(objs):
            m = obj_map == k
            if m.sum() < MIN_AREA:
                masks.append(None)
                continue
            masks.append(m)
            ann_counter[0] += 1
            ann_id = ann_counter[0]
            seg_ids[m] = ann_id
            cat = CATEGORY_ID[f"{o['color']} {o['shape']}"]
            segments.append({"id": ann_id, "category_id": cat, "iscrowd": 0, "bbox": _bbox(m), "area": int(m.sum())})
            inst_anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                              "segmentation": encode_mask(m), "bbox": _bbox(m), "area": int(m.sum())})
        free = obj_map < 0
        for cat in np.unique(stuff[free]):  # stuff segment ids live above every thing id
            m = free & (stuff == cat)
            stuff_id = 1_000_000 + image_id * 16 + int(cat)
            seg_ids[m] = stuff_id
            segments.append({"id": stuff_id, "category_id": int(cat), "iscrowd": 0, "bbox": _bbox(m),
                             "area": int(m.sum())})
        png_name = file_name.replace(".jpg", ".png")
        _save_png(os.path.join(root, "coco", f"panoptic_{split}", png_name), id_to_rgb(seg_ids))
        pan_images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        pan_anns.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})

        thing_ids = [s["id"] for s in segments if s["id"] < 1_000_000]
        visible = [k for k in range(len(objs)) if masks[k] is not None]
        for k, sents in sorted(_expressions(objs, masks, rng).items()):
            ann_id = thing_ids[visible.index(k)]
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id,
                         "split": "train" if split == "train2017" else "val",
                         "category_id": CATEGORY_ID[f"{objs[k]['color']} {objs[k]['shape']}"],
                         "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": ann_id * 10 + i}
                                       for i, s in enumerate(sents)]})
    pan = {"images": pan_images, "annotations": pan_anns, "categories": CATEGORIES}
    inst = {"images": pan_images, "annotations": inst_anns, "categories": [c for c in CATEGORIES if c["isthing"]]}
    return pan, inst, refs


def _video_split(root, split, video_ids, rng, frames, height, width, num_objects, radius):
    videos, tracks, meta, objects_meta = [], [], {}, {}
    for vid_num in video_ids:
        vid = f"v{vid_num:05d}"
        background, stuff = _background(rng, height, width)
        objs = _random_objects(rng, height, width, int(rng.integers(num_objects[0], num_objects[1] + 1)), radius,
                               frames)
        frame_names = [f"{5 * t:05d}" for t in range(frames)]
        per_frame = []
        for t, fname in enumerate(frame_names):
            rgb, obj_map = _render(rng, background, stuff, objs, float(t), height, width)
            _save_jpeg(os.path.join(root, "ytvis19", split, "JPEGImages", vid, f"{fname}.jpg"), rgb)
            palette_map = np.where(obj_map >= 0, obj_map + 1, 0).astype(np.uint8)  # object id = index + 1
            _save_png(os.path.join(root, "ytrvos21", split, "Annotations", vid, f"{fname}.png"), palette_map,
                      palette=True)
            per_frame.append(obj_map)
        objects = {}
        for k, o in enumerate(objs):
            masks = [(m == k) if (m == k).sum() >= MIN_AREA else None for m in per_frame]
            if all(m is None for m in masks):
                continue
            objects[str(k + 1)] = {"category": f"{o['color']} {o['shape']}",
                                   "frames": [f for f, m in zip(frame_names, masks) if m is not None]}
            tracks.append({
                "id": len(tracks) + 1, "video_id": vid_num, "iscrowd": 0,
                "category_id": CATEGORY_ID[f"{o['color']} {o['shape']}"],
                "segmentations": [None if m is None else encode_mask(m) for m in masks],
                "areas": [None if m is None else int(m.sum()) for m in masks],
                "bboxes": [None if m is None else _bbox(m) for m in masks],
                "height": height, "width": width, "length": 1,
            })
        if objects:
            objects_meta[vid] = {"objects": objects}
        videos.append({"id": vid_num, "file_names": [f"{vid}/{f}.jpg" for f in frame_names], "height": height,
                       "width": width, "length": frames})
        first_masks = [(per_frame[0] == k) if (per_frame[0] == k).sum() >= MIN_AREA else None for k in range(len(objs))]
        exps = {}
        for k, sents in sorted(_expressions(objs, first_masks, rng, motion=True).items()):
            for s in sents:
                exps[str(len(exps))] = {"exp": s, "obj_id": str(k + 1)}
        if exps:
            meta[vid] = {"expressions": exps, "frames": frame_names}
    ytvis = {"videos": videos, "annotations": tracks,
             "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES if c["isthing"]]}
    _write_json(os.path.join(root, "ytvis19", split, f"{split}.json"), ytvis)
    _write_json(os.path.join(root, "ytrvos21", "meta_expressions", split, "meta_expressions.json"), {"videos": meta})
    # YouTube-VOS style object list (categories and the frames where each object is visible)
    _write_json(os.path.join(root, "ytrvos21", split, "meta.json"), {"videos": objects_meta})
    link = os.path.join(root, "ytrvos21", split, "JPEGImages")
    os.symlink(os.path.join("..", "..", "ytvis19", split, "JPEGImages"), link)


def _prompt_datasets(root, image_ids, instances, seed):
    """COCO-VGD and COCO-Interactive files over the COCO images: every thing instance with the four
    prompt kinds synthesised as the official generators do (data/prompts.py), from a generator of
    its own so the other files do not change."""
    rng = np.random.default_rng([seed, 7])
    anns_by_image = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    images = {img["id"]: img for img in instances["images"]}
    for split, ids in image_ids.items():
        short = "train" if split == "train2017" else "val"
        vgd, interactive = [], []
        for image_id in ids:
            image = images[image_id]
            vgd_anns, int_anns = [], []
            for ann in anns_by_image.get(image_id, []):
                mask = decode_rle(ann["segmentation"]).astype(bool)
                drawn = {kind: prompts.synthesize(mask, kind, rng) for kind in prompts.PROMPT_KINDS}
                drawn = {kind: encode_mask(m) for kind, m in drawn.items() if m.any()}
                if not drawn:
                    continue
                vgd_anns.append({"id": ann["id"], "category_id": ann["category_id"], "segmentation": ann["segmentation"],
                                 "visual_prompts": {f"{k}_visual_prompt": v for k, v in drawn.items()}})
                int_anns.append({"id": ann["id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                                 "iscrowd": ann["iscrowd"], "segmentation": ann["segmentation"],
                                 **{f"{k}_visual_prompt_mask": v for k, v in drawn.items()}})
            if vgd_anns:
                vgd.append({"image_file": image["file_name"], "image_id": image_id,
                            "image_size": [image["height"], image["width"]], "annotations": vgd_anns})
                interactive.append({"image": f"{split}/{image['file_name']}", "image_info": dict(image),
                                    "anns": int_anns})
        _write_json(os.path.join(root, "coco_vgd", "annotations", f"img_vgdseg_coco_{short}.json"), vgd)
        _write_json(os.path.join(root, "coco_int", "annotations", f"coco_interactive_{short}_psalm.json"), interactive)
    # The official trees keep COCO under coco2017/: link the images and the categories file.
    os.symlink(os.path.join("..", "coco"), os.path.join(root, "coco_vgd", "coco2017"))
    os.symlink(os.path.join("..", "coco"), os.path.join(root, "coco_int", "coco2017"))


_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}


def _gcg_caption(image_anns, segments, categories_by_id):
    """A grounded caption of one image: its things (grouped by name, left to right) on the stuff.
    Returns (caption, GranD-f groundings {phrase: {"token_positives": [start, end), "rle_masks"}})."""
    things, stuff = {}, {}
    for ann in sorted(image_anns, key=lambda a: a["bbox"][0]):
        things.setdefault(categories_by_id[ann["category_id"]], []).append(ann["segmentation"])
    for seg in segments:
        name = categories_by_id[seg["category_id"]]
        if name in STUFF_CATEGORIES:
            stuff[name] = seg
    parts, groundings = [], {}
    for name, masks in things.items():
        count = len(masks)
        phrase = f"{_COUNT_WORDS.get(count, str(count))} {name}" + ("s" if count > 1 else "")
        parts.append((phrase, masks))
    text = ""
    for k, (phrase, masks) in enumerate(parts):
        text += (", " if 0 < k < len(parts) - 1 else " and " if k else "")
        groundings[phrase] = {"token_positives": [len(text), len(text) + len(phrase)], "rle_masks": masks}
        text += phrase
    bottom = [n for n in stuff if n in BOTTOM_STUFF]
    top = [n for n in stuff if n in TOP_STUFF]
    for word, names in ((" on the ", bottom), (" below the ", top)):
        if names:
            text += word
            phrase = names[0]
            groundings[phrase] = {"token_positives": [len(text), len(text) + len(phrase)],
                                  "rle_masks": [stuff[phrase]["rle"]]}
            text += phrase
    return text + ".", groundings


def _gcg_dataset(root, split, image_ids, pan, inst):
    categories_by_id = {c["id"]: c["name"] for c in CATEGORIES}
    anns_by_image = {}
    for ann in inst["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    pngs = {a["image_id"]: a for a in pan["annotations"]}
    images = {img["id"]: img for img in pan["images"]}
    records = []
    for image_id in image_ids:
        image, ann = images[image_id], pngs[image_id]
        if not anns_by_image.get(image_id):
            continue
        ids = rgb_to_id(np.asarray(Image.open(os.path.join(root, "coco", f"panoptic_{split}", ann["file_name"]))))
        segments = [dict(s, rle=encode_mask(ids == s["id"])) for s in ann["segments_info"]]
        caption, groundings = _gcg_caption(anns_by_image[image_id], segments, categories_by_id)
        records.append({"image_id": image_id, "file_name": image["file_name"], "caption": caption,
                        "groundings": groundings, "height": image["height"], "width": image["width"]})
    short = "train" if split == "train2017" else "val"
    _write_json(os.path.join(root, "grand_f", "annotations", short, f"GranDf_HA_GCG_{short}.json"), records)


def generate(root: str, *, num_images: int = 200, num_videos: int = 20, frames: int = 8,
             size: int | tuple[int, int] = (120, 160), seed: int = 0, val_fraction: float = 0.25,
             image_objects: tuple[int, int] = (1, 4), video_objects: tuple[int, int] = (1, 3),
             radius: tuple[float, float] = (0.08, 0.18), overwrite: bool = False) -> dict:
    """Write the synthetic dataset under `root` (atomically) and return the roots of each family.

    `size` is (height, width) or one int for square images. Splits: images train2017 / val2017
    (refs train / val), videos train / valid, each `val_fraction` of the count (at least one).
    The scene difficulty: `image_objects` / `video_objects` (min, max) shapes per scene, `radius`
    (min, max) of a shape as a fraction of the shorter side.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(height, width) < 32:
        raise ValueError(f"size must be at least 32 pixels per side, got {height}x{width}")
    for name, (low, high) in (("image_objects", image_objects), ("video_objects", video_objects)):
        if not 1 <= int(low) <= int(high):
            raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(low, high)}")
    if not 0 < float(radius[0]) <= float(radius[1]) <= 0.5:
        raise ValueError(f"radius must be (min, max) with 0 < min <= max <= 0.5, got {tuple(radius)}")
    image_objects, video_objects = tuple(map(int, image_objects)), tuple(map(int, video_objects))
    radius = (float(radius[0]), float(radius[1]))
    if os.path.exists(root):
        if not overwrite and os.listdir(root):
            raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True)")
    parent = os.path.dirname(os.path.abspath(root)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        rng = np.random.default_rng(seed)
        n_val = max(1, int(num_images * val_fraction)) if num_images > 1 else 0
        image_ids = {"train2017": list(range(1, num_images - n_val + 1)),
                     "val2017": list(range(num_images - n_val + 1, num_images + 1))}
        counter, all_refs, all_inst = [0], [], {"images": [], "annotations": [], "categories": None}
        for split, ids in image_ids.items():
            pan, inst, refs = _image_split(tmp, split, ids, rng, height, width, counter, image_objects, radius)
            _write_json(os.path.join(tmp, "coco", "annotations", f"panoptic_{split}.json"), pan)
            _write_json(os.path.join(tmp, "coco", "annotations", f"instances_{split}.json"), inst)
            _gcg_dataset(tmp, split, ids, pan, inst)
            all_refs += refs
            all_inst["images"] += inst["images"]
            all_inst["annotations"] += inst["annotations"]
            all_inst["categories"] = inst["categories"]
        os.makedirs(os.path.join(tmp, "refcocos", "refcoco"))
        with open(os.path.join(tmp, "refcocos", "refcoco", "refs(unc).p"), "wb") as f:
            pickle.dump(all_refs, f, protocol=2)
        _write_json(os.path.join(tmp, "refcocos", "refcoco", "instances.json"), all_inst)
        # REFER reads every split's images from one folder; link both COCO splits' files into it.
        ref_images = os.path.join(tmp, "refcocos", "images", "train2014")
        os.makedirs(ref_images)
        for split, ids in image_ids.items():
            for image_id in ids:
                name = f"{image_id:012d}.jpg"
                os.symlink(os.path.join("..", "..", "..", "coco", split, name), os.path.join(ref_images, name))

        _prompt_datasets(tmp, image_ids, all_inst, seed)

        n_val_v = max(1, int(num_videos * val_fraction)) if num_videos > 1 else 0
        video_ids = {"train": list(range(1, num_videos - n_val_v + 1)),
                     "valid": list(range(num_videos - n_val_v + 1, num_videos + 1))}
        for split, ids in video_ids.items():
            _video_split(tmp, split, ids, rng, frames, height, width, video_objects, radius)
        _write_json(os.path.join(tmp, "synthetic.json"), {
            "seed": seed, "num_images": num_images, "num_videos": num_videos, "frames": frames,
            "size": [height, width], "val_fraction": val_fraction, "image_objects": list(image_objects),
            "video_objects": list(video_objects), "radius": list(radius), "thing_categories": THING_CATEGORIES,
            "stuff_categories": STUFF_CATEGORIES})
        replace_tree(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"coco": os.path.join(root, "coco"), "refcocos": os.path.join(root, "refcocos"),
            "ytvis19": os.path.join(root, "ytvis19"), "ytrvos21": os.path.join(root, "ytrvos21"),
            "coco_vgd": os.path.join(root, "coco_vgd"), "coco_int": os.path.join(root, "coco_int"),
            "grand_f": os.path.join(root, "grand_f")}


def ensure(root: str, **kwargs) -> str:
    """Generates the dataset into `root` (the arguments of `generate`) unless `root/synthetic.json`
    exists; an existing dataset made with other arguments is kept, with a warning naming them. A
    non-empty `root` without synthetic.json is not ours to replace: FileExistsError."""
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    if isinstance(kwargs.get("size"), tuple) and len(kwargs["size"]) == 1:   # --config...size=32 gives (32,)
        kwargs["size"] = int(kwargs["size"][0])
    record_path = os.path.join(root, "synthetic.json")
    if not os.path.exists(record_path):
        generate(root, **kwargs)
        return root
    with open(record_path) as f:
        record = json.load(f)
    wanted = dict(kwargs)
    if isinstance(wanted.get("size"), int):
        wanted["size"] = (wanted["size"], wanted["size"])
    plain = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples -> lists, as the record holds them)
    differ = sorted(k for k, v in wanted.items() if k in record and plain(v) != record[k])
    if differ:
        logging.getLogger("x2sam_jax.data").warning(
            "%s: the synthetic dataset there was generated with other arguments (%s); using it as it is",
            record_path, ", ".join(f"{k}={record[k]} there, {plain(wanted[k])} asked" for k in differ))
    return root


def generate_kwargs(section) -> dict:
    """A run config's ``data.synthetic`` section minus ``root`` / ``sources``: the arguments of
    :func:`generate` / :func:`ensure` (what train.py and eval.py write the dataset with)."""
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return {k: v for k, v in section.items() if k not in ("root", "sources")}


def sources(root: str, split: str = "train") -> dict:
    """The real sources over a generated tree (split 'train' or 'val'), keyed by source name."""
    coco_split = {"train": "train2017", "val": "val2017"}[split]
    video_split = {"train": "train", "val": "valid"}[split]
    return {
        "coco_panoptic": coco_panoptic(os.path.join(root, "coco"), coco_split),
        "coco_instances": coco_instances(os.path.join(root, "coco"), coco_split),
        "refcoco": refcoco(os.path.join(root, "refcocos"), "refcoco", split),
        "ytvis19": youtube_vis(os.path.join(root, "ytvis19"), video_split),
        "ref_ytvos": ref_youtube_vos(os.path.join(root, "ytrvos21"), video_split),
        "ytvos": youtube_vos(os.path.join(root, "ytrvos21"), video_split),
        "coco_vgd": coco_vgd(os.path.join(root, "coco_vgd"), split),
        "coco_interactive": coco_interactive(os.path.join(root, "coco_int"), split),
        "grandf_gcg": GcgSource(os.path.join(root, "grand_f", "annotations", split, f"GranDf_HA_GCG_{split}.json"),
                                os.path.join(root, "coco", coco_split), name="grandf_gcg"),
    }
