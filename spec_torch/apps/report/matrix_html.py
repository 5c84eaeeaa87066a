"""The matrix report: the finding in words (``matrix.json`` ``summary``), heatmaps of SPEC-diff, lead and linear
CKA (uniform-led entries marked), a dendrogram ordering the feature sets by SPEC-diff, for the most different
pairs their top modes in both directions (image grids or text listings, with the two-encoder report's helpers),
the encoders and the settings. One self-contained ``report.html`` (images inlined)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..explain import keywords_phrase
from . import plots
from .html import _composition, _describe, _e, _img, _purity, _table
from .page import wide, write_page

__all__ = ["write_matrix_report", "plot_heatmap", "plot_dendrogram", "spec_order", "matrix_summary"]


# ------------------------------------------------------------------------------------------- the finding
def _strongest_purity(mode: dict[str, Any]) -> str:
    """``"100% colour=red"``: the planted attribute its top samples are most uniform in, or ``""``."""
    purity = mode.get("purity") or {}
    if purity:
        att, (value, frac) = max(purity.items(), key=lambda kv: float(kv[1][1]))
        return f"{float(frac):.0%} {att}={value}"
    labels = mode.get("labels") or []
    return f"{float(labels[0][1]):.0%} label {labels[0][0]}" if labels else ""


def _headline_mode(pair: dict[str, Any]) -> dict[str, Any] | None:
    """The pair's strongest mode that is not uniform (the modes are each direction's strongest first)."""
    kept = [m for m in pair.get("modes", []) if "uniform" not in m.get("flags", [])]
    return max(kept, key=lambda m: abs(float(m["eigenvalue"])), default=None)


_RANKED_BY = {
    "spec_diff": "by SPEC-diff",
    "cluster_diff": "by the largest lead that is not a uniform mode",
}


def matrix_summary(result: dict[str, Any]) -> str:
    """The plain-words finding of a ``matrix.json`` dict (its ``summary``): the most different pair by the
    matrix ``ranking`` names, what its strongest non-uniform mode holds, the uniform-led entries (uncentred)
    and the closest pair. It renders the fields (flags, ranking, purity); it decides nothing."""
    from .flags import FLAGS

    names = result["names"]
    sd = np.asarray(result["spec_diff"], dtype=np.float64)
    centred = bool(result.get("settings", {}).get("center"))
    ranked = result.get("ranking", {})
    out = []
    pairs = result.get("pairs") or []
    mode = _headline_mode(pairs[0]) if pairs else None
    if mode is not None:
        p = pairs[0]
        holder, lacker = (p["x"], p["y"]) if mode["direction"] == "x" else (p["y"], p["x"])
        pure = _strongest_purity(mode)
        extra = [FLAGS[c][0] for c in mode.get("flags", [])]
        out.append(
            f"Most different {_RANKED_BY.get(ranked.get('matrix'), 'by SPEC-diff')}"
            f"{' of the centred kernels' if centred else ''}: {holder} holds together a group that {lacker} does "
            f"not (eigenvalue {abs(float(mode['eigenvalue'])):.3f}"
            + (f"; its top samples are {pure}" if pure else "")
            + (f"; flagged: {', '.join(extra)}" if extra else "")
            + ")."
        )
        if "uniform" in p.get("flags", []):
            out.append(
                f"The pair's SPEC-diff {p['spec_diff']:.3f} itself is a uniform mode (uniformity "
                f"{p['uniformity']:.3f}): kernel levels, not a group."
            )
    elif len(names) >= 2:  # no pair scored (top_pairs = 0, or the groups route): the ranked matrix's largest
        key = ranked.get("matrix", "spec_diff")
        ranked_by = np.asarray(result.get(key, sd), dtype=np.float64)
        off = np.where(np.eye(len(names), dtype=bool), -np.inf, ranked_by)
        i, j = np.unravel_index(np.argmax(off), off.shape)
        out.append(
            f"Most different {_RANKED_BY.get(key, 'by SPEC-diff')}: {names[i]} vs {names[j]} "
            f"({ranked_by[i, j]:.3f}); no pair's modes were scored."
        )
    lead = np.asarray(result.get("lead", sd), dtype=np.float64)
    lead_u = np.asarray(result.get("lead_uniformity", np.zeros_like(sd)), dtype=np.float64)
    lead_flags = result.get("lead_flags") or [[[] for _ in names] for _ in names]
    uniform = [(lead[i, j], i, j) for i in range(len(names)) for j in range(len(names)) if lead_flags[i][j]]
    if uniform:
        v, i, j = max(uniform)
        out.append(
            f"{len(uniform)} lead entries are led by a uniform mode, the largest {names[i]} over {names[j]} "
            f"({v:.3f}, uniformity {lead_u[i, j]:.3f}): a difference of the kernels' average similarity, not a "
            "group; the ranking skips them. Rerun with center=true to remove them."
        )
    elif centred:
        out.append("Both kernels of every pair are centred, so no entry is a uniform mode.")
    if len(names) >= 2:
        off = np.where(np.eye(len(names), dtype=bool), np.inf, np.maximum(sd, sd.T))
        i, j = np.unravel_index(np.argmin(off), off.shape)
        out.append(f"Closest: {names[i]} and {names[j]} (SPEC-diff {off[i, j]:.3f}).")
    return " ".join(out)


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


#: the smallest font of a heatmap's cell labels and axis labels, in points (readable beside the page's text)
CELL_FONT_PT = 10


def plot_heatmap(
    values: Any,
    names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str,
    cmap: str = "magma",
    dpi: int = 100,
    colorbar: str = "",
    marks: Any = None,
) -> Path:
    """``[N, N]`` heatmap with the values written in the cells (rows: first set, columns: second), cell and
    axis labels of at least :data:`CELL_FONT_PT` points and a labelled colour bar.

    Args:
        colorbar: the colour bar's label (what the colour measures).
        marks: ``[N, N]`` booleans: cells written with a trailing ``"u"`` (led by a uniform mode).
    """
    v = np.asarray(values, dtype=np.float64)
    nn = len(names)
    size = max(6.5, 0.95 * nn + 3.0)
    fig = Figure(figsize=(size, size * 0.82))
    ax = fig.subplots()
    im = ax.imshow(v, cmap=cmap)
    ax.set_xticks(range(nn), labels=list(names), rotation=45, ha="right", fontsize=CELL_FONT_PT)
    ax.set_yticks(range(nn), labels=list(names), fontsize=CELL_FONT_PT)
    ax.set_xlabel("column j", fontsize=CELL_FONT_PT)
    ax.set_ylabel("row i", fontsize=CELL_FONT_PT)
    marked = np.zeros_like(v, dtype=bool) if marks is None else np.asarray(marks, dtype=bool)
    if nn <= 16:
        lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if v.size else (0.0, 0.0)
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                dark = im.cmap(im.norm(v[i, j]))[:3]
                light_text = sum(dark) / 3 < 0.5 if hi > lo else True
                ax.text(
                    j,
                    i,
                    f"{v[i, j]:.3f}" + ("u" if marked[i, j] else ""),
                    ha="center",
                    va="center",
                    fontsize=CELL_FONT_PT,
                    color="white" if light_text else "black",
                )
    ax.set_title(title, fontsize=CELL_FONT_PT + 2)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(colorbar or title, fontsize=CELL_FONT_PT)
    bar.ax.tick_params(labelsize=CELL_FONT_PT)
    fig.tight_layout()
    return plots._save(fig, path, dpi)


def plot_dendrogram(spec_diff: Any, names: Sequence[str], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Average-linkage dendrogram of the feature sets under the symmetrised SPEC-diff."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(spec_diff, dtype=np.float64)
    d = np.maximum(d, d.T)
    np.fill_diagonal(d, 0.0)
    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 2), 3.8))
    ax = fig.subplots()
    dendrogram(
        linkage(squareform(d, checks=False), method="average"),
        labels=list(names),
        ax=ax,
        leaf_rotation=45,
        leaf_font_size=CELL_FONT_PT,
        color_threshold=0,
    )
    ax.set_ylabel("SPEC-diff (average linkage)", fontsize=CELL_FONT_PT)
    ax.tick_params(axis="y", labelsize=CELL_FONT_PT)
    fig.tight_layout()
    return plots._save(fig, path, dpi)


def _mode_block(
    pair: dict[str, Any], mode: dict[str, Any], dataset: Any, index: np.ndarray, plot_dir: Path
) -> str:
    from .flags import FLAGS

    holder, lacker = (pair["x"], pair["y"]) if mode["direction"] == "x" else (pair["y"], pair["x"])
    codes = mode.get("flags", [])
    what = (
        f"{_e(holder)} over {_e(lacker)}: a uniform mode, not a group"
        if "uniform" in codes
        else f"{_e(holder)} holds together, {_e(lacker)} does not"
    )
    head = (
        f'<h3 class="dir-{mode["direction"]}">{what} '
        f"(mode {mode['rank']}, eigenvalue {mode['eigenvalue']:+.4g})</h3>"
    )
    if codes:
        head += (
            '<div class="note"><ul>'
            + "".join(f"<li><b>{_e(FLAGS[c][0])}</b>: {_e(FLAGS[c][1])}</li>" for c in codes)
            + "</ul></div>"
        )
    facts = []
    words = keywords_phrase(mode, with_z=True)  # matrix.json keywords, where the data had texts
    if words is not None:
        facts.append(f'<p class="words"><b>Distinctive words:</b> {_e(words)}</p>')
    if "purity" in mode:
        facts.append(_purity(mode["purity"]))
    if "labels" in mode:
        facts.append(_composition([(lab, float(f)) for lab, f in mode["labels"]]))
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
    facts_html = "".join(wide(f) for f in facts)
    return f'<div class="mode {mode["direction"]}">{head}<div class="facts">{facts_html}</div>{body}</div>'


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


_HOW_TO_READ = (
    "<p><b>SPEC-diff[i, j]</b> is the largest |eigenvalue| of (K_i - eta K_j) / n: how strongly the two "
    "embeddings group the samples differently (0: the same kernel matrix). <b>Lead[i, j]</b> is the largest "
    "positive eigenvalue: the strongest group of samples that row i holds together and column j does not "
    "(read it row by row). <b>Linear CKA</b> (raw rows, columns centred) is a similarity beside them: 1 for the "
    "same geometry. Rows and columns are ordered by the dendrogram (average linkage on SPEC-diff).</p>"
    "<p>A value marked <b>u</b> is led by a <b>uniform mode</b>: its eigenvector scores every sample about "
    "alike, so it measures a difference in the two kernels' average similarity, not a group. The ranking of "
    "the most different pairs never rests on one (it says which matrix it uses); centred kernels "
    "(center=true) remove them.</p>"
)


def _encoders(summary: dict[str, Any]) -> str:
    rows = []
    for name, info in (summary.get("encoders") or {}).items():
        what = info.get("model") or info.get("name") or info.get("family", "")
        sets = info.get("sets") or [name]
        weights = info.get("pretrained") or info.get("weights") or info.get("checkpoint")
        rows.append((name, info.get("family", ""), what, "—" if weights in (None, False) else weights,
                     ", ".join(sets)))  # fmt: skip
    return wide(_table(rows, ["encoder", "family", "model", "weights", "feature sets"])) if rows else ""


def _settings(summary: dict[str, Any]) -> str:
    settings = summary.get("settings", {})
    rows = [(k, _describe(v)) for k, v in settings.items() if k != "kernels"]
    rows += [(f"kernel of {k}", _describe(v)) for k, v in (settings.get("kernels") or {}).items()]
    data = summary.get("dataset") or {}
    rows.append(("dataset", _describe(data)))
    rows.append(("samples compared (skipped)", f"{summary['n']} ({summary.get('skipped', 0)})"))
    return wide(_table(rows, ["setting", "value"]))


def write_matrix_report(
    out_dir: str | os.PathLike, summary: dict[str, Any], dataset: Any = None, index: Any = None
) -> Path:
    """Write ``out_dir/report.html`` (plots under ``out_dir/plots``) from the ``matrix.json`` dict: the finding
    (its ``summary``), how to read, the heatmaps, the ordering, the most different pairs' modes, the encoders
    and the settings."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    names = summary["names"]
    order = spec_order(summary["spec_diff"])
    ordered = [names[i] for i in order]
    settings = summary["settings"]
    centred = bool(settings.get("center"))

    def reorder(key):
        v = np.asarray(summary[key])
        return v[np.ix_(order, order)]

    parts = [
        f"<h1>SPEC matrix: {len(names)} feature sets</h1>",
        f'<p class="sub">n = {summary["n"]} samples, eta = {settings["eta"]}, '
        f"{'centred' if centred else 'uncentred'} kernels, route {_e(settings['route'])}, dataset "
        f"{_e(summary.get('dataset', {}).get('name', '?'))}</p>",
    ]
    if summary.get("summary"):
        parts.append(f'<p class="finding">{_e(summary["summary"])}</p>')
    parts.append("<h2>How to read</h2>" + _HOW_TO_READ)
    heat = [
        (
            "spec_diff",
            "SPEC-diff (symmetric at eta = 1)",
            "magma",
            "SPEC-diff: largest |eigenvalue|",
            "entry_flags",
        ),
        ("lead", "lead: row holds, column lacks", "magma", "lead: largest positive eigenvalue", "lead_flags"),
    ]
    if summary.get("cka") is not None:
        heat.append(("cka", "linear CKA", "viridis", "linear CKA (1 = same geometry)", None))
    parts.append("<h2>Heatmaps</h2>")
    for key, title, cmap, bar, flag_key in heat:
        marks = None
        if flag_key and summary.get(flag_key):
            marks = np.asarray([[bool(c) for c in row] for row in summary[flag_key]])[np.ix_(order, order)]
        png = plot_heatmap(
            reorder(key), ordered, plot_dir / f"{key}.png", title=title, cmap=cmap, colorbar=bar, marks=marks
        )
        parts.append(_img(png, title))
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
    parts.append(wide(_table(nearest, ["feature set", "nearest by SPEC-diff", "SPEC-diff"])))
    if summary.get("pairs"):
        from .flags import FLAGS

        parts.append("<h2>The most different pairs: their top modes in both directions</h2>")
        note = summary.get("ranking", {}).get("note", "ranked by SPEC-diff")
        parts.append(f"<p>{_e(note[:1].upper() + note[1:])}.</p>")
        rows = [
            (
                f"{p['x']} vs {p['y']}",
                p["spec_diff"],
                p.get("lead", [None, None])[0],
                p.get("lead", [None, None])[1],
                "; ".join(FLAGS[c][0] for c in p.get("flags", [])) or "—",
            )
            for p in summary["pairs"]
        ]
        parts.append(
            wide(_table(rows, ["pair (x vs y)", "SPEC-diff", "lead x over y", "lead y over x", "flags"]))
        )
        for pair in summary["pairs"]:
            parts.append(f"<h2>{_e(pair['x'])} vs {_e(pair['y'])} (SPEC-diff {pair['spec_diff']:.4g})</h2>")
            for mode in pair["modes"]:
                parts.append(_mode_block(pair, mode, dataset, np.asarray(index), plot_dir))
    parts.append("<h2>Encoders</h2>" + _encoders(summary))
    parts.append("<h2>Settings</h2>" + _settings(summary))
    return write_page(out_dir / "report.html", "SPEC matrix", parts)
