"""The built-in demo dataset: small RGB images with planted attributes, generated from a seed.

Each image shows one filled **shape** (circle, square, triangle, diamond) in one saturated **colour** (red,
green, blue, yellow) with a dark outline, on an achromatic **texture** (plain, stripes, dots), with a short
**word** (cat, sun, box) written in a corner. Position, size, tones and the texture phase are jittered.

Sample ``i`` is drawn from its own generator ``numpy.random.default_rng([seed, i])``: any sample can be
rendered alone, in any process, in any order, always the same. Rendering is in memory (about 1 ms an image).
"""

from __future__ import annotations

import colorsys
from functools import cache
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont

from ...errors import SpecError
from .base import SampleDataset

__all__ = ["SyntheticShapes", "SHAPES", "COLOURS", "TEXTURES", "WORDS"]

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow")
TEXTURES = ("plain", "stripes", "dots")
WORDS = ("cat", "sun", "box")
_HUES = {"red": 0.0, "yellow": 1 / 6, "green": 1 / 3, "blue": 2 / 3}
#: bump when the rendering changes, so old feature caches are not reused
_VERSION = 1
_SUPERSAMPLE = 2


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class SyntheticShapes(SampleDataset):
    """``n`` generated images of ``image_size`` pixels a side; ``attributes`` holds the planted factors.

    Args:
        n: number of images.
        image_size: side in pixels (>= 32).
        seed: generator seed; the same (n, image_size, seed) always gives the same images.
    """

    name = "synthetic"
    modality = "image"

    def __init__(self, n: int = 600, image_size: int = 64, seed: int = 0):
        super().__init__()
        for key, value, low in (("n", n, 1), ("image_size", image_size, 32)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"data.{key}: expected an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"data.seed: expected a non-negative integer, got {seed!r}")
        self.n, self.image_size, self.seed = n, image_size, seed
        self._ids = [f"syn:{i}" for i in range(n)]
        self._attrs = [_draw_attributes(self._rng(i)) for i in range(n)]

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    @property
    def attributes(self) -> dict[str, list[str]]:
        return {key: [a[key] for a in self._attrs] for key in ("shape", "colour", "texture", "word")}

    @property
    def labels(self) -> list[str]:
        return [f"{a['colour']} {a['shape']}, {a['texture']}, {a['word']}" for a in self._attrs]

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "image_size": self.image_size,
            "seed": self.seed,
            "v": _VERSION,
            "pillow": PIL.__version__,  # the text font comes with Pillow
        }

    def load(self, i: int) -> Image.Image:
        rng = self._rng(i)
        a = _draw_attributes(rng)  # the same draws as in __init__; the rest of the stream renders
        s = self.image_size * _SUPERSAMPLE
        base = int(rng.integers(165, 196))
        img = Image.new("RGB", (s, s), (base,) * 3)
        draw = ImageDraw.Draw(img)
        _texture(draw, a["texture"], s, base - int(rng.integers(45, 61)), rng)
        _shape(draw, a["shape"], _colour(a["colour"], rng), s, rng)
        font = _font(max(8, s // 6))
        corner = (int(rng.integers(2, s // 8)), int(rng.integers(2, s // 10)))
        if rng.random() < 0.5:
            corner = (corner[0], s - s // 5 - corner[1])
        draw.text(corner, a["word"], fill=(15, 15, 15), font=font)
        return img.resize((self.image_size, self.image_size), Image.Resampling.BOX)


def _draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    """The planted factors: the first four draws of a sample's generator."""
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": COLOURS[rng.integers(len(COLOURS))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "word": WORDS[rng.integers(len(WORDS))],
    }


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated RGB colour near the hue of ``name``."""
    hue = (_HUES[name] + rng.uniform(-0.025, 0.025)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _texture(draw: ImageDraw.ImageDraw, kind: str, s: int, tone: int, rng: np.random.Generator) -> None:
    """Achromatic background pattern in grey ``tone``."""
    fill = (tone,) * 3
    if kind == "stripes":
        period = s // 8
        offset = int(rng.integers(period))
        for x0 in range(-s + offset, s, period):  # diagonal bands of half a period
            draw.polygon([(x0, 0), (x0 + period // 2, 0), (x0 + period // 2 + s, s), (x0 + s, s)], fill=fill)
    elif kind == "dots":
        period = s // 6
        r = period // 5
        ox, oy = (int(v) for v in rng.integers(period, size=2))
        for cy in range(oy - period, s + period, period):
            for cx in range(ox - period, s + period, period):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _shape(
    draw: ImageDraw.ImageDraw, kind: str, rgb: tuple[int, int, int], s: int, rng: np.random.Generator
) -> None:
    """One filled shape with a dark outline, of radius 0.22-0.3 of the side, near the centre."""
    r = s * rng.uniform(0.22, 0.3)
    cx, cy = (s / 2 + rng.uniform(-0.1, 0.1) * s for _ in range(2))
    style = {"fill": rgb, "outline": (25, 25, 25), "width": max(2, s // 40)}
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    elif kind == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], **style)
    elif kind == "triangle":
        pts = [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.deg2rad([-90, 30, 150])]
        draw.polygon(pts, **style)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **style)
