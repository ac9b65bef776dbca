"""SA-1B (Segment Anything 1B): the class-agnostic masks of stage 1
(docs/recipe.md#stage-1-the-class-agnostic-segmentor).

Layout as released (one folder per downloaded tar, as X2SAM's tree `img_sam/SA1B/`):
  {root}/sa_NNNNNN/sa_K.jpg   the image
  {root}/sa_NNNNNN/sa_K.json  {"image": {"image_id", "width", "height", "file_name"},
                               "annotations": [{"id", "segmentation": compressed RLE {"size": [h, w],
                                 "counts": str}, "bbox", "area", "predicted_iou", "stability_score",
                                 "crop_box", "point_coords"}, ...]}
Images extracted straight into {root} (one tar unpacked in place) are found too. An image without
its JSON is not indexed.

Index. The full release is ~11 M images in ~1000 folders: listing it takes minutes, so it is built
once, with the folders listed by a thread pool behind a progress bar, and cached in a small .npz
(folder names, their modification times, one int per image): `{root}/.x2sam_sa1b_index.npz`, or
under ~/.cache/x2sam_jax/ when the dataset is read-only, or `index_file`. The next construction
lists the root (cheap: the folders) and again only the folders that appeared or whose modification
time changed (adding, removing or renaming files changes it); a cache of another format version is
rebuilt. A file whose content is replaced in place keeps the index valid: contents are only read
per sample.

Samples (task "gen_seg", categories ["object"]): one instance per mask, category "object", the
first `max_masks` annotations in file order (100 in the recipe; the official loader keeps the first
`num_ann`). Masks are read lazily, one JSON per `__getitem__`; a missing or unreadable JSON, or a
bad mask, is a BadSample; a corrupt image is skipped where it is decoded (data/features).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import tempfile

import numpy as np
from tqdm import tqdm

from x2sam_jax.data.schema import BadSample, Instance, Sample
from x2sam_jax.data.sources.common import Source, require_dir, to_rle

logger = logging.getLogger("x2sam_jax.data")

INDEX_VERSION = 1
INDEX_NAME = ".x2sam_sa1b_index.npz"
_FILE = re.compile(r"sa_(\d+)\.(jpg|json)$")


def _scan_folder(path: str) -> tuple[np.ndarray, list[str], int]:
    """(sorted image numbers with both .jpg and .json, sa_* subfolder names, images without JSON)."""
    jpgs, jsons, subfolders = set(), set(), []
    with os.scandir(path) as entries:
        for entry in entries:
            match = _FILE.match(entry.name)
            if match:
                (jpgs if match.group(2) == "jpg" else jsons).add(int(match.group(1)))
            elif entry.name.startswith("sa_") and entry.is_dir():
                subfolders.append(entry.name)
    both = np.array(sorted(jpgs & jsons), np.int64)
    return both, sorted(subfolders), len(jpgs - jsons)


def default_index_file(root: str) -> str:
    """{root}/.x2sam_sa1b_index.npz when the dataset folder is writable, else a file under
    ~/.cache/x2sam_jax/ named after the dataset's absolute path."""
    root = os.path.abspath(root)
    if os.access(root, os.W_OK):
        return os.path.join(root, INDEX_NAME)
    digest = hashlib.sha1(root.encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "x2sam_jax", f"sa1b_index_{digest}.npz")


def _load_index(path: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != INDEX_VERSION:
                return None
            folders = [str(f) for f in z["folders"]]
            counts = z["counts"].astype(np.int64)
            numbers = np.split(z["numbers"], np.cumsum(counts)[:-1]) if len(folders) else []
            return {folder: (int(m), n) for folder, m, n in zip(folders, z["mtimes"], numbers)}
    except (OSError, ValueError, KeyError) as err:
        logger.warning("SA-1B index %s is unreadable (%s); rebuilding it", path, err)
        return None


def _save_index(path: str, folders: list[str], mtimes: list[int], numbers: list[np.ndarray]) -> bool:
    """Writes the index atomically (a temporary file renamed over the old one). False when the
    location is not writable (the index is then rebuilt next time, with a warning)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-sa1b-index-", suffix=".npz", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, version=np.int64(INDEX_VERSION), folders=np.array(folders, dtype=str),
                         mtimes=np.array(mtimes, np.int64), counts=np.array([len(n) for n in numbers], np.int64),
                         numbers=np.concatenate(numbers) if numbers else np.zeros(0, np.int64))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True
    except OSError as err:
        logger.warning("cannot write the SA-1B index %s (%s); it will be rebuilt next time", path, err)
        return False


class Sa1bSource(Source):
    """SA-1B folders -> class-agnostic generic-segmentation Samples (see the module docstring)."""

    def __init__(self, root: str, *, max_masks: int = 100, index_file: str | None = None,
                 num_workers: int | None = None, rebuild_index: bool = False, progress: bool = True,
                 name: str = "sa1b"):
        if max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {max_masks}")
        self.root = require_dir(root, "SA-1B directory")
        self.name, self.task, self.max_masks = name, "gen_seg", int(max_masks)
        self.categories = ["object"]
        self.index_file = index_file or default_index_file(root)
        self._folders, folder_of, self._numbers, self.index_info = self._index(num_workers, rebuild_index, progress)
        self._folder_of = folder_of
        if not len(self._numbers):
            raise FileNotFoundError(f"no SA-1B images (sa_K.jpg with sa_K.json) under {root}")

    # ------------------------------------------------------------------ index
    def _index(self, num_workers, rebuild, progress):
        cached = None if rebuild or not os.path.isfile(self.index_file) else _load_index(self.index_file)
        cached = cached or {}
        # The root is listed every time (in the released layout it holds ~1000 folders, and the
        # index file itself may live there, changing its mtime); images directly in it count as
        # the folder "". A subfolder is listed again only when its mtime moved.
        root_numbers, subfolders, orphans = _scan_folder(self.root)
        scanned = {"": (0, root_numbers)}
        todo = []
        for folder in subfolders:
            try:
                current = os.stat(os.path.join(self.root, folder)).st_mtime_ns
            except OSError:  # removed while listing
                continue
            if folder in cached and cached[folder][0] == current:
                scanned[folder] = (current, cached[folder][1])
            else:
                todo.append((folder, current))
        if todo:
            workers = num_workers or min(32, 4 * (os.cpu_count() or 1))  # listing is I/O bound
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(_scan_folder, os.path.join(self.root, f)): (f, m) for f, m in todo}
                done = concurrent.futures.as_completed(futures)
                for future in tqdm(done, total=len(futures), desc=f"indexing SA-1B {self.root}", unit="folder",
                                   disable=not progress):
                    folder, current = futures[future]
                    numbers, _, missing_json = future.result()
                    scanned[folder] = (current, numbers)
                    orphans += missing_json
        if orphans:
            logger.warning("SA-1B %s: %d images without their JSON are left out", self.root, orphans)
        folders = [""] + [f for f in subfolders if f in scanned]
        if todo or set(cached) - {""} != set(folders[1:]):
            _save_index(self.index_file, folders[1:], [scanned[f][0] for f in folders[1:]],
                        [scanned[f][1] for f in folders[1:]])
        numbers = [scanned[f][1] for f in folders]
        counts = np.array([len(n) for n in numbers], np.int64)
        all_numbers = np.concatenate(numbers)
        dtype = np.int32 if not len(all_numbers) or all_numbers.max() < 2**31 else np.int64  # 11 M entries
        folder_of = np.repeat(np.arange(len(folders), dtype=np.int32), counts)
        info = {"images": int(len(all_numbers)), "folders": len(folders) - 1, "listed_folders": len(todo),
                "index_file": self.index_file}
        return folders, folder_of, all_numbers.astype(dtype), info

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self._numbers)

    def paths(self, index: int) -> tuple[str, str]:
        """(image path, JSON path) of sample `index`."""
        base = os.path.join(self.root, self._folders[self._folder_of[index]], f"sa_{int(self._numbers[index])}")
        return base + ".jpg", base + ".json"

    def _build(self, index):
        image_path, json_path = self.paths(index)
        try:
            with open(json_path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError as err:
            raise BadSample(f"{self.name}[{index}]: missing annotation file {json_path}", kind="missing_file") from err
        except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
            raise BadSample(f"{self.name}[{index}]: unreadable annotation file {json_path} ({err})",
                            kind="malformed_record") from err
        info = data["image"]
        height, width = int(info["height"]), int(info["width"])
        instances = []
        for ann in data["annotations"][: self.max_masks]:
            try:
                rle = to_rle(ann["segmentation"], height, width)
            except ValueError as err:
                raise BadSample(f"{self.name}[{index}]: {json_path} annotation {ann.get('id')}: {err}") from err
            instances.append(Instance(masks=[rle], category="object", category_id=0,
                                      instance_id=int(ann.get("id", -1))))
        return Sample(dataset=self.name, task=self.task, sample_id=os.path.basename(json_path)[:-5],
                      frames=[image_path], height=height, width=width, instances=instances,
                      categories=list(self.categories),
                      meta={"image_id": info.get("image_id"), "annotation_file": json_path})


def sa1b(root: str, **kwargs) -> Sa1bSource:
    """SA-1B source; spec {"type": "sa1b", "root": ..., "max_masks": 100}."""
    return Sa1bSource(root, **kwargs)
