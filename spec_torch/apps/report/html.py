"""``report.html``: one self-contained page (inline CSS, PNGs as base64 data URIs) that a person can read.

:func:`write_report` takes the ``spec.json`` dict of a comparison, one :class:`ModeView` per reported mode
and optional context scores, draws the plots into ``run_dir/plots/`` and writes ``run_dir/report.html``
atomically (a temporary name, then :func:`os.replace`). Every piece of text is HTML-escaped.

The page, in order: the title and the opening paragraph (spec.json ``summary.headline``, written by
:func:`spec_torch.apps.report.summary.build_summary`), the headline numbers, a mode overview table (one row per
reported mode: direction, eigenvalue, share of |spectrum|, cluster size, tightness under x and y, purity,
flags), report-wide flags, context scores, the spectrum, the per-mode detail, a glossary and the settings.

The page renders facts and decides none: a mode's flags are its spec.json entry's ``flags`` codes (labels and
sentences from :data:`spec_torch.apps.report.flags.FLAGS`; an entry written before ``flags`` existed gets
:func:`~spec_torch.apps.report.flags.mode_flag_codes`, the same rule), the opening is ``summary.headline``
(built from the spec dict by the same function when a hand-made spec has none). Hook points for other
analyses: each :class:`ModeView` carries a ``flags`` list of extra plain-text warnings shown beside the codes'
labels, and ``extra["flags"]`` holds report-wide ones.

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
from ...result import UNIFORM_THRESHOLD
from .._io import atomic_write_text
from ..explain import NO_WORDS, keywords_phrase
from . import flags, plots
from .summary import build_summary, encoder_names, group_phrase, short_name, side_setting

__all__ = ["ModeView", "write_report", "cluster_size", "SIZE_RULE", "GLOSSARY"]


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
        flags: extra plain-text warnings about this mode from another analysis, shown beside the labels of
            its spec.json entry's ``flags`` codes.
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
.wide{overflow-x:auto;max-width:100%}.facts>div{min-width:0;max-width:100%}
td,th,li,p,dd,code{overflow-wrap:break-word}td.num{white-space:nowrap}
dl.glossary dt{font-weight:600;margin-top:8px}dl.glossary dd{margin:2px 0 0 18px}
.tag{color:#9a6700;font-weight:600}
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


def _table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str] | None = None,
    row_attrs: Sequence[Mapping[str, str]] | None = None,
) -> str:
    """A table in a wrapper that scrolls sideways (``overflow-x: auto``), so the page never gets wider than
    the window; ``row_attrs``: HTML attributes of each row (e.g. ``data-mode``)."""
    out = ['<div class="wide"><table>']
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            tag = "th" if j == 0 and header is None else "td"
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<{tag}{cls}>{_e(_fmt(cell))}</{tag}>")
        attrs = "".join(f' {k}="{_e(v)}"' for k, v in (row_attrs[i] if row_attrs else {}).items())
        out.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


def _describe(value: Any) -> str:
    """One line for a settings dict (encoder, kernel, dataset) or any other value."""
    if isinstance(value, Mapping):
        return ", ".join(
            f"{k}={_fmt(v)}" for k, v in value.items() if v is not None and not isinstance(v, Mapping)
        )
    return _fmt(value)


def _lookup(spec: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in spec and spec[key] is not None:
            return spec[key]
    return None


def _encoder(spec: Mapping[str, Any], side: str) -> Any:
    """The encoder settings of one side; for precomputed features, the file they came from."""
    enc = side_setting(spec, "encoder", side)
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


def _view_entry(view: ModeView, rank: int) -> dict[str, Any]:
    """A spec.json-shaped mode entry from a view, for a view whose spec has no entry (library use)."""
    entry: dict[str, Any] = {
        "index": view.index, "rank": rank, "eigenvalue": view.eigenvalue, "top_ids": list(view.sample_ids),
        "tightness_x": view.tightness_x, "tightness_y": view.tightness_y, "support": view.support,
    }  # fmt: skip
    if view.purity:
        split = {a: (v if isinstance(v, (tuple, list)) else ("", v)) for a, v in view.purity.items()}
        entry["purity"] = {a: float(f) for a, (_, f) in split.items()}
        entry["dominant"] = {a: m for a, (m, _) in split.items() if m != ""}
    if view.labels:
        entry["labels"] = [[str(label), float(f)] for label, f in view.labels]
    return {k: v for k, v in entry.items() if v is not None}


def _ranked(spec: Mapping[str, Any], modes: Sequence[ModeView]) -> list[tuple[str, ModeView, dict]]:
    """``[(name, view, entry)]``: each view with its spec.json mode entry (matched by direction and index;
    :func:`_view_entry` where the spec has none), x then y, by the entry's rank."""
    out = []
    for side in ("x", "y"):
        entries = {int(e["index"]): e for e in (spec.get("modes") or {}).get(side) or [] if "index" in e}
        chosen = sorted((m for m in modes if m.direction == side), key=lambda m: -abs(m.eigenvalue))
        pairs = [
            (view, entries.get(int(view.index)) or _view_entry(view, r))
            for r, view in enumerate(chosen, start=1)
        ]
        pairs.sort(key=lambda p: int(p[1].get("rank", 0)))
        out += [(f"{side}{int(e.get('rank', 0))}", view, e) for view, e in pairs]
    return out


def _labels(view: ModeView, entry: Mapping[str, Any]) -> list[str]:
    """The labels of the entry's flag codes, then the view's extra warnings."""
    own = flags.flag_labels(entry)
    return own + [f for f in view.flags if f not in own]


def _same_encoder(spec: Mapping[str, Any]) -> bool:
    ex, ey = side_setting(spec, "encoder", "x"), side_setting(spec, "encoder", "y")
    if not ex or not ey:
        return False
    if isinstance(ex, Mapping) and isinstance(ey, Mapping):
        keys = ("family", "model", "pretrained", "weights", "checkpoint", "tower", "image_size")
        return all(ex.get(k) == ey.get(k) for k in keys)
    return ex == ey


def _overview(
    ranked: Sequence[tuple[str, ModeView, dict]], names: Mapping[str, str], spec: Mapping[str, Any]
) -> str:
    """ "Modes at a glance": one row per mode; the flags column renders the entry's ``flags``."""
    eig = [abs(float(v)) for v in spec.get("eigenvalues") or [] if v is not None]
    total = sum(eig) or 1.0
    header = ["mode", "λ", "share of |spectrum|", "cluster size",
              "tightness under x", "tightness under y", "purity", "flags"]  # fmt: skip
    rows, attrs = [], []
    for name, view, entry in ranked:
        has_group = entry.get("purity") or entry.get("labels")
        rows.append([
            name, view.eigenvalue, f"{abs(view.eigenvalue) / total:.1%}",
            cluster_size(view), view.tightness_x, view.tightness_y,
            group_phrase(entry) if has_group else "—", "; ".join(_labels(view, entry)),
        ])  # fmt: skip
        attrs.append({"data-mode": name, "data-flags": " ".join(flags.entry_flags(entry))})
    if not rows:
        return ""
    return (
        "<h2>Modes at a glance</h2>"
        + _table(rows, header, attrs)
        + f'<p class="muted">Modes x1, x2, ...: held together by x = {_e(names["x"])}; y1, y2, ...: by y = '
        f"{_e(names['y'])}. {_e(SIZE_RULE)}. Flags: see the "
        "glossary at the end.</p>"
    )


def _flags(flags: Sequence[str]) -> str:
    if not flags:
        return ""
    items = "".join(f"<li>{_e(f)}</li>" for f in flags)
    return f'<div class="flags"><b>Read with care</b><ul>{items}</ul></div>'


# ---------------------------------------------------------------- sections

_KNOWN_KEYS = {
    "eigenvalues", "spec_diff", "n", "eta", "method", "kernel_x", "kernel_y", "kernels", "encoder_x",
    "encoder_y", "encoders", "dataset", "data", "modes", "skipped", "n_skipped", "title", "metrics", "report",
    "approximation", "spec_diff_null", "spec_diff_ratio", "summary", "spec_diff_centred", "tied_modes",
    "timings",
}  # fmt: skip


def _title(spec: Mapping[str, Any], names: dict[str, str], extra: Mapping[str, Any]) -> str:
    dataset = short_name(_lookup(spec, "dataset", "data"), "")
    on = f" on {dataset}" if dataset not in ("", "features") else ""
    return str(extra.get("title") or spec.get("title") or f"SPEC: {names['x']} vs {names['y']}{on}")


def _header(
    spec: Mapping[str, Any],
    names: dict[str, str],
    extra: Mapping[str, Any],
    opening: str = "",
    overview: str = "",
    finding: Mapping[str, Any] | None = None,
) -> str:
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
    centred = (finding or {}).get("spec_diff_centred")
    if centred:  # the summary says to read this one: a uniform mode holds the plain SPEC-diff
        lead = "".join(str(p) for p in finding.get("lead_mode") or [])
        stats[0] = ("SPEC-diff", spec.get("spec_diff"), f"of {lead}, uniform: kernel levels, not a group")
        stats.insert(0, ("centred SPEC-diff (read this)", centred.get("value"), "both kernels centred"))
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
    out.append(overview)  # the modes at a glance
    return "\n".join(out)


def _settings(spec: Mapping[str, Any], names: dict[str, str]) -> str:
    """The settings table, at the end of the page: encoders, kernels, dataset, eta, route, other entries."""
    dataset = _lookup(spec, "dataset", "data")
    rows = [
        ["embedding x", names["x"], _describe(_encoder(spec, "x"))],
        ["embedding y", names["y"], _describe(_encoder(spec, "y"))],
        [
            "kernel x",
            short_name(side_setting(spec, "kernel", "x"), "—"),
            _describe(side_setting(spec, "kernel", "x")),
        ],
        [
            "kernel y",
            short_name(side_setting(spec, "kernel", "y"), "—"),
            _describe(side_setting(spec, "kernel", "y")),
        ],
        ["dataset", short_name(dataset, "—"), _describe(dataset)],
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
    return "<h2>Settings</h2>" + _table(rows, ["", "name", "resolved settings"])


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
    flagged = [
        (d, e)
        for d in ("x", "y")
        for e in (spec.get("modes") or {}).get(d) or []
        if "uniform" in flags.entry_flags(e)
    ]
    if flagged:
        rows = [
            [f"mode {d}{e.get('rank')}", e.get("eigenvalue"), e.get("uniformity"),
             f"captured by {names[d]}: a higher average similarity, not a group"]
            for d, e in flagged
        ]  # fmt: skip
        centred = spec.get("spec_diff_centred")
        read = (
            f"<p><b>Centred SPEC-diff: {_e(_fmt(centred.get('value')))}</b> (both kernels centred; "
            f"{_e(centred.get('how'))}). Read this one: it compares groups only.</p>"
            if isinstance(centred, Mapping) and centred.get("value") is not None
            else ""
        )
        out.append(
            f'<div class="mode"><h3>Uniform modes (uniformity &gt; {flags.UNIFORM_THRESHOLD})</h3>'
            f"<p>{_e(flags.UNIFORM_MEANING)}</p>"
            + read
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
    return f'<div class="wide"><table><tr><th>label</th><th>fraction</th></tr>{rows}</table></div>'


def _purity(purity: Mapping[str, Any], pure: float = 0.9) -> str:
    """Majority value and its fraction per planted attribute; attributes at least ``pure`` in bold."""
    rows = ["<tr><th>planted attribute</th><th>majority value</th><th>fraction of top samples</th></tr>"]
    for attr, value in purity.items():
        major, frac = (value[0], float(value[1])) if isinstance(value, (tuple, list)) else ("", float(value))
        style = ' style="font-weight:600"' if frac >= pure else ""
        rows.append(f"<tr{style}><td>{_e(attr)}</td><td>{_e(major)}</td><td>{frac:.0%}</td></tr>")
    return f'<div class="wide"><table>{"".join(rows)}</table></div>'


def _mode(
    name: str,
    view: ModeView,
    entry: Mapping[str, Any],
    names: dict[str, str],
    plot_dir: Path,
    baseline: Mapping[str, float] | None,
) -> str:
    """One mode's card: heading, its flags (label and sentence of each code), verdict line, facts, samples."""
    other = "y" if view.direction == "x" else "x"
    heading = (
        f"Mode {name} · λ = {view.eigenvalue:.4g} "
        f"(spectrum index {view.index}) · captured by {names[view.direction]}, not by {names[other]}"
    )
    codes = flags.entry_flags(entry)
    out = [
        f'<section class="mode {view.direction}" data-mode="{_e(name)}" data-flags="{_e(" ".join(codes))}">'
        f"<h3>{_e(heading)}</h3>",
        _flags(
            [f"{flags.flag_label(c, entry)}: {flags.FLAGS[c][1]}" if c in flags.FLAGS else c for c in codes]
            + [f for f in view.flags if f not in codes]
        ),
        _support_line(view, codes),
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
            f"mode {name}: λ = {view.eigenvalue:+.3g}, top {len(view.images)} samples — "
            f"held together by {names[view.direction]}, not by {names[other]}"
        )
        path = plots.image_grid(list(view.images), captions, plot_dir / f"mode_{name}.png", title=title)
        out.append(_img(path, f"top {len(view.images)} images of mode {name}"))
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


def _support_line(view: ModeView, codes: Sequence[str]) -> str:
    """Under a mode's heading: what "supported" means when the verdict is that and nothing is flagged (the
    other verdicts are flags, shown above in words), then its interval, held-out eigenvalue and stability."""
    if not view.support or view.support == "unknown":
        return ""
    ci = f"[{view.ci[0]:.4g}, {view.ci[1]:.4g}]" if view.ci else "—"
    words = f"<p>{_e(flags.SUPPORTED_MEANING)}</p>" if view.support == "supported" and not codes else ""
    return (
        words + f'<p class="muted">verdict: {_e(view.support)} · interval {_e(ci)} · held-out λ '
        f"{_e(_fmt(view.heldout_eigenvalue))} · stability {_e(_fmt(view.stability, 2))}</p>"
    )


def _uncertainty(
    spec: Mapping[str, Any], all_ranked: Sequence[tuple[str, ModeView, dict]], plot_dir: Path
) -> str:
    """Intervals plot and mode table (eigenvalue, interval, held-out, stability, verdict), or the note why off."""
    info = spec.get("uncertainty") if isinstance(spec.get("uncertainty"), Mapping) else {}
    ranked = [(n, m, e) for n, m, e in all_ranked if m.ci is not None and m.heldout_eigenvalue is not None]
    if not ranked:
        note = info.get("note") if info else None
        return f'<p class="muted">Intervals and held-out eigenvalues: {_e(note)}.</p>' if note else ""
    level = float(info.get("level", 0.9))
    path = plots.plot_intervals(
        [label for label, _, _ in ranked],
        [m.eigenvalue for _, m, _ in ranked],
        [list(m.ci) for _, m, _ in ranked],
        [m.heldout_eigenvalue for _, m, _ in ranked],
        [not flags.entry_flags(e) for _, _, e in ranked],  # a flagged mode is drawn hollow
        plot_dir / "intervals.png",
        level=level,
    )
    rows = [
        [label, m.eigenvalue, f"{m.ci[0]:.4g} .. {m.ci[1]:.4g}", m.heldout_eigenvalue, m.stability, m.support,
         "; ".join(_labels(m, e))]
        for label, m, e in ranked
    ]  # fmt: skip
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
        + _table(rows, ["mode", "λ", f"{level:.0%} interval", "held-out λ", "stability", "verdict", "flags"])
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


#: the terms the report uses, in plain words (the "Glossary" section; the flags follow from FLAGS)
GLOSSARY: tuple[tuple[str, str], ...] = (
    ("mode", "An eigenvector of (K_X − η K_Y) / n: a weighting of the samples. Its top samples are the ones it "
     "weights most; they are the group the mode speaks of."),
    ("λ (eigenvalue), direction", "A positive λ marks a group the first embedding (x) holds together and the "
     "second (y) does not; a negative λ the reverse. Modes are named by direction and rank: x1 is the "
     "strongest positive mode, y1 the strongest negative one."),
    ("SPEC-diff", "The largest |λ|: the strongest difference between the two embeddings' kernel geometries."),
    ("centred SPEC-diff", "SPEC-diff with both kernels centred (H K H, center=true): the kernels' average "
     "levels are removed, so only groups are compared. The report gives it beside a uniform strongest mode."),
    ("kernel geometry", "The pairwise similarities (the kernel matrix) an embedding gives the samples. SPEC "
     "compares these, not coordinates, so two embeddings that differ by a rotation have the same geometry."),
    ("marginals", "Each embedding's distribution on its own, without the pairing of samples. \"Unrelated "
     "embeddings with the same marginals\" are the same two embeddings with the pairing shuffled."),
    ("spectrum index", "The mode's position among all eigenvalues sorted from largest to smallest (the index "
     "into spec.json eigenvalues)."),
    ("share of |spectrum|", "|λ| divided by the sum of all |λ|."),
    ("tightness", "The mean kernel value between a mode's top samples under each embedding: a mode of x should "
     "be tight under x and loose under y."),
    ("purity", "The fraction of a mode's top samples that share the majority value of a label or planted "
     "attribute."),
    ("cluster size", SIZE_RULE + "."),
    ("linear CKA, mutual k-NN", "Familiar global similarity scores: centred linear CKA (1 = the same up to "
     "rotation and scale) and the mean overlap of each sample's k nearest neighbours (1 = the same)."),
    ("NMI / AMI", "Normalised and adjusted mutual information between KMeans clusters of the modes' top samples "
     "and which mode each sample came from: 1 = the same grouping; AMI is about 0 for a chance grouping."),
    ("uniformity, uniform", f"|<v, 1>| / sqrt(n): 1 for a mode that weights every sample alike. Above "
     f"{UNIFORM_THRESHOLD} a mode is uniform: it measures the kernels' average similarity, not a group."),
    ("interval", "Where λ would fall on another sample of the same size: a bootstrap interval over groups of "
     "samples (docs/uncertainty.md)."),
    ("held-out λ", "The mode fitted on part of the samples and measured on the rest: in-sample extremes are "
     "inflated by selection, a real group keeps most of its value."),
    ("stability", "The fraction of resamples in which the same mode reappears (sample-score overlap at least "
     "the stated cutoff). Low stability: one of several equally strong directions."),
    ("tied", "Adjacent modes whose eigenvalues are within sampling noise of each other: together they span a "
     "real difference, but no one of them is an identifiable group on its own."),
    ("verdict", "The library's judgement of a mode from its interval, held-out λ and stability: supported, "
     "tied, not a distinct cluster, not supported by the data, or unknown (no replicates)."),
)  # fmt: skip


def _glossary() -> str:
    """The glossary: the report's terms, then each flag's label and sentence from :data:`flags.FLAGS`."""
    terms = "".join(f"<dt>{_e(t)}</dt><dd>{_e(d)}</dd>" for t, d in GLOSSARY)
    marks = "".join(f"<dt>{_e(label)}</dt><dd>{_e(text)}</dd>" for label, text in flags.FLAGS.values())
    return (
        '<h2>Glossary</h2><dl class="glossary">' + terms + "</dl>"
        "<h3>Flags</h3>"
        '<p class="muted">A mode\'s flags (spec.json <code>flags</code>) say what its number does not mean. '
        "A flagged mode is never described without its flag.</p>"
        '<dl class="glossary">' + marks + "</dl>"
    )


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

    finding = spec.get("summary") if isinstance(spec.get("summary"), Mapping) else None
    names = encoder_names(spec, extra.get("names") or (finding or {}).get("names"))
    if finding is None:  # a hand-made spec (library use): the same words the job would have stored
        finding = build_summary(spec, names)
    ranked = _ranked(spec, modes)
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
    opening = f'<p class="verdict">{_e(finding["headline"])}</p>'
    body = [
        _header(spec, names, extra, opening + _flags(report_flags), _overview(ranked, names, spec), finding),
        _context(extra),
        _trust_notes(spec, names),
        "<h2>Spectrum</h2>",
        _how_to_read(names),
    ]
    body.append(_img(spectrum, "eigenvalue spectrum"))
    body.append(_uncertainty(spec, ranked, plot_dir))
    for side in ("x", "y"):
        other = "y" if side == "x" else "x"
        chosen = [(n, v, e) for n, v, e in ranked if v.direction == side]
        sign = "λ > 0" if side == "x" else "λ < 0"
        body.append(
            f'<h2><span class="dir-{side}">Modes {_e(names[side])} captures and {_e(names[other])} does not</span> '
            f'<span class="muted">({sign})</span></h2>'
        )
        if not chosen:
            body.append('<p class="muted">No mode reported in this direction.</p>')
        body += [_mode(n, view, entry, names, plot_dir, baseline) for n, view, entry in chosen]
    if extra.get("kmeans"):
        body.append(_kmeans(extra["kmeans"], names))
    body.append(_glossary())
    body.append(_settings(spec, names))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(_title(spec, names, extra))}</title><style>{_CSS}</style></head>\n"
        "<body><main>\n" + "\n".join(part for part in body if part) + "\n</main></body></html>\n"
    )
    return atomic_write_text(run_dir / "report.html", page)
