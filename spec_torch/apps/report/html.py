"""``report.html``: one self-contained page (inline CSS, PNGs as base64 data URIs) that a person can read.

:func:`write_report` takes the ``spec.json`` dict of a comparison, one :class:`ModeView` per reported mode
and optional context scores, draws the plots into ``run_dir/plots/`` and writes ``run_dir/report.html``
atomically (a temporary name, then :func:`os.replace`). Every piece of text is HTML-escaped.

The page, in order: the title and an opening paragraph in plain words (:func:`verdict`: which encoder holds
which groups the other does not, how strong), the headline numbers, a mode overview table (one row per
reported mode: direction, eigenvalue, share of |spectrum|, cluster size, tightness under x and y, purity,
flags), report-wide flags, settings, context scores, the spectrum, and the per-mode detail.

Hook points for other analyses: each :class:`ModeView` carries a ``flags`` list (short warnings shown in the
overview and on the mode: e.g. a mode that is close to the uniform vector, an approximation error, a
confidence interval or an unsupported mode), and ``extra["flags"]`` holds report-wide ones; both are plain
strings appended by whoever computes them. :func:`mode_flags` adds the ones the report can see by itself.

Why f-strings and not a template engine (Jinja2): the page is assembled from a dozen small functions, each
escaping its own values with one helper; a template would move the markup into a second language while the
same logic (formatting numbers, choosing rows) stayed in Python, so it would add a file without removing code.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import SpecError
from .._io import atomic_write_text
from ..explain import NO_WORDS, keywords_phrase
from . import flags, plots

__all__ = ["ModeView", "write_report", "verdict", "mode_flags", "cluster_size", "SIZE_RULE"]


@dataclass
class ModeView:
    """Everything the report shows about one mode (one eigenvector of ``(K_X - eta K_Y) / n``).

    Attributes:
        direction: ``"x"`` for a mode x captures and y does not (eigenvalue > 0), ``"y"`` for the reverse.
        index: the mode's index into the spectrum (``SpecResult.eigenvalues``).
        eigenvalue: its eigenvalue (sign must match ``direction``).
        sample_ids: ids of the top samples, best first.
        scores: their scores in the mode (same length).
        images: the top images (PIL images or arrays), for image data; or None.
        texts: the top texts, for text data; or None.
        tightness_x, tightness_y: mean pairwise kernel value of the top samples under x and under y
            (:func:`spec_torch.apps.report.metrics.mode_tightness`).
        labels: label composition ``[(label, fraction), ...]`` (:func:`metrics.label_composition`), or None.
        purity: per planted attribute, ``(majority value, fraction)`` (:func:`metrics.purity`) or a fraction.
        paths: the file of each top sample (same order as ``sample_ids``), where the data has files; or None.
        flags: short warnings about this mode (the report appends its own: :func:`mode_flags`).
        ci, heldout_eigenvalue, stability, support: the mode's bootstrap interval ``[lo, hi]``, held-out
            eigenvalue, stability and plain-words verdict (:func:`spec_torch.uncertainty.mode_support`), or None.
        keywords: the mode's distinctive terms ``[[term, z], ...]`` (spec.json ``keywords``, from
            :mod:`spec_torch.apps.explain`): ``[]`` when none stands out, None when the data has no texts.
    """

    direction: str
    index: int
    eigenvalue: float
    sample_ids: Sequence[str]
    scores: Sequence[float]
    images: Sequence[Any] | None = None
    texts: Sequence[str] | None = None
    tightness_x: float | None = None
    tightness_y: float | None = None
    labels: Sequence[tuple[str, float]] | None = None
    purity: Mapping[str, Any] | None = None
    paths: Sequence[str] | None = None
    flags: list[str] = field(default_factory=list)
    ci: Sequence[float] | None = None
    heldout_eigenvalue: float | None = None
    stability: float | None = None
    support: str | None = None
    keywords: Sequence[Sequence[Any]] | None = None

    def __post_init__(self) -> None:
        where = f"ModeView(direction={self.direction!r}, index={self.index!r})"
        if self.direction not in ("x", "y"):
            raise SpecError(f"{where}: direction: expected 'x' or 'y', got {self.direction!r}")
        lam = float(self.eigenvalue)
        if not math.isfinite(lam) or (lam > 0) != (self.direction == "x") or lam == 0:
            want = "> 0" if self.direction == "x" else "< 0"
            raise SpecError(
                f"{where}: eigenvalue: expected {want} for direction {self.direction!r}, got {lam!r}"
            )
        self.sample_ids = [str(s) for s in self.sample_ids]
        self.scores = [float(s) for s in self.scores]
        if self.texts is not None:
            self.texts = [str(t) for t in self.texts]
        if len(self.scores) != len(self.sample_ids):
            raise SpecError(
                f"{where}: scores: expected one score per sample id ({len(self.sample_ids)}), got {len(self.scores)}"
            )
        for name in ("images", "texts", "paths"):
            items = getattr(self, name)
            if items is not None and len(items) != len(self.sample_ids):
                raise SpecError(
                    f"{where}: {name}: expected one per sample id ({len(self.sample_ids)}), got {len(items)}"
                )


# ---------------------------------------------------------------- small helpers

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2125}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:34px 0 8px;border-bottom:2px solid #e1e4e8;
padding-bottom:4px}h3{font-size:1.05em;margin:0 0 8px}
.sub{color:#57606a;margin:0 0 16px}.muted{color:#57606a;font-size:.9em}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.headline{display:flex;gap:14px;flex-wrap:wrap;margin:14px 0}
.stat{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:130px}
.stat b{display:block;font-size:1.35em}.stat span{color:#57606a;font-size:.85em}
.mode{border:1px solid #d0d7de;border-left:6px solid #999;border-radius:6px;padding:12px 16px;margin:14px 0}
.mode.x{border-left-color:@POS@}.mode.y{border-left-color:@NEG@}
.dir-x{color:@POS@}.dir-y{color:@NEG@}
.facts{display:flex;gap:28px;flex-wrap:wrap}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.bar{display:inline-block;height:10px;background:#8c959f;vertical-align:middle;margin-right:6px}
ol.texts{padding-left:22px;margin:6px 0}ol.texts li{margin:3px 0}ol.ids{columns:4 220px}
.score{font-variant-numeric:tabular-nums;color:#57606a;margin-right:8px}
code{background:#f6f8fa;padding:1px 4px;border-radius:3px;font-size:.9em}
details{margin:6px 0}summary{cursor:pointer;color:#57606a}
.verdict{font-size:1.08em;margin:10px 0 14px}
.flags{border:1px solid #d4a72c;background:#fff8c5;border-radius:6px;padding:8px 14px;margin:10px 0}
.flags ul{margin:4px 0 0 0}
""".replace("@POS@", plots.POSITIVE_COLOUR).replace("@NEG@", plots.NEGATIVE_COLOUR)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img(path: Path, alt: str) -> str:
    return f'<img src="{_png_uri(path)}" alt="{_e(alt)}">'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            tag = "th" if j == 0 and header is None else "td"
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<{tag}{cls}>{_e(_fmt(cell))}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _describe(value: Any) -> str:
    """One line for a settings dict (encoder, kernel, dataset) or any other value."""
    if isinstance(value, Mapping):
        return ", ".join(
            f"{k}={_fmt(v)}" for k, v in value.items() if v is not None and not isinstance(v, Mapping)
        )
    return _fmt(value)


def _short_name(value: Any, fallback: str) -> str:
    if isinstance(value, Mapping):
        for key in ("name", "model", "classifier", "family"):
            if value.get(key):
                return str(value[key])
        return fallback
    return str(value) if value else fallback


def _weights_tag(encoder: Any) -> str | None:
    """The weights an encoder config names (open_clip pretrained tag, torchvision weights, checkpoint)."""
    if not isinstance(encoder, Mapping):
        return None
    for key in ("pretrained", "weights", "checkpoint"):
        if isinstance(encoder.get(key), str) and encoder[key]:
            return Path(encoder[key]).name if key == "checkpoint" else encoder[key]
    return None


def _lookup(spec: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in spec and spec[key] is not None:
            return spec[key]
    return None


def _side(spec: Mapping[str, Any], kind: str, side: str) -> Any:
    """``spec[kind + "_" + side]`` or ``spec[kind + "s"][side]`` (e.g. kernel_x or kernels["x"])."""
    direct = spec.get(f"{kind}_{side}")
    if direct is not None:
        return direct
    group = spec.get(f"{kind}s")
    return group.get(side) if isinstance(group, Mapping) else None


def _encoder(spec: Mapping[str, Any], side: str) -> Any:
    """The encoder settings of one side; for precomputed features, the file they came from."""
    enc = _side(spec, "encoder", side)
    dataset = _lookup(spec, "dataset", "data")
    if enc is None and isinstance(dataset, Mapping) and dataset.get(f"{side}_path"):
        return f"precomputed features: {dataset[f'{side}_path']}"
    return enc


# ---------------------------------------------------------------- what the report finds

#: the documented rule behind the overview's "cluster size" column
SIZE_RULE = (
    "cluster size: how many of the mode's listed top samples score at least half of its best score "
    "(shown as ≥ k when all k listed samples do: the cluster is at least that large)"
)


def cluster_size(view: ModeView) -> str:
    """The size of a mode's cluster by :data:`SIZE_RULE`, as shown in the overview."""
    if not view.scores:
        return "—"
    best = max(view.scores)
    size = sum(1 for s in view.scores if s >= 0.5 * best)
    return f"≥ {size}" if size == len(view.scores) else str(size)


def _purity_of(view: ModeView) -> tuple[str, float] | None:
    """The mode's strongest shared label or planted attribute value and its fraction of the top samples."""
    best = None
    if view.purity:
        for attr, value in view.purity.items():
            major, frac = (
                (value[0], float(value[1])) if isinstance(value, (tuple, list)) else ("", float(value))
            )
            if best is None or frac > best[1]:
                best = (f"{attr}={major}" if major != "" else str(attr), frac)
    elif view.labels:
        label, frac = list(view.labels)[0]
        best = (str(label), float(frac))
    return best


def mode_flags(view: ModeView, names: Mapping[str, str]) -> list[str]:
    """Warnings the report sees by itself: a mode "captured by x" whose top samples are tighter under y (or the
    reverse) contradicts its sign — its top samples are not the group the eigenvalue speaks of."""
    flags = []
    tx, ty = view.tightness_x, view.tightness_y
    if tx is not None and ty is not None:
        own, other = (tx, ty) if view.direction == "x" else (ty, tx)
        if own < other:
            side, rival = (names["x"], names["y"]) if view.direction == "x" else (names["y"], names["x"])
            flags.append(
                f"contradictory: captured by {side} by its sign, but its top samples are tighter under {rival} "
                f"({other:.2f} vs {own:.2f})"
            )
    return flags


def _same_encoder(spec: Mapping[str, Any]) -> bool:
    ex, ey = _side(spec, "encoder", "x"), _side(spec, "encoder", "y")
    if not ex or not ey:
        return False
    if isinstance(ex, Mapping) and isinstance(ey, Mapping):
        keys = ("family", "model", "pretrained", "weights", "checkpoint", "tower", "image_size")
        return all(ex.get(k) == ey.get(k) for k in keys)
    return ex == ey


def verdict(spec: Mapping[str, Any], modes: Sequence[ModeView], names: Mapping[str, str]) -> str:
    """One or two plain sentences: which encoder holds which groups the other does not, and how strongly."""
    eig = [float(v) for v in spec.get("eigenvalues") or []]
    total = sum(abs(v) for v in eig) or 1.0
    parts = []
    for side in ("x", "y"):
        other = "y" if side == "x" else "x"
        chosen = sorted((m for m in modes if m.direction == side), key=lambda m: -abs(m.eigenvalue))
        if not chosen:
            continue
        top = chosen[0]
        what = _purity_of(top)
        group = f"a group that is {what[1]:.0%} {what[0]}" if what else f"a group led by {top.sample_ids[0]}"
        if top.keywords:  # its distinctive words say best what the group is
            group = f"a group described by {keywords_phrase({'keywords': top.keywords})}"
        parts.append(
            f"{names[side]} holds together {group}, which {names[other]} does not "
            f"(the strongest such mode: λ = {top.eigenvalue:+.3g}, {abs(top.eigenvalue) / total:.0%} of the "
            f"|spectrum|; {len(chosen)} mode{'s' if len(chosen) > 1 else ''} of this kind reported)."
        )
    if not parts:
        return "No mode was reported, so this run says nothing about which groups either encoder holds."
    sd = spec.get("spec_diff")
    reference = flags.reference_phrase(spec)
    strength = (
        f" SPEC-diff, the largest |λ|, is {sd:.3g}" + (f", {reference}." if reference else ".")
        if isinstance(sd, (int, float))
        else ""
    )
    return " ".join(parts) + strength


def _overview(modes: Sequence[ModeView], names: Mapping[str, str], spec: Mapping[str, Any]) -> str:
    eig = [float(v) for v in spec.get("eigenvalues") or []]
    total = sum(abs(v) for v in eig) or 1.0
    header = ["mode", "captured by", "λ", "share of |spectrum|", "cluster size",
              f"tightness under {names['x']}", f"tightness under {names['y']}", "purity", "flags"]  # fmt: skip
    rows = []
    for side in ("x", "y"):
        chosen = sorted((m for m in modes if m.direction == side), key=lambda m: -abs(m.eigenvalue))
        for rank, view in enumerate(chosen, start=1):
            what = _purity_of(view)
            rows.append([
                f"{side}{rank}", names[side], view.eigenvalue, f"{abs(view.eigenvalue) / total:.1%}",
                cluster_size(view), view.tightness_x, view.tightness_y,
                f"{what[0]} {what[1]:.0%}" if what else "—", "; ".join(view.flags) or "",
            ])  # fmt: skip
    if not rows:
        return ""
    return "<h2>Modes at a glance</h2>" + _table(rows, header) + f'<p class="muted">{_e(SIZE_RULE)}.</p>'


def _flags(flags: Sequence[str]) -> str:
    if not flags:
        return ""
    items = "".join(f"<li>{_e(f)}</li>" for f in flags)
    return f'<div class="flags"><b>Read with care</b><ul>{items}</ul></div>'


# ---------------------------------------------------------------- sections

_KNOWN_KEYS = {
    "eigenvalues", "spec_diff", "n", "eta", "method", "kernel_x", "kernel_y", "kernels", "encoder_x",
    "encoder_y", "encoders", "dataset", "data", "modes", "skipped", "n_skipped", "title", "metrics", "report",
    "approximation", "spec_diff_null", "spec_diff_ratio",
}  # fmt: skip


def _title(spec: Mapping[str, Any], names: dict[str, str], extra: Mapping[str, Any]) -> str:
    dataset = _short_name(_lookup(spec, "dataset", "data"), "")
    on = f" on {dataset}" if dataset not in ("", "features") else ""
    return str(extra.get("title") or spec.get("title") or f"SPEC: {names['x']} vs {names['y']}{on}")


def _header(
    spec: Mapping[str, Any],
    names: dict[str, str],
    extra: Mapping[str, Any],
    opening: str = "",
    overview: str = "",
) -> str:
    dataset = _lookup(spec, "dataset", "data")
    title = _title(spec, names, extra)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Spectral Pairwise Embedding Comparison · generated {stamp}</p>',
        opening,  # what the run found, in words, first
    ]
    skipped = _lookup(spec, "n_skipped", "skipped")
    if isinstance(skipped, Mapping):  # {"count": ..., "ids": [...]}
        skipped = skipped.get("count", len(skipped.get("ids") or []))
    elif isinstance(skipped, (list, tuple)):
        skipped = len(skipped)
    stats = [
        ("SPEC-diff", spec.get("spec_diff"), "max |λ| = ‖(K_X − η K_Y) / n‖"),
        ("samples n", spec.get("n"), "compared" + (f", {skipped} skipped" if skipped else "")),
    ]
    ratio = spec.get("spec_diff_ratio")
    if ratio is not None:  # the permutation reference (docs/uncertainty.md)
        stats.insert(
            1,
            (
                "SPEC-diff vs unrelated",
                f"{float(ratio):.0%}",
                f"of {_fmt(spec.get('spec_diff_null'))}, its value with the pairing shuffled",
            ),
        )
    for key, label, desc in _CONTEXT:
        value = extra.get(key)
        if isinstance(value, Mapping):
            value = value.get("value")
        if value is not None:
            stats.append((label, float(value), desc.split(" (")[0]))
    out.append('<div class="headline">')
    for label, value, desc in stats:
        out.append(
            f'<div class="stat"><span>{_e(label)}</span><b>{_e(_fmt(value))}</b><span>{_e(desc)}</span></div>'
        )
    out.append("</div>")
    out.append(overview)  # the modes at a glance, before the settings
    rows = [
        ["embedding x", names["x"], _describe(_encoder(spec, "x"))],
        ["embedding y", names["y"], _describe(_encoder(spec, "y"))],
        ["kernel x", _short_name(_side(spec, "kernel", "x"), "—"), _describe(_side(spec, "kernel", "x"))],
        ["kernel y", _short_name(_side(spec, "kernel", "y"), "—"), _describe(_side(spec, "kernel", "y"))],
        ["dataset", _short_name(dataset, "—"), _describe(dataset)],
        ["η (eta)", _fmt(spec.get("eta")), "L = (K_X − η K_Y) / n"],
        ["method", _fmt(spec.get("method")), f"{len(spec.get('eigenvalues') or [])} eigenvalues computed"],
    ]
    for key, value in spec.items():
        if key in _KNOWN_KEYS:
            continue
        if isinstance(value, Mapping):  # e.g. "settings": one row per scalar entry
            rows += [
                [f"{key}.{k}", _fmt(v), ""]
                for k, v in value.items()
                if not isinstance(v, (Mapping, list, tuple))
                and not (key == "settings" and k in ("eta", "method"))
            ]
        elif not isinstance(value, (list, tuple)):
            rows.append([key, _fmt(value), ""])
    out.append("<h2>Settings</h2>" + _table(rows, ["", "name", "resolved settings"]))
    return "\n".join(out)


_CONTEXT = (
    ("linear_cka", "linear CKA", "centred linear CKA (1 = same up to rotation and scale)"),
    ("mutual_knn", "mutual k-NN", "mutual k-NN overlap (1 = same neighbours, about k/m by chance)"),
)


def _context(extra: Mapping[str, Any]) -> str:
    rows = []
    for key, label, desc in _CONTEXT:
        value = extra.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            detail = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items() if k != "value")
            rows.append([label, value.get("value"), desc + (f"; {detail}" if detail else "")])
        else:
            rows.append([label, float(value), desc])
    if not rows:
        return ""
    return (
        "<h2>Context scores</h2>"
        '<p class="muted">Familiar global similarity scores of the same two embeddings, for comparison with '
        "SPEC-diff. They say how similar the embeddings are overall; the modes below say where they differ.</p>"
        + _table(rows, ["score", "value", "meaning"])
    )


def _trust_notes(spec: Mapping[str, Any], names: dict[str, str]) -> str:
    """What the numbers above do not say by themselves: modes that are uniform (kernel levels, not a
    cluster; from the mode entries' ``uniformity``), the random-feature error (``approximation``) and SPEC-diff
    against its permutation reference (``spec_diff_ratio``)."""
    out = []
    reference = flags.reference_line(spec)
    if reference:
        out.append(
            f'<div class="mode"><h3>Is SPEC-diff large?</h3><p>{_e(reference)}. {_e(flags.REFERENCE_MEANING)} '
            "See docs/uncertainty.md.</p></div>"
        )
    flagged = flags.uniform_modes(spec.get("modes"))
    if flagged:
        rows = [
            [f"mode {d}{r}", lam, u, f"captured by {names[d]}: a higher average similarity, not a group"]
            for d, r, lam, u in flagged
        ]
        out.append(
            f'<div class="mode"><h3>Uniform modes (uniformity &gt; {flags.UNIFORM_THRESHOLD})</h3>'
            f"<p>{_e(flags.UNIFORM_MEANING)}</p>"
            + _table(rows, ["mode", "λ", "uniformity", "what it is"])
            + "</div>"
        )
    approx = spec.get("approximation")
    if isinstance(approx, Mapping) and approx.get("rel_error_mean") is not None:
        rows = [[e.get("rank"), e.get("exact"), e.get("rff_mean"), e.get("rel_error"), e.get("rel_bias"),
                 e.get("seed_spread")] for e in approx.get("extremes") or []]  # fmt: skip
        out.append(
            '<div class="mode"><h3>Random-feature error (estimate)</h3>'
            f"<p>{_e(flags.approximation_line(approx))}. The eigenvalues above come from random Fourier "
            "features; this table compares the extreme eigenvalues of the exact kernels with those of random "
            f"features under {len(approx.get('seeds') or [])} frequency seeds, on a seeded subsample.</p>"
            + _table(rows, ["rank", "exact λ", "RFF λ (mean)", "rel. error", "rel. bias", "seed spread"])
            + "</div>"
        )
    return "\n".join(out)


def _how_to_read(names: dict[str, str]) -> str:
    return (
        '<p class="muted">Each eigenvector of (K_X − η K_Y) / n is a <i>mode</i>: a weighting of the samples. '
        f'A <b class="dir-x">positive</b> eigenvalue marks a group of samples that <b>{_e(names["x"])}</b> holds '
        f'together and <b>{_e(names["y"])}</b> does not; a <b class="dir-y">negative</b> one the reverse. '
        "The larger |λ|, the stronger the difference. <i>Tightness</i> is the mean kernel similarity between "
        "a mode's top samples under each embedding: a mode of x should be tight under x and loose under y.</p>"
    )


def _composition(labels: Sequence[tuple[str, float]], top: int = 6) -> str:
    items = list(labels)[:top]
    rest = 1.0 - sum(f for _, f in items)
    rows = "".join(
        f'<tr><td>{_e(label)}</td><td><span class="bar" style="width:{int(round(120 * frac))}px">'
        f"</span>{frac:.0%}</td></tr>"
        for label, frac in items
    )
    if len(labels) > top and rest > 1e-9:
        rows += f'<tr><td class="muted">other ({len(labels) - top})</td><td>{rest:.0%}</td></tr>'
    return f"<table><tr><th>label</th><th>fraction</th></tr>{rows}</table>"


def _purity(purity: Mapping[str, Any], pure: float = 0.9) -> str:
    """Majority value and its fraction per planted attribute; attributes at least ``pure`` in bold."""
    rows = ["<tr><th>planted attribute</th><th>majority value</th><th>fraction of top samples</th></tr>"]
    for attr, value in purity.items():
        major, frac = (value[0], float(value[1])) if isinstance(value, (tuple, list)) else ("", float(value))
        style = ' style="font-weight:600"' if frac >= pure else ""
        rows.append(f"<tr{style}><td>{_e(attr)}</td><td>{_e(major)}</td><td>{frac:.0%}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _mode(
    view: ModeView, rank: int, names: dict[str, str], plot_dir: Path, baseline: Mapping[str, float] | None
) -> str:
    other = "y" if view.direction == "x" else "x"
    heading = (
        f"Mode {view.direction}{rank} · λ = {view.eigenvalue:.4g} "
        f"(spectrum index {view.index}) · captured by {names[view.direction]}, not by {names[other]}"
    )
    out = [
        f'<section class="mode {view.direction}"><h3>{_e(heading)}</h3>',
        _flags(view.flags),
        _support_line(view),
        _keywords_line(view),
    ]
    out.append('<div class="facts">')
    if view.tightness_x is not None or view.tightness_y is not None:
        rows = [[f"under {names['x']} (x)", view.tightness_x], [f"under {names['y']} (y)", view.tightness_y]]
        header = ["tightness of top samples", "mean kernel"]
        if baseline:
            rows[0].append(baseline.get("x"))
            rows[1].append(baseline.get("y"))
            header.append("random pairs")
        out.append("<div>" + _table(rows, header) + "</div>")
    if view.purity:
        out.append("<div>" + _purity(view.purity) + "</div>")
    if view.labels:
        out.append("<div>" + _composition(view.labels) + "</div>")
    out.append("</div>")
    if view.images is not None and len(view.images):
        captions = [f"{s:.3g}" for s in view.scores]
        title = (
            f"mode {view.direction}{rank}: λ = {view.eigenvalue:+.3g}, top {len(view.images)} samples — "
            f"held together by {names[view.direction]}, not by {names[other]}"
        )
        path = plots.image_grid(
            list(view.images), captions, plot_dir / f"mode_{view.direction}{rank}.png", title=title
        )
        out.append(_img(path, f"top {len(view.images)} images of mode {view.direction}{rank}"))
        paths = view.paths if view.paths is not None else [None] * len(view.sample_ids)
        items = "".join(
            f"<li><span class='score'>{s:.4g}</span><code>{_e(i)}</code>"
            + (f" <span class='muted'>{_e(p)}</span>" if p else "")
            + "</li>"
            for i, s, p in zip(view.sample_ids, view.scores, paths, strict=True)
        )
        what = "sample ids, files and scores" if view.paths is not None else "sample ids and scores"
        out.append(f'<details><summary>{what}</summary><ol class="texts">{items}</ol></details>')
    else:
        texts = view.texts if view.texts is not None else [None] * len(view.sample_ids)
        items = []
        for sid, score, text in zip(view.sample_ids, view.scores, texts, strict=True):
            body = f"{_e(text[:400] + ('…' if len(text) > 400 else ''))} " if text is not None else ""
            items.append(f"<li><span class='score'>{score:.4g}</span>{body}<code>{_e(sid)}</code></li>")
        listing = "texts" if view.texts is not None else "texts ids"  # bare ids: in columns
        out.append(f'<ol class="{listing}">{"".join(items)}</ol>')
    out.append("</section>")
    return "\n".join(out)


_SUPPORT_WORDS = {
    "supported": "Supported by the data: its strength carries over to held-out samples and it reappears in "
    "resampled data.",
    "not a distinct cluster": "Not a distinct cluster: the direction is real (it keeps its strength on held-out "
    "samples) but the mode changes from one resample to the next: it is one of several equally strong "
    "directions, so its top samples are not a stable group.",
    "not supported by the data": "Not supported by the data: on held-out samples its eigenvalue falls towards 0 "
    "(or changes sign); it is mostly sampling noise.",
}


def _keywords_line(view: ModeView) -> str:
    """One line under a mode's heading: its distinctive words with their z-scores (spec.json ``keywords``)."""
    phrase = keywords_phrase({"keywords": view.keywords}, with_z=True)
    if phrase is None:
        return ""
    if phrase == NO_WORDS:
        return (
            '<p class="words"><b>No distinctive words</b> <span class="muted">(no term is over-represented '
            "among its members enough to stand out from the rest of the data)</span></p>"
        )
    return (
        f'<p class="words"><b>Distinctive words:</b> {_e(phrase)} <span class="muted">(weighted log-odds '
        "z-score of its members' texts against the rest)</span></p>"
    )


def _support_line(view: ModeView) -> str:
    """One sentence under a mode's heading: its verdict, interval, held-out eigenvalue and stability."""
    if not view.support or view.support == "unknown":
        return ""
    ci = f"[{view.ci[0]:.4g}, {view.ci[1]:.4g}]" if view.ci else "—"
    style = "" if view.support == "supported" else ' style="color:#9a6700;font-weight:600"'
    return (
        f"<p{style}>{_e(_SUPPORT_WORDS.get(view.support, view.support))}</p>"
        f'<p class="muted">interval {_e(ci)} · held-out λ {_e(_fmt(view.heldout_eigenvalue))} · '
        f"stability {_e(_fmt(view.stability, 2))}</p>"
    )


def _uncertainty(spec: Mapping[str, Any], modes: Sequence[ModeView], plot_dir: Path) -> str:
    """Intervals plot and mode table (eigenvalue, interval, held-out, stability, verdict), or the note why off."""
    info = spec.get("uncertainty") if isinstance(spec.get("uncertainty"), Mapping) else {}
    shown = [m for m in modes if m.ci is not None and m.heldout_eigenvalue is not None]
    if not shown:
        note = info.get("note") if info else None
        return f'<p class="muted">Intervals and held-out eigenvalues: {_e(note)}.</p>' if note else ""
    ranked: list[tuple[str, ModeView]] = []
    for side in ("x", "y"):
        chosen = sorted((m for m in shown if m.direction == side), key=lambda m: -abs(m.eigenvalue))
        ranked += [(f"{side}{r}", m) for r, m in enumerate(chosen, start=1)]
    level = float(info.get("level", 0.9))
    path = plots.plot_intervals(
        [label for label, _ in ranked],
        [m.eigenvalue for _, m in ranked],
        [list(m.ci) for _, m in ranked],
        [m.heldout_eigenvalue for _, m in ranked],
        [m.support == "supported" for _, m in ranked],
        plot_dir / "intervals.png",
        level=level,
    )
    rows = [
        [label, m.eigenvalue, f"{m.ci[0]:.4g} .. {m.ci[1]:.4g}", m.heldout_eigenvalue, m.stability, m.support]
        for label, m in ranked
    ]
    ci = spec.get("spec_diff_ci")
    diff = (
        f" SPEC-diff: {_fmt(spec.get('spec_diff'))}, {level:.0%} interval {ci[0]:.4g} .. {ci[1]:.4g}."
        if ci
        else ""
    )
    return (
        "<h3>Is each mode real?</h3>"
        f'<p class="muted">From {_e(info.get("replicates"))} bootstrap replicates over {_e(info.get("groups"))} '
        f"groups of samples.{_e(diff)} The <i>interval</i> is where the eigenvalue would fall on another sample "
        "of the same size; the <i>held-out λ</i> is the mode fitted on half the samples and measured on the "
        "other half (in-sample extremes are inflated by selection; a real cluster keeps most of its value); "
        "<i>stability</i> is the fraction of resamples in which the same mode reappears (sample-score overlap "
        f"≥ {_e(info.get('overlap_cutoff', 0.9))}). See docs/uncertainty.md.</p>"
        + _img(path, "eigenvalue intervals and held-out eigenvalues")
        + _table(rows, ["mode", "λ", f"{level:.0%} interval", "held-out λ", "stability", "verdict"])
    )


def _kmeans(kmeans: Mapping[str, Any], names: dict[str, str]) -> str:
    grouped = all(v is None or isinstance(v, Mapping) for v in kmeans.values())
    groups = {k: v for k, v in kmeans.items() if v is not None} if grouped else {"": kmeans}
    if not groups:
        return ""
    rows = []
    for group, scores in groups.items():
        label = {"x": f"modes of {names['x']}", "y": f"modes of {names['y']}"}.get(
            group, group or "all modes"
        )
        rows.append(
            [label, scores.get("nmi_x"), scores.get("ami_x"), scores.get("nmi_y"), scores.get("ami_y")]
        )
    return (
        "<h2>KMeans agreement</h2>"
        '<p class="muted">KMeans (k = number of modes) on the union of the modes\' top samples, under each '
        "embedding, compared with which mode each sample came from. High NMI/AMI under x and low under y: "
        "x separates those groups and y does not.</p>"
        + _table(rows, ["top samples of", f"NMI under {names['x']}", f"AMI under {names['x']}",
                        f"NMI under {names['y']}", f"AMI under {names['y']}"])
    )  # fmt: skip


# ---------------------------------------------------------------- entry point


def write_report(
    run_dir: str | os.PathLike,
    spec: Mapping[str, Any],
    modes: Sequence[ModeView],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and its PNGs under ``run_dir/plots/``; return the path.

    Args:
        run_dir: output folder (created if missing).
        spec: the comparison's ``spec.json`` dict. Read: ``eigenvalues``, ``spec_diff``, ``n``, ``eta``,
            ``method``, ``kernel_x``/``kernel_y`` (or ``kernels: {x, y}``), ``encoder_x``/``encoder_y`` (or
            ``encoders: {x, y}``; dicts or strings), ``dataset`` (or ``data``), ``skipped``/``n_skipped``;
            other scalar entries are listed under Settings.
        modes: the modes to show, both directions; shown strongest first within each direction.
        extra: optional: ``linear_cka`` (float), ``mutual_knn`` (float, or ``{"value", "k", "m"}``),
            ``kmeans`` (:func:`metrics.kmeans_agreement` dict, or ``{"x": dict, "y": dict}`` per direction),
            ``names`` (``{"x": "CLIP", "y": "DINOv2"}`` short names), ``title``, ``tightness_baseline``
            (``{"x", "y"}`` or a pair: :func:`metrics.mode_tightness` of a random subsample, the mean kernel
            value of random pairs, shown beside each mode's tightness).

    Raises:
        SpecError: when ``spec`` has no ``eigenvalues`` or a mode is not a :class:`ModeView`.
    """
    extra = dict(extra or {})
    if not isinstance(spec, Mapping) or not spec.get("eigenvalues"):
        raise SpecError("spec: expected the spec.json dict with a non-empty 'eigenvalues' list")
    for i, view in enumerate(modes):
        if not isinstance(view, ModeView):
            raise SpecError(f"modes[{i}]: expected a ModeView, got {type(view).__name__}")
    run_dir = Path(run_dir)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("mode_[xy]*.png"):  # grids of an earlier run here must not pass for this one's
        old.unlink()

    given = extra.get("names") or {}
    names = {
        side: str(given.get(side) or _short_name(_side(spec, "encoder", side), f"embedding {side}"))
        for side in ("x", "y")
    }
    if names["x"] == names["y"]:  # same model: tell them apart by weights, else by side
        tags = {side: _weights_tag(_side(spec, "encoder", side)) for side in ("x", "y")}
        use_tags = tags["x"] != tags["y"] and all(tags.values())
        names = {side: f"{names[side]} ({tags[side] if use_tags else side})" for side in names}

    for view in modes:  # the flags the report sees by itself, beside those others appended
        view.flags = list(view.flags) + [f for f in mode_flags(view, names) if f not in view.flags]
    report_flags = list(extra.get("flags") or [])
    if _same_encoder(spec):
        report_flags.append(
            "same encoder on both sides: both embeddings come from the same model and weights, so any "
            "difference comes from the kernels, η or randomness, not from the encoders"
        )

    baseline = extra.get("tightness_baseline")
    if isinstance(baseline, (tuple, list)):
        baseline = {"x": baseline[0], "y": baseline[1]}
    spectrum = plots.plot_spectrum(
        spec["eigenvalues"], plot_dir / "spectrum.png", spec.get("spec_diff"), labels=(names["x"], names["y"])
    )
    opening = f'<p class="verdict">{_e(verdict(spec, modes, names))}</p>'
    body = [
        _header(spec, names, extra, opening + _flags(report_flags), _overview(modes, names, spec)),
        _context(extra),
        _trust_notes(spec, names),
        "<h2>Spectrum</h2>",
        _how_to_read(names),
    ]
    body.append(_img(spectrum, "eigenvalue spectrum"))
    body.append(_uncertainty(spec, modes, plot_dir))
    for side in ("x", "y"):
        other = "y" if side == "x" else "x"
        chosen = sorted((m for m in modes if m.direction == side), key=lambda m: -abs(m.eigenvalue))
        sign = "λ > 0" if side == "x" else "λ < 0"
        body.append(
            f'<h2><span class="dir-{side}">Modes {_e(names[side])} captures and {_e(names[other])} does not</span> '
            f'<span class="muted">({sign})</span></h2>'
        )
        if not chosen:
            body.append('<p class="muted">No mode reported in this direction.</p>')
        body += [_mode(view, rank, names, plot_dir, baseline) for rank, view in enumerate(chosen, start=1)]
    if extra.get("kmeans"):
        body.append(_kmeans(extra["kmeans"], names))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(_title(spec, names, extra))}</title><style>{_CSS}</style></head>\n"
        "<body><main>\n" + "\n".join(part for part in body if part) + "\n</main></body></html>\n"
    )
    return atomic_write_text(run_dir / "report.html", page)
