"""The main job: the most complete end-to-end path of x2sam_jax that runs today.

    python -m x2sam_jax.demo [--out runs/demo] [--num-images 40] [--num-videos 6] ...

Steps (all on the built-in synthetic data, no network, a few minutes on a 2-core CPU):
  1. generate the synthetic dataset (COCO panoptic, RefCOCO, Ref-YouTube-VOS formats) in OUT/data;
  2. build the tiny tokenizer and the tiny X2SAM (token ids and vocabulary from the tokenizer),
     born sharded over every local device;
  3. run the Grain evaluation pipeline (panoptic and referring image batches, a Ref-YouTube-VOS
     clip) and a micro-batch of the training pipeline (panoptic + referring mixture) through the
     jitted, teacher-forced forward pass (one compiled program per padded shape: two in all);
  4. post-process: per condition the best query (class score) -> mask (logit > 0) on the S/4 grid;
     mean IoU against the batch's ground truth; overlays upsampled to the original frames in
     OUT/overlays (PNG per image, GIF per video);
  5. save the model with x2sam_jax.save, reload it with x2sam_jax.load, compare mask logits;
  6. write OUT/summary.json and print a short summary.
The model is randomly initialised: IoU numbers are near chance, and the summary says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("x2sam_jax.demo")

CHANCE_NOTE = ("The model is randomly initialised (no training exists yet): IoU is near chance, compare it "
               "with the all-foreground baseline. The pipeline, the model, the post-processing and the "
               "checkpoint round trip are what this run demonstrates.")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out: str = "runs/demo"
    num_images: int = 40               # synthetic images (a quarter of them form the val split)
    num_videos: int = 6                # synthetic videos (a quarter of them, at least one, are val)
    frames: int = 8                    # frames per video = the clip length of evaluation
    image_size: tuple[int, int] = (120, 160)
    image_batch_size: int = 2          # per device (the mesh's batch axes)
    video_batch_size: int = 1          # clips per device
    image_batches: int = 2             # batches per image source (panoptic, referring)
    video_batches: int = 1
    train_batches: int = 1             # micro-batches of the training pipeline (image sources)
    seed: int = 0
    overwrite: bool = False
    fast_compile: bool | None = None   # None: on for CPU (see compiler_options)


# ---------------------------------------------------------------------------------- set-up
def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """OUT may be new, empty, a previous demo run (it holds summary.json), or anything with --overwrite."""
    if out.exists() and any(out.iterdir()):
        if not (overwrite or (out / "summary.json").exists()):
            raise FileExistsError(f"{out} is not empty and holds no previous demo run (summary.json); "
                                  "pass --overwrite to replace it or choose another --out")
        for name in ("data", "overlays", "checkpoint", "summary.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build_config(tokenizer):
    """The tiny X2SAM with the tokenizer's special-token ids and a vocabulary that covers it."""
    from x2sam_jax.data.tokenizer import tiny_x2sam_config

    return tiny_x2sam_config(tokenizer)


def demo_buckets():
    """Few bucket values, so every image batch shares one program and every clip another."""
    from x2sam_jax.data.batching import BucketConfig

    return BucketConfig(seq_lengths=(512, 1024), patch_counts=(512,), grids=(1,), frames=(1, 8),
                        instances=(16,), conditions=(32,), regions=(1,), seg_tokens=(16,))


def compiler_options(fast_compile: bool | None) -> dict | None:
    """XLA options of the demo's programs (``x2sam_jax.sharding.compiler_options``): on CPU the
    demo compiles three programs and runs a handful of steps, so fast compiles win."""
    from x2sam_jax.sharding import compiler_options as options

    return options(fast_compile)


def build_model(config, mesh, seed: int, options: dict | None = None):
    from flax import nnx

    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.sharding import create_sharded

    return create_sharded(lambda: X2SAM(config, rngs=nnx.Rngs(seed)), mesh, compiler_options=options)


# ---------------------------------------------------------------------------------- forward
def make_forward(options: dict | None = None):
    """forward(model, inputs) -> (mask logits, class logits, mean LM loss on the answer tokens):
    the evaluation forward (x2sam_jax.eval.inference.make_forward) with the LM loss; `inputs` is
    what `model_inputs` returns. One program per batch shape, shared by every model of the same
    structure (the reloaded one included)."""
    from x2sam_jax.eval.inference import make_forward as eval_forward

    forward = eval_forward(options, with_lm_loss=True)

    def run(model, inputs):
        out = forward(model, *inputs)
        return out["mask_logits"], out["class_logits"], out["lm_loss"]

    run.programs = forward.programs
    return run


def model_inputs(batch: dict, mesh) -> tuple[dict, dict]:
    """(the model's arrays, the per-row arrays: region keys and labels), batch axis over
    ('data', 'fsdp') when the devices divide it."""
    from x2sam_jax.eval.inference import model_inputs as inputs, row_inputs

    return inputs(batch, mesh), row_inputs(batch, mesh, with_labels=True)


# ---------------------------------------------------------------------------------- post-processing
def condition_scores(class_logits: np.ndarray, cond_valid: np.ndarray, frame_valid: np.ndarray) -> np.ndarray:
    """Softmax over [real conditions, background] without the background, averaged over the
    valid frames: [B, T, Q, C + 1] -> [B, Q, C] (one query per condition for the whole clip)."""
    real = np.concatenate([cond_valid, np.ones_like(cond_valid[:, :1])], axis=1)[:, None, None, :]
    logits = np.where(real, class_logits.astype(np.float64), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights = frame_valid.astype(np.float64)[:, :, None, None]
    return (probs[..., :-1] * weights).sum(1) / np.maximum(weights.sum(1), 1)


def best_query_logits(mask_logits: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per condition the mask logits of its best-scoring query: ([B, T, C, h, w], query [B, C])."""
    best = scores.argmax(1)                                                   # [B, C]
    picked = np.take_along_axis(mask_logits, best[:, None, :, None, None], axis=2)
    return picked, best


def condition_targets(gt_masks: np.ndarray, gt_classes: np.ndarray, num_conditions: int) -> np.ndarray:
    """Union of the target masks answering each condition: [B, T, N, h, w] -> [B, T, C, h, w]."""
    onehot = gt_classes[:, :, None] == np.arange(num_conditions)[None, None]  # [B, N, C] (-1 never matches)
    return np.einsum("btnhw,bnc->btchw", gt_masks.astype(np.int32), onehot.astype(np.int32)) > 0


def grid_valid_hw(orig_hw, grid: int) -> tuple[int, int]:
    """The unpadded part of the S/4 grid (the ground truth's own longest-side resize)."""
    from x2sam_jax.data.transforms import longest_side_shape

    return longest_side_shape(int(orig_hw[0]), int(orig_hw[1]), grid)


def batch_ious(batch: dict, mask_logits: np.ndarray, class_logits: np.ndarray) -> list[dict]:
    """IoU of every (sample, condition with a target), pooled over the clip's valid frames, on
    the unpadded S/4 grid; also the IoU of an all-foreground mask (the chance reference)."""
    num_conditions = batch["cond_valid"].shape[1]
    scores = condition_scores(class_logits, batch["cond_valid"], batch["frame_valid"])
    picked, best = best_query_logits(mask_logits, scores)
    targets = condition_targets(batch["gt_masks"], batch["gt_classes"], num_conditions)
    rows = []
    for b in np.flatnonzero(batch["sample_valid"]):
        vh, vw = grid_valid_hw(batch["orig_hw"][b], picked.shape[-1])
        frames = batch["frame_valid"][b]
        for c in np.flatnonzero(batch["cond_valid"][b]):
            gt = targets[b, frames, c, :vh, :vw]
            if not gt.any():
                continue  # a listed category absent from the image: nothing to score
            pred = picked[b, frames, c, :vh, :vw] > 0
            union = np.logical_or(pred, gt).sum()
            rows.append({"sample": int(batch["sample_index"][b]), "condition": int(c), "query": int(best[b, c]),
                         "iou": float(np.logical_and(pred, gt).sum() / union),
                         "all_foreground_iou": float(gt.sum() / gt.size),
                         "score": float(scores[b, best[b, c], c])})
    return rows


def upsample_to_original(logits: np.ndarray, sam_size: int, sam_valid_hw, orig_hw) -> np.ndarray:
    """Mask logits on the S/4 grid [T, K, h, w] -> masks [T, K, H, W] at the original size
    (x2sam_jax.eval.postprocess.upsample, thresholded at 0)."""
    from x2sam_jax.eval.postprocess import upsample

    return upsample(logits, sam_size, sam_valid_hw, orig_hw) > 0


def grid_to_original(masks: np.ndarray, orig_hw) -> np.ndarray:
    """Ground-truth masks on the S/4 grid [T, K, h, w] -> nearest-neighbour at the original size."""
    vh, vw = grid_valid_hw(orig_hw, masks.shape[-1])
    height, width = int(orig_hw[0]), int(orig_hw[1])
    rows = np.minimum((np.arange(height) + 0.5) * vh / height, vh - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * vw / width, vw - 1).astype(int)
    return masks[..., rows[:, None], cols[None, :]]


def condition_labels(tokenizer, input_ids: np.ndarray, spans: np.ndarray) -> list[str]:
    """The text inside each <p>..</p> span (x2sam_jax.eval.evaluator.condition_texts)."""
    from x2sam_jax.eval.evaluator import condition_texts

    return condition_texts(tokenizer, input_ids, spans)


def draw_overlays(out_dir: Path, source, source_name: str, batch: dict, mask_logits: np.ndarray,
                  class_logits: np.ndarray, tokenizer, sam_size: int) -> list[str]:
    """One PNG (image) or GIF (clip) per valid sample: prediction | ground truth, with a legend of
    the conditions that have a target."""
    from x2sam_jax.data.transforms import load_image
    from x2sam_jax.eval import visualize

    scores = condition_scores(class_logits, batch["cond_valid"], batch["frame_valid"])
    picked, _ = best_query_logits(mask_logits, scores)
    targets = condition_targets(batch["gt_masks"], batch["gt_classes"], batch["cond_valid"].shape[1])
    written = []
    for b in np.flatnonzero(batch["sample_valid"]):
        frames = int(batch["frame_valid"][b].sum())
        shown = [c for c in np.flatnonzero(batch["cond_valid"][b]) if targets[b, :frames, c].any()]
        if not shown:
            continue
        index = int(batch["sample_index"][b])
        sample = source[index]
        images = [load_image(sample.frames[int(t)]) for t in batch["clip_frames"][b, :frames]]  # the row's clip
        pred = upsample_to_original(picked[b, :frames][:, shown], sam_size, batch["sam_valid_hw"][b, 0],
                                    batch["orig_hw"][b])
        gt = grid_to_original(targets[b, :frames][:, shown], batch["orig_hw"][b])
        colors = visualize.palette(len(shown))
        labels = condition_labels(tokenizer, batch["input_ids"][b], batch["cond_spans"][b][shown])
        pages = [visualize.add_legend(visualize.side_by_side(
            [visualize.overlay(img, pred[t], colors), visualize.overlay(img, gt[t], colors)],
            ["prediction", "ground truth"]), labels, colors) for t, img in enumerate(images)]
        clip = int(batch["clip_index"][b])
        stem = out_dir / (f"{source_name}_{index:04d}" + (f"_clip{clip:02d}" if clip > 0 else ""))
        if frames == 1:
            written.append(visualize.save_png(f"{stem}.png", pages[0]))
        else:
            written.append(visualize.save_gif(f"{stem}.gif", pages))
    return written


# ---------------------------------------------------------------------------------- the job
def _shape_key(inputs: tuple[dict, dict]) -> str:
    return " ".join(f"{k}={'x'.join(map(str, inputs[0][k].shape))}" for k in ("input_ids", "sam_pixel_values"))


def run(settings: DemoSettings) -> dict:
    """Runs the whole job; returns (and writes) the summary dict."""
    import jax

    import x2sam_jax
    from x2sam_jax.data import synthetic
    from x2sam_jax.data.pipeline import build_eval_pipeline, build_train_pipeline
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.models.x2sam import parameter_counts
    from x2sam_jax.sharding import make_mesh

    start = time.perf_counter()
    out = Path(settings.out).absolute()
    prepare_out_dir(out, settings.overwrite)
    summary: dict = {"settings": dataclasses.asdict(settings), "note": CHANCE_NOTE}

    # 1. data
    t0 = time.perf_counter()
    data_root = out / "data"
    synthetic.generate(str(data_root), num_images=settings.num_images, num_videos=settings.num_videos,
                       frames=settings.frames, size=settings.image_size, seed=settings.seed)
    sources = synthetic.sources(str(data_root), "val")
    summary["dataset"] = {
        "root": str(data_root), "generate_s": round(time.perf_counter() - t0, 3),
        "images": settings.num_images, "videos": settings.num_videos, "frames_per_video": settings.frames,
        "val_sources": {name: len(src) for name, src in sources.items()},
    }
    logger.info("synthetic data in %s (%.1fs)", data_root, summary["dataset"]["generate_s"])

    # 2. tokenizer, config, model
    tokenizer = build_tiny_tokenizer()
    config = build_config(tokenizer)
    mesh = make_mesh(data=1, fsdp=-1)
    options = compiler_options(settings.fast_compile)
    t0 = time.perf_counter()
    model = build_model(config, mesh, settings.seed, options)
    build_s = time.perf_counter() - t0
    counts = parameter_counts(model)["total"]
    summary["model"] = {
        "preset": "tiny", "parameters": counts["trainable"] + counts["frozen"], "build_s": round(build_s, 3),
        "tokenizer_size": len(tokenizer), "vocab_size": config.vlm.text.vocab_size,
        "region_tokens": config.region_tokens, "sam_size": config.mask_encoder.image_size,
        "queries": config.mask_decoder.num_queries, "compiler_options": options,
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "mesh": {k: int(v) for k, v in mesh.shape.items()}},
    }

    # 3. pipeline + forward, 4. post-processing
    sam_size = config.mask_encoder.image_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]  # batch sizes are per device
    plan = [("coco_panoptic", settings.image_batch_size * shards, settings.image_batches),
            ("refcoco", settings.image_batch_size * shards, settings.image_batches),
            ("ref_ytvos", settings.video_batch_size * shards, settings.video_batches)]
    forward = make_forward(options)
    overlay_dir = out / "overlays"
    programs: dict[str, dict] = {}
    program_inputs: dict[str, dict] = {}
    batches, ious, overlays, pipelines = [], [], [], {}

    def timed_forward(batch):
        """Runs one batch; the first batch of a shape also pays for its compile (recorded apart)."""
        inputs = model_inputs(batch, mesh)
        key = _shape_key(inputs)
        t0 = time.perf_counter()
        mask_logits, class_logits, lm_loss = jax.block_until_ready(forward(model, inputs))
        elapsed = time.perf_counter() - t0
        if key not in programs:
            programs[key] = {"first_call_s": round(elapsed, 3), "steps_s": []}
            program_inputs[key] = inputs
        else:
            programs[key]["steps_s"].append(elapsed)
        record = {"program": key, "seconds": round(elapsed, 3), "valid_samples": int(batch["sample_valid"].sum()),
                  "mask_logits": list(mask_logits.shape), "class_logits": list(class_logits.shape),
                  "lm_loss": float(lm_loss)}
        return np.asarray(mask_logits), np.asarray(class_logits), record

    for name, batch_size, max_batches in plan:
        source = sources[name]
        iterator = build_eval_pipeline(
            source, tokenizer=tokenizer, batch_size=batch_size, buckets=demo_buckets(), sam_size=sam_size,
            seed=settings.seed, process_index=0, process_count=1,
            feature_kwargs={"region_tokens": config.region_tokens})
        for k, batch in zip(range(max_batches), iterator):
            mask_logits, class_logits, record = timed_forward(batch)
            rows = batch_ious(batch, mask_logits, class_logits)
            for row in rows:
                row["source"] = name
            ious += rows
            overlays += draw_overlays(overlay_dir, source, name, batch, mask_logits, class_logits, tokenizer,
                                      sam_size)
            batches.append({"source": name, "split": "val", "batch": k, **record,
                            "sample_index": batch["sample_index"].tolist(), "scored_conditions": len(rows),
                            "mean_iou": _mean([r["iou"] for r in rows])})
            logger.info("%s batch %d: %s, %.2fs, %d conditions scored", name, k, record["program"],
                        record["seconds"], len(rows))
        pipelines[name] = iterator.stats()

    # The training pipeline (mixture plan, augmentation, skip-and-refill) over the image train
    # splits: its micro-batches share the image program (no loss or update yet: no trainer exists).
    if settings.train_batches:
        train_sources = synthetic.sources(str(data_root), "train")
        iterator = build_train_pipeline(
            [train_sources["coco_panoptic"], train_sources["refcoco"]], tokenizer=tokenizer,
            global_batch_images=settings.image_batch_size * shards, images_per_device=settings.image_batch_size,
            buckets=demo_buckets(), sam_size=sam_size, seed=settings.seed, process_index=0, process_count=1,
            num_epochs=None, feature_kwargs={"region_tokens": config.region_tokens})
        for k, batch in zip(range(settings.train_batches), iterator):
            _, _, record = timed_forward(batch)
            source = ("coco_panoptic", "refcoco")[int(batch["source_index"])]
            batches.append({"source": source, "split": "train", "batch": k, **record})
            logger.info("train micro-batch %d (%s): %s, %.2fs", k, source, record["program"], record["seconds"])
        pipelines["train_mixture"] = iterator.stats()
    if not batches:
        raise RuntimeError("the pipelines produced no batch: the synthetic val split is empty")
    for key, stats in programs.items():
        if not stats["steps_s"]:  # one batch of this shape: time a second (compiled) call
            t0 = time.perf_counter()
            jax.block_until_ready(forward(model, program_inputs[key]))
            stats["steps_s"].append(time.perf_counter() - t0)
            stats["timed_again"] = True
        stats["step_s"] = round(_mean(stats.pop("steps_s")), 3)
        stats["compile_s_estimate"] = round(max(stats["first_call_s"] - stats["step_s"], 0.0), 3)
    summary["batches"] = batches
    summary["programs"] = programs
    summary["pipeline"] = {"skipped_total": sum(p["total"] for p in pipelines.values()), "by_source": pipelines}
    summary["iou"] = {
        "mean": _mean([r["iou"] for r in ious]),
        "all_foreground_baseline": _mean([r["all_foreground_iou"] for r in ious]),
        "per_source": {n: _mean([r["iou"] for r in ious if r["source"] == n]) for n, _, _ in plan},
        "count": len(ious), "grid": "unpadded S/4 mask grid, pooled over each clip's frames",
        "rows": ious,
    }
    summary["lm_loss"] = {"mean": _mean([b["lm_loss"] for b in batches]),
                          "uniform": math.log(config.vlm.text.vocab_size)}
    summary["overlays"] = {"dir": str(overlay_dir), "files": [os.path.relpath(p, out) for p in overlays]}

    # 5. checkpoint round trip
    t0 = time.perf_counter()
    ckpt = x2sam_jax.save(out / "checkpoint", model, overwrite=True)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reloaded = x2sam_jax.load(ckpt, mesh=mesh)
    load_s = time.perf_counter() - t0
    first_key = next(iter(program_inputs))
    compiled = forward.programs()
    before = np.asarray(forward(model, program_inputs[first_key])[0])
    after = np.asarray(forward(reloaded, program_inputs[first_key])[0])
    summary["checkpoint"] = {"path": str(ckpt), "save_s": round(save_s, 3), "load_s": round(load_s, 3),
                             "mask_logits_max_abs_diff": float(np.abs(before - after).max()),
                             "compared_program": first_key,
                             "reload_recompiled": forward.programs() != compiled}
    tokenizer.save_pretrained(str(out / "checkpoint" / "tokenizer"))

    summary["total_s"] = round(time.perf_counter() - start, 3)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")  # a summary.json on disk always belongs to a finished run
    return summary


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def format_summary(summary: dict) -> str:
    iou, ckpt, pipe = summary["iou"], summary["checkpoint"], summary["pipeline"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"x2sam_jax demo: tiny X2SAM ({summary['model']['parameters']:,} parameters) on "
        f"{summary['model']['devices']['count']} {summary['model']['devices']['platform']} device(s)",
        f"  data      {summary['dataset']['root']}  val sizes {summary['dataset']['val_sources']}",
        f"  batches   {len(summary['batches'])} run; programs compiled: {len(summary['programs'])}",
    ]
    for key, stats in summary["programs"].items():
        lines.append(f"            {key}: first call {stats['first_call_s']:.1f}s (compile + run), "
                     f"step {stats['step_s']:.2f}s")
    lines += [
        f"  pipeline  skipped samples: {pipe['skipped_total']}",
        f"  IoU       mean {fmt(iou['mean'])} over {iou['count']} conditions "
        f"(all-foreground baseline {fmt(iou['all_foreground_baseline'])}); per source "
        + ", ".join(f"{k} {fmt(v)}" for k, v in iou["per_source"].items()),
        f"  LM loss   {fmt(summary['lm_loss']['mean'])} (uniform guess {summary['lm_loss']['uniform']:.3f})",
        f"  overlays  {len(summary['overlays']['files'])} files in {summary['overlays']['dir']}",
        f"  checkpoint {ckpt['path']}: reload max |diff| of mask logits = {ckpt['mask_logits_max_abs_diff']:g}",
        f"  note      {summary['note']}",
        f"  total     {summary['total_s']:.1f}s",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> DemoSettings:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m x2sam_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=defaults.out, help="output directory (default: %(default)s)")
    parser.add_argument("--num-images", type=int, default=defaults.num_images)
    parser.add_argument("--num-videos", type=int, default=defaults.num_videos)
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per synthetic video")
    parser.add_argument("--image-batch-size", type=int, default=defaults.image_batch_size, help="per device")
    parser.add_argument("--video-batch-size", type=int, default=defaults.video_batch_size, help="per device")
    parser.add_argument("--image-batches", type=int, default=defaults.image_batches,
                        help="batches per image source (panoptic, referring)")
    parser.add_argument("--video-batches", type=int, default=defaults.video_batches)
    parser.add_argument("--train-batches", type=int, default=defaults.train_batches,
                        help="micro-batches of the training pipeline run through the forward pass")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.add_argument("--fast-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="XLA backend optimisation off (default: on for CPU only)")
    args = parser.parse_args(argv)
    for field in ("num_images", "num_videos", "frames", "image_batch_size", "video_batch_size"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be at least 1")
    return DemoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings)
                           if hasattr(args, f.name)})


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save/restore step at INFO
    settings = parse_args(argv)
    summary = run(settings)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
