"""A trained X2SAM kept in memory and compiled once per input shape: answers and masks for
images and videos, one input at a time or many in a batch.

    import x2sam_jax

    predictor = x2sam_jax.Predictor("runs/main")        # a training workdir or a model directory
    result = predictor.predict("photo.jpg", prompt="the red circle")
    result.answer, result.masks, result.scores          # text; [T, K, H, W] bool; one score per mask
    predictor.predict("clip.mp4", point=(40, 30))       # a video: 8 frames sampled uniformly
    predictor.predict_batch(["a.jpg", "b.jpg"], prompt="the red circle")   # one result per input

The model is restored once (``x2sam_jax.load``) and its programs stay compiled: every input is
padded to a bucket of shapes (``PREDICT_BUCKETS``; a batch also to a row count of
``batch_buckets``), and each bucket compiles one generation program and one forward the first
time it is seen; later inputs of the same bucket trace and compile nothing
(``Predictor.programs`` counts them). ``enable_compilation_cache`` keeps them across processes.

What a call does (as ``eval.py``): the model answers the instruction greedily (``answer``), then
one teacher-forced forward over the instruction and its templated answer segments, post-processed
per task (``x2sam_jax.eval.tasks``) at the input's resolution. A text prompt is the referring task
(``ref_seg`` / ``vref_seg``); a point, box or mask (pixels of the first frame) the interactive one.
An input's result does not depend on the batch it ran in (its template and region-sampler points
are drawn from the Predictor's seed alone).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from x2sam_jax.data.batching import BucketConfig, Collator, bucket_size, check_fits
from x2sam_jax.data.pipeline import _sample_rng, default_feature_fn
from x2sam_jax.data.schema import BadSample, Phrase, Sample, VisualPrompt
from x2sam_jax.data.sources.common import encode_mask
from x2sam_jax.data.tokenizer import SpecialIds
from x2sam_jax.data.transforms import IMAGE_EXTENSIONS, decode_rle, load_image, load_video_frames
from x2sam_jax.eval import evaluator, inference, tasks, visualize
from x2sam_jax.eval.postprocess import SCORE_THRESHOLD
from x2sam_jax.generate import _generate, generate
from x2sam_jax.sharding import compiler_options, make_mesh

# One row: its sizes round up to these (a compiled program per distinct shape; frames <= 32).
PREDICT_BUCKETS = dict(seq_lengths=(512, 1024, 2048), patch_counts=(512, 1024, 2048, 4096, 8192, 16384),
                       grids=(1,), frames=(1, 8, 16, 32), instances=(1,), conditions=(8,), regions=(1,),
                       seg_tokens=(8,))
BATCH_BUCKETS = (1, 2, 4, 8)
# What one input of predict_batch may hold (predict's arguments; frame_indices: which frames of
# a source the given frames are, recorded in the result).
REQUEST_KEYS = {"media", "prompt", "point", "box", "mask", "num_frames", "frame_times", "frame_indices", "out"}
DEFAULT_FRAMES = 8


@dataclasses.dataclass
class Prediction:
    answer: str                  # the model's generated answer
    labels: list                 # one per mask: the phrase, or "region"
    masks: np.ndarray            # [T, K, H, W] bool at the input's resolution
    scores: list                 # the class score of each mask's query (first frame)
    frames: list                 # the frame image files (temporary ones are gone after the call)
    frame_indices: list | None = None   # which frames of a video were sampled (None: an image, a list)
    frame_times: list | None = None     # their times in seconds, when the video has a frame rate
    overlay: str | None = None   # the written overlay file


class _OneSample:
    """A one-sample source, as the task evaluators take."""

    def __init__(self, sample):
        self.sample, self.name, self.task = sample, "predict", sample.task

    def __len__(self):
        return 1

    def __getitem__(self, index):
        if index != 0:
            raise IndexError(index)
        return self.sample


# ------------------------------------------------------------------------------------------ inputs
def _check_prompt(prompt: str | None) -> str | None:
    """The referring expression of a prompt: the prompt itself, or its one <p>phrase</p>."""
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt.count("<p>") != prompt.count("</p>"):
        raise ValueError(f"prompt {prompt!r}: unbalanced <p>..</p> ({prompt.count('<p>')} <p>, "
                         f"{prompt.count('</p>')} </p>)")
    phrases = re.findall(r"<p>(.*?)</p>", prompt)
    if len(phrases) > 1:
        raise ValueError(f"prompt names {len(phrases)} <p>..</p> phrases; give one expression per input")
    return phrases[0] if phrases else prompt


def build_sample(frames: list[str], *, prompt: str | None = None, point=None, box=None, mask: np.ndarray | None = None,
                 frame_times=None):
    """(the Sample of a prediction, the visual prompt's kind or None): referring (a text prompt:
    an expression, or an instruction with one <p>phrase</p>) or interactive (a visual prompt), no
    ground truth, image (one frame) or video. Reads the first frame; every bad prompt is a
    ValueError naming what is wrong."""
    prompt = _check_prompt(prompt)
    first = load_image(frames[0])
    height, width = first.shape[:2]
    video = len(frames) > 1
    visual = [v is not None for v in (point, box, mask)]
    if sum(visual) > 1:
        raise ValueError("give at most one visual prompt (point, box or mask)")
    if any(visual) and prompt is not None:
        raise ValueError("give a text prompt or a visual prompt (point, box, mask), not both: the interactive "
                         "task asks for the object under the visual prompt and reads no text")
    common = dict(dataset="predict", sample_id=os.path.basename(frames[0]), frames=list(frames), height=height,
                  width=width, has_targets=False, frame_times=frame_times)
    if any(visual):
        if point is not None:
            x, y = _numbers(point, 2, "point")
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(f"point {x:g},{y:g} lies outside the {width}x{height} input")
            region = VisualPrompt(kind="point", frame=0, mask=None, points=[(x, y)])
        elif box is not None:
            x0, y0, x1, y1 = _numbers(box, 4, "box")
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g}: needs X0 < X1 and Y0 < Y1")
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the {width}x{height} input")
            region = VisualPrompt(kind="box", frame=0, mask=None, box=(x0, y0, x1, y1))
        else:
            mask = np.asarray(mask)
            if mask.shape != (height, width):
                size = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"of shape {list(mask.shape)}"
                raise ValueError(f"mask is {size}, the input {width}x{height}")
            if not mask.any():
                raise ValueError("mask is empty (no non-zero pixel)")
            region = VisualPrompt(kind="mask", frame=0, mask=encode_mask(mask.astype(bool)))
        return Sample(task="vinter_seg" if video else "inter_seg", visual_prompts=[region], **common), region.kind
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give a referring expression or a visual prompt (point, box, mask)")
    return Sample(task="vref_seg" if video else "ref_seg", phrases=[Phrase(text=prompt.strip(), instance_indices=[])],
                  **common), None


def _numbers(value, count: int, what: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not np.isfinite(numbers).all():
        raise ValueError(f"{what} must be {count} finite numbers, got {value!r}")
    return numbers


def _write_frames(frames, directory: str) -> list[str]:
    """RGB arrays as PNG files (lossless; the pipeline and the overlay read files)."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, axis=-1)
        if frame.ndim != 3 or frame.shape[-1] not in (3, 4) or frame.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 [H, W, 3] (or [H, W], [H, W, 4]), got {frame.dtype} "
                             f"{list(frame.shape)}")
        paths.append(os.path.join(directory, f"{k:05d}.png"))
        Image.fromarray(frame[..., :3]).save(paths[-1])
    return paths


def _image_file(path: str) -> str:
    """``path`` if it is a readable image, else a ValueError naming it."""
    try:
        load_image(path)
    except BadSample as error:
        raise ValueError(f"{path} is not a readable image ({error})") from None
    return path


def resolve_media(media, *, num_frames: int, workdir: str):
    """(frame files, sampled frame indices or None, their times or None) of an input: an image
    file, a video file (PyAV), a folder of frames, an RGB array [H, W, 3] or frames [T, H, W, 3], a
    PIL image, or a list of frames (files or arrays)."""
    if hasattr(media, "convert") and hasattr(media, "size"):          # a PIL image
        media = np.asarray(media.convert("RGB"))
    if isinstance(media, np.ndarray):
        if media.ndim == 3 and media.shape[-1] in (3, 4) or media.ndim == 2:
            return _write_frames([media], workdir), None, None
        if media.ndim == 4:
            return _write_frames(list(media), workdir), list(range(len(media))), None
        raise ValueError(f"an array input must be an image [H, W, 3] or frames [T, H, W, 3], got shape "
                         f"{list(media.shape)}")
    if isinstance(media, (list, tuple)):
        if not media:
            raise ValueError("an empty list of frames")
        files = [os.fspath(m) if isinstance(m, (str, os.PathLike)) else None for m in media]
        if all(files):
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"frame {f} is not a file")
                _image_file(f)
        else:
            files = _write_frames(media, workdir)
        return files, (list(range(len(files))) if len(files) > 1 else None), None
    if not isinstance(media, (str, os.PathLike)):
        raise ValueError(f"an input is a file, a folder of frames, an array or a list of frames, not "
                         f"{type(media).__name__}")
    path = os.fspath(media)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS):
        return [_image_file(path)], None, None
    try:
        video = load_video_frames(path, num_frames)
    except BadSample as error:
        if os.path.isdir(path):
            raise ValueError(f"{path}: {error}") from None
        try:   # an image without an image extension
            return [_image_file(path)], None, None
        except ValueError:
            # PyAV's own reason (e.g. "Invalid data found when processing input"), without the path again
            reason = getattr(error.__cause__, "strerror", None) or str(error)
            raise ValueError(f"{path} is neither an image nor a video PyAV can decode ({reason})") from None
    files = _write_frames(video.frames, workdir)
    indices = [int(i) for i in video.indices]
    times = [float(i) / float(video.fps) for i in indices] if video.fps else None
    return files, indices, times


def _drawn_prompts(sample) -> list:
    """The visual prompt of a prediction as the overlay draws it: the given point, box or mask."""
    drawn = []
    for prompt in sample.visual_prompts:
        if prompt.kind == "point":
            drawn.append(visualize.Prompt("point", point=tuple(prompt.points[0]), frame=prompt.frame))
        elif prompt.kind == "box":
            drawn.append(visualize.Prompt("box", box=tuple(prompt.box), frame=prompt.frame))
        else:
            drawn.append(visualize.Prompt("mask", mask=decode_rle(prompt.mask, sample.height, sample.width),
                                          frame=prompt.frame))
    return drawn


TOY_MODEL_NOTE = ("this is the tiny model (the tiny preset's 2-layer, 64-wide language model, trained on "
                  "synthetic shapes): its masks mean something, its answer text does not")


def is_toy_model(config) -> bool:
    """Whether an X2SAM config has the ``tiny`` preset's language model (its width and depth),
    too small to answer in words: the main job's model."""
    from x2sam_jax.config import x2sam_preset

    text, tiny = getattr(getattr(config, "vlm", None), "text", None), x2sam_preset("tiny").vlm.text
    return text is not None and (text.hidden_size, text.num_layers) == (tiny.hidden_size, tiny.num_layers)


# ------------------------------------------------------------------------------------------ cache
def compilation_cache_dir(checkpoint) -> str:
    """Where compiled programs persist: a training workdir's ``jax_cache`` (which train.py fills
    too), else ``$X2SAM_CACHE_DIR`` or ``~/.cache/x2sam_jax/jax_cache`` (``$XDG_CACHE_HOME``)."""
    from x2sam_jax.model_checkpoint import is_training_workdir

    if checkpoint is not None and is_training_workdir(checkpoint):
        return os.path.join(os.fspath(checkpoint), "jax_cache")
    if os.environ.get("X2SAM_CACHE_DIR"):
        return os.environ["X2SAM_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "x2sam_jax", "jax_cache")


def enable_compilation_cache(directory: str) -> str:
    """Turns JAX's persistent compilation cache on at ``directory``, unless one is already set
    (``JAX_COMPILATION_CACHE_DIR``: the user's choice wins). Returns the directory in use. Call it
    before the first compile: JAX reads the setting once per process."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    return jax.config.jax_compilation_cache_dir


# ------------------------------------------------------------------------------------------ predictor
class Predictor:
    """A restored X2SAM, its tokenizer and its compiled programs (see the module docstring).

    Args:
      checkpoint: a training workdir (the latest complete step) or a model directory
        (``x2sam_jax.save``, the converters), with its tokenizer (``tokenizer/`` or top level).
      model, tokenizer: an X2SAM already in memory instead of ``checkpoint``.
      mesh: where the parameters and batches live (default: one device).
      max_new_tokens: the answer's length budget.
      num_frames: frames sampled uniformly from a video (at most the largest frames bucket).
      batch_buckets: the row counts a batch is padded to (``predict_batch`` runs chunks of at
        most the largest).
      seed: the templates' and the region sampler's draws (the same for every input).
      threshold: overlays (``out=``) draw the masks scoring at least this (all are returned).
    """

    def __init__(self, checkpoint=None, *, model=None, tokenizer=None, mesh=None, max_new_tokens: int = 32,
                 num_frames: int = DEFAULT_FRAMES, batch_buckets: Sequence[int] = BATCH_BUCKETS, seed: int = 0,
                 buckets: dict | None = None, fast_compile: bool | None = None, threshold: float = SCORE_THRESHOLD):
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint directory or a model (with its tokenizer)")
        self.buckets = BucketConfig(**(buckets or PREDICT_BUCKETS))
        if not 1 <= num_frames <= max(self.buckets.frames):
            raise ValueError(f"num_frames must be between 1 and {max(self.buckets.frames)} (the largest frames "
                             f"bucket), got {num_frames}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.mesh = mesh if mesh is not None else make_mesh(data=1, fsdp=1, tensor=1)
        if model is None:
            model, tokenizer = inference.load_model_and_tokenizer(checkpoint, self.mesh)
        elif tokenizer is None:
            raise ValueError("a model needs its tokenizer")
        self.checkpoint = checkpoint
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.num_frames, self.seed = int(max_new_tokens), int(num_frames), int(seed)
        self.threshold = float(threshold)
        self.batch_buckets = tuple(sorted(int(b) for b in batch_buckets))
        self.special = SpecialIds.from_tokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sam_size = int(model.config.mask_encoder.image_size)
        self.collator = Collator(self.buckets, pad_token_id=self.pad_id, sam_size=self.sam_size)
        # One jitted forward per compiler options, shared with the evaluation: programs compiled
        # by eval (same model structure, same shapes) are reused here and the other way round.
        self._forward = evaluator._forward(compiler_options(fast_compile))
        self._features: dict = {}
        self._streamer = None      # x2sam_jax.streaming.VideoStreamer, made by the first predict_video

    # -- programs ---------------------------------------------------------------------------------
    def programs(self) -> dict[str, int]:
        """Compiled programs so far: the forward's and the generation's (process-wide caches)."""
        return {"forward": int(self._forward.programs()), "generate": int(_generate.jitted_fn._cache_size())}

    # -- public -----------------------------------------------------------------------------------
    def predict(self, media, *, prompt: str | None = None, point=None, box=None, mask=None,
                num_frames: int | None = None, frame_times=None, out: str | None = None) -> Prediction:
        """Answers and segments one input (see ``resolve_media`` for the kinds): a text prompt
        (a referring expression, or an instruction with one ``<p>phrase</p>``) or one visual
        prompt on the first frame (``point`` (x, y), ``box`` (x0, y0, x1, y1) in pixels, ``mask``
        a bool [H, W] array). ``out``: also write the overlay (OUT.png / OUT.gif) and
        OUT_masks.npz."""
        (result,) = self.predict_batch([dict(media=media, prompt=prompt, point=point, box=box, mask=mask,
                                             num_frames=num_frames, frame_times=frame_times, out=out)])
        return result

    def predict_video(self, video, *, out, memory: str = "carry", prompt: str | None = None, point=None, box=None,
                      mask=None, progress: bool = False):
        """Segments EVERY frame of a video file of any length in constant memory
        (``x2sam_jax.streaming``): the LLM reads the prompt once over 8 frames spread over the
        video, then the segmentor runs clip after clip (8 frames), its memory bank carried from
        clip to clip (``memory="carry"``) or emptied at each (``"reset"``, as the official
        evaluation). Writes OUT.mp4 (the overlay at the source's frame rate), OUT_masks.jsonl
        (per frame: index, time, each object's label, score and COCO RLE) and OUT.json; returns a
        ``streaming.VideoPrediction``."""
        from x2sam_jax.streaming import VideoStreamer

        if self._streamer is None:
            self._streamer = VideoStreamer(self)
        return self._streamer(video, out=out, memory=memory, prompt=prompt, point=point, box=box, mask=mask,
                              progress=progress)

    def predict_batch(self, inputs: Sequence, **common) -> list[Prediction]:
        """One Prediction per input, in order. An input is a media (then ``common`` holds its
        prompt) or a dict of ``predict``'s arguments with the media under "media" (``common``
        fills what it leaves out). Inputs of the same bucket run together, padded to a batch
        bucket; each result equals that of ``predict`` on the input alone."""
        requests = []
        for k, item in enumerate(inputs):
            request = {**common, **(dict(item) if isinstance(item, dict) else {"media": item})}
            unknown = set(request) - REQUEST_KEYS
            if unknown:
                raise ValueError(f"input {k}: unknown argument(s) {sorted(unknown)}")
            if "media" not in request:
                raise ValueError(f"input {k}: no media (an image, a video, frames)")
            requests.append(request)
        if not requests:
            return []
        with tempfile.TemporaryDirectory(prefix="x2sam-predict-") as tmp:
            prepared = []
            for k, request in enumerate(requests):
                try:
                    prepared.append(self._prepare(request, os.path.join(tmp, str(k))))
                except ValueError as error:
                    if len(requests) == 1:
                        raise
                    raise ValueError(f"input {k}: {error}") from None
            groups: dict = {}
            for k, item in enumerate(prepared):
                groups.setdefault(item["key"], []).append(k)
            results: list = [None] * len(prepared)
            chunk = max(self.batch_buckets)
            for members in groups.values():
                for start in range(0, len(members), chunk):
                    part = members[start:start + chunk]
                    for k, result in zip(part, self._run([prepared[k] for k in part])):
                        results[k] = result
        return results

    def prepare(self, media, **prompt) -> dict:
        """The collated one-row batch of an input, as ``predict`` feeds the model
        (``x2sam_jax.models.x2sam.model_inputs(batch)`` picks the model's arguments)."""
        with tempfile.TemporaryDirectory(prefix="x2sam-predict-") as tmp:
            item = self._prepare({"media": media, **prompt}, tmp)
            return self._collate([item])

    # -- steps ------------------------------------------------------------------------------------
    def _prepare(self, request: dict, workdir: str) -> dict:
        """Sample, features and bucket of a request; every problem of the input raises here,
        before any device work."""
        count = self.num_frames if request.get("num_frames") is None else int(request["num_frames"])
        if not 1 <= count <= max(self.buckets.frames):
            raise ValueError(f"num_frames must be between 1 and {max(self.buckets.frames)}, got {count}")
        frames, indices, times = resolve_media(request["media"], num_frames=count, workdir=workdir)
        if request.get("frame_times") is not None:
            times = list(request["frame_times"])
            if len(times) != len(frames):
                raise ValueError(f"frame_times has {len(times)} entries for {len(frames)} frames")
        if request.get("frame_indices") is not None:
            indices = [int(i) for i in request["frame_indices"]]
            if len(indices) != len(frames):
                raise ValueError(f"frame_indices has {len(indices)} entries for {len(frames)} frames")
        sizes = {tuple(load_image(f).shape[:2]) for f in frames[1:]}   # the first is read by build_sample
        sample, kind = build_sample(frames, prompt=request.get("prompt"), point=request.get("point"),
                                    box=request.get("box"), mask=request.get("mask"), frame_times=times)
        if sizes - {(sample.height, sample.width)}:
            raise ValueError(f"the frames differ in size: {sorted(sizes | {(sample.height, sample.width)})} (H, W)")
        options = (len(frames), kind)
        if options not in self._features:
            kwargs = {"region_tokens": int(self.model.config.region_tokens), "clip_len": len(frames),
                      "sam_size": self.sam_size}
            if kind is not None:
                kwargs["eval_prompt_kind"] = kind
            self._features[options] = default_feature_fn(self.tokenizer, train=False, **kwargs)
        try:
            # The same draw for every input (sample index 0): results do not depend on the batch.
            features = self._features[options](sample, _sample_rng(self.seed, 0))
            check_fits(features, self.buckets)
        except (BadSample, ValueError) as error:
            raise ValueError(f"{frames[0]}: the input cannot be prepared: {error}") from None
        # Inputs of one bucket run together (any task). The generation scatters a batch's patches
        # at either image or video placeholders: rows of the two kinds run apart. (x2sam_jax's
        # tokenizer writes a clip's temporal groups as image placeholders, so clips are image rows.)
        video = bool((np.asarray(features["input_ids"]) == self.model.config.vlm.video_token_id).any())
        key = tuple(sorted(self.collator.padded_sizes([features]).items())) + (video,)
        return dict(sample=sample, kind=kind, features=features, key=key, video=video, indices=indices, times=times,
                    out=request.get("out"))

    def _collate(self, items: list[dict]) -> dict:
        count = len(items)
        rows = min((b for b in self.batch_buckets if b >= count), default=count)
        batch = self.collator([i["features"] for i in items], batch_size=rows)
        valid = np.arange(rows) < count
        # sample_index maps a row to its input (for the post-processing); the region sampler's
        # keys come from index 0 for every row (see _run).
        batch["sample_index"] = np.where(valid, np.arange(rows), -1).astype(np.int32)
        batch["clip_index"] = np.where(valid, 0, -1).astype(np.int32)
        clip_frames = np.full((rows, batch["sam_pixel_values"].shape[1]), -1, np.int32)
        for row, item in enumerate(items):
            clip_frames[row, :item["sample"].num_frames] = np.arange(item["sample"].num_frames)
        batch["clip_frames"] = clip_frames
        batch["condition_instances"] = ([i["features"].get("condition_instances") for i in items]
                                        + [None] * (rows - count))
        return batch

    def _answers(self, batch: dict, count: int, video: bool) -> list[str]:
        """Greedy answers of the valid rows, generated together; the prompts are padded to the
        sequence bucket, the packed patches to a patch bucket and the grid rows to a fixed count,
        so one program serves the bucket."""
        rows = batch["input_ids"].shape[0]
        lengths = inference.prompt_lengths(batch)
        width = int(lengths[:count].max())
        ids = np.full((rows, width), self.pad_id, np.int32)
        attention = np.zeros((rows, width), np.int32)
        for b in range(count):
            ids[b, : lengths[b]] = batch["input_ids"][b, : lengths[b]]
            attention[b, : lengths[b]] = 1
        attention[count:, 0] = 1                     # padding rows: one pad token (generate needs one)
        pixels = np.concatenate([batch["pixel_values"][b][batch["pixel_valid"][b]] for b in range(count)])
        grids = np.concatenate([g[g.prod(-1) > 0] for g in batch["grid_thw"][:count]])
        # Trailing zero patches and all-zero grid rows are padding to the ViT (qwen3_vl_vision).
        padded = bucket_size(len(pixels), self.buckets.patch_counts, "patch_counts") \
            if len(pixels) <= max(self.buckets.patch_counts) else len(pixels)
        pixels = np.concatenate([pixels, np.zeros((padded - len(pixels), pixels.shape[1]), pixels.dtype)])
        grid_rows = rows * batch["grid_thw"].shape[1]
        grids = np.concatenate([grids, np.zeros((grid_rows - len(grids), 3), grids.dtype)]).astype(np.int32)
        vision = (dict(pixel_values_videos=pixels, video_grid_thw=grids) if video
                  else dict(pixel_values=pixels, image_grid_thw=grids))
        vlm = nnx.clone(self.model.vlm)   # generate writes its state back into the module it gets
        # The prompt pads to the batch's sequence bucket (not generate's powers of two): one
        # generation program per bucket, whatever the prompt's length.
        out = generate(vlm, ids, attention, max_new_tokens=self.max_new_tokens, stop_token_ids=(self.special.im_end,),
                       pad_token_id=self.pad_id, prompt_buckets=self.buckets.seq_lengths, **vision)
        tokens, produced = np.asarray(out.tokens), np.asarray(out.lengths)
        texts = []
        for b in range(count):
            row = [t for t in tokens[b, : int(produced[b])].tolist() if t != self.special.im_end]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=False).strip())
        return texts

    def _run(self, items: list[dict]) -> list[Prediction]:
        count = len(items)
        batch = self._collate(items)
        answers = self._answers(batch, count, items[0]["video"])
        zeros = np.zeros(batch["input_ids"].shape[0], np.int32)
        keys = inference.to_devices({"sample_index": zeros, "clip_index": zeros}, self.mesh)
        outputs = inference.to_host(self._forward(self.model, inference.model_inputs(batch, self.mesh), keys,
                                                  self.seed), self.mesh)
        samples = [i["sample"] for i in items]
        results = []
        for item, text, row in zip(items, answers, evaluator._rows(batch, outputs, samples, self.tokenizer,
                                                                     self.sam_size)):
            sample, kind = item["sample"], item["kind"]
            scored = not sample.task.startswith("v")   # image evaluators need ground-truth slots; it stays empty
            task_evaluator = tasks.evaluator_for(_OneSample(sample), scored=scored, submission=False)
            _, visual = task_evaluator.process(dataclasses.replace(row, index=0), visual=True)
            scores = [float(row.probs(0)[:, c].max()) for c in range(row.num_conditions)]
            labels = ["region" if kind else sample.phrases[0].text]
            visual = dataclasses.replace(visual, gt=None, gt_labels=[], pred_labels=labels, pred_scores=scores)
            result = Prediction(answer=text, labels=labels, masks=np.asarray(visual.pred, bool), scores=scores,
                                frames=list(sample.frames), frame_indices=item["indices"], frame_times=item["times"])
            if item["out"] is not None:
                out = os.fspath(item["out"])
                if os.path.dirname(out):
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                result.overlay = evaluator.draw_overlay(Path(out), row, visual, prompts=_drawn_prompts(sample),
                                                        frame_times=item["times"], threshold=self.threshold)
                extra = {} if item["indices"] is None else {"frame_indices": np.asarray(item["indices"])}
                if item["times"] is not None:
                    extra["frame_times"] = np.asarray(item["times"])
                np.savez_compressed(f"{out}_masks.npz", masks=result.masks, labels=np.asarray(labels),
                                    scores=np.asarray(scores), **extra)
            results.append(result)
        return results
