"""Image grids of the report (synthetic samples, image/mask pairs, outlines, segmentations), composed
with Pillow instead of one matplotlib axes per image.

A grid of images needs no axes, ticks or layout engine: matplotlib spent most of the report's time
laying out and drawing them (about 0.4 s per grid of 18 images here, and half of a smoke run's report),
where pasting the pixels takes milliseconds. No maintained library composes labelled image tiles with
mask outlines without pulling in torchvision (``make_grid``) or scikit-image, so this is the small piece
written here: resize, outline (a mask minus its erosion, scipy.ndimage), paste, caption.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from busynth.report.common import png_to_img

RED, LIME = (230, 20, 20), (40, 220, 40)
TILE = 112  # the longer side of each image in the grid, in pixels
CAPTION = 14  # height of the caption band above each tile
GAP = 4


@dataclass
class Tile:
    """One image of a grid: grey uint8 pixels, mask outlines drawn on it ((bool mask, RGB) pairs, any
    size: resized to the image), and a caption above it."""

    image: np.ndarray
    outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = field(default_factory=tuple)
    caption: str = ""


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_tile(tile: Tile, size: int = TILE) -> Image.Image:
    """The tile's image scaled so that its longer side is ``size``, in RGB, outlines drawn on it."""
    h, w = tile.image.shape[:2]
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(tile.image).resize(shape, Image.Resampling.BILINEAR).convert("RGB")).copy()
    for mask, colour in tile.outlines:
        big = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
                         .resize(shape, Image.Resampling.NEAREST)) > 0
        edge = big & ~ndimage.binary_erosion(big, iterations=1, border_value=0)
        rgb[edge] = colour
    return Image.fromarray(rgb)


def image_grid(rows: Sequence[Sequence[Tile]], size: int = TILE) -> Image.Image:
    """The rows of tiles on a white canvas, each tile under its caption; short rows stay short."""
    ncols = max((len(r) for r in rows), default=0)
    cell_w, cell_h = size + GAP, size + CAPTION + GAP
    canvas = Image.new("RGB", (max(1, ncols * cell_w), max(1, len(rows) * cell_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            x, y = c * cell_w, r * cell_h
            if tile.caption:
                draw.text((x, y + 1), tile.caption, fill=(0, 0, 0), font=_font())
            canvas.paste(render_tile(tile, size), (x, y + CAPTION))
    return canvas


def grid_to_img(rows: Sequence[Sequence[Tile]], alt: str, save_to: Path | None = None) -> str:
    """An ``<img>`` tag with the grid as a PNG data URI (and written to ``save_to``, see ``png_to_img``)."""
    buf = io.BytesIO()
    image_grid(rows).save(buf, format="png")
    return png_to_img(buf.getvalue(), alt, save_to=save_to)
