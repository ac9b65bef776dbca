"""Mask overlays with PIL only: PNG for images, animated GIF for videos.

    colors = palette(len(masks))
    panel = overlay(image, masks, colors)                       # uint8 [H, W, 3]
    page = side_by_side([panel, gt_panel], ["prediction", "ground truth"])
    page = add_legend(page, ["the red circle", ...], colors)
    save_png("out.png", page)          save_gif("out.gif", [page_t for each frame])

Images are uint8 [H, W, 3] numpy arrays; masks are bool [K, H, W] at the image's resolution.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_TITLE_HEIGHT = 14
_LEGEND_ROW = 13


def palette(count: int) -> np.ndarray:
    """``count`` well-separated saturated colours, uint8 [count, 3] (golden-ratio hue steps)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)] for h in hues],
                    np.uint8).reshape(count, 3)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` [H, W] that touch a pixel outside it (4-neighbourhood)."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay(image: np.ndarray, masks: np.ndarray, colors: np.ndarray | None = None, *, alpha: float = 0.5,
            outline: bool = True) -> np.ndarray:
    """Blends each mask's colour into ``image`` (later masks on top) and draws its outline."""
    image = _check_image(image)
    masks = np.asarray(masks, bool)
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not match the image {image.shape[:2]}")
    colors = palette(len(masks)) if colors is None else np.asarray(colors, np.uint8)
    if len(colors) < len(masks):
        raise ValueError(f"{len(masks)} masks but only {len(colors)} colours")
    out = image.astype(np.float32)
    for mask, color in zip(masks, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
        if outline:
            out[mask_outline(mask)] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font():
    return ImageFont.load_default()


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, *, gap: int = 4) -> np.ndarray:
    """Panels of equal height next to each other, each under its title (white background)."""
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


def add_legend(image: np.ndarray, labels: Sequence[str], colors: np.ndarray) -> np.ndarray:
    """Appends one row per label below ``image``: a colour swatch and the label text."""
    image = _check_image(image)
    if not labels:
        return image
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + _LEGEND_ROW * len(labels) + 2), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (label, color) in enumerate(zip(labels, np.asarray(colors, np.uint8))):
        y = image.shape[0] + 2 + k * _LEGEND_ROW
        draw.rectangle([2, y + 1, 11, y + 10], fill=tuple(int(c) for c in color))
        draw.text((15, y), str(label), fill=(0, 0, 0), font=_font())
    return np.asarray(canvas)


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


def save_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], *, duration_ms: int = 250) -> str:
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
