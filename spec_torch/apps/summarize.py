"""``spec-torch summarize DIR``: one table across the runs under a folder (e.g. a Hydra multirun).

Every finished run under ``DIR`` (a folder holding ``spec.json`` from compare, or ``results.json`` from align)
becomes one row: the run folder, the overrides that made it (``.hydra/overrides.yaml``, written by Hydra),
and its headline numbers. A compare row renders what spec.json says and computes nothing: the flags of each
direction's strongest mode (``flags`` codes), the mode SPEC-diff comes from, the centred SPEC-diff where the
summary says to read it, and the ``summary`` headline, printed under the table. The table is printed and
written (headlines included) to ``DIR/summary.csv``::

    spec-torch compare -m kernel@kernel_x=cosine,linear eta=0.5,1 hydra.sweep.dir=multirun/eta
    spec-torch summarize multirun/eta
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ._io import atomic_open
from .explain import keywords_phrase

__all__ = ["collect", "main"]

log = logging.getLogger(__name__)


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    from omegaconf import OmegaConf

    return " ".join(str(o) for o in OmegaConf.load(path))


def _compare_row(spec: dict[str, Any]) -> dict[str, Any]:
    from .report.flags import entry_flags
    from .report.summary import build_summary

    modes = spec.get("modes") or {}
    metrics = spec.get("metrics") or {}
    top = {d: (modes.get(d) or [{}])[0] for d in ("x", "y")}
    summary = spec.get("summary") if isinstance(spec.get("summary"), dict) else None
    if summary is None:  # a spec.json from before ``summary``: the words the job would have stored
        summary = build_summary(spec)
    lead = summary.get("lead_mode")
    centred = summary.get("spec_diff_centred") or {}
    row = {
        "kind": "compare",
        "n": spec.get("n"),
        "spec_diff": spec.get("spec_diff"),
        "spec_diff_of": "".join(str(p) for p in lead) if lead else None,
        "spec_diff_flags": " ".join(summary.get("lead_flags") or []),
        "spec_diff_centred": centred.get("value"),
        "top_eigenvalue_x": top["x"].get("eigenvalue"),
        "flags_x1": " ".join(entry_flags(top["x"])) if top["x"] else "",
        "top_eigenvalue_y": top["y"].get("eigenvalue"),
        "flags_y1": " ".join(entry_flags(top["y"])) if top["y"] else "",
        "linear_cka": metrics.get("linear_cka"),
        "mutual_knn": (metrics.get("mutual_knn") or {}).get("value"),
        "headline": summary.get("headline"),
    }
    for d in ("x", "y"):  # the strongest mode's distinctive words, where the run's data had texts
        words = keywords_phrase((modes.get(d) or [{}])[0])
        if words is not None:
            row[f"words_{d}"] = words
    return row


def _align_row(results: dict[str, Any]) -> dict[str, Any]:
    before = (results.get("before") or {}).get("heldout") or {}
    after = (results.get("after") or {}).get("heldout") or {}
    return {
        "kind": "align",
        "n": results.get("n_heldout"),
        "spec_diff": after.get("spec_diff"),
        "spec_diff_before": before.get("spec_diff"),
        "steps": results.get("steps"),
    }


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One dict per finished run under ``root`` (sorted by folder): ``run``, ``overrides`` and its numbers."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SpecError(f"DIR: expected a folder of runs, got {str(root)!r} (no such folder)")
    rows = []
    for name, reader in (("spec.json", _compare_row), ("results.json", _align_row)):
        for path in sorted(root.rglob(name)):
            run = path.parent
            try:  # a file spec-torch did not write (binary, another JSON shape): warned about and skipped
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                row = {"run": str(run.relative_to(root)) or ".", "overrides": _overrides(run), **reader(data)}
            except (OSError, ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
                log.warning(
                    "skipping %s: not a readable %s (%s)", path, name, " ".join(str(exc).split())[:200]
                )
                continue
            rows.append(row)
    return sorted(rows, key=lambda r: r["run"])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


#: columns written to the CSV but not printed in the table (too long for a line): printed under it instead
LONG_COLUMNS = ("headline",)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as an aligned text table (columns: the union of the rows' keys, in first-seen order, without
    :data:`LONG_COLUMNS`)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k not in LONG_COLUMNS]
    cells = [columns] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def main(argv: Sequence[str] | None = None) -> int:
    """``spec-torch summarize DIR [--csv PATH]``: print the table of the runs under DIR, write it as CSV."""
    from .cli import plain_text

    parser = argparse.ArgumentParser(
        prog="spec-torch summarize",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the example's lines
    )
    parser.add_argument("dir", help="a folder of runs (a Hydra multirun sweep dir, or outputs/)")
    parser.add_argument("--csv", default=None, help="where to write the table (default: DIR/summary.csv)")
    args = parser.parse_args(argv)
    rows = collect(args.dir)
    if not rows:
        raise SpecError(f"DIR: no finished run (spec.json or results.json) under {args.dir}")
    print(table(rows))
    for row in rows:
        if row.get("headline"):
            print(f"\n{row['run']}: {row['headline']}")
    out = Path(args.csv) if args.csv else Path(args.dir) / "summary.csv"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_open(out, "w", newline="", setting="--csv", record=False) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return 0
