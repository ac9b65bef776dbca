"""Every frame of a video of any length, segmented in constant memory.

    predictor = x2sam_jax.Predictor("runs/main")
    done = predictor.predict_video("long.mp4", prompt="the red circle", out="pred/long")   # or point=, box=, mask=
    done.video, done.masks, done.summary      # pred/long.mp4, pred/long_masks.jsonl, pred/long.json

How (the recipe's pieces, put together for a whole video):
1. The LLM reads the prompt once, over ``clip_len`` (8) frames spread over the video as the
   recipe's span clips are (``data.clips.span_clips``: step L // 8 from frame 0, where a visual
   prompt lies); its conditions (<SEG> embedding, phrase tokens and means) serve every clip.
   One compiled program (``_read_prompt``) per prompt bucket; the answer comes from the
   Predictor's generation program.
2. The segmentor runs over every frame, ``clip_len`` frames at a time (the last clip padded:
   padded frames never reach the memory bank), one compiled program for any clip
   (``_segment_clip``). The memory bank either flows from one clip into the next (``carry``: an
   object seen at the end of a clip is remembered at the start of the next one) or starts empty
   at every clip (``reset``, as the official evaluation of a video runs its clips).
3. Frames are decoded with PyAV one at a time; a clip's frames and results are the only
   per-frame data held, so host and device memory do not grow with the video's length. Each
   clip's results are written as they come: the overlay mp4 at the source's frame rate, one JSON
   line per frame (frame index, time in seconds, per object its label, score and COCO RLE mask).
   Outputs go to temporary names, renamed when the whole video is done.

Per frame, each prompt's mask is its top-scoring query's (``eval.tasks.VideoObject``, the rule
the evaluation of video referring / object segmentation applies).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2sam_jax.data import clips as clips_mod
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.features import FeatureConfig
from x2sam_jax.eval import inference, tasks
from x2sam_jax.eval import visualize as overlays
from x2sam_jax.predictor import _OneSample
from x2sam_jax.storage import atomic

MEMORY_MODES = ("carry", "reset")
CLIP_LEN = FeatureConfig().clip_len          # the model's clip length (training and evaluation)


@dataclasses.dataclass
class VideoPrediction:
    answer: str                  # the model's answer to the prompt over the LLM's frames
    labels: list                 # one per object: the phrase, or "region"
    num_frames: int              # frames segmented (every frame of the video)
    fps: float | None            # the source's frame rate (the overlay's)
    llm_frames: list             # the frame indices the LLM read
    memory: str                  # "carry" or "reset"
    video: str                   # OUT.mp4: the overlay
    masks: str                   # OUT_masks.jsonl: one line per frame
    summary: str                 # OUT.json: this record


# ------------------------------------------------------------------------------------------ decoding
def _open(path: str):
    """(container, video stream) of a file PyAV decodes; a one-line ValueError otherwise."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a video PyAV can decode ({error})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} holds no video stream")
    return container, container.streams.video[0]


def frame_rate(path: str) -> float | None:
    container, stream = _open(path)
    with container:
        return float(stream.average_rate) if stream.average_rate else None


def iter_frames(path: str):
    """(index, time in seconds or None, RGB uint8 [H, W, 3]) of every frame, decoded one at a time."""
    import av

    container, stream = _open(path)
    rate = float(stream.average_rate) if stream.average_rate else None
    index = -1
    with container:
        try:
            for index, frame in enumerate(container.decode(stream)):
                time = float(frame.time) if frame.time is not None else (index / rate if rate else None)
                yield index, time, frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: decoding failed after frame {index} ({error})") from None


def _frame_count(path: str) -> int:
    """The container's frame count, else its packets counted (no decoding)."""
    container, stream = _open(path)
    with container:
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def llm_frames(path: str, clip_len: int = CLIP_LEN) -> tuple[list[int], list, list, int]:
    """(indices, times, RGB frames, frame count) of the frames the LLM reads: the first span clip
    (``span_clips``) of the video. Decodes up to the last of them; a container that states more
    frames than it holds is counted by decoding and sampled again."""
    total = _frame_count(path)
    while True:
        if total < 1:
            raise ValueError(f"{path} holds no decodable frame")
        indices = clips_mod.span_clips(total, clip_len)[0]
        wanted, got, decoded = set(indices), {}, 0
        for index, time, rgb in iter_frames(path):
            decoded = index + 1
            if index in wanted:
                got[index] = (time, rgb)
            if index >= indices[-1]:
                break
        if len(got) == len(indices):
            return indices, [got[i][0] for i in indices], [got[i][1] for i in indices], total
        total = decoded


# ------------------------------------------------------------------------------------------ programs
_CONDITION_ARGS = ("input_ids", "attention_mask", "pixel_values", "grid_thw", "cond_spans", "cond_valid",
                   "seg_positions", "region_masks", "region_valid", "region_frame", "position_ids",
                   "shared_conditions")


@functools.partial(jax.jit, static_argnums=0)
def _read_prompt(graphdef, state, inputs: dict, rows: dict, seed):
    """The segmentor's conditions from the prompt over the LLM's frames (``X2SAM.read_prompt``);
    region keys as the Predictor's forward draws them, so a visual prompt reads the same points."""
    model = nnx.merge(graphdef, state)
    model.eval()
    _, prompt_maps = model.encode_frames(inputs["sam_pixel_values"], inputs.get("sam_valid_hw"))
    keys = inference.region_keys(seed, rows["sample_index"], rows["clip_index"])
    arguments = {k: v for k, v in inputs.items() if k in _CONDITION_ARGS}
    _, conditions = model.read_prompt(prompt_maps, **arguments, region_key=keys)
    return conditions


def _segment(graphdef, state, frames: dict, frame_valid, conditions: dict, bank, first_frame):
    """``frames``: the clip's ``sam_pixel_values`` (uint8) and ``sam_valid_hw``."""
    model = nnx.merge(graphdef, state)
    model.eval()
    levels, _ = model.encode_frames(frames["sam_pixel_values"], frames["sam_valid_hw"])
    (masks, classes), bank = model.segmentor(
        levels, **conditions, all_predictions=False, frame_valid=frame_valid, scan=True,
        remat=model.config.frame_remat_policy, bank=bank, first_frame=first_frame, keep_bank=True)
    # [B, T, P, ...] with P = 1 (the last decoder prediction)
    return {"mask_logits": masks[:, :, -1], "class_logits": classes[:, :, -1]}, bank


_segment_clip = jax.jit(_segment, static_argnums=0)


# ------------------------------------------------------------------------------------------ the video
class VideoStreamer:
    """Streams videos through a Predictor's model (``Predictor.predict_video`` keeps one)."""

    def __init__(self, predictor, clip_len: int = CLIP_LEN):
        self.predictor, self.clip_len = predictor, int(clip_len)
        self._empty_banks: dict = {}

    def __call__(self, path, *, out, memory: str = "carry", prompt: str | None = None, point=None, box=None,
                 mask=None, progress: bool = False) -> VideoPrediction:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if out is None:
            raise ValueError("predict_video writes its results: give out=PATH (OUT.mp4, OUT_masks.jsonl, OUT.json)")
        path, out = os.fspath(path), os.fspath(out)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such video file")
        predictor = self.predictor
        # Every problem of the input is found here, before any device work.
        indices, times, frames, total = llm_frames(path, self.clip_len)
        fps = frame_rate(path)
        with tempfile.TemporaryDirectory(prefix="x2sam-video-") as tmp:
            item = predictor._prepare(dict(media=frames, prompt=prompt, point=point, box=box, mask=mask,
                                           frame_indices=indices, frame_times=times if None not in times else None),
                                      tmp)
            batch = predictor._collate([item])
            answer = predictor._answers(batch, 1, item["video"])
            conditions = self._conditions(batch)
        sample, kind = item["sample"], item["kind"]
        labels = ["region" if kind else sample.phrases[0].text]
        record = dict(answer=answer[0], labels=labels, fps=fps, llm_frames=indices, llm_frame_times=times,
                      memory=memory, clip_len=self.clip_len, source=path)
        files = dict(video=f"{out}.mp4", masks=f"{out}_masks.jsonl", summary=f"{out}.json")
        with contextlib.ExitStack() as stack:
            scratch = {k: stack.enter_context(atomic.atomic_file(v, overwrite=True, replaceable=lambda p: True))
                       for k, v in files.items()}
            writer = stack.enter_context(_Writer(scratch["video"], scratch["masks"], fps, labels))
            count = self._stream(path, batch, sample, conditions, memory, writer, progress, total)
            record["num_frames"] = count
            scratch["summary"].write_text(json.dumps(dict(record, files=files), indent=1))
        return VideoPrediction(answer=answer[0], labels=labels, num_frames=count, fps=fps, llm_frames=indices,
                               memory=memory, **files)

    def _conditions(self, batch: dict) -> dict:
        predictor = self.predictor
        graphdef, state = nnx.split(predictor.model)
        zeros = np.zeros(batch["input_ids"].shape[0], np.int32)
        rows = inference.to_devices({"sample_index": zeros, "clip_index": zeros}, predictor.mesh)
        return _read_prompt(graphdef, state, inference.model_inputs(batch, predictor.mesh), rows,
                            jnp.asarray(predictor.seed, jnp.uint32))

    def _empty_bank(self, graphdef, state, frames, valid, conditions):
        """A bank with no valid entry, shaped as the clip program's (its shapes traced once)."""
        key = (graphdef, frames["sam_pixel_values"].shape,
               tuple((k, v.shape, str(v.dtype)) for k, v in sorted(conditions.items())))
        if key not in self._empty_banks:
            shapes = jax.eval_shape(lambda *a: _segment(graphdef, *a)[1], state, frames, valid, conditions, None, 0)
            self._empty_banks[key] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return self._empty_banks[key]

    def _stream(self, path, batch, sample, conditions, memory, writer, progress, total) -> int:
        """Decodes, segments and writes every frame; returns the frame count."""
        from tqdm import tqdm

        predictor = self.predictor
        graphdef, state = nnx.split(predictor.model)
        evaluator = tasks.evaluator_for(_OneSample(sample), scored=False, submission=True)
        clip_row = functools.partial(
            tasks.Row, index=0, sample=sample, num_conditions=int(batch["cond_valid"][0].sum()),
            condition_instances=tuple(batch["condition_instances"][0]), sam_size=predictor.sam_size,
            region_masks=np.asarray(batch["region_masks"][0, :int(batch["region_valid"][0].sum())]),
            region_frame=np.asarray(batch["region_frame"][0, :int(batch["region_valid"][0].sum())]),
            labels=[], answer="")
        bank = empty = None

        def dispatch(clip, pixels, valid_hw):
            nonlocal bank, empty
            valid = np.zeros((1, self.clip_len), bool)
            valid[0, :len(clip)] = True
            sizes = np.where(valid[..., None], valid_hw, 0).astype(np.int32)   # padded frames: all padding
            arrays = inference.to_devices({"sam_pixel_values": pixels, "sam_valid_hw": sizes, "valid": valid},
                                          predictor.mesh)
            frames = {k: arrays[k] for k in ("sam_pixel_values", "sam_valid_hw")}
            if empty is None:
                empty = self._empty_bank(graphdef, state, frames, arrays["valid"], conditions)
            carry = memory == "carry" and bank is not None
            outputs, bank = self.segment(graphdef, state, frames, arrays["valid"], conditions,
                                         bank if carry else empty, clip[0][0] if carry else 0)
            return clip, valid_hw, outputs

        def write(clip, valid_hw, outputs):
            outputs = inference.to_host(outputs, predictor.mesh)
            n = len(clip)
            row = clip_row(clip=clip[0][0] // self.clip_len, frames=np.array([c[0] for c in clip]),
                           mask_logits=outputs["mask_logits"][0, :n], class_logits=outputs["class_logits"][0, :n],
                           sam_valid_hw=np.repeat(valid_hw[None], n, 0))
            record, visual = evaluator.process(row, visual=True)
            per_frame = len(record["masks"]) // n
            for t, (index, time, rgb) in enumerate(clip):
                objects = record["masks"][t * per_frame:(t + 1) * per_frame]
                writer.write(index, time, rgb, visual.pred[t], [(rle, score) for _, _, rle, score in objects])
            bar.update(n)

        count, pending = 0, None
        with tqdm(total=total, unit="frame", disable=not progress, desc=os.path.basename(path)) as bar:
            for clip, pixels, valid_hw in self._clips(path, sample):
                # The clip goes to the device before the previous one's results are written.
                dispatched = dispatch(clip, pixels, valid_hw)
                if pending is not None:
                    write(*pending)
                pending, count = dispatched, count + len(clip)
            if pending is not None:
                write(*pending)
        return count

    def _clips(self, path, sample):
        """(frames [(index, time, RGB)], their SAM pixels [1, clip_len, S, S, 3] uint8 zero-padded,
        the resized frame's size) per clip of the video, the last clip short."""
        size = self.predictor.sam_size
        config = tf.SamPreprocessConfig(size=size)
        clip, pixels, valid_hw = [], None, None
        for index, time, rgb in iter_frames(path):
            if rgb.shape[:2] != (sample.height, sample.width):
                raise ValueError(f"{path}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the video "
                                 f"{sample.width}x{sample.height}")
            if pixels is None:   # a fresh array per clip: the one dispatched may still be read on the device
                pixels = np.zeros((1, self.clip_len, size, size, 3), np.uint8)
            _, valid_hw = tf.sam_image(rgb, config, out=pixels[0, len(clip)])
            clip.append((index, time, rgb))
            if len(clip) == self.clip_len:
                yield clip, pixels, valid_hw
                clip, pixels = [], None
        if clip:
            yield clip, pixels, valid_hw

    def segment(self, graphdef, state, frames, valid, conditions, bank, first_frame):
        """One clip: (outputs, the bank leaving it). The one place a clip meets the device."""
        return _segment_clip(graphdef, state, frames, valid, conditions, bank, jnp.asarray(first_frame, jnp.int32))


class _Writer:
    """The overlay mp4 (PyAV, H.264 at the source's rate) and the masks' JSON lines, frame by frame."""

    def __init__(self, video_path, masks_path, fps: float | None, labels: list):
        self.video_path, self.masks_path, self.labels = video_path, masks_path, labels
        self.rate = Fraction(fps or 25).limit_denominator(1001 * 1000)
        self.colors = overlays.palette(max(len(labels), 1))

    def __enter__(self):
        import av

        self.container = av.open(os.fspath(self.video_path), mode="w", format="mp4")
        self.stream = None
        self.lines = open(self.masks_path, "w")
        return self

    def write(self, index: int, time, rgb, masks, objects):
        """One frame: masks bool [K, H, W]; objects: (COCO RLE, score) per label."""
        import av

        page = overlays.add_legend(overlays.overlay(rgb, masks, self.colors),
                                   [f"{label} {score:.2f}" for label, (_, score) in zip(self.labels, objects)],
                                   self.colors)
        page = np.pad(page, ((0, page.shape[0] % 2), (0, page.shape[1] % 2), (0, 0)), mode="edge")  # yuv420p
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = page.shape[1], page.shape[0], "yuv420p"
            self.stream.options = {"crf": "18"}
        self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(page, format="rgb24")))
        self.lines.write(json.dumps({"frame": int(index), "time": time, "objects": [
            {"label": label, "score": float(score), "rle": rle} for label, (rle, score) in zip(self.labels, objects)]})
            + "\n")

    def __exit__(self, *exc):
        try:
            if self.stream is not None and exc[0] is None:
                self.container.mux(self.stream.encode(None))     # flush the encoder
        finally:
            self.container.close()
            self.lines.close()
