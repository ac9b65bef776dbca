"""Segment what a prompt names in an image or a video with a trained X2SAM, and draw it.

    python -m x2sam_jax.predict --checkpoint DIR (--image PATH | --video PATH) --prompt TEXT
        [--point X,Y | --box X0,Y0,X1,Y1 | --mask PNG] [--out OUT] [--frames 8]

DIR is a training workdir or a model directory (as eval.py takes). The prompt is a referring
expression ("the red circle") or a whole instruction with ``<p>phrase</p>`` spans; a visual prompt
(a point, a box or a mask PNG, drawn on the first frame, in pixels of the input) asks instead for
the object under it (the interactive task). ``--video`` is a folder of frames or a video file
(mp4, webm, ... decoded with PyAV); ``--frames`` frames are sampled uniformly from it.

The model first answers the instruction (greedy generation, printed), then segments as the
evaluation does: one teacher-forced forward over the instruction and its templated answer,
post-processed per task (``x2sam_jax.eval.tasks``) at the input's resolution. The overlay goes to
OUT.png (image) or OUT.gif (video); the masks to OUT_masks.npz (``masks`` [T, K, H, W] bool,
``labels``, ``scores``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from x2sam_jax.cli import cli_errors
from x2sam_jax.data.batching import BucketConfig
from x2sam_jax.data.pipeline import build_eval_pipeline
from x2sam_jax.data.schema import Phrase, Sample, VisualPrompt
from x2sam_jax.data.sources.common import encode_mask
from x2sam_jax.data.tokenizer import SpecialIds
from x2sam_jax.data.transforms import load_image, load_video_frames
from x2sam_jax.eval import evaluator, inference, tasks
from x2sam_jax.eval.inference import load_model_and_tokenizer, prompt_lengths
from x2sam_jax.generate import generate
from x2sam_jax.sharding import compiler_options, make_mesh

logger = logging.getLogger("x2sam_jax.predict")

# One row: its sizes round up to these (a compiled program per distinct shape; --frames <= 32).
PREDICT_BUCKETS = dict(seq_lengths=(512, 1024, 2048), patch_counts=(512, 1024, 2048, 4096, 8192, 16384),
                       grids=(1,), frames=(1, 8, 16, 32), instances=(1,), conditions=(8,), regions=(1,),
                       seg_tokens=(8,))


@dataclasses.dataclass
class Prediction:
    answer: str                  # the model's generated answer
    labels: list                 # one per mask: the phrase, or "region"
    masks: np.ndarray            # [T, K, H, W] bool at the input's resolution
    scores: list                 # the class score of each mask's query (first frame)
    frames: list                 # the frame image paths (the overlay's background)
    overlay: str | None = None   # the written overlay file


class _OneSample:
    """A one-sample source for the evaluation pipeline."""

    def __init__(self, sample):
        self.sample, self.name, self.task = sample, "predict", sample.task

    def __len__(self):
        return 1

    def __getitem__(self, index):
        if index != 0:
            raise IndexError(index)
        return self.sample


def parse_pair(text: str, count: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"--{what} expects {count} comma-separated numbers, got {text!r}")
    return values


def build_sample(frames: list[str], *, prompt: str | None = None, point=None, box=None, mask: np.ndarray | None = None,
                 frame_times=None):
    """The Sample of a prediction: referring (a text prompt) or interactive (a visual prompt), no
    ground truth, image (one frame) or video."""
    first = load_image(frames[0])
    height, width = first.shape[:2]
    video = len(frames) > 1
    visual = [v is not None for v in (point, box, mask)]
    if sum(visual) > 1:
        raise ValueError("give at most one visual prompt (--point, --box or --mask)")
    common = dict(dataset="predict", sample_id=os.path.basename(frames[0]), frames=list(frames), height=height,
                  width=width, has_targets=False, frame_times=frame_times)
    if any(visual):
        if point is not None:
            x, y = point
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(f"--point {x:g},{y:g} lies outside the {width}x{height} input")
            region = VisualPrompt(kind="point", frame=0, mask=None, points=[(x, y)])
        elif box is not None:
            x0, y0, x1, y1 = box
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"--box {box}: needs X0 < X1 and Y0 < Y1")
            region = VisualPrompt(kind="box", frame=0, mask=None, box=(x0, y0, x1, y1))
        else:
            if mask.shape != (height, width):
                raise ValueError(f"--mask is {mask.shape[1]}x{mask.shape[0]}, the input {width}x{height}")
            if not mask.any():
                raise ValueError("--mask is empty (no non-zero pixel)")
            region = VisualPrompt(kind="mask", frame=0, mask=encode_mask(mask))
        return Sample(task="vinter_seg" if video else "inter_seg", visual_prompts=[region], **common), region.kind
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is empty: give a referring expression or a visual prompt")
    return Sample(task="vref_seg" if video else "ref_seg", phrases=[Phrase(text=prompt.strip(), instance_indices=[])],
                  **common), None


def _instruction_phrases(prompt: str) -> list[str] | None:
    """The <p>..</p> phrases of a whole instruction, or None for a bare expression."""
    found = re.findall(r"<p>(.*?)</p>", prompt)
    return found or None


def answer(model, tokenizer, batch: dict, *, max_new_tokens: int) -> str:
    """The model's greedy answer to the batch's (one row) instruction."""
    ids = SpecialIds.from_tokenizer(tokenizer)
    length = int(prompt_lengths(batch)[0])
    prompt_ids = np.asarray(batch["input_ids"][:1, :length], np.int32)
    pixels = np.asarray(batch["pixel_values"][0][batch["pixel_valid"][0]])
    grid = np.asarray(batch["grid_thw"][0])
    grid = grid[grid.prod(-1) > 0]
    video = bool((grid[:, 0] > 1).any())
    vision = (dict(pixel_values_videos=pixels, video_grid_thw=grid) if video
              else dict(pixel_values=pixels, image_grid_thw=grid))
    vlm = nnx.clone(model.vlm)   # generate writes its state back into the module it gets
    out = generate(vlm, prompt_ids, np.ones_like(prompt_ids), max_new_tokens=max_new_tokens,
                   stop_token_ids=(ids.im_end,), pad_token_id=tokenizer.pad_token_id or 0, **vision)
    tokens = np.asarray(out.tokens)[0, : int(np.asarray(out.lengths)[0])].tolist()
    tokens = [t for t in tokens if t != ids.im_end]
    return tokenizer.decode(tokens, skip_special_tokens=False).strip()


def predict(model, tokenizer, frames: list[str], *, prompt: str | None = None, point=None, box=None, mask=None,
            frame_times=None, out: str | None = None, mesh=None, max_new_tokens: int = 32, seed: int = 0) -> Prediction:
    """Answers and segments one image (``frames`` = [path]) or clip (frame paths in time order)."""
    phrases = _instruction_phrases(prompt) if prompt else None
    if phrases and len(phrases) > 1:
        raise ValueError(f"--prompt names {len(phrases)} <p>..</p> phrases; give one expression per call")
    sample, kind = build_sample(frames, prompt=phrases[0] if phrases else prompt, point=point, box=box, mask=mask,
                                frame_times=frame_times)
    mesh = mesh if mesh is not None else make_mesh(data=1, fsdp=1, tensor=1)
    sam_size = int(model.config.mask_encoder.image_size)
    feature = {"region_tokens": int(model.config.region_tokens), "clip_len": max(len(frames), 1)}
    if kind is not None:
        feature["eval_prompt_kind"] = kind
    source = _OneSample(sample)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    iterator = build_eval_pipeline(source, tokenizer=tokenizer, batch_size=1, buckets=BucketConfig(**PREDICT_BUCKETS),
                                   pad_token_id=pad_id, sam_size=sam_size, seed=seed, process_index=0,
                                   process_count=1, feature_kwargs=feature, num_threads=1, prefetch=0)
    batch = next(iter(iterator))
    iterator.close()
    if not batch["sample_valid"][0]:
        raise ValueError(f"{frames[0]}: the input could not be prepared (see the log)")
    text = answer(model, tokenizer, batch, max_new_tokens=max_new_tokens)
    forward = evaluator._forward(compiler_options(None))
    outputs = inference.to_host(forward(model, inference.model_inputs(batch, mesh), inference.row_inputs(batch, mesh),
                                        seed), mesh)
    (row,) = evaluator._rows(batch, outputs, source, tokenizer, sam_size)
    scored = not sample.task.startswith("v")   # image evaluators need ground-truth slots; it stays empty
    task_evaluator = tasks.evaluator_for(source, scored=scored, submission=False)
    _, visual = task_evaluator.process(row, visual=True)
    visual = dataclasses.replace(visual, gt=None, gt_labels=[])
    scores = [float(row.probs(0)[:, c].max()) for c in range(row.num_conditions)]
    labels = ["region" if kind else sample.phrases[0].text]
    visual = dataclasses.replace(visual, pred_labels=labels, pred_scores=scores)
    result = Prediction(answer=text, labels=labels, masks=np.asarray(visual.pred, bool), scores=scores,
                        frames=list(sample.frames))
    if out is not None:
        result.overlay = evaluator.draw_overlay(Path(out), row, visual)
        np.savez_compressed(f"{out}_masks.npz", masks=result.masks, labels=np.asarray(labels),
                            scores=np.asarray(scores))
    return result


def video_frames(path: str, count: int, workdir: str) -> tuple[list[str], list[float] | None]:
    """``count`` frames sampled uniformly from a folder of frames or a video file, as image files
    (the pipeline and the overlay read files), with their times in seconds when the video has a
    frame rate."""
    from PIL import Image

    video = load_video_frames(path, count)
    os.makedirs(workdir, exist_ok=True)
    paths = []
    for k, frame in enumerate(video.frames):
        paths.append(os.path.join(workdir, f"{k:05d}.png"))
        Image.fromarray(frame).save(paths[-1])
    times = [float(i) / float(video.fps) for i in video.indices] if video.fps else None
    return paths, times


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m x2sam_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file")
    source.add_argument("--video", help="a folder of frames or a video file (mp4, webm, ...)")
    parser.add_argument("--prompt", help="a referring expression, or an instruction with one <p>phrase</p>")
    parser.add_argument("--point", help="X,Y: the object under this pixel (first frame)")
    parser.add_argument("--box", help="X0,Y0,X1,Y1: the object in this box (first frame)")
    parser.add_argument("--mask", help="a PNG the input's size: the object under its non-zero pixels (first frame)")
    parser.add_argument("--out", default="prediction", help="overlay OUT.png / OUT.gif and OUT_masks.npz "
                                                            "(default: %(default)s)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if not args.prompt and not (args.point or args.box or args.mask):
        parser.error("give --prompt TEXT and/or a visual prompt (--point, --box, --mask)")
    if not 1 <= args.frames <= max(PREDICT_BUCKETS["frames"]):
        parser.error(f"--frames must be between 1 and {max(PREDICT_BUCKETS['frames'])}")
    return args


def run(argv=None) -> Prediction:
    """The CLI's work: parse, load, predict, print; returns the Prediction."""
    args = parse_args(argv)
    from PIL import Image

    point = parse_pair(args.point, 2, "point") if args.point else None
    box = parse_pair(args.box, 4, "box") if args.box else None
    mask = None
    if args.mask:
        if not os.path.isfile(args.mask):
            raise FileNotFoundError(f"--mask {args.mask} is not a file")
        mask = np.asarray(Image.open(args.mask).convert("L")) > 0
    if args.image and not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image} is not a file")
    visual = point is not None or box is not None or mask is not None
    if visual and args.prompt:
        logger.warning("a visual prompt is given: --prompt %r is not used", args.prompt)
    prompt = None if visual else args.prompt
    with tempfile.TemporaryDirectory(prefix="x2sam-predict-") as tmp:
        frames, times = video_frames(args.video, args.frames, tmp) if args.video else ([args.image], None)
        build_sample(frames, prompt=prompt, point=point, box=box, mask=mask)   # bad prompts fail before the load
        mesh = make_mesh(data=1, fsdp=1, tensor=1)
        model, tokenizer = load_model_and_tokenizer(args.checkpoint, mesh)
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        result = predict(model, tokenizer, frames, prompt=prompt, point=point, box=box, mask=mask, frame_times=times,
                         out=args.out, mesh=mesh, max_new_tokens=args.max_new_tokens)
    print(f"answer: {result.answer}")
    for k, (label, score) in enumerate(zip(result.labels, result.scores)):
        area = float(result.masks[:, k].mean())
        print(f"mask {k}: {label!r} score {score:.3f}, {100 * area:.1f}% of the frame"
              + (f" (mean over {result.masks.shape[0]} frames)" if result.masks.shape[0] > 1 else ""))
    print(f"overlay: {result.overlay}")
    return result


@cli_errors
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
