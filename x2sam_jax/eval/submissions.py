"""Prediction files in the formats the benchmark servers take, for evaluation splits whose ground
truth is withheld (sources give their samples `has_targets=False`).

Ref-YouTube-VOS 2021 (CodaLab challenge, valid phase): a zip with one PNG per expression and frame,
  Annotations/{video}/{exp_id}/{frame}.png
single channel, 0 = background, 255 = the referred object, at the video's original size, for every
frame the meta file lists (the layout ReferFormer's evaluation writes and zips with
`zip -r submission.zip Annotations`; the server reads the Annotations/ folder at the archive's top).

YouTube-VOS 2019 (semi-supervised, CodaLab valid phase; the DAVIS-style layout): a zip with one
palette PNG per video and frame,
  Annotations/{video}/{frame}.png
8-bit "P" mode at the video's original size, pixel value = object id (0 = background), every
object of the video in the one PNG, for every frame the split's meta.json lists for the video (the
union of its objects' frames: the frames in valid/JPEGImages the server evaluates). An object is
drawn on the frames meta.json lists for it only (from its first appearance); objects that overlap
are resolved per pixel by score: the object with the higher score on that frame wins, the later
(higher) object id on a tie or without scores. A frame without any prediction is all background.

YouTube-VIS 2019 / 2021 (CodaLab): results.json, a list with one entry per predicted track,
  {"video_id": int, "category_id": int, "score": float,
   "segmentations": [one compressed RLE {"size": [h, w], "counts": str} per frame of the video, or None]}
zipped with results.json at the archive's top (the server takes the zip; mmtracking's
`format_results` writes the same). Loaders of the pycocotools family (`YTVOS.loadRes`) accept it.

Inputs are numpy masks: bool or integer [H, W] (nonzero = object) at the original frame size,
after post-processing (thresholding and resizing back are the caller's), or COCO RLEs of them. The
keys come from the samples: Ref-YouTube-VOS `meta["video_id"]`, `meta["expression_ids"]` (one per
phrase, in order) and `meta["frame_names"]`; YouTube-VOS `meta["video_id"]`, `meta["frame_names"]`
and the instances' `instance_id` (the object id); YouTube-VIS `meta["video_id"]` and
`meta["category_ids"][class index]`. Writers stream: a mask is encoded when it is added, so a whole
split never sits in memory. Output appears atomically (written to a temporary file next to it,
renamed at the end); a failure leaves no partial file.

From an evaluation (`eval.evaluate` on a split without ground truth, see `FORMATS`):
`ref_youtube_vos_predictions` / `write_ref_youtube_vos_rles`, `youtube_vos_predictions` /
`write_youtube_vos_rles` and `youtube_vis_predictions` turn the
records of the video evaluators (eval/tasks.py, RLEs at the original size, clips merged per frame)
into these files.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from x2sam_jax.data.sources.common import check_rle, decode_rle
from x2sam_jax.data.sources.refvos import RefVosSource, YouTubeVosSource
from x2sam_jax.data.sources.ytvis import YouTubeVisSource

__all__ = [
    "FORMATS", "detect_format", "check_format",
    "RefYouTubeVosSubmission", "write_ref_youtube_vos_submission", "ref_youtube_vos_expected",
    "ref_youtube_vos_predictions", "write_ref_youtube_vos_rles",
    "YouTubeVosSubmission", "write_youtube_vos_submission", "youtube_vos_expected", "youtube_vos_predictions",
    "write_youtube_vos_rles", "davis_palette",
    "write_youtube_vis_results", "youtube_vis_video_lengths", "youtube_vis_category_ids", "youtube_vis_predictions",
    "encode_rle",
]

# Submission formats and the file each writes (under OUT/submissions/<dataset>/ in an evaluation).
FORMATS = {"ref_youtube_vos": "submission.zip", "youtube_vos": "submission.zip", "youtube_vis": "results.zip"}


def _format_sources():
    return {"ref_youtube_vos": RefVosSource, "youtube_vos": YouTubeVosSource, "youtube_vis": YouTubeVisSource}


def detect_format(source) -> str | None:
    """The submission format of a source's benchmark (by its reader), None when there is none."""
    for name, kind in _format_sources().items():
        if isinstance(source, kind):
            return name
    return None


def check_format(fmt: str, source, dataset: str) -> str:
    """`fmt` when it names a format this source can be written in; ValueError naming the dataset otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"dataset {dataset}: unknown submission format {fmt!r}; known: {sorted(FORMATS)}")
    kind = _format_sources()[fmt]
    if not isinstance(source, kind):
        raise ValueError(f"dataset {dataset}: submission {fmt!r} needs a {kind.__name__} source, "
                         f"got {type(source).__name__} (task {getattr(source, 'task', None)!r})")
    return fmt


def _rle_for_json(rle, what: str) -> dict:
    """A COCO RLE (compressed, or uncompressed counts) checked to decode -> {"size", "counts": str}."""
    try:
        rle = check_rle(dict(rle))
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if isinstance(rle["counts"], (list, tuple)):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    counts = rle["counts"]
    counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _binary(mask, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what}: a mask must be [H, W], got shape {mask.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"{what}: a mask must be bool or integer (threshold probabilities first), got {mask.dtype}")
    return mask != 0


def encode_rle(mask: np.ndarray) -> dict:
    """Binary [H, W] -> compressed COCO RLE {"size": [h, w], "counts": str} (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class _AtomicFile:
    """A temporary file beside `path`, renamed onto it by `commit()`, removed by `discard()`."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"output {path} is a directory; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
        self.file = os.fdopen(fd, "w+b")

    def commit(self) -> str:
        self.file.close()
        os.chmod(self.tmp, 0o644)          # mkstemp's 0600 would keep the archive from whoever it is shared with
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class _ZipSubmission:
    """A challenge zip written atomically: ``close()`` checks it (``_check``) and puts it in
    place; an error, ``abort()`` or leaving a ``with`` block by an exception writes nothing."""

    def __init__(self, out_zip: str | os.PathLike):
        self._out = _AtomicFile(out_zip)
        self._zip = zipfile.ZipFile(self._out.file, "w", zipfile.ZIP_STORED)  # PNGs are compressed already

    def _check(self) -> None:
        """Raises ValueError when the archive is incomplete (nothing is written then)."""

    def close(self) -> str:
        """Checks the archive and puts the zip in place; its path."""
        try:
            self._zip.close()
            self._check()
        except BaseException:
            self._out.discard()
            raise
        return self._out.commit()

    def abort(self) -> None:
        self._zip.close()
        self._out.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


# ----------------------------------------------------------------------------- Ref-YouTube-VOS
class RefYouTubeVosSubmission(_ZipSubmission):
    """Streams Ref-YouTube-VOS predictions into the challenge zip.

        with RefYouTubeVosSubmission("submission.zip", expected=ref_youtube_vos_expected(source)) as sub:
            for video, exp_id, frame, mask in predictions:
                sub.add(video, exp_id, frame, mask)

    `expected` ({(video, exp_id): [frame names]}) makes `close()` check the archive is complete:
    a missing or unexpected (video, expression, frame) raises ValueError naming the first ones, and
    no zip is written. Leaving the `with` block by an exception writes nothing either.
    """

    def __init__(self, out_zip: str | os.PathLike, *, expected: Mapping | None = None):
        super().__init__(out_zip)
        self._expected = None if expected is None else {
            (str(v), str(e), str(f)) for (v, e), frames in expected.items() for f in frames}
        self._written: set = set()
        self._size: dict = {}  # video -> (h, w): every frame of a video has one size

    def add(self, video: str, exp_id, frame: str, mask) -> None:
        key = (str(video), str(exp_id), str(frame))
        where = f"Ref-YouTube-VOS prediction {'/'.join(key)}"
        if key in self._written:
            raise ValueError(f"{where} was added twice")
        mask = _binary(mask, where)
        size = self._size.setdefault(key[0], mask.shape)
        if mask.shape != size:
            raise ValueError(f"{where}: mask is {mask.shape}, other frames of video {key[0]} are {size}")
        png = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(png, format="PNG")
        self._zip.writestr(f"Annotations/{key[0]}/{key[1]}/{key[2]}.png", png.getvalue())
        self._written.add(key)

    def _check(self) -> None:
        if self._expected is not None:
            _check_complete(self._expected, self._written, self._out.path)


def _check_complete(expected: set, written: set, where: str) -> None:
    missing, extra = sorted(expected - written), sorted(written - expected)
    if missing or extra:
        raise ValueError(f"incomplete Ref-YouTube-VOS submission {where}: {len(missing)} expected (video, expression, "
                         f"frame) masks missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}")


def write_ref_youtube_vos_submission(predictions, out_zip: str | os.PathLike, *,
                                     expected: Mapping | None = None) -> str:
    """Writes the Ref-YouTube-VOS challenge zip; returns its path.

    predictions: {(video, exp_id): {frame_name: mask [H, W]}}, or an iterable of
      (video, exp_id, frame_name, mask) tuples (streamed: nothing is kept once written).
    expected: optional {(video, exp_id): [frame names]} (see `ref_youtube_vos_expected`); the
      archive must then hold exactly these masks.
    """
    if isinstance(predictions, Mapping):
        predictions = ((v, e, f, m) for (v, e), frames in predictions.items() for f, m in frames.items())
    with RefYouTubeVosSubmission(out_zip, expected=expected) as submission:
        for video, exp_id, frame, mask in predictions:
            submission.add(video, exp_id, frame, mask)
    return os.fspath(out_zip)


def ref_youtube_vos_expected(source, indices: Iterable[int] | None = None) -> dict:
    """{(video, exp_id): [frame names]} a complete submission holds for a Ref-YouTube-VOS source
    (`data.sources.ref_youtube_vos`): every expression of every video, every frame it lists
    (`indices`: of those samples only, e.g. the first N evaluated)."""
    records = source._records if indices is None else [source._records[i] for i in indices]
    expected = {}
    for video, exp_ids in records:
        frames = [str(f) for f in source._videos[video]["frames"]]
        for exp_id in exp_ids:
            expected[(str(video), str(exp_id))] = frames
    return expected


def ref_youtube_vos_predictions(source, frame_masks: Mapping) -> dict:
    """Evaluation records -> {(video, exp_id): {frame name: RLE}}.

    frame_masks: {(sample index, "phrase", condition): {source frame index: RLE}} of the evaluated
    `source` (`tasks.VideoObject.frame_masks`); a sample's condition c is its c-th expression."""
    out, meta = {}, {}
    for (index, kind, *rest), frames in frame_masks.items():
        if kind != "phrase":
            raise ValueError(f"{getattr(source, 'name', source)}[{index}]: a Ref-YouTube-VOS submission needs "
                             f"referring expressions as conditions, got a {kind!r} condition")
        if index not in meta:
            meta[index] = source[index].meta
        m = meta[index]
        video, exp_id = str(m["video_id"]), str(m["expression_ids"][rest[0]])
        out[(video, exp_id)] = {str(m["frame_names"][f]): rle for f, rle in frames.items()}
    return out


def _entries_with_fill(predictions: Mapping, expected: Mapping):
    """(video, exp_id, frame, RLE, filled) for every expected frame that has a prediction of its
    expression: its own, else (a frame no evaluated clip covered, e.g. the last few frames that span
    clips can leave out) that of the nearest predicted frame, the earlier on a tie.
    Then every prediction outside `expected`, so that the completeness check names it."""
    for (video, exp_id), frames in expected.items():
        have = predictions.get((video, exp_id)) or {}
        positions = [k for k, f in enumerate(frames) if f in have]
        for k, frame in enumerate(frames):
            if frame in have:
                yield video, exp_id, frame, have[frame], False
            elif positions:
                nearest = min(positions, key=lambda p: (abs(p - k), p))
                yield video, exp_id, frame, have[frames[nearest]], True
    for (video, exp_id), frames in predictions.items():
        listed = set(expected.get((video, exp_id), ()))
        for frame, rle in frames.items():
            if frame not in listed:
                yield video, exp_id, frame, rle, False


def write_ref_youtube_vos_rles(predictions: Mapping, out_zip: str | os.PathLike | None, *, expected: Mapping) -> dict:
    """Streams {(video, exp_id): {frame name: RLE}} into the challenge zip (`out_zip` None: checks
    and counts only, for the processes that do not write). Every (video, expression, frame) of
    `expected` must be covered: a frame without its own prediction takes its expression's nearest
    predicted frame (counted as filled); an expression without any prediction, or a prediction
    outside `expected`, is a ValueError and no zip is written. Returns {"entries", "frames_filled"}."""
    expected = {(str(v), str(e)): [str(f) for f in frames] for (v, e), frames in expected.items()}
    entries = list(_entries_with_fill(predictions, expected))      # references to the RLEs, no masks
    where = os.fspath(out_zip) if out_zip is not None else "(not written)"
    _check_complete({(v, e, f) for (v, e), frames in expected.items() for f in frames},
                    {(v, e, f) for v, e, f, _, _ in entries}, where)
    if out_zip is not None:
        with RefYouTubeVosSubmission(out_zip, expected=expected) as submission:
            for video, exp_id, frame, rle, _ in entries:
                submission.add(video, exp_id, frame, decode_rle(rle))
    return {"entries": len(entries), "frames_filled": sum(e[4] for e in entries)}


# ----------------------------------------------------------------------------- YouTube-VOS
def davis_palette() -> np.ndarray:
    """[256, 3] uint8: the colour map of the DAVIS / YouTube-VOS annotation PNGs (PASCAL VOC's:
    the bits of index i, taken three at a time, fill red, green and blue from the high bit down).
    The server reads the indices; the colours only make the PNGs viewable."""
    index = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for level in range(8):
        for channel in range(3):
            bit = (index >> (3 * level + channel)) & 1
            palette[:, channel] |= bit << (7 - level)
    return palette.astype(np.uint8)


_PALETTE = davis_palette().reshape(-1).tolist()


def _palette_png(ids: np.ndarray) -> bytes:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _object_id(oid, where: str) -> int:
    try:
        value = int(oid)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: object id {oid!r} is not an integer") from None
    if not 1 <= value <= 255:
        raise ValueError(f"{where}: object id {value} does not fit a palette index (1..255)")
    return value


def _video_plan(where: str, spec: Mapping | None, objects: Mapping) -> tuple[dict, tuple | None]:
    """({frame name: [(object id, its frames mapping, key of the frame)]} in frame order, (h, w) or
    None) of one video: with `spec` (an `expected` entry) every listed frame, each object on the
    frames listed for it; an object or a frame the video does not have is a ValueError."""
    owned = {}
    for oid, frames in objects.items():
        key = _object_id(oid, where)
        if key in owned:
            raise ValueError(f"{where}: object {key} is given twice")
        owned[key] = (frames, {str(f): f for f in frames})
    if spec is None:
        frame_names = sorted({f for _, names in owned.values() for f in names})
        allowed, size = None, None
    else:
        frame_names = [str(f) for f in spec["frames"]]
        allowed = {_object_id(o, where): set(map(str, fs)) for o, fs in spec["objects"].items()}
        size = tuple(int(v) for v in spec["size"])
        unknown = sorted(set(owned) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: objects {unknown} are not objects of the video ({sorted(allowed)})")
        extra = sorted({f for _, names in owned.values() for f in names} - set(frame_names))
        if extra:
            raise ValueError(f"{where}: frames {extra[:3]} are not frames of the video")
    plan = {frame: [(key, frames, names[frame]) for key, (frames, names) in owned.items()
                    if frame in names and (allowed is None or frame in allowed[key])] for frame in frame_names}
    return plan, size


class YouTubeVosSubmission(_ZipSubmission):
    """Streams YouTube-VOS predictions, one video at a time, into the server's zip.

        with YouTubeVosSubmission("submission.zip", expected=youtube_vos_expected(source)) as sub:
            for video, objects in predictions:            # objects: {object id: {frame: mask}}
                sub.add_video(video, objects)

    `expected` ({video: {"frames": [...], "size": (h, w), "objects": {object id: [frames]}}}) gives
    each video's frames (every one gets a PNG: background where nothing is predicted), size and
    objects; `close()` then checks every expected video was added, else ValueError and no zip.
    Without it a video's frames are those predicted, in sorted order, and objects are drawn on all
    of them. Leaving the `with` block by an exception writes nothing either.
    """

    def __init__(self, out_zip: str | os.PathLike, *, expected: Mapping | None = None):
        super().__init__(out_zip)
        self._expected = None if expected is None else {str(v): e for v, e in expected.items()}
        self._written: set = set()
        self.entries = self.frames_background = 0

    def add_video(self, video, objects: Mapping, scores: Mapping | None = None) -> int:
        """Writes every frame of one video. objects: {object id: {frame name: mask [H, W]}} (each
        mask is read when it is painted); scores: optional {object id: {frame name: float}} (a
        missing score counts as 0). Returns how many frames were written as background because no
        object had a prediction there."""
        video = str(video)
        where = f"YouTube-VOS prediction {video}"
        if video in self._written:
            raise ValueError(f"{where}: the video was added twice")
        if self._expected is not None and video not in self._expected:
            raise ValueError(f"{where}: the video is not in the split")
        spec = None if self._expected is None else self._expected[video]
        plan, size = _video_plan(where, spec, objects)
        scores = {_object_id(o, where): {str(f): float(v) for f, v in fs.items()} for o, fs in (scores or {}).items()}
        background = 0
        for frame, claims in plan.items():
            # Painted in increasing (score, object id): the highest score wins a pixel that several
            # objects claim, the later object id on a tie (or without scores).
            claims = sorted(claims, key=lambda c: (scores.get(c[0], {}).get(frame, 0.0), c[0]))
            ids = None if size is None else np.zeros(size, np.uint8)
            for key, frames, name in claims:
                mask = _binary(frames[name], f"{where} object {key} frame {frame}")
                if ids is None:
                    ids, size = np.zeros(mask.shape, np.uint8), mask.shape
                if mask.shape != ids.shape:
                    raise ValueError(f"{where} object {key} frame {frame}: mask is {mask.shape}, "
                                     f"the video is {tuple(ids.shape)}")
                ids[mask] = key
            background += not claims
            self._zip.writestr(f"Annotations/{video}/{frame}.png", _palette_png(ids))
            self.entries += 1
        self.frames_background += background
        self._written.add(video)
        return background

    def _check(self) -> None:
        """Every expected video was written (when `expected` was given)."""
        if self._expected is not None:
            missing = sorted(set(self._expected) - self._written)
            if missing:
                raise ValueError(f"incomplete YouTube-VOS submission {self._out.path}: {len(missing)} videos "
                                 f"without any prediction {missing[:3]}")


def write_youtube_vos_submission(predictions: Mapping, out_zip: str | os.PathLike, *, expected: Mapping | None = None,
                                 scores: Mapping | None = None) -> str:
    """Writes the YouTube-VOS server zip; returns its path.

    predictions: {video: {object id: {frame name: mask [H, W]}}}; scores: optional
    {video: {object id: {frame name: float}}} (overlaps go to the higher score); expected: optional
    {video: {"frames", "size", "objects"}} (see `youtube_vos_expected`): then every listed video must
    have predictions and every listed frame gets a PNG."""
    with YouTubeVosSubmission(out_zip, expected=expected) as submission:
        for video, objects in predictions.items():
            submission.add_video(video, objects, (scores or {}).get(video))
    return os.fspath(out_zip)


def youtube_vos_expected(source, indices: Iterable[int] | None = None) -> dict:
    """{video: {"frames": [frame names], "size": (h, w), "objects": {object id: [frame names]}}} of
    a YouTube-VOS source (`data.sources.youtube_vos`): the frames meta.json lists (every one gets a
    PNG) and each object's own frames (`indices`: of those samples only, e.g. the first N evaluated).
    The size is the sample's (its first-frame masks', else its first JPEG's)."""
    indices = range(len(source._records)) if indices is None else indices
    expected = {}
    for index in indices:
        video = source._records[index]
        sample = source[index]
        expected[str(video)] = {"frames": [str(f) for f in source._frames(video)],
                                "size": (int(sample.height), int(sample.width)),
                                "objects": source.object_frames(video)}
    return expected


def youtube_vos_predictions(source, frame_masks: Mapping, frame_scores: Mapping | None = None) -> tuple[dict, dict]:
    """Evaluation records -> ({video: {object id: {frame name: RLE}}}, the same with scores).

    frame_masks / frame_scores: {(sample index, "instances", k): {source frame index: RLE / score}}
    of the evaluated `source` (`tasks.VideoObject.frame_masks` / `frame_scores`); instance k of a
    sample is the object `instance_id`."""
    masks, scores, samples = {}, {}, {}
    for (index, kind, *rest), frames in frame_masks.items():
        name = f"{getattr(source, 'name', source)}[{index}]"
        if kind != "instances" or len(rest) != 1:
            raise ValueError(f"{name}: a YouTube-VOS submission needs one prompted object per condition, "
                             f"got condition {(kind, *rest)}")
        if index not in samples:
            samples[index] = source[index]
        sample = samples[index]
        video, oid = str(sample.meta["video_id"]), str(sample.instances[rest[0]].instance_id)
        names = sample.meta["frame_names"]
        masks.setdefault(video, {})[oid] = {str(names[f]): rle for f, rle in frames.items()}
        if frame_scores is not None:
            given = frame_scores.get((index, kind, *rest), {})
            scores.setdefault(video, {})[oid] = {str(names[f]): float(v) for f, v in given.items()}
    return masks, scores


def write_youtube_vos_rles(predictions: Mapping, out_zip: str | os.PathLike | None, *, expected: Mapping,
                           scores: Mapping | None = None) -> dict:
    """Streams {video: {object id: {frame name: RLE}}} into the server zip (`out_zip` None: checks
    and counts only, for the processes that do not write). Every video of `expected` needs a
    prediction (else ValueError, no zip); a listed frame without one is background. Returns
    {"entries": PNGs, "frames_background": those without any prediction}."""
    expected = {str(v): e for v, e in expected.items()}
    predictions = {str(v): objects for v, objects in predictions.items()}
    missing = sorted(set(expected) - set(predictions))
    unknown = sorted(set(predictions) - set(expected))
    if missing or unknown:
        where = os.fspath(out_zip) if out_zip is not None else "(not written)"
        raise ValueError(f"incomplete YouTube-VOS submission {where}: {len(missing)} videos without any prediction "
                         f"{missing[:3]}, {len(unknown)} not in the split {unknown[:3]}")
    if out_zip is None:
        counts = {"entries": 0, "frames_background": 0}
        for video, spec in expected.items():
            plan, _ = _video_plan(f"YouTube-VOS prediction {video}", spec, predictions[video])
            counts["entries"] += len(plan)
            counts["frames_background"] += sum(not claims for claims in plan.values())
        return counts
    with YouTubeVosSubmission(out_zip, expected=expected) as submission:
        for video in expected:
            objects = {oid: _DecodedFrames(frames, decode_rle) for oid, frames in predictions[video].items()}
            submission.add_video(video, objects, (scores or {}).get(video))
    return {"entries": submission.entries, "frames_background": submission.frames_background}


class _DecodedFrames(Mapping):
    """{frame: RLE} read as {frame: mask}: each mask decoded when it is painted, not before."""

    def __init__(self, rles: Mapping, decode):
        self._rles, self._decode = rles, decode

    def __getitem__(self, frame):
        return self._decode(self._rles[frame])

    def __iter__(self):
        return iter(self._rles)

    def __len__(self):
        return len(self._rles)


# ----------------------------------------------------------------------------- YouTube-VIS
def write_youtube_vis_results(predictions: Iterable[Mapping], out_path: str | os.PathLike, *,
                              video_lengths: Mapping | None = None, category_ids: Iterable[int] | None = None) -> str:
    """Writes YouTube-VIS results: `out_path` ending in .zip gets the server's archive (results.json
    inside), any other name the JSON itself. Returns the path.

    predictions: iterable of {"video_id": int, "category_id": int, "score": float,
      "masks": [T, H, W] array or a list of T masks [H, W] / COCO RLEs / None (None = no prediction
      on that frame)}.
    video_lengths: optional {video_id: frame count} (see `youtube_vis_video_lengths`): every
      prediction must be for a known video and cover exactly its frames.
    category_ids: optional dataset category ids a prediction may use.
    """
    out_path = os.fspath(out_path)
    known_categories = None if category_ids is None else {int(c) for c in category_ids}
    out = _AtomicFile(out_path)
    try:
        results = []
        for k, pred in enumerate(predictions):
            where = f"YouTube-VIS prediction #{k}"
            try:
                video_id, category_id, score = int(pred["video_id"]), int(pred["category_id"]), float(pred["score"])
                masks = pred["masks"]
            except KeyError as err:
                raise ValueError(f"{where}: missing key {err} (need video_id, category_id, score, masks)") from None
            if not math.isfinite(score):
                raise ValueError(f"{where}: score {score} is not finite")
            if known_categories is not None and category_id not in known_categories:
                raise ValueError(f"{where}: category_id {category_id} is not a dataset category")
            if video_lengths is not None:
                if video_id not in video_lengths:
                    raise ValueError(f"{where}: video_id {video_id} is not a video of the split")
                if len(masks) != int(video_lengths[video_id]):
                    raise ValueError(f"{where}: {len(masks)} frames for video {video_id} of "
                                     f"{int(video_lengths[video_id])} frames")
            segmentations = [None if m is None else _rle_for_json(m, f"{where} frame {t}") if isinstance(m, Mapping)
                             else encode_rle(_binary(m, f"{where} frame {t}")) for t, m in enumerate(masks)]
            sizes = {tuple(s["size"]) for s in segmentations if s is not None}
            if len(sizes) > 1:
                raise ValueError(f"{where}: frames of several sizes {sorted(sizes)}")
            results.append({"video_id": video_id, "category_id": category_id, "score": score,
                            "segmentations": segmentations})
        payload = json.dumps(results).encode("utf-8")
        if out_path.endswith(".zip"):
            with zipfile.ZipFile(out.file, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("results.json", payload)
        else:
            out.file.write(payload)
    except BaseException:
        out.discard()
        raise
    return out.commit()


def youtube_vis_video_lengths(source) -> dict:
    """{video_id: frame count} of a YouTube-VIS source (`data.sources.youtube_vis`)."""
    return {int(video["id"]): len(video["file_names"]) for video, _ in
            (r for r in source._records if isinstance(r, tuple))}


def youtube_vis_category_ids(source) -> list[int]:
    """The dataset category ids of a YouTube-VIS source (`data.sources.youtube_vis`)."""
    return list(source._category_ids)


def youtube_vis_predictions(source, evaluator, records) -> list[dict]:
    """Evaluation records -> the predictions of `write_youtube_vis_results` (masks as RLEs): one
    per (video, track), the tracks of `tasks.VideoGeneric.video_tracks` (each clip's
    `evaluator.top_k` best, None on the frames of other clips) with the dataset's category ids."""
    by_index: dict = {}
    for r in records:
        by_index.setdefault(r["index"], []).append(r)
    out = []
    for index in sorted(by_index):
        sample = source[index]
        for track in evaluator.video_tracks(by_index[index], sample.num_frames, evaluator.top_k,
                                            field="dataset_category_id"):
            out.append({"video_id": int(sample.meta["video_id"]), "category_id": track["category_id"],
                        "score": track["score"], "masks": track["segmentations"]})
    return out
