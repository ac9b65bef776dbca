"""Prediction files in the formats the benchmark servers take, for evaluation splits whose ground
truth is withheld (sources give their samples `has_targets=False`).

Ref-YouTube-VOS 2021 (CodaLab challenge, valid phase): a zip with one PNG per expression and frame,
  Annotations/{video}/{exp_id}/{frame}.png
single channel, 0 = background, 255 = the referred object, at the video's original size, for every
frame the meta file lists (the layout ReferFormer's evaluation writes and zips with
`zip -r submission.zip Annotations`; the server reads the Annotations/ folder at the archive's top).

YouTube-VIS 2019 / 2021 (CodaLab): results.json, a list with one entry per predicted track,
  {"video_id": int, "category_id": int, "score": float,
   "segmentations": [one compressed RLE {"size": [h, w], "counts": str} per frame of the video, or None]}
zipped with results.json at the archive's top (the server takes the zip; mmtracking's
`format_results` writes the same). Loaders of the pycocotools family (`YTVOS.loadRes`) accept it.

Inputs are numpy masks: bool or integer [H, W] (nonzero = object) at the original frame size,
after post-processing (thresholding and resizing back are the caller's). The keys come from the
samples: Ref-YouTube-VOS `meta["video_id"]`, `meta["expression_ids"]` (one per phrase, in order) and
`meta["frame_names"]`; YouTube-VIS `meta["video_id"]` and `meta["category_ids"][class index]`. Writers stream: a mask is
encoded when it is added, so a whole split never sits in memory. Output appears atomically (written
to a temporary file next to it, renamed at the end); a failure leaves no partial file.
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

__all__ = [
    "RefYouTubeVosSubmission", "write_ref_youtube_vos_submission", "ref_youtube_vos_expected",
    "write_youtube_vis_results", "youtube_vis_video_lengths", "encode_rle",
]


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
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# ----------------------------------------------------------------------------- Ref-YouTube-VOS
class RefYouTubeVosSubmission:
    """Streams Ref-YouTube-VOS predictions into the challenge zip.

        with RefYouTubeVosSubmission("submission.zip", expected=ref_youtube_vos_expected(source)) as sub:
            for video, exp_id, frame, mask in predictions:
                sub.add(video, exp_id, frame, mask)

    `expected` ({(video, exp_id): [frame names]}) makes `close()` check the archive is complete:
    a missing or unexpected (video, expression, frame) raises ValueError naming the first ones, and
    no zip is written. Leaving the `with` block by an exception writes nothing either.
    """

    def __init__(self, out_zip: str | os.PathLike, *, expected: Mapping | None = None):
        self._out = _AtomicFile(out_zip)
        self._zip = zipfile.ZipFile(self._out.file, "w", zipfile.ZIP_STORED)  # PNGs are compressed already
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

    def close(self) -> str:
        """Checks completeness (when `expected` was given) and puts the zip in place; its path."""
        try:
            self._zip.close()
            if self._expected is not None:
                missing = sorted(self._expected - self._written)
                extra = sorted(self._written - self._expected)
                if missing or extra:
                    raise ValueError(
                        f"incomplete Ref-YouTube-VOS submission {self._out.path}: {len(missing)} expected "
                        f"(video, expression, frame) masks missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
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


def ref_youtube_vos_expected(source) -> dict:
    """{(video, exp_id): [frame names]} a complete submission holds for a Ref-YouTube-VOS source
    (`data.sources.ref_youtube_vos`): every expression of every video, every frame it lists."""
    expected = {}
    for video, exp_ids in source._records:
        frames = [str(f) for f in source._videos[video]["frames"]]
        for exp_id in exp_ids:
            expected[(str(video), str(exp_id))] = frames
    return expected


# ----------------------------------------------------------------------------- YouTube-VIS
def write_youtube_vis_results(predictions: Iterable[Mapping], out_path: str | os.PathLike, *,
                              video_lengths: Mapping | None = None, category_ids: Iterable[int] | None = None) -> str:
    """Writes YouTube-VIS results: `out_path` ending in .zip gets the server's archive (results.json
    inside), any other name the JSON itself. Returns the path.

    predictions: iterable of {"video_id": int, "category_id": int, "score": float,
      "masks": [T, H, W] array or a list of T masks [H, W] / None (None = no prediction on that frame)}.
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
            segmentations = [None if m is None else encode_rle(_binary(m, f"{where} frame {t}"))
                             for t, m in enumerate(masks)]
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
