"""A miniature of every dataset the X2SAM recipe reads, in the official `datas/` layout.

`write_miniature(root)` writes a handful of samples of each dataset of stage 1 (SA-1B) and stage 3
(`configs/x2sam_4b_base.stage3_train_sources` and `paper_benchmarks`) under `root`, where the
official tree keeps them (docs/mds/datasets.md of X2SAM), in each dataset's own file formats, so
that the real readers (`x2sam_jax.data.sources`) read them and the real configs run end to end
with `--config.data.root=ROOT`:

  img_sam/SA1B/sa_000000/sa_K.{jpg,json}                        SA-1B
  img_chat/llava/{LLaVA-Instruct-150K/llava_v1_5_mix665k.json, llava_images/coco -> coco2017}
  img_genseg/coco2017/{train2017,val2017,panoptic_*,annotations}  COCO panoptic + instances
  img_genseg/coco2014/train2014/COCO_train2014_*.jpg             RefCOCO images
  img_refseg/refcocos/{refcoco,refcoco+,refcocog}/{refs(unc|umd).p,instances.json},
      refcocop -> refcoco+, images/train2014 -> coco2014/train2014
  img_reaseg/lisa/{train,val,test}/*.{jpg,json}                  LISA ReasonSeg (polygons)
  img_vgdseg/coco_vgd/{annotations, coco2017 -> img_genseg/coco2017}
  img_intseg/coco_int/{annotations, coco2017 -> img_genseg/coco2017}
  img_gcgseg/grand_f/annotations/{train,val_test}/..., images/{GranDf_HA_images, flickr30k,
      coco2014 -> .., coco2017 -> ..}                            GranD-f / RefCOCOg / PSG / Flickr GCG
  img_ovseg/ade20k/{ade20k_panoptic_val.json, ade20k_panoptic_val/, images/validation/}
  vid_chat/video_chatgpt/{VideoInstruct100K.json, ActivityNet/train/*.mp4}
  vid_genseg/vipseg_720p/{panoptic_gt_VIPSeg_{train,val}.json, panomasksRGB, images, *.txt}
  vid_genseg/ytvis19/{train,valid}/{JPEGImages, train.json | valid.json (no annotations)}
  vid_genseg/vspw_480p/{train.txt, val.txt, label_num_dic_final.json, images, semmasks} (val: 17+ frames)
  vid_ovseg/ytvis21/valid/{JPEGImages, instances.json (no annotations)}
  vid_refseg/ytrvos21/{meta_expressions/{train,valid,test}, train/{JPEGImages,Annotations,meta.json},
      valid/JPEGImages}
  vid_refseg/davis17/{meta_expressions/{train,val}, davis_supervised/{JPEGImages,Annotations}/480p}
  vid_reaseg/revos/{annotations/{meta_expressions_{train,valid}_.json, mask_dict.json}, JPEGImages}
  vid_vgdseg/{ytvis_vgd,vipseg_vgd}/{annotations, ytvis19 | vipseg_720p -> vid_genseg/...}
  vid_objseg/ytvos19/{train,valid}/{meta.json, JPEGImages, Annotations} (valid: first frames only)
  vid_gcgseg/video_glamm/{mevis_gcg/{train,valid_u}, mevis/{train,valid_u}, ytvos_gcg,
      ytrvos21 -> .., vidstg_gcg/{train,val}, hcstvg_gcg, video_gcg/{instruction_data/{train,test}.json,
      yt19 -> vid_genseg/ytvis19, YFCC100M/val}}         (valid_u / val / test: X2SAM's video GCG evaluation)
  LMUData/{MME,POPE,MMBench_DEV_EN,SEEDBench_IMG,AI2D_TEST}.tsv, datasets--lmms-lab--Video-MME,
      datasets--OpenGVLab--MVBench, datasets--MLVU--MVLU/MLVU, datasets--longvideobench--LongVideoBench
                                                                 chat benchmarks (VLMEvalKit's LMUData)

The scenes are synthetic.py's: coloured shapes (thing categories "red circle", ...) on two stuff
bands ("sky" above "grass", ...); expressions, questions and captions name the shapes, so every
sample has targets. Links are relative (as the official tree's `ln -s`), so the tree can move.
Everything is deterministic for a seed and written atomically (a temporary folder renamed);
`ensure_miniature(root)` writes it once (`root/miniature.json` records the arguments).

    python -m x2sam_jax.data.miniature --root /tmp/datas
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import os
import pickle
import shutil
import tempfile

import numpy as np
from PIL import Image

from x2sam_jax.data import prompts, synthetic as syn
from x2sam_jax.data.sources.common import encode_mask, id_to_rgb, merge_rles
from x2sam_jax.data.transforms import write_video_file

logger = logging.getLogger("x2sam_jax.data")

RECORD = "miniature.json"
VERSION = 1
CATEGORY_NAME = {c["id"]: c["name"] for c in syn.CATEGORIES}
THING_CATEGORIES = [c for c in syn.CATEGORIES if c["isthing"]]
_POLYGON_POINTS = 16


def _rle_json(mask) -> dict:
    return encode_mask(np.asarray(mask, bool))


def _markup_caption(scene, ids) -> dict:
    """A VideoGLaMM caption file naming the scene's things with their object ids: "[a red circle](1)"."""
    parts = [f"[{'the' if i == 0 else 'a'} {t['name']}]({ids[i]})" for i, t in enumerate(scene["things"])]
    return {"caption": "In the video " + " passes by ".join(parts) + " slowly."}


class _Writer:
    def __init__(self, root: str, *, seed: int, images: int, videos: int, frames: int, size):
        self.root, self.seed = root, seed
        self.rng = np.random.default_rng(seed)
        self.n, self.videos, self.frames = images, videos, frames
        self.h, self.w = size
        self.radius = (0.14, 0.24)
        self._ann = 0

    # ------------------------------------------------------------------ files
    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def json(self, obj, *parts) -> None:
        syn._write_json(self.path(*parts), obj)

    def jpg(self, rgb, *parts) -> None:
        syn._save_jpeg(self.path(*parts), rgb)

    def png(self, array, *parts, palette=False) -> None:
        syn._save_png(self.path(*parts), array, palette=palette)

    def link(self, target: tuple, *parts) -> None:
        """A relative symlink at `parts` pointing at `target` (both under the root)."""
        where = self.path(*parts)
        os.makedirs(os.path.dirname(where), exist_ok=True)
        os.symlink(os.path.relpath(self.path(*target), os.path.dirname(where)), where)

    def next_id(self) -> int:
        self._ann += 1
        return self._ann

    # ------------------------------------------------------------------ scenes
    def image_scene(self, objects=(1, 3)) -> dict:
        """One image: rgb, things [{name, category_id, mask, obj}], stuff [{name, category_id, mask}]."""
        h, w = self.h, self.w
        background, stuff = syn._background(self.rng, h, w)
        objs = syn._random_objects(self.rng, h, w, int(self.rng.integers(objects[0], objects[1] + 1)), self.radius)
        rgb, obj_map = syn._render(self.rng, background, stuff, objs, 0.0, h, w)
        things = []
        for k, o in enumerate(objs):
            mask = obj_map == k
            if mask.sum() >= syn.MIN_AREA:
                name = f"{o['color']} {o['shape']}"
                things.append({"name": name, "category_id": syn.CATEGORY_ID[name], "mask": mask, "obj": o})
        free = obj_map < 0
        stuff_segs = [{"name": CATEGORY_NAME[int(c)], "category_id": int(c), "mask": free & (stuff == c)}
                      for c in np.unique(stuff[free])]
        return {"rgb": rgb, "things": things, "stuff": stuff_segs}

    def video_scene(self, objects=(1, 3), frames: int | None = None) -> dict:
        """One clip: rgb frames, things [{name, category_id, masks (None where < MIN_AREA), obj}]
        (each visible on frame 0), stuff [{name, category_id, masks}]."""
        h, w, count = self.h, self.w, frames or self.frames
        background, stuff = syn._background(self.rng, h, w)
        n = int(self.rng.integers(objects[0], objects[1] + 1))
        objs = syn._random_objects(self.rng, h, w, n, self.radius, count)
        for o in objs:   # slow enough to stay in view over the clip
            o["vx"], o["vy"] = o["vx"] / 3, o["vy"] / 3
        rendered = [syn._render(self.rng, background, stuff, objs, float(t), h, w) for t in range(count)]
        things = []
        for k, o in enumerate(objs):
            masks = [(m == k) if (m == k).sum() >= syn.MIN_AREA else None for _, m in rendered]
            if masks[0] is None:
                continue
            name = f"{o['color']} {o['shape']}"
            things.append({"name": name, "category_id": syn.CATEGORY_ID[name], "masks": masks, "obj": o})
        stuff_segs = []
        for c in np.unique(stuff):
            masks = [((m < 0) & (stuff == c)) for _, m in rendered]
            masks = [m if m.sum() else None for m in masks]
            stuff_segs.append({"name": CATEGORY_NAME[int(c)], "category_id": int(c), "masks": masks})
        return {"frames": [rgb for rgb, _ in rendered], "things": things, "stuff": stuff_segs}

    def polygon(self, obj) -> list:
        """The outline of a synthetic shape as [[x, y], ...] (LabelMe points)."""
        cx, cy, r = obj["cx"], obj["cy"], obj["r"]
        if obj["shape"] == "square":
            pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif obj["shape"] == "triangle":
            pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        else:
            a = np.linspace(0, 2 * np.pi, _POLYGON_POINTS, endpoint=False)
            pts = list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))
        return [[float(np.clip(x, 0, self.w - 1)), float(np.clip(y, 0, self.h - 1))] for x, y in pts]

    # ------------------------------------------------------------------ COCO-style images
    def coco_panoptic(self, scenes, image_ids, file_names, image_dir: tuple, png_dir: tuple):
        """Writes images and panoptic PNGs; returns (panoptic json, instances json)."""
        images, pan, inst = [], [], []
        for scene, image_id, file_name in zip(scenes, image_ids, file_names):
            self.jpg(scene["rgb"], *image_dir, file_name)
            ids = np.zeros((self.h, self.w), np.int64)
            segments = []
            for is_thing, seg in [(True, t) for t in scene["things"]] + [(False, t) for t in scene["stuff"]]:
                seg_id = self.next_id()
                ids[seg["mask"]] = seg_id
                segments.append({"id": seg_id, "category_id": seg["category_id"], "iscrowd": 0,
                                 "bbox": syn._bbox(seg["mask"]), "area": int(seg["mask"].sum())})
                seg["id"] = seg_id
                if is_thing:
                    inst.append({"id": seg_id, "image_id": image_id, "category_id": seg["category_id"], "iscrowd": 0,
                                 "segmentation": _rle_json(seg["mask"]), "bbox": syn._bbox(seg["mask"]),
                                 "area": int(seg["mask"].sum())})
            png_name = os.path.splitext(file_name)[0] + ".png"
            self.png(id_to_rgb(ids), *png_dir, png_name)
            images.append({"id": image_id, "file_name": file_name, "height": self.h, "width": self.w})
            pan.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
        return ({"images": images, "annotations": pan, "categories": syn.CATEGORIES},
                {"images": images, "annotations": inst, "categories": THING_CATEGORIES})

    # ------------------------------------------------------------------ image datasets
    def sa1b(self):
        for k in range(self.n):
            scene = self.image_scene()
            number = 20 + k
            self.jpg(scene["rgb"], "img_sam", "SA1B", "sa_000000", f"sa_{number}.jpg")
            anns = []
            for seg in scene["things"] + scene["stuff"]:
                m = seg["mask"]
                ys, xs = np.nonzero(m)
                anns.append({"id": self.next_id(), "segmentation": _rle_json(m), "bbox": syn._bbox(m),
                             "area": int(m.sum()), "predicted_iou": 0.95, "stability_score": 0.97,
                             "crop_box": [0.0, 0.0, float(self.w), float(self.h)],
                             "point_coords": [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]]})
            self.json({"image": {"image_id": number, "width": self.w, "height": self.h,
                                 "file_name": f"sa_{number}.jpg"}, "annotations": anns},
                      "img_sam", "SA1B", "sa_000000", f"sa_{number}.json")

    def coco2017(self):
        """COCO 2017 panoptic + instances; returns {split: (scenes, panoptic, instances)}."""
        out = {}
        for s, split in enumerate(("train2017", "val2017")):
            scenes = [self.image_scene() for _ in range(self.n)]
            ids = [1000 * (s + 1) + k for k in range(self.n)]
            names = [f"{i:012d}.jpg" for i in ids]
            base = ("img_genseg", "coco2017")
            pan, inst = self.coco_panoptic(scenes, ids, names, base + (split,), base + (f"panoptic_{split}",))
            self.json(pan, *base, "annotations", f"panoptic_{split}.json")
            self.json(inst, *base, "annotations", f"instances_{split}.json")
            out[split] = (scenes, pan, inst)
        return out

    def ade20k(self):
        scenes = [self.image_scene() for _ in range(self.n)]
        ids = [f"ADE_val_{k + 1:08d}" for k in range(self.n)]
        base = ("img_ovseg", "ade20k")
        pan, _ = self.coco_panoptic(scenes, ids, [f"{i}.jpg" for i in ids], base + ("images", "validation"),
                                    base + ("ade20k_panoptic_val",))
        self.json(pan, *base, "ade20k_panoptic_val.json")

    def refcocos(self):
        """COCO 2014 train images and RefCOCO / RefCOCO+ (unc: train/val/testA/testB) and
        RefCOCOg (umd: train/val/test) over them; returns the scenes and their image ids."""
        unc, umd = ("train", "val", "testA", "testB"), ("train", "val", "test", "train")
        scenes = [self.image_scene((2, 3)) for _ in range(4 * self.n)]
        ids = [500 + k for k in range(len(scenes))]
        images, anns = [], []
        refs = {"refcoco": [], "refcoco+": [], "refcocog": []}
        for k, (scene, image_id) in enumerate(zip(scenes, ids)):
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            self.jpg(scene["rgb"], "img_genseg", "coco2014", "train2014", file_name)
            images.append({"id": image_id, "file_name": file_name, "height": self.h, "width": self.w})
            objs = [t["obj"] for t in scene["things"]]
            expressions = syn._expressions(objs, [t["mask"] for t in scene["things"]], self.rng)
            for j, thing in enumerate(scene["things"]):
                ann_id = self.next_id()
                thing["id"] = ann_id
                anns.append({"id": ann_id, "image_id": image_id, "category_id": thing["category_id"], "iscrowd": 0,
                             "segmentation": _rle_json(thing["mask"]), "bbox": syn._bbox(thing["mask"]),
                             "area": int(thing["mask"].sum())})
                color, shape = thing["obj"]["color"], thing["obj"]["shape"]
                texts = {"refcoco": expressions.get(j) or [f"the {thing['name']}"],
                         "refcoco+": [f"the {shape} that is {color}"],
                         "refcocog": [f"a {color} {shape} lying in the picture"]}
                for dataset, sents in texts.items():
                    split = (umd if dataset == "refcocog" else unc)[k % 4]
                    sent_ids = [ann_id * 10 + i for i in range(len(sents))]
                    refs[dataset].append({
                        "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                        "category_id": thing["category_id"], "file_name": file_name, "sent_ids": sent_ids,
                        "sentences": [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": i}
                                      for t, i in zip(sents, sent_ids)]})
        instances = {"images": images, "annotations": anns, "categories": THING_CATEGORIES}
        for dataset, items in refs.items():
            by = "umd" if dataset == "refcocog" else "unc"
            folder = self.path("img_refseg", "refcocos", dataset)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"refs({by}).p"), "wb") as f:
                pickle.dump(items, f, protocol=2)
            self.json(instances, "img_refseg", "refcocos", dataset, "instances.json")
        os.symlink("refcoco+", self.path("img_refseg", "refcocos", "refcocop"))
        self.link(("img_genseg", "coco2014", "train2014"), "img_refseg", "refcocos", "images", "train2014")
        return scenes, ids

    def lisa(self):
        for split in ("train", "val", "test"):
            for k in range(self.n):
                scene = self.image_scene((1, 3))
                name = f"{split}_{k:04d}"
                self.jpg(scene["rgb"], "img_reaseg", "lisa", split, f"{name}.jpg")
                target = scene["things"][0]
                obj = target["obj"]
                shapes = [{"label": "target", "labels": ["target"], "points": self.polygon(obj), "shape_type": "polygon",
                           "group_id": None, "flags": {}}]
                sentence = k % 2 == 0
                text = ([f"Which object in this picture would you call {obj['color']} and {obj['shape']}-shaped?"]
                        if sentence else [f"the {target['name']}"])
                self.json({"text": text, "is_sentence": sentence, "shapes": shapes},
                          "img_reaseg", "lisa", split, f"{name}.json")

    def llava(self, coco):
        scenes, pan, _ = coco["train2017"]
        records = []
        for k, image in enumerate(pan["images"]):
            things = [t["name"] for t in scenes[k]["things"]]
            records.append({"id": f"{image['id']:012d}", "image": f"coco/train2017/{image['file_name']}",
                            "conversations": [
                                {"from": "human", "value": "<image>\nWhat shapes do you see?"},
                                {"from": "gpt", "value": "I see " + " and ".join(f"a {t}" for t in things) + "."},
                                {"from": "human", "value": "What is in the background?"},
                                {"from": "gpt", "value": "The " + " and the ".join(s["name"] for s in scenes[k]["stuff"])
                                 + "."}]})
        records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hello."},
                                                             {"from": "gpt", "value": "Hello."}]})
        self.json(records, "img_chat", "llava", "LLaVA-Instruct-150K", "llava_v1_5_mix665k.json")
        self.link(("img_genseg", "coco2017"), "img_chat", "llava", "llava_images", "coco")

    def prompt_sets(self, coco):
        """COCO-VGD and COCO-Interactive over the COCO 2017 images (prompts as data/prompts.py draws them)."""
        for split, short in (("train2017", "train"), ("val2017", "val")):
            scenes, pan, _ = coco[split]
            vgd, interactive = [], []
            for scene, image in zip(scenes, pan["images"]):
                vgd_anns, int_anns = [], []
                for thing in scene["things"]:
                    drawn = {kind: prompts.synthesize(thing["mask"], kind, self.rng) for kind in prompts.PROMPT_KINDS}
                    drawn = {kind: _rle_json(m) for kind, m in drawn.items() if m.any()}
                    seg = _rle_json(thing["mask"])
                    vgd_anns.append({"id": thing["id"], "category_id": thing["category_id"], "segmentation": seg,
                                     "visual_prompts": {f"{k}_visual_prompt": v for k, v in drawn.items()}})
                    int_anns.append({"id": thing["id"], "category_id": thing["category_id"],
                                     "bbox": syn._bbox(thing["mask"]), "iscrowd": 0, "segmentation": seg,
                                     **{f"{k}_visual_prompt_mask": v for k, v in drawn.items()}})
                vgd.append({"image_file": image["file_name"], "image_id": image["id"],
                            "image_size": [self.h, self.w], "annotations": vgd_anns})
                interactive.append({"image": f"{split}/{image['file_name']}", "image_info": dict(image),
                                    "anns": int_anns})
            self.json(vgd, "img_vgdseg", "coco_vgd", "annotations", f"img_vgdseg_coco_{short}.json")
            self.json(interactive, "img_intseg", "coco_int", "annotations", f"coco_interactive_{short}_psalm.json")
        self.link(("img_genseg", "coco2017"), "img_vgdseg", "coco_vgd", "coco2017")
        self.link(("img_genseg", "coco2017"), "img_intseg", "coco_int", "coco2017")

    @staticmethod
    def _grandf_record(scene, image_id, file_name, h, w):
        anns = [{"bbox": syn._bbox(t["mask"]), "category_id": t["category_id"], "segmentation": _rle_json(t["mask"])}
                for t in scene["things"]]
        segments = [{"category_id": s["category_id"], "rle": _rle_json(s["mask"])} for s in scene["stuff"]]
        caption, groundings = syn._gcg_caption(anns, segments, CATEGORY_NAME)
        return {"image_id": image_id, "file_name": file_name, "caption": caption, "groundings": groundings,
                "height": h, "width": w}

    def grand_f(self, coco, ref_scenes, ref_ids):
        base = ("img_gcgseg", "grand_f")
        # GranD-f (its own images)
        records = []
        for k in range(self.n):
            scene = self.image_scene((1, 3))
            name = f"grandf_{k:04d}.jpg"
            self.jpg(scene["rgb"], *base, "images", "GranDf_HA_images", "train", name)
            records.append(self._grandf_record(scene, name[:-4], name, self.h, self.w))
        self.json(records, *base, "annotations", "train", "GranDf_HA_GCG_train.json")
        # OpenPSG (COCO 2017 train images)
        scenes, pan, _ = coco["train2017"]
        self.json([self._grandf_record(s, i["id"], f"train2017/{i['file_name']}", self.h, self.w)
                   for s, i in zip(scenes, pan["images"])], *base, "annotations", "train", "OpenPsgGCG_train.json")
        # RefCOCOg-GCG (COCO 2014 train images): the caption joins the referring phrases
        records = []
        for scene, image_id in list(zip(ref_scenes, ref_ids))[: self.n]:
            phrases = [f"the {t['name']}" if i == 0 else f"a {t['name']}" for i, t in enumerate(scene["things"])]
            records.append({str(image_id): {
                "img_file_name": f"COCO_train2014_{image_id:012d}.jpg", "caption": " next to ".join(phrases) + ".",
                "refs": [{"sentence": p, "segmentation": _rle_json(t["mask"])} for p, t in zip(phrases, scene["things"])],
                "height": self.h, "width": self.w}})
        self.json(records, *base, "annotations", "train", "RefCOCOg_GCG_train.json")
        # Flickr30k-GCG (COCO layout, tokens_positive spans)
        images, anns = [], []
        for k in range(self.n):
            scene = self.image_scene((1, 3))
            image_id = 9000 + k
            name = f"{image_id}.jpg"
            self.jpg(scene["rgb"], *base, "images", "flickr30k", "images", "train", name)
            phrases = [f"a {t['name']}" for t in scene["things"]]
            caption = "a photo showing " + " and ".join(phrases) + " outside."
            images.append({"id": image_id, "file_name": name, "caption": caption, "height": self.h, "width": self.w})
            pos = 0
            for phrase, thing in zip(phrases, scene["things"]):
                start = caption.index(phrase, pos)
                pos = start + len(phrase)
                anns.append({"id": self.next_id(), "image_id": image_id, "tokens_positive": [[start, pos]],
                             "sam_mask": _rle_json(thing["mask"]), "bbox": syn._bbox(thing["mask"])})
        self.json({"images": images, "annotations": anns}, *base, "annotations", "train",
                  "flickr_mergedGT_GCG_train.json")
        # val / test: images, the mask ground truth (COCO) and the caption ground truth (+ labels)
        for split in ("val", "test"):
            images, masks, captions = [], [], []
            for k in range(self.n):
                scene = self.image_scene((1, 3))
                name = f"{split}_{k:04d}.jpg"
                self.jpg(scene["rgb"], *base, "images", "GranDf_HA_images", "val_test", name)
                record = self._grandf_record(scene, name[:-4], name, self.h, self.w)
                images.append({"id": name[:-4], "file_name": name, "height": self.h, "width": self.w})
                labels = []
                for phrase, g in sorted(record["groundings"].items(), key=lambda kv: kv[1]["token_positives"][0]):
                    labels.append(phrase)
                    masks.append({"id": self.next_id(), "image_id": name[:-4], "category_id": 1, "iscrowd": 0,
                                  "segmentation": merge_rles(g["rle_masks"], self.h, self.w)})
                captions.append({"id": len(captions) + 1, "image_id": name[:-4], "caption": record["caption"],
                                 "labels": labels})
            self.json({"images": images, "annotations": masks, "categories": [{"id": 1, "name": "object"}]},
                      *base, "annotations", "val_test", f"{split}_gcg_coco_mask_gt.json")
            self.json({"images": images, "annotations": captions}, *base, "annotations", "val_test",
                      f"{split}_gcg_coco_caption_gt.json")
        self.link(("img_genseg", "coco2017"), *base, "images", "coco2017")
        self.link(("img_genseg", "coco2014"), *base, "images", "coco2014")

    # ------------------------------------------------------------------ video helpers
    def frame_names(self, count=None, step=5):
        return [f"{step * t:05d}" for t in range(count or self.frames)]

    def write_frames(self, scene, folder: tuple, names, ext=".jpg"):
        for rgb, name in zip(scene["frames"], names):
            self.jpg(rgb, *folder, f"{name}{ext}")

    def palette_pngs(self, scene, folder: tuple, names):
        """Palette PNGs (pixel = object id = thing index + 1) for every frame."""
        for t, name in enumerate(names):
            ids = np.zeros((self.h, self.w), np.uint8)
            for k, thing in enumerate(scene["things"]):
                if thing["masks"][t] is not None:
                    ids[thing["masks"][t]] = k + 1
            self.png(ids, *folder, f"{name}.png", palette=True)

    def first_frame_pngs(self, scene, folder: tuple, names):
        """YouTube-VOS valid's annotations: a palette PNG on each frame where objects first appear,
        holding only those objects (pixel = thing index + 1)."""
        starts: dict = {}
        for k, thing in enumerate(scene["things"]):
            first = next(t for t, m in enumerate(thing["masks"]) if m is not None)
            starts.setdefault(first, []).append(k)
        for t, things in sorted(starts.items()):
            ids = np.zeros((self.h, self.w), np.uint8)
            for k in things:
                ids[scene["things"][k]["masks"][t]] = k + 1
            self.png(ids, *folder, f"{names[t]}.png", palette=True)

    # ------------------------------------------------------------------ video datasets
    def video_chatgpt(self):
        qas = []
        for k in range(self.videos):
            scene = self.video_scene()
            vid = f"v_mini{k:04d}"
            path = self.path("vid_chat", "video_chatgpt", "ActivityNet", "train", f"{vid}.mp4")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_video_file(path, scene["frames"])
            names = " and ".join(f"a {t['name']}" for t in scene["things"])
            qas.append({"video_id": vid, "q": "What moves in the video?", "a": f"{names.capitalize()} moving slowly."})
            qas.append({"video_id": vid, "q": "What is the background?",
                        "a": "The " + " and the ".join(s["name"] for s in scene["stuff"]) + "."})
        self.json(qas, "vid_chat", "video_chatgpt", "VideoInstruct100K.json")

    def ytvis19(self):
        """YouTube-VIS 2019 train (annotated) and valid (videos only); returns {split: [(vid, id, scene)]}."""
        out = {}
        cats = [{"id": c["id"], "name": c["name"]} for c in THING_CATEGORIES]
        for split in ("train", "valid"):
            videos, tracks, items = [], [], []
            for k in range(self.videos):
                scene = self.video_scene()
                vid_num = (1 if split == "train" else 101) + k
                vid = f"{vid_num:08x}"
                names = self.frame_names()
                self.write_frames(scene, ("vid_genseg", "ytvis19", split, "JPEGImages", vid), names)
                videos.append({"id": vid_num, "file_names": [f"{vid}/{n}.jpg" for n in names], "height": self.h,
                               "width": self.w, "length": len(names)})
                for thing in scene["things"]:
                    thing["track_id"] = len(tracks) + 1
                    tracks.append({"id": len(tracks) + 1, "video_id": vid_num, "category_id": thing["category_id"],
                                   "iscrowd": 0, "height": self.h, "width": self.w, "length": 1,
                                   "segmentations": [None if m is None else _rle_json(m) for m in thing["masks"]],
                                   "areas": [None if m is None else int(m.sum()) for m in thing["masks"]],
                                   "bboxes": [None if m is None else syn._bbox(m) for m in thing["masks"]]})
                items.append((vid, vid_num, scene, names))
            data = {"videos": videos, "categories": cats,
                    "annotations": tracks if split == "train" else None}
            self.json(data, "vid_genseg", "ytvis19", split, f"{split}.json")
            out[split] = items
        return out

    def ytvis21(self):
        videos = []
        for k in range(self.videos):
            scene = self.video_scene()
            vid = f"{201 + k:08x}"
            names = self.frame_names()
            self.write_frames(scene, ("vid_ovseg", "ytvis21", "valid", "JPEGImages", vid), names)
            videos.append({"id": 201 + k, "file_names": [f"{vid}/{n}.jpg" for n in names], "height": self.h,
                           "width": self.w, "length": len(names)})
        self.json({"videos": videos, "annotations": None,
                   "categories": [{"id": c["id"], "name": c["name"]} for c in THING_CATEGORIES]},
                  "vid_ovseg", "ytvis21", "valid", "instances.json")

    def vipseg(self):
        """VIPSeg train / val (frames named .png in the JSON, .jpg on disk, as released)."""
        base = ("vid_genseg", "vipseg_720p")
        out = {}
        for split in ("train", "val"):
            videos, anns, items = [], [], []
            for k in range(self.videos):
                scene = self.video_scene()
                vid = f"{split}_{k:03d}_mini"
                names = [f"{t:08d}" for t in range(self.frames)]
                self.write_frames(scene, base + ("images", vid), names)
                for k2, thing in enumerate(scene["things"]):
                    thing["seg_id"] = 100 * thing["category_id"] + k2 + 1
                for seg in scene["stuff"]:
                    seg["seg_id"] = seg["category_id"]
                images, frame_anns = [], []
                for t, name in enumerate(names):
                    ids = np.zeros((self.h, self.w), np.int64)
                    segments = []
                    for seg in scene["things"] + scene["stuff"]:
                        if seg["masks"][t] is not None:
                            ids[seg["masks"][t]] = seg["seg_id"]
                            segments.append({"id": seg["seg_id"], "category_id": seg["category_id"], "iscrowd": 0})
                    self.png(id_to_rgb(ids), *base, "panomasksRGB", vid, f"{name}.png")
                    images.append({"id": f"{vid}_{name}", "file_name": f"{name}.png", "height": self.h, "width": self.w})
                    frame_anns.append({"image_id": f"{vid}_{name}", "file_name": f"{name}.png",
                                       "segments_info": segments})
                videos.append({"video_id": vid, "images": images})
                anns.append({"video_id": vid, "annotations": frame_anns})
                items.append((vid, scene, names))
            self.json({"videos": videos, "annotations": anns, "categories": syn.CATEGORIES}, *base,
                      f"panoptic_gt_VIPSeg_{split}.json")
            with open(self.path(*base, f"{split}.txt"), "w") as f:
                f.write("".join(f"{v['video_id']}\n" for v in videos))
            out[split] = items
        return out

    def vspw(self):
        base = ("vid_genseg", "vspw_480p")
        labels = {"others": 0, **{c["name"]: c["id"] for c in syn.CATEGORIES}}
        self.json(labels, *base, "label_num_dic_final.json")
        for split in ("train", "val"):
            vids = []
            # val videos are long enough for mVC_8 and mVC_16 (windows of n + 1 frames), several clips
            count = self.frames if split == "train" else max(self.frames, 17)
            for k in range(self.videos):
                scene = self.video_scene(frames=count)
                vid = f"{k + 1}_{split}mini"
                names = [f"{t:08d}" for t in range(count)]
                self.write_frames(scene, base + ("images", vid), names)
                for t, name in enumerate(names):
                    classes = np.zeros((self.h, self.w), np.uint8)
                    for seg in scene["stuff"] + scene["things"]:
                        if seg["masks"][t] is not None:
                            classes[seg["masks"][t]] = seg["category_id"]
                    self.png(classes, *base, "semmasks", vid, f"{name}.png")
                vids.append(vid)
            with open(self.path(*base, f"{split}.txt"), "w") as f:
                f.write("".join(f"{v}\n" for v in vids))

    def _expressions(self, scene):
        objs = [t["obj"] for t in scene["things"]]
        first = [t["masks"][0] for t in scene["things"]]
        return syn._expressions(objs, first, self.rng, motion=True)

    def ytrvos21(self):
        """Ref-YouTube-VOS 2021: train (palette masks), valid (frames only) and the test list."""
        base = ("vid_refseg", "ytrvos21")
        items = []
        for split in ("train", "valid"):
            meta, objects_meta = {}, {}
            for k in range(self.videos + (1 if split == "valid" else 0)):
                scene = self.video_scene()
                vid = f"{split[0]}{k:04d}mini"
                names = self.frame_names()
                self.write_frames(scene, base + (split, "JPEGImages", vid), names)
                exps = {}
                for j, sents in sorted(self._expressions(scene).items()):
                    for s in sents[:2]:
                        exps[str(len(exps))] = {"exp": s, "obj_id": str(j + 1)} if split == "train" else {"exp": s}
                meta[vid] = {"expressions": exps, "frames": names}
                if split == "train":
                    self.palette_pngs(scene, base + (split, "Annotations", vid), names)
                    objects_meta[vid] = {"objects": {str(j + 1): {"category": t["name"], "frames": names}
                                                     for j, t in enumerate(scene["things"])}}
                    items.append((vid, scene, names))
            self.json({"videos": meta}, *base, "meta_expressions", split, "meta_expressions.json")
            if split == "train":
                self.json({"videos": objects_meta}, *base, split, "meta.json")
            else:   # the released valid meta file also lists the test videos; the last one is one
                test_vid = sorted(meta)[-1]
                self.json({"videos": {test_vid: meta[test_vid]}}, *base, "meta_expressions", "test",
                          "meta_expressions.json")
        return items

    def davis17(self):
        base = ("vid_refseg", "davis17")
        for split in ("train", "val"):
            meta = {}
            for k in range(self.videos):
                scene = self.video_scene()
                vid = f"{split}-mini-{k}"
                names = [f"{t:05d}" for t in range(self.frames)]
                self.write_frames(scene, base + ("davis_supervised", "JPEGImages", "480p", vid), names)
                self.palette_pngs(scene, base + ("davis_supervised", "Annotations", "480p", vid), names)
                exps = {}
                for j, sents in sorted(self._expressions(scene).items()):
                    for s in sents[:2]:
                        exps[str(len(exps))] = {"exp": s, "obj_id": str(j + 1)}
                meta[vid] = {"expressions": exps, "frames": names}
            self.json({"videos": meta}, *base, "meta_expressions", split, "meta_expressions.json")

    def revos(self):
        base = ("vid_reaseg", "revos")
        mask_dict = {}
        for split in ("train", "valid"):
            meta = {}
            for k in range(self.videos):
                scene = self.video_scene()
                vid = f"revos_{split}_{k}"
                names = self.frame_names()
                self.write_frames(scene, base + ("JPEGImages", vid), names)
                anno = {}
                for j, thing in enumerate(scene["things"]):
                    anno_id = str(self.next_id())
                    mask_dict[anno_id] = [None if m is None else _rle_json(m) for m in thing["masks"]]
                    anno[j] = anno_id
                exps = {}
                for j, sents in sorted(self._expressions(scene).items()):
                    obj = scene["things"][j]["obj"]
                    texts = [sents[0], f"Which object here is {obj['color']} and keeps moving?"]
                    for text in texts:
                        exps[str(len(exps))] = {"exp": text, "obj_id": [j + 1], "anno_id": [anno[j]],
                                                "type_id": 1 if text.endswith("?") else 0}
                meta[vid] = {"expressions": exps, "frames": names, "vid_id": k}
            self.json({"videos": meta}, *base, "annotations", f"meta_expressions_{split}_.json")
        self.json(mask_dict, *base, "annotations", "mask_dict.json")

    def video_vgd(self, ytvis, vipseg):
        """Video VGD files over YouTube-VIS 2019 (train / valid videos) and VIPSeg (train / val)."""
        def records(items, file_of):
            out = []
            for vid, scene, names in items:
                per_frame = []
                for t in range(len(names)):
                    anns = []
                    for k, thing in enumerate(scene["things"]):
                        m = thing["masks"][t]
                        if m is None:
                            continue
                        drawn = {kind: prompts.synthesize(m, kind, self.rng) for kind in prompts.PROMPT_KINDS}
                        anns.append({"id": (k + 1) * 100 + t, "category_id": thing["category_id"],
                                     "segmentation": _rle_json(m),
                                     "visual_prompts": {f"{kind}_visual_prompt": _rle_json(d)
                                                        for kind, d in drawn.items() if d.any()}})
                    per_frame.append(anns)
                out.append({"video_id": vid, "image_files": [file_of(vid, n) for n in names],
                            "image_sizes": [[self.h, self.w]] * len(names), "annotations": per_frame})
            return out

        for split, vis_split in (("train", "train"), ("val", "valid")):
            items = [(vid, scene, names) for vid, _, scene, names in ytvis[vis_split]]
            self.json(records(items, lambda v, n: f"{v}/{n}.jpg"), "vid_vgdseg", "ytvis_vgd", "annotations",
                      f"vid_vgdseg_yt19_{split}.json")
            self.json(records(vipseg[split], lambda v, n: f"{v}/{n}.jpg"), "vid_vgdseg", "vipseg_vgd", "annotations",
                      f"vid_vgdseg_vipseg_{split}.json")
        self.link(("vid_genseg", "ytvis19"), "vid_vgdseg", "ytvis_vgd", "ytvis19")
        self.link(("vid_genseg", "vipseg_720p"), "vid_vgdseg", "vipseg_vgd", "vipseg_720p")

    def ytvos19(self):
        base = ("vid_objseg", "ytvos19")
        for split in ("train", "valid"):
            meta = {}
            for k in range(self.videos):
                scene = self.video_scene()
                vid = f"{split[0]}vos{k:04d}"
                names = self.frame_names()
                self.write_frames(scene, base + (split, "JPEGImages", vid), names)
                objects = {}
                for j, t in enumerate(scene["things"]):
                    visible = [n for n, m in zip(names, t["masks"]) if m is not None]
                    # valid lists an object's frames from its first appearance to the end (the
                    # frames the server scores), not where it is visible
                    frames = visible if split == "train" else names[names.index(visible[0]):]
                    objects[str(j + 1)] = {"category": t["name"].split()[-1], "frames": frames}
                if split == "train":
                    self.palette_pngs(scene, base + (split, "Annotations", vid), names)
                else:   # as released: each object's first-frame mask only, in the PNG of that frame
                    self.first_frame_pngs(scene, base + (split, "Annotations", vid), names)
                meta[vid] = {"objects": objects}
            self.json({"videos": meta}, *base, split, "meta.json")

    def video_glamm(self, ytvis, ytrvos):
        base = ("vid_gcgseg", "video_glamm")
        markup = _markup_caption
        # MeViS-GCG: captions + MeViS meta_expressions / mask_dict
        self.mevis_gcg("train", "mevis", [self.frames] * self.videos)
        # YouTube-VOS-GCG: captions over the Ref-YouTube-VOS train videos (palette object ids)
        for vid, scene, _ in ytrvos:
            self.json(markup(scene, [j + 1 for j in range(len(scene["things"]))]), *base, "ytvos_gcg", "train",
                      f"{vid}.json")
        self.link(("vid_refseg", "ytrvos21"), *base, "ytrvos21")
        # VidSTG / HC-STVG GCG: frames and one binary PNG per object and frame
        for subset in ("vidstg", "hcstvg"):
            for k in range(self.videos):
                scene = self.video_scene()
                vid = f"{subset}{k:04d}"
                names = [f"{t:05d}" for t in range(self.frames)]
                self.write_frames(scene, base + (f"{subset}_gcg", "train", vid, "frames"), names)
                for j, thing in enumerate(scene["things"]):
                    for name, m in zip(names, thing["masks"]):
                        if m is not None:
                            self.png((m * 255).astype(np.uint8), *base, f"{subset}_gcg", "train", vid, "masks",
                                     f"{j:03d}", f"{name}.png")
                self.json(markup(scene, list(range(len(scene["things"])))), *base, f"{subset}_gcg", "train_captions",
                          f"{vid}.json")
        # Video GCG (BURST / YouTube-VIS dense captions) over the YouTube-VIS 2019 train videos
        videos, anns = [], []
        for vid, vid_num, scene, names in ytvis["train"]:
            words = ["the"]
            token_pos, mask_ids = [], []
            for j, thing in enumerate(scene["things"]):
                if j:
                    words += ["and", "the"]
                words += thing["name"].split()
                token_pos.append(len(words) - 1)      # the shape word
                ann_id = 10000 + thing["track_id"]
                mask_ids.append(ann_id)
                anns.append({"id": ann_id, "segmentations": [None if m is None else _rle_json(m)
                                                             for m in thing["masks"]]})
            words += ["move", "slowly."]
            videos.append({"id": vid_num, "file_names": [f"{vid}/{n}.jpg" for n in names], "height": self.h,
                           "width": self.w, "dataset_split": "yt19",
                           "dense_cap": {"caption": " ".join(words), "token_pos": token_pos, "mask_id": mask_ids}})
        self.json({"videos": videos, "annotations": anns}, *base, "video_gcg", "instruction_data", "train.json")
        self.link(("vid_genseg", "ytvis19"), *base, "video_gcg", "yt19")
        self.link(("vid_genseg", "ytvis19"), *base, "ytvis19")
        self.video_glamm_eval()

    def mevis_gcg(self, split: str, prefix: str, frame_counts: list[int]):
        """MeViS-GCG under video_glamm: one video per frame count, its markup caption and the MeViS
        meta_expressions.json / mask_dict.json of ``split``."""
        base = ("vid_gcgseg", "video_glamm")
        meta, mask_dict = {}, {}
        for k, count in enumerate(frame_counts):
            scene = self.video_scene(frames=count)
            vid = f"{prefix}{k:04d}"
            names = self.frame_names(count)
            self.write_frames(scene, base + ("mevis", split, "JPEGImages", vid), names)
            exps = {}
            for j, thing in enumerate(scene["things"]):
                anno = str(self.next_id())
                mask_dict[anno] = [None if m is None else _rle_json(m) for m in thing["masks"]]
                exps[str(j)] = {"exp": f"the {thing['name']}", "obj_id": [j], "anno_id": [anno]}
            meta[vid] = {"expressions": exps, "frames": names}
            self.json(_markup_caption(scene, list(range(len(scene["things"])))), *base, "mevis_gcg", split,
                      f"{vid}.json")
        self.json({"videos": meta}, *base, "mevis", split, "meta_expressions.json")
        self.json(mask_dict, *base, "mevis", split, "mask_dict.json")

    def video_glamm_eval(self):
        """The evaluation sets of X2SAM's video GCG: MeViS-GCG valid_u (its last video 18 frames
        long, two 16-frame span clips), VidSTG-GCG val (PNG frames), the BURST / YouTube-VIS
        dense-caption test file (frames under {subset}/val/)."""
        base, markup = ("vid_gcgseg", "video_glamm"), _markup_caption
        # the last video 18 frames long (two clips); the others short, for a quick first sample
        self.mevis_gcg("valid_u", "mevisval", [self.frames] * (self.videos - 1) + [max(self.frames, 18)])
        for k in range(self.videos):
            scene = self.video_scene()
            vid = f"vidstgval{k:04d}"
            names = [f"{t:05d}" for t in range(self.frames)]
            for rgb, name in zip(scene["frames"], names):
                self.png(rgb, *base, "vidstg_gcg", "val", vid, "frames", f"{name}.png")
            for j, thing in enumerate(scene["things"]):
                for name, m in zip(names, thing["masks"]):
                    if m is not None:
                        self.png((m * 255).astype(np.uint8), *base, "vidstg_gcg", "val", vid, "masks", f"{j:03d}",
                                 f"{name}.png")
            self.json(markup(scene, list(range(len(scene["things"])))), *base, "vidstg_gcg", "val_captions",
                      f"{vid}.json")
        videos, anns = [], []
        for k in range(self.videos):
            scene = self.video_scene()
            vid, names = f"burstval{k:04d}", self.frame_names()
            self.write_frames(scene, base + ("video_gcg", "YFCC100M", "val", vid), names)
            words, token_pos, mask_ids = ["the"], [], []
            for j, thing in enumerate(scene["things"]):
                if j:
                    words += ["and", "the"]
                words += thing["name"].split()
                token_pos.append(len(words) - 1)
                mask_ids.append(self.next_id())
                anns.append({"id": mask_ids[-1], "segmentations": [None if m is None else _rle_json(m)
                                                                  for m in thing["masks"]]})
            words += ["move", "slowly."]
            videos.append({"id": 500 + k, "file_names": [f"{vid}/{n}.jpg" for n in names], "height": self.h,
                           "width": self.w, "length": len(names), "dataset_split": "YFCC100M",
                           "dense_cap": {"caption": " ".join(words), "token_pos": token_pos, "mask_id": mask_ids}})
        self.json({"videos": videos, "annotations": anns}, *base, "video_gcg", "instruction_data", "test.json")

    # ------------------------------------------------------------------ chat benchmarks
    def _b64_jpeg(self, rgb) -> str:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        return base64.b64encode(buf.getvalue()).decode()

    def _tsv(self, rows, *parts) -> None:
        """As pandas' DataFrame.to_csv(sep="\\t", index=False) writes VLMEvalKit's LMUData TSVs."""
        path = self.path(*parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, keys, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    def _choices(self, right: str) -> tuple[list[str], str]:
        """Four options (the right one at a random place among other shape names) and its letter."""
        others = [c["name"] for c in THING_CATEGORIES if c["name"] != right]
        options = [str(o) for o in self.rng.choice(others, 3, replace=False)]
        k = int(self.rng.integers(4))
        options.insert(k, right)
        return options, "ABCD"[k]

    def _text(self, text: str, *parts) -> None:
        path = self.path(*parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    @staticmethod
    def _srt(shape: str) -> str:
        """Video-MME's subtitles of a miniature video (8 fps): three cues over its first second."""
        cues = [("00:00:00,000", "00:00:00,300", f"A {shape} appears."),
                ("00:00:00,300", "00:00:00,600", f"The {shape}\nstarts to move."),
                ("00:00:00,600", "00:00:01,000", f"<i>The {shape} keeps moving.</i>")]
        return "".join(f"{k}\n{a} --> {b}\n{text}\n\n" for k, (a, b, text) in enumerate(cues, 1))

    @staticmethod
    def _lvb_subtitles(shape: str, k: int) -> list[dict]:
        """LongVideoBench's subtitles of a miniature video, in its two entry formats: a line at the
        start, one after the video's end (no frame under it), one running to the end (end null)."""
        if k % 2:
            return [{"start": "00:00:00.000", "end": "00:00:00.400", "line": f"A {shape} appears."},
                    {"start": "00:00:05.000", "end": "00:00:07.000", "line": "Credits roll."}]
        return [{"timestamp": [0.0, 0.4], "text": f"A {shape} appears."},
                {"timestamp": [5.0, 7.0], "text": "Credits roll."},
                {"timestamp": [0.6, None], "text": f"The {shape} keeps moving."}]

    def lmu_data(self):
        """The chat benchmarks where X2SAM's VLMEvalKit runs find them (datas/LMUData): the image
        TSVs (MME, POPE, MMBench dev, SEED-Bench image, AI2D test; base64 JPEGs) and the video sets
        in their Hugging Face layouts (Video-MME parquet and .srt subtitles, MVBench / MLVU /
        LongVideoBench JSON, LongVideoBench's subtitle JSON)."""
        base = ("LMUData",)
        mme, pope, choice = [], [], {"MMBench_DEV_EN": [], "SEEDBench_IMG": [], "AI2D_TEST": []}
        absent = [c["name"] for c in THING_CATEGORIES]
        for k in range(self.n):
            scene = self.image_scene()
            image = self._b64_jpeg(scene["rgb"])
            shown = scene["things"][0]["name"] if scene["things"] else None
            missing = next(n for n in absent if all(t["name"] != n for t in scene["things"]))
            # MME: a yes and a no question on each image (its acc+ pair), perception and cognition
            for j, (category, name) in enumerate((("existence", shown or missing), ("existence", missing))):
                category = category if k % 2 == 0 else "commonsense_reasoning"
                mme.append({"index": 2 * k + j, "image": image if j == 0 else str(2 * k),
                            "question": f"Is there a {name} in this image? Please answer yes or no.",
                            "answer": "Yes" if name == shown else "No", "category": category,
                            "image_path": f"mini_{k:04d}.jpg"})
                pope.append({"index": 2 * k + j, "image": image if j == 0 else str(2 * k),
                             "question": f"Is there a {name} in the image?", "answer": "yes" if name == shown else "no",
                             "category": ("adversarial", "popular", "random")[k % 3]})
            right = shown or scene["stuff"][0]["name"]
            for name, rows in choice.items():
                options, letter = self._choices(right)
                row = {"index": k, "question": "Which of these is in the image?", **dict(zip("ABCD", options)),
                       "answer": letter, "category": "object_localization" if name != "AI2D_TEST" else "shapes",
                       "image": image}
                if name == "MMBench_DEV_EN":
                    row.update({"hint": "", "l2-category": "Fine-grained Perception (instance-level)", "split": "dev"})
                rows.append(row)
        self._tsv(mme, *base, "MME.tsv")
        self._tsv(pope, *base, "POPE.tsv")
        for name, rows in choice.items():
            self._tsv(rows, *base, f"{name}.tsv")
        # video benchmarks: one question per video, about the shape that moves in it
        videomme, mvbench, mlvu, lvb = [], [], [], []
        for k in range(self.videos):
            scene = self.video_scene()
            right = scene["things"][0]["name"]
            vid = f"mini{k:04d}"

            def video(*parts):
                path = self.path(*base, *parts)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_video_file(path, scene["frames"])

            options, letter = self._choices(right)
            video("datasets--lmms-lab--Video-MME", "video", f"{vid}.mp4")
            self._text(self._srt(right), *base, "datasets--lmms-lab--Video-MME", "subtitle", f"{vid}.srt")
            videomme.append({"video_id": f"{k:03d}", "duration": "short", "domain": "Knowledge",
                             "sub_category": "Shapes", "url": f"https://www.youtube.com/watch?v={vid}", "videoID": vid,
                             "question_id": f"{k:03d}-1", "task_type": "Object Recognition",
                             "question": "Which shape moves in the video?",
                             "options": [f"{L}. {o}" for L, o in zip("ABCD", options)], "answer": letter})
            options, _ = self._choices(right)
            video("datasets--OpenGVLab--MVBench", "video", "ssv2_video", f"{vid}.mp4")
            mvbench.append({"video": f"{vid}.mp4", "question": "Which shape moves in the video?", "candidates": options,
                            "answer": right})
            options, _ = self._choices(right)
            video("datasets--MLVU--MVLU", "MLVU", "video", "1_plotQA", f"{vid}.mp4")
            mlvu.append({"video": f"{vid}.mp4", "duration": 1, "question": "Which shape moves in the video?",
                         "candidates": options, "answer": right, "question_type": "plotQA"})
            options, letter = self._choices(right)
            video("datasets--longvideobench--LongVideoBench", "videos", f"{vid}.mp4")
            lvb.append({"video_id": vid, "id": f"{vid}_0", "video_path": f"{vid}.mp4",
                        "question": "Which shape moves in the video?", "candidates": options,
                        "correct_choice": "ABCD".index(letter), "duration_group": 15, "question_category": "O2E",
                        "duration": self.frames / 8, "subtitle_path": f"{vid}_en.json",
                        "starting_timestamp_for_subtitles": 0})
            self.json(self._lvb_subtitles(right, k), *base, "datasets--longvideobench--LongVideoBench", "subtitles",
                      f"{vid}_en.json")
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = self.path(*base, "datasets--lmms-lab--Video-MME", "videomme", "test-00000-of-00001.parquet")
        os.makedirs(os.path.dirname(parquet), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(videomme), parquet)
        self.json(mvbench, *base, "datasets--OpenGVLab--MVBench", "json", "action_antonym.json")
        self.json(mlvu, *base, "datasets--MLVU--MVLU", "MLVU", "json", "1_plotQA.json")
        self.json(lvb, *base, "datasets--longvideobench--LongVideoBench", "lvb_val.json")

    def write_all(self):
        self.sa1b()
        coco = self.coco2017()
        self.ade20k()
        ref_scenes, ref_ids = self.refcocos()
        self.lisa()
        self.llava(coco)
        self.prompt_sets(coco)
        self.grand_f(coco, ref_scenes, ref_ids)
        self.video_chatgpt()
        ytvis = self.ytvis19()
        self.ytvis21()
        vipseg = self.vipseg()
        self.vspw()
        ytrvos = self.ytrvos21()
        self.davis17()
        self.revos()
        self.video_vgd(ytvis, vipseg)
        self.ytvos19()
        self.video_glamm(ytvis, ytrvos)
        self.lmu_data()


def write_miniature(root: str, *, seed: int = 0, images_per_dataset: int = 2, videos_per_dataset: int = 2,
                    frames: int = 8, size=(64, 96), overwrite: bool = False) -> str:
    """Writes the miniature data tree under `root` (atomically: a temporary folder renamed) and
    returns `root`. `images_per_dataset` images per image split (RefCOCO: 4x, one per split),
    `videos_per_dataset` videos of `frames` frames per video split, frames of `size` (h, w)."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(height, width) < 32:
        raise ValueError(f"size must be at least 32 pixels per side, got {height}x{width}")
    if images_per_dataset < 1 or videos_per_dataset < 1 or frames < 1:
        raise ValueError("images_per_dataset, videos_per_dataset and frames must be >= 1")
    if os.path.exists(root) and os.listdir(root) and not overwrite:
        raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True)")
    parent = os.path.dirname(os.path.abspath(root)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".miniature-", dir=parent)
    try:
        _Writer(tmp, seed=seed, images=images_per_dataset, videos=videos_per_dataset, frames=frames,
                size=(height, width)).write_all()
        record = {"version": VERSION, "seed": seed, "images_per_dataset": images_per_dataset,
                  "videos_per_dataset": videos_per_dataset, "frames": frames, "size": [height, width]}
        syn._write_json(os.path.join(tmp, RECORD), record)
        syn.replace_tree(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_miniature(root: str, **kwargs) -> str:
    """Writes the miniature into `root` unless `root/miniature.json` is there (then it is kept as
    it is, with a warning when it was written with other arguments); a non-empty `root` without
    the record is not replaced (FileExistsError)."""
    record_path = os.path.join(root, RECORD)
    if not os.path.exists(record_path):
        return write_miniature(root, **kwargs)
    with open(record_path) as f:
        record = json.load(f)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    differ = sorted(k for k, v in wanted.items() if k in record and v != record[k])
    if differ:
        logger.warning("%s: the miniature there was written with other arguments (%s); using it as it is",
                       record_path, ", ".join(f"{k}={record[k]}" for k in differ))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the miniature of every X2SAM dataset (official layout).")
    parser.add_argument("--root", required=True, help="the data root to write (data.root of the configs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=2, help="images per image split")
    parser.add_argument("--videos", type=int, default=2, help="videos per video split")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    write_miniature(args.root, seed=args.seed, images_per_dataset=args.images, videos_per_dataset=args.videos,
                    frames=args.frames, size=tuple(args.size), overwrite=args.overwrite)
    print(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
