"""Image preprocessing for the two encoders, written to match the reference processors.

Pixels leave the host as uint8, resized and laid out; the encoders normalise them on the device
(`x2sam_jax.layers.pixels`, bit-identical to the processors' float32 normalisation).

Qwen3-VL (ViT input): `smart_resize` to multiples of 32 (patch 16 x merge 2), PIL bicubic on uint8,
then patches flattened in transformers' order: for every 2x2 merge window (row-major over
windows), its four 16x16 patches (row-major), each patch laid out as [channel, temporal(2), 16, 16].
Images are duplicated to 2 temporal frames; videos are grouped by 2 consecutive frames (the last
frame repeats when the count is odd). The device applies rescale 1/255 and mean/std 0.5.
Reference: transformers `Qwen2VLImageProcessorPil` (the image processor Qwen3-VL uses) and the
`patchify` / `smart_resize` of `Qwen3VLVideoProcessor`. Images are resized with PIL bicubic (the
PIL backend, bit-exact); video frames with torchvision's tensor resize (bicubic, antialias, which
rounds back to uint8), written out here in numpy (`torch_bicubic_resize`, checked against torch's
interpolate).

SAM2 (mask encoder input): longest side -> S with int(x + 0.5) rounding, PIL bilinear on uint8,
zero pad bottom/right to S x S; the device applies ImageNet mean/std and keeps the padding 0
(docs/data.md#image-preprocessing; transformers `SamImageProcessorPil` does exactly this). Masks
go to the S/4 grid the same way (longest side -> S/4, nearest, pad), region prompts to the S grid
(nearest, pad).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from fractions import Fraction

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from x2sam_jax.data.schema import BadSample
from x2sam_jax.data.sources.common import check_rle


@dataclasses.dataclass(frozen=True)
class QwenVisionPreprocessConfig:
    """Qwen3-VL preprocessing; pixel budgets are those of the Qwen3-VL-4B-Instruct processor files."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = 65536  # preprocessor_config.json size.shortest_edge
    image_max_pixels: int = 16777216  # preprocessor_config.json size.longest_edge
    video_min_pixels: int = 4096  # video_preprocessor_config.json
    video_max_pixels: int = 25165824

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class SamPreprocessConfig:
    size: int = 1024  # S: longest side after resize, and the padded square
    mask_stride: int = 4  # gt masks live on the S/4 grid (the mask-feature resolution)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3]; a missing or unreadable file is a BadSample naming the path."""
    if not os.path.isfile(path):
        raise BadSample(f"missing image file {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadSample(f"corrupt image file {path}: {err}") from err


def load_image_bytes(data: bytes, name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] from encoded image bytes (TFDS-embedded frames); `name` is what an
    error names (the frame's tfds:// address)."""
    if not data:
        raise BadSample(f"missing image file {name} (no bytes stored)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadSample(f"corrupt image file {name}: {err}") from err


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _natural_key(name: str):
    """'frame_10.jpg' after 'frame_9.jpg': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Uniform frame sampling of transformers' Qwen3-VL video processor (`sample_frames` with
    num_frames): linspace(0, total - 1, n).round(), with n capped at `total` (no repeats)."""
    return np.linspace(0, total - 1, min(num_frames, total)).round().astype(int)


def bounded_frame_indices(total: int, num_frames: int | None, bound, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """MVBench's clip bounds as X2SAM's evaluation applies them: VLMEvalKit hands a video LLM the
    clip [start, min(end, duration)] seconds cut out of the video (mvbench.py
    `load_into_video_and_process`, moviepy's subclip: its frame k is the source frame
    int(fps * (start + k / fps) + 1e-5), k over arange(0, end - start, 1 / fps)), and the model's
    processor samples it uniformly (`sample_frame_indices`). (VLMEvalKit's `get_index`, segment
    midpoints, is the path of image-frame models, which X2SAM is not.) Returns (source frame
    indices, their indices within the cut clip); an empty clip is a BadSample."""
    start, end = max(float(bound[0]), 0.0), min(float(bound[1]), total / fps)
    offsets = np.arange(0.0, end - start, 1.0 / fps)
    if not offsets.size:
        raise BadSample(f"clip bound {tuple(bound)} s holds no frame of a {total}-frame video at {fps:g} fps")
    source = np.minimum((fps * (offsets + start) + 1e-5).astype(np.int64), total - 1)
    picked = sample_frame_indices(len(source), num_frames or len(source))
    return source[picked], picked


@dataclasses.dataclass
class VideoFrames:
    """Frames sampled from a video: RGB uint8 [H, W, 3] each, their indices in the video, the
    video's frame rate (None for a directory of frames, which has none), and with a clip bound
    their indices within the cut clip (its own time axis starts at 0; None when uncut)."""

    frames: list
    indices: np.ndarray
    fps: float | None = None
    clip_indices: np.ndarray | None = None


def _frame_plan(total: int, num_frames: int | None, bound, fps: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(source indices, clip indices or None) of the frames to read."""
    if bound is None:
        return sample_frame_indices(total, num_frames or total), None
    if not fps:
        raise BadSample(f"a clip bound {tuple(bound)} needs the video's frame rate (none given or stored)")
    return bounded_frame_indices(total, num_frames, bound, fps)


def load_video_frames(path: str, num_frames: int | None = None, *, bound=None, fps: float | None = None) -> VideoFrames:
    """`num_frames` frames sampled uniformly (`sample_frame_indices`) from a video (all frames when
    None): a video file decoded with PyAV (mp4, mkv, webm, ...), or a directory of extracted frames
    (image files in natural name order). `bound` (start, end) in seconds samples within that clip
    only (`bounded_frame_indices`, MVBench); `fps` is the frame rate of a frame directory (a file's
    own rate otherwise). Undecodable or empty videos are a BadSample naming the file."""
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
        if not names:
            raise BadSample(f"video frame directory {path} holds no image files")
        try:
            indices, clip = _frame_plan(len(names), num_frames, bound, fps)
        except BadSample as err:
            raise BadSample(f"{path}: {err}") from err
        return VideoFrames([load_image(os.path.join(path, names[i])) for i in indices], indices, fps, clip)
    if not os.path.isfile(path):
        raise BadSample(f"missing video {path}", kind="missing_file")
    try:
        return _decode_video_file(path, num_frames, bound, fps)
    except BadSample as err:
        if path in str(err):
            raise
        raise BadSample(f"{path}: {err}") from err   # a bound beyond the video
    except Exception as err:  # PyAV raises its own error types for corrupt / unsupported files
        raise BadSample(f"cannot decode video file {path}: {type(err).__name__}: {err}", kind="corrupt_image") from err


def _decode_video_file(path: str, num_frames: int | None, bound=None, fps: float | None = None) -> VideoFrames:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise BadSample(f"video file {path} has no video stream", kind="corrupt_image")
        stream = container.streams.video[0]
        fps = fps or (float(stream.average_rate) if stream.average_rate else None)
        total = int(stream.frames or 0)  # container metadata; 0 when the container does not say
        if total and (num_frames or bound is not None):
            wanted, clip = _frame_plan(total, num_frames, bound, fps)
            frames = _decode_indices(container, stream, set(wanted.tolist()))
            if len(frames) == len(set(wanted.tolist())):
                return VideoFrames([frames[i] for i in wanted], wanted, fps, clip)
            container.seek(0)  # the metadata overstated the length: count by decoding
        frames = _decode_indices(container, stream, None)
    if not frames:
        raise BadSample(f"video file {path} holds no decodable frames", kind="corrupt_image")
    indices, clip = _frame_plan(len(frames), num_frames, bound, fps)
    return VideoFrames([frames[i] for i in indices], indices, fps, clip)


def video_frame_count(path: str) -> tuple[int, float]:
    """(frame count, frame rate) of a video file, from its container (counted by demuxing when the
    container does not say); a missing or unreadable file is a BadSample naming it."""
    if not os.path.isfile(path):
        raise BadSample(f"missing video {path}", kind="missing_file")
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            total = int(stream.frames or 0) or sum(1 for p in container.demux(stream) if p.size)
    except Exception as err:  # PyAV's own error types, or no video stream
        raise BadSample(f"cannot read video file {path}: {type(err).__name__}: {err}", kind="corrupt_image") from err
    if not total or not fps:
        raise BadSample(f"video file {path} states no frames or frame rate", kind="corrupt_image")
    return total, fps


def _decode_indices(container, stream, keep: set | None) -> dict:
    """Decodes the stream in order, keeping the frames whose index is in `keep` (all when None)."""
    frames = {}
    last = max(keep) if keep else None
    for index, frame in enumerate(container.decode(stream)):
        if keep is None or index in keep:
            frames[index] = frame.to_ndarray(format="rgb24")
        if last is not None and index >= last:
            break
    return frames


def write_video_file(path: str, frames, fps: float = 8.0, crf: int = 18) -> str:
    """Encodes RGB uint8 frames [H, W, 3] (equal sizes; odd sides are cropped by one pixel, which
    yuv420p needs) as an H.264 video file with PyAV; returns the path."""
    import av

    frames = [np.asarray(f, np.uint8) for f in frames]
    if not frames or len({f.shape for f in frames}) != 1 or frames[0].ndim != 3 or frames[0].shape[2] != 3:
        raise ValueError(f"write_video_file: needs >= 1 RGB frames of one size, got {[f.shape for f in frames]}")
    height, width = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame[:height, :width], format="rgb24")))
        container.mux(stream.encode(None))  # flush the encoder
    return path


def decode_rle(rle: dict | None, height: int, width: int) -> np.ndarray:
    """bool [H, W]; None (object absent on this frame) is an empty mask. An RLE whose runs do not
    cover its size exactly (truncated or corrupt counts) is a BadSample of kind "corrupt_mask"."""
    if rle is None:
        return np.zeros((height, width), bool)
    try:
        rle = check_rle(rle)
    except ValueError as err:
        raise BadSample(str(err), kind="corrupt_mask") from err
    if isinstance(rle["counts"], (list, tuple)):  # uncompressed RLE
        rle = mask_utils.frPyObjects({"size": rle["size"], "counts": list(rle["counts"])}, *rle["size"])
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise BadSample(f"mask of size {list(mask.shape)} for an image of size {[height, width]}")
    return mask


# --------------------------------------------------------------------------------------------
# Qwen3-VL
# --------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL image resize target: multiples of `factor`, pixel count within [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise BadSample(f"aspect ratio of {height}x{width} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_smart_resize(
    num_frames: int, height: int, width: int, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL video resize target: the pixel budget counts all (temporally rounded) frames."""
    if height < factor or width < factor:  # tiny frames are first scaled up to one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise BadSample(f"aspect ratio of {height}x{width} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = max(temporal_factor, round(num_frames / temporal_factor) * temporal_factor)
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_resize(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _aa_bicubic_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [n_out, K] and weights [n_out, K] of torch's antialiased bicubic (Keys
    a = -0.5, support widened by the downscale factor, weights normalised per output pixel).
    Scale, centres and weights are float32 with torch's mixed float/double promotions: computing
    them in float64 instead moves outputs by ~2e-3 grey levels and flips roundings."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = f32(2) * scale if scale >= 1 else f32(2)
    inv_scale = f32(1) / scale if scale >= 1 else f32(1)
    centers = (scale.astype(np.float64) * (np.arange(n_out) + 0.5)).astype(f32)
    starts = np.maximum(np.trunc((centers - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    stops = np.minimum(np.trunc((centers + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    taps = int((stops - starts).max())
    offsets = np.arange(taps)
    shifted = (starts[:, None] + offsets[None]).astype(f32) - centers[:, None]  # float32
    x = np.abs(((shifted.astype(np.float64) + 0.5) * np.float64(inv_scale)).astype(f32))
    a = f32(-0.5)
    near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
    far = (((x - f32(5)) * x + f32(8)) * x - f32(4)) * a
    weights = np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(f32)
    weights[offsets[None] >= (stops - starts)[:, None]] = 0
    total = np.zeros(n_out, f32)
    for k in range(taps):  # sequential float32 sum, as the reference
        total += weights[:, k]
    weights /= total[:, None]
    return np.minimum(starts[:, None] + offsets[None], n_in - 1), weights


def _resample_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    if x.shape[axis] == n_out:  # the weights are exactly the identity then
        return x
    from scipy import sparse

    index, weights = _aa_bicubic_weights(x.shape[axis], n_out)
    used = weights != 0
    rows = np.broadcast_to(np.arange(n_out)[:, None], index.shape)[used]
    # A sparse [n_out, n_in] matrix; its product sums each row's taps in column order in float32,
    # the order of the reference loop.
    matrix = sparse.csr_matrix((weights[used], (rows, index[used])), shape=(n_out, x.shape[axis]), dtype=np.float32)
    moved = np.moveaxis(x, axis, 0)
    out = matrix @ moved.reshape(moved.shape[0], -1)
    return np.moveaxis(np.asarray(out, np.float32).reshape((n_out,) + moved.shape[1:]), 0, axis)


def torch_bicubic_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [..., H, W, C] resized like torchvision's tensor resize (bicubic, antialias=True),
    which transformers' Qwen3-VL video processor uses: float interpolation, width pass then
    height pass, clamp to [0, 255], round, back to uint8."""
    if frames.shape[-3:-1] == (height, width):
        return frames
    x = frames.astype(np.float32)
    x = _resample_axis(x, x.ndim - 2, width)
    x = _resample_axis(x, x.ndim - 3, height)
    return np.round(np.clip(x, 0, 255)).astype(np.uint8)


def patchify(frames: np.ndarray, cfg: QwenVisionPreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """frames [T, H, W, 3] (T a multiple of the temporal patch) -> patches [N, 3*Tp*P*P] of their
    dtype, grid_thw [3] int32."""
    t, h, w, c = frames.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # -> (gt, gh/m, gw/m, m_h, m_w, c, tp, p_h, p_w): merge windows row-major, then the patch content
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), np.array([gt, gh, gw], np.int32)


def qwen_image_patches(image: np.ndarray, cfg: QwenVisionPreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (pixel_values [N, 3*2*16*16] uint8, grid_thw [3] int32)."""
    h, w = image.shape[:2]
    rh, rw = smart_resize(h, w, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
    frame = _pil_resize(image, rh, rw, Image.BICUBIC)
    return patchify(np.repeat(frame[None], cfg.temporal_patch_size, axis=0), cfg)


def qwen_video_patches(frames: list[np.ndarray] | np.ndarray, cfg: QwenVisionPreprocessConfig):
    """uint8 frames (same size) -> (pixel_values [N, 1536] uint8, grid_thw [3] int32)."""
    frames = np.asarray(frames)
    t, h, w = frames.shape[:3]
    if t < cfg.temporal_patch_size:  # a single frame is duplicated, like an image
        frames = np.repeat(frames, cfg.temporal_patch_size, axis=0)
        t = frames.shape[0]
    rh, rw = video_smart_resize(
        t, h, w, cfg.factor, cfg.temporal_patch_size, cfg.video_min_pixels, cfg.video_max_pixels
    )
    resized = torch_bicubic_resize(frames, rh, rw)
    if pad := -t % cfg.temporal_patch_size:  # the last frame repeats to complete a temporal group
        resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
    return patchify(resized, cfg)


def merged_token_count(grid_thw, merge_size: int = 2) -> int:
    """Number of LLM placeholder tokens of one image/video after the 2x2 merger."""
    gt, gh, gw = (int(v) for v in grid_thw)
    return gt * gh * gw // (merge_size * merge_size)


# --------------------------------------------------------------------------------------------
# SAM2
# --------------------------------------------------------------------------------------------


def longest_side_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """Unpadded size after resizing the longest side to `longest` (SAM's int(x + 0.5) rounding)."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_image(image: np.ndarray, cfg: SamPreprocessConfig, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (pixels [S, S, 3] uint8 zero-padded, valid_hw [2] int32: the resized
    size, which tells the device's normalisation where the padding starts).

    `out` (uint8 [S, S, 3], e.g. one frame of a preallocated clip array) receives the pixels in
    place, padding included."""
    h, w = image.shape[:2]
    rh, rw = longest_side_shape(h, w, cfg.size)
    if out is None:
        out = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    else:
        if out.shape != (cfg.size, cfg.size, 3) or out.dtype != np.uint8:
            raise ValueError(f"sam_image: out must be uint8 {(cfg.size, cfg.size, 3)}, got {out.dtype} {out.shape}")
        out[rh:] = 0
        out[:rh, rw:] = 0
    out[:rh, :rw] = _pil_resize(image, rh, rw, Image.BILINEAR)
    return out, np.array([rh, rw], np.int32)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PIL NEAREST source index of each output pixel, ~floor((i + 0.5) * n_in / n_out). PIL walks
    the positions by repeated addition in double precision; cumsum reproduces its rounding."""
    scale = n_in / n_out
    steps = np.full(n_out, scale)
    steps[0] = scale * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), n_in - 1)


def resize_masks_padded(masks: np.ndarray, longest: int, padded: int | None = None) -> np.ndarray:
    """bool [..., H, W] -> bool [..., P, P]: longest side -> `longest` (nearest), zero pad bottom/right."""
    h, w = masks.shape[-2:]
    padded = longest if padded is None else padded
    rh, rw = longest_side_shape(h, w, longest)
    rows, cols = _nearest_index(h, rh), _nearest_index(w, rw)
    out = np.zeros(masks.shape[:-2] + (padded, padded), bool)
    out[..., :rh, :rw] = masks[..., rows[:, None], cols[None, :]]
    return out


def gt_mask_grid(masks: np.ndarray, cfg: SamPreprocessConfig) -> np.ndarray:
    """Ground-truth masks on the padded S/4 grid (the mask-logit resolution)."""
    grid = cfg.size // cfg.mask_stride
    return resize_masks_padded(masks, grid)


def region_mask_grid(masks: np.ndarray, cfg: SamPreprocessConfig) -> np.ndarray:
    """Visual-prompt masks on the padded S grid (what the region sampler reads)."""
    return resize_masks_padded(masks, cfg.size)
