"""Shared pieces of the dataset sources: the base class, file checks, RLE helpers, PNG readers.

Every source indexes its annotation files at construction (a missing file or directory is a
FileNotFoundError naming the path) and builds one `Sample` per `__getitem__`. Anything wrong
inside one record (a missing key, a mask of the wrong size, an unknown category) becomes
`BadSample(reason)` so the pipeline's robust wrapper can skip and count it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data.schema import BadSample, Sample

logger = logging.getLogger("x2sam_jax.data")

# ----------------------------------------------------------------------------------- base class
class MalformedRecord:
    """Stands in `Source._records` for an index entry that could not be parsed at construction (an
    annotation without its `image_id`, say): one bad record is one counted skip when it is read,
    never an error that stops the whole source."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"MalformedRecord({self.reason!r})"


class Source:
    """Random-access source (Grain MapDataset-compatible: `__len__`, `__getitem__`).

    Subclasses index their annotation file into `self._records` (one entry per sample; a
    `MalformedRecord` for an entry that could not be indexed) or override `__len__`.
    `has_targets` is False for an evaluation split whose ground truth is withheld (its samples
    carry prompts only, see `Sample.has_targets`).
    """

    name: str = "source"
    task: str = "gen_seg"
    has_targets: bool = True

    def __len__(self) -> int:
        return len(self._records)

    def _build(self, index: int) -> Sample:
        raise NotImplementedError

    def _frame_count(self, index: int) -> int:
        return 1

    def _check_index(self, index) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} samples")
        return index

    def _malformed(self, index: int) -> MalformedRecord | None:
        records = getattr(self, "_records", None)
        record = records[index] if records is not None else None
        return record if isinstance(record, MalformedRecord) else None

    def __getitem__(self, index) -> Sample:
        index = self._check_index(index)
        bad = self._malformed(index)
        if bad is not None:
            raise BadSample(f"{self.name}[{index}]: {bad.reason}", kind="malformed_record")
        try:
            sample = self._build(index)
        except BadSample:
            raise
        # A malformed record surfaces as one of these while it is parsed; name the record.
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as err:
            raise BadSample(f"{self.name}[{index}]: malformed record ({type(err).__name__}: {err})") from err
        return sample.validate()

    def frame_count(self, index) -> int:
        """Number of frames of sample `index`, without building it (for length sorting); 0 when the
        record is malformed (its `__getitem__` raises BadSample, so one bad record cannot stop start-up)."""
        index = self._check_index(index)
        if self._malformed(index) is not None:
            return 0
        try:
            return self._frame_count(index)
        except (BadSample, KeyError, TypeError, ValueError, IndexError, AttributeError, OSError):
            return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, task={self.task!r}, len={len(self)})"


# ----------------------------------------------------------------------------------- file checks
def require_file(path: str, what: str = "annotation file") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_dir(path: str, what: str = "dataset directory") -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_json(path: str, what: str = "annotation file"):
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and scalars: a refs pickle holds nothing else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def load_plain_pickle(path: str, what: str = "annotation pickle"):
    """Load a pickle of dicts/lists/strings/numbers (e.g. REFER's `refs(unc).p`, a Python 2 pickle)."""
    require_file(path, what)
    with open(path, "rb") as f:
        try:
            return _PlainDataUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{what} {path}: {err}") from err


def group_by_key(items, key: str, what: str, where: str) -> tuple[dict, list[MalformedRecord]]:
    """Groups the dict entries of an annotation list by `entry[key]` (annotations by "image_id",
    say). An entry that is not a dict or lacks the key becomes a MalformedRecord naming the file,
    the entry's position and the missing key, so the source skips and counts it; a few such
    entries are logged once at construction."""
    groups: dict = {}
    bad: list[MalformedRecord] = []
    for position, item in enumerate(items or []):
        if not isinstance(item, dict) or item.get(key) is None:
            ident = f" (id {item.get('id')})" if isinstance(item, dict) and item.get("id") is not None else ""
            bad.append(MalformedRecord(f"{where}: {what} #{position}{ident} has no {key!r}"))
            continue
        groups.setdefault(item[key], []).append(item)
    if bad:
        logger.warning("%s: %d %s entries without %r are skipped (first: %s)", where, len(bad), what, key,
                       bad[0].reason)
    return groups, bad


# ----------------------------------------------------------------------------------- category names
def clean_category_name(name: str) -> str:
    """COCO/ADE names as the official code shows them: no '-merged'/'-stuff', no '(..)', spaces."""
    name = re.sub(r"-merged", "", name)
    name = re.sub(r"-stuff", "", name)
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace(".", "").replace("_", " ").replace("-", " ")
    name = re.sub(r" +", " ", name)
    return name.strip().lower()


# ----------------------------------------------------------------------------------- RLE helpers
RLE_ERROR = "bad mask RLE"  # prefix of every RLE error (robust.classify counts them as corrupt_mask)


def rle_counts(counts) -> np.ndarray:
    """The run lengths of a COCO compressed RLE string (int64), decoded without pycocotools.

    The format (pycocotools maskApi `rleFrString`): each run is a little-endian base-32 number,
    5 bits per character offset by 48, bit 0x20 = "more characters follow", bit 0x10 of the last
    character = negative; from the fourth run on, each value is stored as the difference to the
    run two places before. Raises ValueError on characters outside the alphabet or a number cut
    off in the middle.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError(f"{RLE_ERROR}: counts string holds characters outside the COCO alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError(f"{RLE_ERROR}: counts string ends inside a number (truncated)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    digit = np.arange(c.size) - np.repeat(starts, ends - starts + 1)  # position inside its number
    if digit.max() > 11:  # 12 digits = 60 bits: nothing a real mask needs
        raise ValueError(f"{RLE_ERROR}: counts string holds a number too large for a mask")
    values = np.add.reduceat((c & 0x1F) << (5 * digit), starts)
    negative = (c[ends] & 0x10) != 0
    values = values - np.where(negative, np.left_shift(1, 5 * (digit[ends] + 1)), 0)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run 3 = stored 3 + run 1, run 5 = stored 5 + run 3, ...
    runs[2::2] = np.cumsum(values[2::2])  # run 4 = stored 4 + run 2, ... (run 2 is stored as is)
    return runs


def check_rle(rle) -> dict:
    """A COCO RLE dict checked for decoding: its runs must be non-negative and cover exactly
    height x width pixels. (pycocotools decodes a truncated run list into whatever memory follows
    it: random masks, different on every run.) Returns {"size": [h, w], "counts": bytes} for
    compressed input, the dict itself for uncompressed ({"counts": [ints]}); raises ValueError
    starting "bad mask RLE" (the skip reason "corrupt_mask" in data/robust.py) saying what is wrong."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{RLE_ERROR}: needs 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or any(int(v) < 0 for v in size):
        raise ValueError(f"{RLE_ERROR}: size {size!r} is not [height, width]")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = rle_counts(counts)
    elif isinstance(counts, (list, tuple)):
        runs = np.asarray(counts, np.int64)
    else:
        raise ValueError(f"{RLE_ERROR}: counts of type {type(counts).__name__}")
    if runs.size and runs.min() < 0:
        raise ValueError(f"{RLE_ERROR}: a negative run length (corrupt counts)")
    total = int(runs.sum())
    if total != h * w:
        raise ValueError(f"{RLE_ERROR}: runs cover {total} pixels, its size {h}x{w} has {h * w} "
                         "(truncated or corrupt counts)")
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    return rle if isinstance(counts, (list, tuple)) else {"size": [h, w], "counts": counts}


def encode_mask(mask: np.ndarray) -> dict:
    """Binary [H, W] array -> compressed COCO RLE with `counts` as str (JSON- and pickle-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    rle["size"] = [int(v) for v in rle["size"]]
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """RLE (compressed with counts str or bytes, or uncompressed) -> uint8 [H, W]; ValueError when
    the runs do not cover the mask exactly (see `check_rle`)."""
    rle = check_rle(rle)
    if isinstance(rle["counts"], (list, tuple)):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return mask_utils.decode(rle)


def empty_rle(height: int, width: int) -> dict:
    return encode_mask(np.zeros((height, width), np.uint8))


def to_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation -> one compressed RLE at (height, width).

    Accepts polygons ([[x0, y0, ...], ...]), uncompressed RLE ({"counts": [ints]}), compressed RLE,
    or a list of RLEs (merged, as GCG files store several pieces of one phrase).
    Raises ValueError when the segmentation is malformed or its size disagrees with (height, width).
    """
    if isinstance(segmentation, dict):
        rles = [segmentation]
    elif isinstance(segmentation, (list, tuple)) and segmentation and isinstance(segmentation[0], dict):
        rles = list(segmentation)
    elif isinstance(segmentation, (list, tuple)) and segmentation and isinstance(segmentation[0], (list, tuple)):
        polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise ValueError("segmentation has no valid polygon (need >= 3 points each)")
        merged = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        merged["counts"] = merged["counts"].decode("ascii")
        merged["size"] = [int(height), int(width)]
        return merged
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")

    compressed = []
    for rle in rles:
        checked = check_rle(rle)
        h, w = checked["size"]
        if (h, w) != (int(height), int(width)):
            raise ValueError(f"RLE size {h}x{w} differs from image size {height}x{width}")
        if isinstance(checked["counts"], (list, tuple)):
            checked = mask_utils.frPyObjects({"size": [h, w], "counts": list(checked["counts"])}, h, w)
        compressed.append(checked)
    merged = compressed[0] if len(compressed) == 1 else mask_utils.merge(compressed)
    counts = merged["counts"]
    return {"size": [int(height), int(width)], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_area(rle: dict) -> int:
    checked = check_rle(rle)
    if isinstance(checked["counts"], (list, tuple)):
        return int(sum(checked["counts"][1::2]))
    return int(mask_utils.area(checked))


def merge_rles(rles: list, height: int, width: int) -> dict:
    """Union of several RLEs (any of the forms `to_rle` accepts)."""
    return to_rle([to_rle(r, height, width) for r in rles], height, width)


def rle_size(segmentation) -> tuple[int, int] | None:
    """(height, width) stored in an RLE or a list of RLEs, if any."""
    if isinstance(segmentation, dict) and "size" in segmentation:
        return int(segmentation["size"][0]), int(segmentation["size"][1])
    if isinstance(segmentation, (list, tuple)) and segmentation and isinstance(segmentation[0], dict):
        return rle_size(segmentation[0])
    return None


# ----------------------------------------------------------------------------------- PNG readers
def read_png(path: str) -> np.ndarray:
    """A label PNG as an integer array: palette/grey PNGs give the index, RGB PNGs give [H, W, 3]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label PNG not found: {path}")
    with Image.open(path) as img:
        if img.mode in ("P", "L", "I", "I;16"):
            return np.asarray(img).astype(np.int64)
        return np.asarray(img.convert("RGB")).astype(np.int64)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: id = R + 256 G + 256^2 B."""
    if rgb.ndim == 2:
        return rgb.astype(np.int64)
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header (no pixel decoding)."""
    with Image.open(path) as img:
        return img.height, img.width


def rasterize_polygons(polygons, height: int, width: int, values=None, order=None) -> np.ndarray:
    """Paint polygons ([[x, y], ...] each) into a uint8 canvas: interior and 1-px outline.

    Points are truncated to ints as the official code does (np.int32), then filled with PIL; PIL's
    scan conversion can differ from OpenCV's fillPoly on boundary pixels.
    """
    from PIL import ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    values = values if values is not None else [1] * len(polygons)
    for k in order if order is not None else range(len(polygons)):
        pts = [(int(np.int32(x)), int(np.int32(y))) for x, y in polygons[k]]
        if len(pts) >= 2:
            draw.polygon(pts, fill=int(values[k]), outline=int(values[k]))
    return np.asarray(canvas)


def open_frame(sample: Sample, t: int) -> Image.Image:
    """Frame t of a sample as an RGB PIL image, from its file or from embedded bytes (TFDS)."""
    embedded = sample.meta.get("frame_bytes")
    if embedded:
        return Image.open(io.BytesIO(embedded[t])).convert("RGB")
    with Image.open(sample.frames[t]) as img:
        return img.convert("RGB")
