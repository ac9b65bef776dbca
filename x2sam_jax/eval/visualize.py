"""Overlays a person can read, with PIL only: PNG for an image, animated GIF for a clip. The one
drawing path of ``eval.py --visualize`` and of ``x2sam_jax.predict`` / ``Predictor(out=...)``.

    pages = render_pages(frames, pred, labels, scores, prompts=[Prompt("point", point=(40, 30))],
                         gt=gt, gt_labels=gt_labels)          # one page per frame
    save_pages("out", pages, duration_ms=frame_duration_ms(frame_times))   # out.png or out.gif

A page is ``input | prediction [| ground truth]``: the input with the visual prompts drawn on it
(a point as a filled marker, a box as a rectangle, a mask as its outline), then the masks blended
over the frame, each outlined with a light or dark halo, above a legend of label and score per
drawn mask. Masks scoring under ``threshold`` (default ``postprocess.SCORE_THRESHOLD``, the score
from which the evaluation's post-processing counts a query as a detection) are not drawn; the
legend lists them apart. Each label gets the palette colour farthest from the mean colour of the
pixels its masks and prompts cover (a red object gets a blue or green mask, not a red one) and
keeps it in every panel and frame. Frames narrower than ``min_width`` are enlarged (nearest) so
that the legend fits.

Images are uint8 [H, W, 3] numpy arrays; masks are bool [..., H, W] at the image's resolution;
points and boxes are in pixels of the image (x right, y down).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from x2sam_jax.eval.postprocess import SCORE_THRESHOLD

_TITLE_HEIGHT = 14
_LEGEND_ROW = 13
_CANDIDATE_COLORS = 12            # the palette a label's colour is chosen from
DEFAULT_FRAME_MS = 250            # a GIF frame's duration when the source's frame rate is unknown
MIN_PANEL_WIDTH = 200             # narrower frames are enlarged so that the legend text fits


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A visual prompt as drawn on the input panel: ``point`` (x, y), ``box`` (x0, y0, x1, y1) or
    ``mask`` (bool [H, W]), on frame ``frame``; ``label`` names the mask it asks for (its colour)."""

    kind: str
    point: tuple | None = None
    box: tuple | None = None
    mask: np.ndarray | None = None
    frame: int = 0
    label: str = "region"


def palette(count: int) -> np.ndarray:
    """``count`` well-separated saturated colours, uint8 [count, 3] (golden-ratio hue steps)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)] for h in hues],
                    np.uint8).reshape(count, 3)


def contrasting_colors(means: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """One colour per region, uint8 [K, 3]: of the candidates (default a 12-colour palette) not yet
    taken, the one farthest (RGB distance) from the region's mean colour ``means[k]`` (NaN: an
    empty region, which takes the first free one). Colours repeat only when K exceeds the palette."""
    candidates = palette(_CANDIDATE_COLORS) if candidates is None else np.asarray(candidates, np.uint8)
    out, used = [], set()
    for mean in np.asarray(means, np.float64).reshape(-1, 3):
        free = [i for i in range(len(candidates)) if i not in used] or list(range(len(candidates)))
        if np.isnan(mean).any():
            pick = free[0]
        else:
            distance = np.linalg.norm(candidates[free].astype(np.float64) - mean, axis=1)
            pick = free[int(np.argmax(distance))]
        used.add(pick)
        out.append(candidates[pick])
    return np.array(out, np.uint8).reshape(-1, 3)


def _halo(color) -> tuple:
    """Black beside a light colour, white beside a dark one: one of the two lines always shows."""
    r, g, b = (int(c) for c in color)
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (255, 255, 255)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return (mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` [H, W] that touch a pixel outside it (4-neighbourhood)."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _draw_outline(out: np.ndarray, mask: np.ndarray, color) -> None:
    """The mask's border in ``color`` and, just outside it, a one-pixel halo."""
    out[_dilate(mask) & ~mask] = _halo(color)
    out[mask_outline(mask)] = color


def overlay(image: np.ndarray, masks: np.ndarray, colors: np.ndarray | None = None, *, alpha: float = 0.5,
            outline: bool = True) -> np.ndarray:
    """Blends each mask's colour into ``image`` (later masks on top) and outlines it (its colour on
    its border, a black or white halo around it)."""
    image = _check_image(image)
    masks = np.asarray(masks, bool)
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not match the image {image.shape[:2]}")
    colors = palette(len(masks)) if colors is None else np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(colors) < len(masks):
        raise ValueError(f"{len(masks)} masks but only {len(colors)} colours")
    out = image.astype(np.float32)
    for mask, color in zip(masks, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if outline:
        for mask, color in zip(masks, colors):
            _draw_outline(out, mask, color)
    return out


def prompt_area(prompt: Prompt, height: int, width: int) -> np.ndarray:
    """The pixels a prompt covers, bool [H, W] (its colour is chosen against them)."""
    area = np.zeros((height, width), bool)
    if prompt.kind == "point":
        x, y = (int(round(v)) for v in prompt.point)
        radius = _marker_radius(height, width)
        area[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1] = True
    elif prompt.kind == "box":
        x0, y0, x1, y1 = prompt.box
        area[max(0, int(y0)):max(0, math.ceil(y1)), max(0, int(x0)):max(0, math.ceil(x1))] = True
    elif prompt.kind == "mask":
        area = np.asarray(prompt.mask, bool).copy()
    else:
        raise ValueError(f"unknown prompt kind {prompt.kind!r}: expected point, box or mask")
    return area


def _marker_radius(height: int, width: int) -> int:
    return max(3, round(0.04 * min(height, width)))


def draw_prompt(image: np.ndarray, prompt: Prompt, color, *, scale: int = 1) -> np.ndarray:
    """``image`` (already enlarged ``scale`` times) with the prompt drawn in ``color`` over a
    contrasting halo: a point as a filled disc centred on its pixel, a box as a rectangle along its
    edges, a mask as its outline."""
    image = _check_image(image)
    color = tuple(int(c) for c in color)
    halo = _halo(color)
    if prompt.kind == "mask":
        out = image.copy()
        mask = np.asarray(prompt.mask, bool)
        mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1) if scale > 1 else mask
        ring = mask_outline(mask)
        for _ in range(max(1, scale // 2)):      # a line thick enough to see on an enlarged panel
            ring = _dilate(ring) & mask
        out[_dilate(ring) & ~ring] = halo
        out[ring] = color
        return out
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    if prompt.kind == "point":
        x, y = ((v + 0.5) * scale - 0.5 for v in prompt.point)     # the centre of the pixel
        r = _marker_radius(*image.shape[:2])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=halo, width=max(1, r // 3))
    elif prompt.kind == "box":
        x0, y0, x1, y1 = (v * scale for v in prompt.box)
        width = max(1, scale // 2)
        draw.rectangle([x0 - width, y0 - width, x1 - 1 + width, y1 - 1 + width], outline=halo, width=width)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
    else:
        raise ValueError(f"unknown prompt kind {prompt.kind!r}: expected point, box or mask")
    return np.asarray(canvas)


def _font():
    return ImageFont.load_default()


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, *, gap: int = 4) -> np.ndarray:
    """Panels next to each other, each under its title (white background)."""
    panels = [_check_image(p) for p in panels]
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    height = max(p.shape[0] for p in panels)
    top = _TITLE_HEIGHT if titles else 0
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for k, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (x, top))
        if titles:
            draw.text((x + 2, 1), str(titles[k]), fill=(0, 0, 0), font=_font())
        x += panel.shape[1] + gap
    return np.asarray(canvas)


def add_legend(image: np.ndarray, labels: Sequence[str], colors: np.ndarray, note: str | None = None) -> np.ndarray:
    """Appends one row per label below ``image`` (a colour swatch and the label text), and a
    last row of grey ``note`` text when given."""
    image = _check_image(image)
    rows = len(labels) + (note is not None)
    if not rows:
        return image
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + _LEGEND_ROW * rows + 2), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (label, color) in enumerate(zip(labels, np.asarray(colors, np.uint8).reshape(-1, 3))):
        y = image.shape[0] + 2 + k * _LEGEND_ROW
        draw.rectangle([2, y + 1, 11, y + 10], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((15, y), str(label), fill=(0, 0, 0), font=_font())
    if note is not None:
        draw.text((2, image.shape[0] + 2 + len(labels) * _LEGEND_ROW), note, fill=(110, 110, 110), font=_font())
    return np.asarray(canvas)


def _enlarge(x: np.ndarray, scale: int, axes: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(x, scale, axis=axes[0]), scale, axis=axes[1]) if scale > 1 else x


def legend(labels: Sequence[str], scores=None, threshold: float = SCORE_THRESHOLD):
    """(indices of the masks drawn, their legend texts "label score", a note listing those not
    drawn, or None): masks scoring under ``threshold`` are left out; without scores all are drawn."""
    shown = [k for k in range(len(labels)) if scores is None or scores[k] >= threshold]
    texts = [str(labels[k]) if scores is None else f"{labels[k]} {scores[k]:.2f}" for k in shown]
    hidden = [f"{labels[k]} {scores[k]:.2f}" for k in range(len(labels)) if k not in shown]
    if not hidden:
        return shown, texts, None
    listed = ", ".join(hidden[:3]) + (f" and {len(hidden) - 3} more" if len(hidden) > 3 else "")
    return shown, texts, f"under {threshold:.2f}, not drawn: {listed}"


def render_pages(frames: Sequence[np.ndarray], pred: np.ndarray, labels: Sequence[str], scores=None, *,
                 threshold: float = SCORE_THRESHOLD, prompts: Sequence[Prompt] = (), gt: np.ndarray | None = None,
                 gt_labels: Sequence[str] = (), min_width: int = MIN_PANEL_WIDTH) -> list[np.ndarray]:
    """One page per frame: ``input | prediction [| ground truth]`` (see the module docstring).

    frames: T uint8 images; pred: bool [T, K, H, W] with a label (and a score, or None: all drawn)
    per mask; prompts: drawn on the input panel of their frame; gt: bool [T, K', H, W] with
    ``gt_labels``, or None for no ground-truth panel."""
    frames = [_check_image(f) for f in frames]
    pred = np.asarray(pred, bool)
    if pred.ndim != 4 or pred.shape[0] != len(frames) or len(labels) != pred.shape[1]:
        raise ValueError(f"pred {pred.shape} needs [T={len(frames)}, K={len(labels)}, H, W]")
    if scores is not None and len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} masks")
    shown, pred_text, note = legend(labels, scores, threshold)
    height, width = frames[0].shape[:2]
    gt = None if gt is None else np.asarray(gt, bool)
    areas = [(p.label, p.frame, prompt_area(p, height, width)) for p in prompts]

    # A colour per label, against the mean colour of everything drawn in it (all frames).
    names = list(dict.fromkeys([labels[k] for k in shown] + list(gt_labels) + [p.label for p in prompts]))
    sums, counts = {n: np.zeros(3) for n in names}, dict.fromkeys(names, 0)

    def add(name, frame, mask):
        sums[name] += frames[frame][mask].sum(0)
        counts[name] += int(mask.sum())

    for t in range(len(frames)):
        for k in shown:
            add(labels[k], t, pred[t, k])
        for k, name in enumerate(gt_labels if gt is not None else ()):
            add(name, t, gt[t, k])
    for name, frame, area in areas:
        add(name, frame, area)
    means = np.array([sums[n] / counts[n] if counts[n] else [np.nan] * 3 for n in names]).reshape(-1, 3)
    table = dict(zip(names, contrasting_colors(means)))

    scale = max(1, math.ceil(min_width / width))
    pred_colors = np.array([table[labels[k]] for k in shown], np.uint8).reshape(-1, 3)
    pages = []
    for t, frame in enumerate(frames):
        image = _enlarge(frame, scale, (0, 1))
        source = image
        for prompt in prompts:
            if prompt.frame == t:
                source = draw_prompt(source, prompt, table[prompt.label], scale=scale)
        panels = [source, add_legend(overlay(image, _enlarge(pred[t, shown], scale, (1, 2)), pred_colors),
                                     pred_text, pred_colors, note)]
        titles = ["input", "prediction"]
        if gt is not None:
            gt_colors = np.array([table[n] for n in gt_labels], np.uint8).reshape(-1, 3)
            panels.append(add_legend(overlay(image, _enlarge(gt[t], scale, (1, 2)), gt_colors), list(gt_labels),
                                     gt_colors))
            titles.append("ground truth")
        pages.append(side_by_side(panels, titles))
    return pages


def frame_duration_ms(times: Sequence[float] | None) -> int:
    """A GIF frame's duration: the median gap between the frames' times in seconds (the clip plays
    at the source's pace), or ``DEFAULT_FRAME_MS`` when the times are unknown. Browsers slow GIF
    frames under 20 ms down, so none is shorter."""
    if times is None or len(times) < 2:
        return DEFAULT_FRAME_MS
    gap = float(np.median(np.diff(np.asarray(times, np.float64))))
    return int(min(max(round(1000 * gap), 20), 60_000)) if gap > 0 else DEFAULT_FRAME_MS


def save_pages(path_stem, pages: Sequence[np.ndarray], *, duration_ms: int = DEFAULT_FRAME_MS) -> str:
    """PATH_STEM.png for one page, PATH_STEM.gif for several (pages padded to one height)."""
    if len(pages) == 1:
        return save_png(f"{path_stem}.png", pages[0])
    height = max(p.shape[0] for p in pages)
    pages = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in pages]
    return save_gif(f"{path_stem}.gif", pages, duration_ms=duration_ms)


def _atomic_write(path: str | os.PathLike, write) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
    image = _check_image(image)
    return _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], *, duration_ms: int = DEFAULT_FRAME_MS) -> str:
    """An endlessly looping GIF of equally sized uint8 frames."""
    frames = [_check_image(f) for f in frames]
    if not frames:
        raise ValueError(f"{path}: a GIF needs at least one frame")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{path}: frames differ in size: {sorted({f.shape for f in frames})}")
    images = [Image.fromarray(f) for f in frames]
    return _atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                          append_images=images[1:], duration=duration_ms,
                                                          loop=0, disposal=2))
