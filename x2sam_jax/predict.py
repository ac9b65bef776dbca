"""Segment what a prompt names in an image or a video with a trained X2SAM, and draw it.

    python -m x2sam_jax.predict --checkpoint DIR (--image PATH | --video PATH) --prompt TEXT
        [--point X,Y | --box X0,Y0,X1,Y1 | --mask PNG] [--out OUT] [--frames 8] [--threshold 0.5]
        [--all-frames [--memory carry|reset]] [--cache-dir DIR | --no-cache]

DIR is a training workdir or a model directory (as eval.py takes). The prompt is a referring
expression ("the red circle") or a whole instruction with one ``<p>phrase</p>`` span; a visual
prompt (a point, a box or a mask PNG, drawn on the first frame, in pixels of the input;
``--point -5,10`` reads as ``--point=-5,10``) asks instead for the object under it (the
interactive task); give one or the other. ``--video`` is a folder of frames or a video file (mp4,
webm, ... decoded with PyAV); ``--frames`` frames are sampled uniformly from it. ``--all-frames``
segments every frame of a video file instead, streamed clip by clip in constant memory
(``x2sam_jax.streaming``): OUT.mp4, OUT_masks.jsonl and OUT.json, ``--memory carry|reset``. A bad
input fails in one line (exit code 1; 2 for a malformed command line) before the model loads.

A thin shell over ``x2sam_jax.Predictor`` (which see for the Python interface): the model first
answers the instruction (greedy generation, printed; a note says so when the model is the tiny
synthetic one, whose answer text means nothing), then segments as the evaluation does. The
overlay (the input with the visual prompt drawn | the masks scoring at least ``--threshold``,
with a legend of label and score) goes to OUT.png (image) or OUT.gif (video, at the source's
pace); all the masks to OUT_masks.npz (``masks`` [T, K, H, W] bool, ``labels``, ``scores``; for a
video ``frame_indices`` and, when the file has a frame rate, ``frame_times``). Compiled programs
persist between runs (JAX's compilation cache): in the training workdir's ``jax_cache/``, else
``~/.cache/x2sam_jax/jax_cache`` (``--cache-dir`` to choose, ``--no-cache`` to turn off,
``JAX_COMPILATION_CACHE_DIR`` wins over both).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile

import numpy as np

from x2sam_jax.cli import cli_errors
from x2sam_jax.eval.postprocess import SCORE_THRESHOLD
from x2sam_jax.predictor import (PREDICT_BUCKETS, TOY_MODEL_NOTE, Prediction, Predictor, build_sample,
                                 compilation_cache_dir, enable_compilation_cache, is_toy_model, resolve_media)

logger = logging.getLogger("x2sam_jax.predict")

__all__ = ["PREDICT_BUCKETS", "Prediction", "build_sample", "parse_args", "predict", "run", "video_frames"]


def parse_pair(text: str, count: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"--{what} expects {count} comma-separated numbers, got {text!r}")
    return values


def predict(model, tokenizer, frames: list[str], *, prompt: str | None = None, point=None, box=None, mask=None,
            frame_times=None, out: str | None = None, mesh=None, max_new_tokens: int = 32, seed: int = 0) -> Prediction:
    """Answers and segments one image (``frames`` = [path]) or clip (frame paths in time order)
    with a model already in memory (``Predictor(model=..., tokenizer=...)``)."""
    predictor = Predictor(model=model, tokenizer=tokenizer, mesh=mesh, max_new_tokens=max_new_tokens, seed=seed)
    return predictor.predict(list(frames), prompt=prompt, point=point, box=box, mask=mask, frame_times=frame_times,
                             out=out)


def video_frames(path: str, count: int, workdir: str) -> tuple[list[str], list[float] | None]:
    """``count`` frames sampled uniformly from a folder of frames or a video file, as image files
    (the pipeline and the overlay read files), with their times in seconds when the video has a
    frame rate."""
    frames, _, times = resolve_media(path, num_frames=count, workdir=workdir)
    return frames, times


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--point -5,10`` as ``--point=-5,10``: argparse reads a value that starts with "-" and is
    not one plain number as an option."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--point", "--box") and re.fullmatch(r"-[\d.][\d.,eE+-]*", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    argv = _join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
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
    frames_max = max(PREDICT_BUCKETS["frames"])
    parser.add_argument("--frames", type=int, default=8,
                        help=f"frames sampled from --video, 1 to {frames_max} (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=SCORE_THRESHOLD,
                        help="the overlay draws the masks scoring at least this (default: %(default)s, the "
                             "evaluation's detection score); the npz holds them all")
    parser.add_argument("--all-frames", action="store_true",
                        help="segment EVERY frame of --video (a video file), clip by clip in constant memory: "
                             "OUT.mp4 (overlay at the source's frame rate), OUT_masks.jsonl (per frame: index, "
                             "time, RLE and score), OUT.json")
    parser.add_argument("--memory", choices=("carry", "reset"), default="carry",
                        help="with --all-frames: the memory bank flows from clip to clip (carry) or starts empty "
                             "at each 8-frame clip (reset, as the official evaluation) (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", help="where compiled programs persist (default: the workdir's jax_cache/, "
                                            "else ~/.cache/x2sam_jax/jax_cache)")
    parser.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    args = parser.parse_args(argv)
    if not args.prompt and not (args.point or args.box or args.mask):
        parser.error("give --prompt TEXT or a visual prompt (--point, --box, --mask)")
    if not 1 <= args.frames <= frames_max:
        parser.error(f"--frames must be between 1 and {frames_max}")
    if args.all_frames and not args.video:
        parser.error("--all-frames needs --video FILE")
    return args


def run(argv=None):
    """The CLI's work: parse, check the inputs, load, predict, print; returns the Prediction
    (with ``--all-frames`` the ``streaming.VideoPrediction``)."""
    args = parse_args(argv)
    from PIL import Image, UnidentifiedImageError

    point = parse_pair(args.point, 2, "point") if args.point else None
    box = parse_pair(args.box, 4, "box") if args.box else None
    mask = None
    if args.mask:
        if not os.path.isfile(args.mask):
            raise FileNotFoundError(f"--mask {args.mask} is not a file")
        try:
            mask = np.asarray(Image.open(args.mask).convert("L")) > 0
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"--mask {args.mask} is not a readable image ({error})") from None
    if args.image and not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image} is not a file")
    if args.all_frames and not os.path.isfile(args.video):
        raise ValueError(f"--all-frames streams a video file (mp4, webm, ...); {args.video} is not one")
    if args.prompt and (point is not None or box is not None or mask is not None):
        raise ValueError("give --prompt or a visual prompt (--point, --box, --mask), not both: the interactive "
                         "task asks for the object under the visual prompt and reads no text")
    with tempfile.TemporaryDirectory(prefix="x2sam-predict-") as tmp:
        # Every input problem fails here, before the model loads.
        frames, indices, times = resolve_media(args.video or args.image, num_frames=args.frames, workdir=tmp)
        if args.image and len(frames) != 1:
            raise ValueError(f"--image {args.image} is a video; use --video")
        build_sample(frames, prompt=args.prompt, point=point, box=box, mask=mask)
        if not os.path.isdir(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a directory")
        if not args.no_cache:
            cache = enable_compilation_cache(args.cache_dir or compilation_cache_dir(args.checkpoint))
            logger.info("compiled programs persist in %s", cache)
        predictor = Predictor(args.checkpoint, max_new_tokens=args.max_new_tokens, num_frames=args.frames,
                              threshold=args.threshold)
        if args.all_frames:
            done = predictor.predict_video(args.video, prompt=args.prompt, point=point, box=box, mask=mask,
                                           out=args.out, memory=args.memory, progress=True)
            print(f"answer: {done.answer}")
            print(f"{done.num_frames} frames segmented (memory: {done.memory}); the LLM read frames {done.llm_frames}")
            print(f"overlay: {done.video}\nmasks: {done.masks}\nsummary: {done.summary}")
            return done
        result = predictor.predict_batch([dict(media=frames, prompt=args.prompt, point=point, box=box, mask=mask,
                                               frame_times=times, frame_indices=indices, out=args.out)])[0]
    print(f"answer: {result.answer}")
    if is_toy_model(predictor.model.config):
        print(f"note: {TOY_MODEL_NOTE}")
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
