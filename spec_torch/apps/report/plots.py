"""The report's figures, saved as PNG files.

Charts use matplotlib's object API (:class:`~matplotlib.figure.Figure`, rendered by Agg), never pyplot, so
importing this module changes no global matplotlib state (a notebook's backend stays as it is).

- :func:`plot_spectrum`: every eigenvalue of ``(K_X - eta K_Y) / n`` by rank (positive and negative in two
  colours, SPEC-diff marked) beside a bar chart of the strongest modes of each sign.
- :func:`image_grid`: a mode's top images with their scores as captions (composed with PIL).
- :func:`score_histogram`: the distribution of one mode's sample scores, top samples marked.

Each function writes to a temporary name beside ``path`` and renames it, so a crash leaves no partial PNG,
and returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ...errors import SpecError
from .._io import atomic_open

__all__ = [
    "plot_spectrum",
    "plot_intervals",
    "image_grid",
    "grid_font",
    "score_histogram",
    "POSITIVE_COLOUR",
    "NEGATIVE_COLOUR",
]

#: Colour of the modes x captures and y does not (eigenvalue > 0), and of the reverse.
POSITIVE_COLOUR = "#c0392b"
NEGATIVE_COLOUR = "#2471a3"


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _vector(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise SpecError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise SpecError(f"{name}: contains NaN or Inf")
    return arr


def plot_spectrum(
    eigenvalues: Any,
    path: str | os.PathLike,
    spec_diff: float | None = None,
    *,
    top: int = 10,
    labels: tuple[str, str] = ("x", "y"),
    dpi: int = 110,
) -> Path:
    """Eigenvalue spectrum of the kernel difference.

    Left: all eigenvalues, sorted descending, against their rank; positive (captured by x, not by y) and
    negative (the reverse) in two colours; the eigenvalue of largest magnitude (SPEC-diff) circled and
    ``±SPEC-diff`` dashed. Right: ``|lambda|`` of the ``top`` strongest modes of each sign, side by side.

    Args:
        eigenvalues: 1-D, any order (sorted here).
        spec_diff: the value to mark; defaults to ``max |lambda|``.
        labels: short names of the two embeddings for the legend.
    """
    lam = np.sort(_vector(eigenvalues, "eigenvalues"))[::-1]
    if spec_diff is None:
        spec_diff = float(np.abs(lam).max())
    rank = np.arange(1, lam.size + 1)
    tiny = 1e-9 * max(float(np.abs(lam).max()), 1e-300)  # below this: numerically zero, no direction
    pos, neg = lam > tiny, lam < -tiny
    zero = ~(pos | neg)
    fig = Figure(figsize=(11, 3.8))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})

    ax.axhline(0.0, color="#888888", lw=0.8)
    for sign in (1, -1):
        ax.axhline(sign * spec_diff, color="#555555", lw=0.8, ls="--")
    ax.vlines(rank[pos], 0, lam[pos], color=POSITIVE_COLOUR, lw=1.2)
    ax.vlines(rank[neg], 0, lam[neg], color=NEGATIVE_COLOUR, lw=1.2)
    ax.scatter(
        rank[pos],
        lam[pos],
        s=10,
        color=POSITIVE_COLOUR,
        label=f"λ > 0: {labels[0]} captures, {labels[1]} not",
    )
    ax.scatter(
        rank[neg],
        lam[neg],
        s=10,
        color=NEGATIVE_COLOUR,
        label=f"λ < 0: {labels[1]} captures, {labels[0]} not",
    )
    if zero.any():
        ax.scatter(rank[zero], lam[zero], s=6, color="#999999", label="λ ≈ 0")
    i_max = int(np.argmax(np.abs(lam)))
    ax.scatter([rank[i_max]], [lam[i_max]], s=110, facecolors="none", edgecolors="black", lw=1.4)
    ax.annotate(
        f"SPEC-diff = {spec_diff:.4g}",
        (rank[i_max], lam[i_max]),
        xytext=(12 if i_max < lam.size / 2 else -12, -12 if lam[i_max] > 0 else 12),
        textcoords="offset points",
        ha="left" if i_max < lam.size / 2 else "right",  # keep the label inside the axes
        fontsize=9,
    )
    ax.set_xlim(0, lam.size + 1)
    ax.set_xlabel("rank (eigenvalues sorted descending)")
    ax.set_ylabel("eigenvalue λ of (K_X − η K_Y) / n")
    ax.set_title("Spectrum")
    ax.legend(fontsize=8, loc="upper right")

    pos_top = lam[pos][:top]
    neg_top = np.abs(lam[neg][::-1][:top])  # most negative first
    width = 0.4
    bx.bar(
        np.arange(1, pos_top.size + 1) - width / 2,
        pos_top,
        width,
        color=POSITIVE_COLOUR,
        label=f"{labels[0]} modes",
    )
    bx.bar(
        np.arange(1, neg_top.size + 1) + width / 2,
        neg_top,
        width,
        color=NEGATIVE_COLOUR,
        label=f"{labels[1]} modes",
    )
    bx.set_xlabel("mode (strongest first)")
    bx.set_ylabel("|λ|")
    bx.set_title(f"Top {top} modes of each sign")
    bx.set_xticks(np.arange(1, max(pos_top.size, neg_top.size, 1) + 1))
    bx.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


@lru_cache(maxsize=8)
def grid_font(size: int):
    """A PIL font with the glyphs the grid titles print (λ, the em dash, ≥): DejaVu Sans, which matplotlib
    ships, found through :mod:`matplotlib.font_manager` (PIL's built-in default font has neither glyph)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
    return ImageFont.truetype(path, size)


def image_grid(
    images: Sequence[Any],
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    ncols: int = 8,
    cell: int = 112,
    title: str | None = None,
) -> Path:
    """Save a grid of images (PIL images or ``[H, W(, C)]`` uint8 arrays) with a caption above each.

    Composed with PIL (no matplotlib): each image is scaled to fit a ``cell x cell`` square, aspect kept.
    """
    from PIL import Image, ImageDraw

    if len(images) == 0:
        raise SpecError("images: expected at least one image, got none")
    if len(captions) != len(images):
        raise SpecError(f"captions: expected one caption per image ({len(images)}), got {len(captions)}")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    font = grid_font(12)
    pad, cap_h = 6, 16
    top = 24 if title else 0
    sheet = Image.new("RGB", (ncols * (cell + pad) + pad, top + nrows * (cell + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), str(title), fill="black", font=grid_font(15))
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        if not isinstance(image, Image.Image):
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise SpecError(
                    f"images[{i}]: expected a PIL image or a uint8 array [H, W(, C)], got {arr.dtype} {arr.shape}"
                )
            image = Image.fromarray(arr)
        thumb = image.convert("RGB")
        scale = cell / max(thumb.size)
        thumb = thumb.resize(
            (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
            Image.NEAREST if scale >= 2 else Image.LANCZOS,  # small synthetic images stay crisp
        )
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * (cell + pad), top + pad + r * (cell + cap_h + pad)
        text = str(caption)
        while len(text) > 1 and draw.textlength(text, font=font) > cell:
            text = text[:-2] + "…"
        draw.text((x0 + (cell - draw.textlength(text, font=font)) / 2, y0), text, fill="#333333", font=font)
        sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + cap_h + (cell - thumb.height) // 2))
    with atomic_open(path) as fh:
        sheet.save(fh, format="PNG", optimize=True)
    return Path(path)


def score_histogram(
    scores: Any,
    path: str | os.PathLike,
    *,
    top_k: int | None = None,
    title: str | None = None,
    colour: str = POSITIVE_COLOUR,
    dpi: int = 90,
) -> Path:
    """Histogram of one mode's sample scores ``v_k(i)`` over all samples; the ``top_k`` largest marked."""
    s = _vector(scores, "scores")
    fig = Figure(figsize=(5, 2.6))
    ax = fig.subplots()
    ax.hist(s, bins=min(60, max(10, s.size // 20)), color=colour, alpha=0.8)
    if top_k:
        ax.axvline(
            np.sort(s)[::-1][min(top_k, s.size) - 1], color="black", ls="--", lw=1, label=f"top {top_k}"
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("sample score in the mode")
    ax.set_ylabel("samples")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_intervals(
    labels: Sequence[str],
    eigenvalues: Any,
    ci: Any,
    heldout: Any,
    supported: Sequence[bool],
    path: str | os.PathLike,
    *,
    level: float = 0.9,
    dpi: int = 110,
) -> Path:
    """The reported modes' eigenvalues with their bootstrap intervals and held-out eigenvalues.

    One column per mode (``labels``, e.g. ``"x1"``): the in-sample eigenvalue (dot, coloured by sign), its
    ``level`` interval (bar), the held-out eigenvalue (cross); modes not ``supported`` (the report passes: not
    flagged) drawn hollow and grey.

    Args:
        eigenvalues: ``[M]``; ci: ``[M, 2]``; heldout: ``[M]``; supported: ``[M]`` booleans.
    """
    lam = _vector(eigenvalues, "eigenvalues")
    held = _vector(heldout, "heldout")
    bounds = np.asarray(ci, dtype=np.float64).reshape(-1, 2)
    if not (len(labels) == lam.size == held.size == bounds.shape[0] == len(supported)):
        raise SpecError("labels/eigenvalues/ci/heldout/supported: expected one entry per mode")
    fig = Figure(figsize=(max(4.0, 0.7 * lam.size + 2), 3.4))
    ax = fig.subplots()
    ax.axhline(0.0, color="#888888", lw=0.8)
    pos = np.arange(lam.size)
    for i in range(lam.size):
        colour = (POSITIVE_COLOUR if lam[i] > 0 else NEGATIVE_COLOUR) if supported[i] else "#999999"
        ax.vlines(pos[i], bounds[i, 0], bounds[i, 1], color=colour, lw=4, alpha=0.45)
        face = colour if supported[i] else "none"
        ax.scatter([pos[i]], [lam[i]], s=36, facecolors=face, edgecolors=colour, zorder=3)
        ax.scatter([pos[i]], [held[i]], s=40, marker="x", color="black", zorder=4)
    ax.scatter([], [], s=36, color="#555555", label="in-sample λ")
    ax.plot([], [], color="#555555", lw=4, alpha=0.45, label=f"{level:.0%} bootstrap interval")
    ax.scatter([], [], s=40, marker="x", color="black", label="held-out λ")
    ax.scatter([], [], s=36, facecolors="none", edgecolors="#999999", label="flagged (see the mode's card)")
    ax.set_xticks(pos, [str(label) for label in labels])
    ax.set_xlabel("reported mode")
    ax.set_ylabel("eigenvalue λ")
    ax.set_title("Is this mode real? Intervals and held-out eigenvalues")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path, dpi)
