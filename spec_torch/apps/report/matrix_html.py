"""The matrix report: heatmaps of SPEC-diff, lead and linear CKA, a dendrogram ordering the feature sets by
SPEC-diff, and for the most different pairs their top modes in both directions (image grids or text listings,
with the two-encoder report's helpers). One self-contained ``report.html`` (images inlined)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .._io import atomic_write_text
from ..explain import keywords_phrase
from . import plots
from .html import _CSS, _e, _img, _table

__all__ = ["write_matrix_report", "plot_heatmap", "plot_dendrogram", "spec_order"]


def spec_order(spec_diff: Any) -> list[int]:
    """Leaf order of average-linkage clustering on the symmetrised SPEC-diff (``max`` of the two directions)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(spec_diff, dtype=np.float64)
    d = np.maximum(d, d.T)
    np.fill_diagonal(d, 0.0)
    if d.shape[0] < 3:
        return list(range(d.shape[0]))
    return [int(i) for i in leaves_list(linkage(squareform(d, checks=False), method="average"))]


def plot_heatmap(
    values: Any,
    names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str,
    cmap: str = "magma",
    dpi: int = 90,
) -> Path:
    """``[N, N]`` heatmap with the values written in the cells (rows: first set, columns: second)."""
    v = np.asarray(values, dtype=np.float64)
    size = max(4.0, 0.55 * len(names) + 2.5)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    im = ax.imshow(v, cmap=cmap)
    ax.set_xticks(range(len(names)), labels=list(names), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), labels=list(names), fontsize=8)
    if len(names) <= 16:
        hi = np.nanmax(v) if v.size else 0.0
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{v[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v[i, j] < 0.6 * hi else "black",
                )
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return plots._save(fig, path, dpi)


def plot_dendrogram(spec_diff: Any, names: Sequence[str], path: str | os.PathLike, dpi: int = 90) -> Path:
    """Average-linkage dendrogram of the feature sets under the symmetrised SPEC-diff."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(spec_diff, dtype=np.float64)
    d = np.maximum(d, d.T)
    np.fill_diagonal(d, 0.0)
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 2), 3.2))
    ax = fig.subplots()
    dendrogram(
        linkage(squareform(d, checks=False), method="average"),
        labels=list(names),
        ax=ax,
        leaf_rotation=60,
        color_threshold=0,
    )
    ax.set_ylabel("SPEC-diff (average linkage)")
    fig.tight_layout()
    return plots._save(fig, path, dpi)


def _mode_block(
    pair: dict[str, Any], mode: dict[str, Any], dataset: Any, index: np.ndarray, plot_dir: Path
) -> str:
    holder, lacker = (pair["x"], pair["y"]) if mode["direction"] == "x" else (pair["y"], pair["x"])
    head = (
        f'<h3 class="dir-{mode["direction"]}">{_e(holder)} holds together, {_e(lacker)} does not '
        f"(eigenvalue {mode['eigenvalue']:+.4g})</h3>"
    )
    facts = []
    words = keywords_phrase(mode, with_z=True)  # matrix.json keywords, where the data had texts
    if words is not None:
        facts.append(f'<p class="words"><b>Distinctive words:</b> {_e(words)}</p>')
    if "purity" in mode:
        facts.append(
            _table([(a, v, f) for a, (v, f) in mode["purity"].items()], ["attribute", "majority", "fraction"])
        )
    if "labels" in mode:
        facts.append(_table([(lab, f) for lab, f in mode["labels"][:6]], ["label", "fraction"]))
    rows = [int(index[r]) for r in mode["top_rows"]]
    if dataset is not None and dataset.modality == "image":
        name = f"pair_{_slug(pair['x'])}__{_slug(pair['y'])}_{mode['direction']}{mode['rank']}.png"
        grid = plots.image_grid(
            [dataset.display(r) for r in rows], [f"{s:+.3f}" for s in mode["top_scores"]], plot_dir / name
        )
        body = _img(grid, f"top samples of {holder} over {lacker}")
    elif dataset is not None:
        body = (
            '<ol class="texts">'
            + "".join(
                f'<li><span class="score">{s:+.3f}</span>{_e(dataset.display(r))}</li>'
                for r, s in zip(rows, mode["top_scores"])
            )
            + "</ol>"
        )
    else:
        body = ""
    return (
        f'<div class="mode {mode["direction"]}">{head}<div class="facts">{"".join(facts)}</div>{body}</div>'
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def write_matrix_report(
    out_dir: str | os.PathLike, summary: dict[str, Any], dataset: Any = None, index: Any = None
) -> Path:
    """Write ``out_dir/report.html`` (plots under ``out_dir/plots``) from the ``matrix.json`` dict."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    names = summary["names"]
    order = spec_order(summary["spec_diff"])
    ordered = [names[i] for i in order]

    def reorder(key):
        v = np.asarray(summary[key])
        return v[np.ix_(order, order)]

    parts = [
        f"<h1>SPEC matrix: {len(names)} feature sets</h1>",
        f'<p class="sub">n = {summary["n"]} samples, eta = {summary["settings"]["eta"]}, '
        f"route {_e(summary['settings']['route'])}, dataset {_e(summary.get('dataset', {}).get('name', '?'))}</p>",
        "<h2>How to read</h2><p>SPEC-diff[i, j] is the largest |eigenvalue| of (K_i - eta K_j) / n: how strongly "
        "the two embeddings group the samples differently (0: the same kernel matrix). Lead[i, j] is the largest "
        "positive eigenvalue: the strongest cluster structure i holds and j lacks (read it row by row). Linear "
        "CKA (raw rows, centred, biased HSIC) is shown beside it: a similarity, 1 for the same geometry. Rows and "
        "columns are ordered by the dendrogram.</p>",
    ]
    heat = [
        ("spec_diff", "SPEC-diff (symmetric at eta = 1)", "magma"),
        ("lead", "lead: row holds, column lacks", "magma"),
    ]
    if summary.get("cka") is not None:
        heat.append(("cka", "linear CKA", "viridis"))
    parts.append("<h2>Heatmaps</h2>")
    for key, title, cmap in heat:
        parts.append(
            _img(plot_heatmap(reorder(key), ordered, plot_dir / f"{key}.png", title=title, cmap=cmap), title)
        )
    if len(names) >= 3:
        parts.append("<h2>Ordering by SPEC-diff</h2>")
        parts.append(
            _img(plot_dendrogram(summary["spec_diff"], names, plot_dir / "dendrogram.png"), "dendrogram")
        )
    parts.append("<p>Order: " + " &rarr; ".join(_e(s) for s in ordered) + "</p>")
    sd = np.asarray(summary["spec_diff"])
    nearest = [
        (
            s,
            names[int(np.argsort(np.where(np.arange(len(names)) == i, np.inf, sd[i]))[0])],
            float(np.sort(np.delete(sd[i], i))[0]),
        )
        for i, s in enumerate(names)
    ]
    parts.append(_table(nearest, ["feature set", "nearest by SPEC-diff", "SPEC-diff"]))
    if summary.get("pairs"):
        parts.append("<h2>The most different pairs: their top modes in both directions</h2>")
        for pair in summary["pairs"]:
            parts.append(f"<h2>{_e(pair['x'])} vs {_e(pair['y'])} (SPEC-diff {pair['spec_diff']:.4g})</h2>")
            for mode in pair["modes"]:
                parts.append(_mode_block(pair, mode, dataset, np.asarray(index), plot_dir))
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>SPEC matrix</title><style>{_CSS}</style>'
        f"</head><body><main>{''.join(parts)}</main></body></html>"
    )
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
