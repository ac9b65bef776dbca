"""Visual prompt synthesis (docs/data.md#visual-prompts): point, scribble, box and mask prompts
drawn from a mask.

Every connected component (8-connectivity) of area > `min_area` gets its own shape; the shapes
of one instance are united into one prompt mask at image resolution. The rules follow the
official X2SAM generator (dataset/utils/vprompt.py); randomness comes from a numpy Generator so
a (seed, sample) pair always draws the same prompt.

- point: a random offset of length U(0, r) (r = half the shorter bbox side) from the centroid,
  truncated to int, clipped into the bbox, accepted when it lands inside the mask (retried);
  drawn as a disk of radius 10.
- scribble: a box around the centroid with sides scaled by U(0.5, 1.2), clipped to the image and
  accepted when its IoU with the bbox is >= 0.5 (retried); the line between two opposite corners
  gets a sine wiggle on the row coordinate (amplitude U(10, 20), frequency U(0.2, 1), random
  phase) and is dilated to radius 5.
- box: the bbox scaled by U(0.9, 1.1) about its centre, clipped, filled.
- mask: Gaussian blur (sigma 2) of the whole mask, thresholded at its mean.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

PROMPT_KINDS = ("point", "scribble", "box", "mask")


@dataclasses.dataclass(frozen=True)
class Region:
    """One connected component: bbox as (min_row, min_col, max_row, max_col), max exclusive."""

    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]  # (row, col)
    area: int


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    min_area: int = 5
    max_retries: int = 1000
    point_radius: int = 10
    scribble_radius: int = 5
    scribble_scale: tuple[float, float] = (0.5, 1.2)
    scribble_min_iou: float = 0.5
    scribble_amplitude: tuple[float, float] = (10.0, 20.0)
    scribble_frequency: tuple[float, float] = (0.2, 1.0)
    box_scale: tuple[float, float] = (0.9, 1.1)
    mask_sigma: float = 2.0


def connected_regions(mask: np.ndarray, min_area: int = 5) -> list[Region]:
    """Components of area > min_area, in label order (row-major first pixel)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    regions = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None:
            continue
        rows, cols = np.nonzero(labels[slices] == index)
        if rows.size <= min_area:
            continue
        r0, c0 = slices[0].start, slices[1].start
        regions.append(
            Region(
                bbox=(r0, c0, slices[0].stop, slices[1].stop),
                centroid=(float(rows.mean() + r0), float(cols.mean() + c0)),
                area=int(rows.size),
            )
        )
    return regions


def dilate_disk(seeds: np.ndarray, radius: float) -> np.ndarray:
    """Every pixel within Euclidean distance `radius` of a seed pixel."""
    if not seeds.any():
        return np.zeros_like(seeds, bool)
    return ndimage.distance_transform_edt(~seeds) <= radius


def box_iou_inclusive(a, b) -> float:
    """IoU of (min_row, min_col, max_row, max_col) boxes counted in pixels with inclusive ends."""
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ih * iw
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def point_seeds(mask: np.ndarray, regions: list[Region], rng: np.random.Generator, cfg=PromptConfig()):
    """One (row, col) per region (regions where every retry failed get none)."""
    points = []
    for region in regions:
        r0, c0, r1, c1 = region.bbox
        radius = min(r1 - r0, c1 - c0) * 0.5
        for _ in range(cfg.max_retries):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0, radius)
            row = int(np.clip(int(region.centroid[0] + length * np.cos(angle)), r0, r1 - 1))
            col = int(np.clip(int(region.centroid[1] + length * np.sin(angle)), c0, c1 - 1))
            if mask[row, col]:
                points.append((row, col))
                break
    return points


def point_prompt(mask, regions, rng, cfg=PromptConfig()) -> np.ndarray:
    seeds = np.zeros(mask.shape, bool)
    for row, col in point_seeds(mask, regions, rng, cfg):
        seeds[row, col] = True
    return dilate_disk(seeds, cfg.point_radius)


def scribble_box(mask_shape, region: Region, rng, cfg=PromptConfig()):
    """The jittered box of a scribble, or None when no draw reached the IoU bound."""
    r0, c0, r1, c1 = region.bbox
    cr, cc = region.centroid
    for _ in range(cfg.max_retries):
        height = (r1 - r0) * rng.uniform(*cfg.scribble_scale)
        width = (c1 - c0) * rng.uniform(*cfg.scribble_scale)
        box = (
            max(0, int(cr - height / 2)),
            max(0, int(cc - width / 2)),
            min(mask_shape[0], int(cr + height / 2)),
            min(mask_shape[1], int(cc + width / 2)),
        )
        if box_iou_inclusive(box, region.bbox) >= cfg.scribble_min_iou:
            return box
    return None


def _line(r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the straight segment, one pixel per step of the longer axis."""
    n = max(abs(r1 - r0), abs(c1 - c0)) + 1
    return np.linspace(r0, r1, n), np.rint(np.linspace(c0, c1, n))


def scribble_prompt(mask, regions, rng, cfg=PromptConfig()) -> np.ndarray:
    seeds = np.zeros(mask.shape, bool)
    for region in regions:
        box = scribble_box(mask.shape, region, rng, cfg)
        if box is None:
            continue
        b0, b1, b2, b3 = box
        corners = [(b0, b1), (b0, b3), (b2, b1), (b2, b3)]
        start = corners[rng.integers(4)]
        end = (b2 if start[0] == b0 else b0, b3 if start[1] == b1 else b1)  # the opposite corner
        rows, cols = _line(*start, *end)
        rows = np.rint(rows)
        amplitude = rng.uniform(*cfg.scribble_amplitude)
        frequency = rng.uniform(*cfg.scribble_frequency)
        phase = rng.uniform(0, 2 * np.pi)
        rows = rows + amplitude * np.sin(2 * np.pi * frequency * np.linspace(0, 1, rows.size) + phase)
        rows = np.clip(rows, 0, mask.shape[0] - 1).astype(np.int64)
        cols = np.clip(cols, 0, mask.shape[1] - 1).astype(np.int64)
        seeds[rows, cols] = True
    return dilate_disk(seeds, cfg.scribble_radius)


def box_prompt(mask, regions, rng, cfg=PromptConfig()) -> np.ndarray:
    out = np.zeros(mask.shape, bool)
    for region in regions:
        r0, c0, r1, c1 = region.bbox
        grow = rng.uniform(*cfg.box_scale) - 1
        dh, dw = (r1 - r0) * grow, (c1 - c0) * grow
        out[
            max(0, int(r0 - dh / 2)) : min(mask.shape[0], int(r1 + dh / 2)),
            max(0, int(c0 - dw / 2)) : min(mask.shape[1], int(c1 + dw / 2)),
        ] = True
    return out


def mask_prompt(mask, cfg=PromptConfig()) -> np.ndarray:
    blurred = ndimage.gaussian_filter(mask.astype(np.float64), sigma=cfg.mask_sigma)
    return blurred > blurred.mean()


def synthesize(mask: np.ndarray, kind: str, rng: np.random.Generator, cfg=PromptConfig()) -> np.ndarray:
    """The prompt mask (bool, image resolution) of one kind for one instance mask."""
    mask = np.asarray(mask, bool)
    if kind == "mask":
        return mask_prompt(mask, cfg)
    regions = connected_regions(mask, cfg.min_area)
    if kind == "point":
        return point_prompt(mask, regions, rng, cfg)
    if kind == "scribble":
        return scribble_prompt(mask, regions, rng, cfg)
    if kind == "box":
        return box_prompt(mask, regions, rng, cfg)
    raise ValueError(f"unknown visual prompt kind {kind!r}; expected one of {PROMPT_KINDS}")


def random_prompt(mask, rng, kinds=PROMPT_KINDS, cfg=PromptConfig()) -> tuple[str, np.ndarray] | None:
    """Training draw: a random kind, falling back to the others when it comes out empty."""
    remaining = list(kinds)
    while remaining:
        kind = remaining.pop(int(rng.integers(len(remaining))))
        prompt = synthesize(mask, kind, rng, cfg)
        if prompt.any():
            return kind, prompt
    return None
