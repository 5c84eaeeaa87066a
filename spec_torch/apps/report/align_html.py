"""The alignment report: ``report.html`` of an ``align`` run, from its ``results.json`` dict and the plot.

The finding in words (held-out SPEC-diff to the teacher before and after), the metrics before and after with the
direction that means better (:func:`spec_torch.apps.align.evaluate.metric_direction`: SPEC-diff and the
|eigenvalue| of the loss's strongest mode lower, accuracies higher, stability neither), the plot of the bars
and the training curves, the loss's strongest mode before and after, and the settings. One self-contained page
(the plot inlined); the compare report's table and image helpers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .html import _describe, _e, _fmt, _img, _table
from .page import wide, write_page
from .summary import short_name

__all__ = ["write_align_report", "align_summary"]

#: the settings sections of ``results["config"]`` shown, in order
_SETTINGS = (
    "student",
    "teacher",
    "data",
    "loss",
    "optim",
    "train",
    "kernel_student",
    "kernel_teacher",
    "eval",
)

_MODE_ROWS = (
    ("mode_eigenvalue", "eigenvalue of the strongest mode (signed)"),
    ("mode_heldout_eigenvalue", "its held-out eigenvalue (fitted on half, measured on the other half)"),
    ("mode_stability", "its stability (bootstrap: how often the same direction comes back)"),
    ("lambda_max", "largest eigenvalue: the student's strongest group the teacher lacks"),
    ("lambda_min", "smallest eigenvalue: the teacher's strongest group the student lacks"),
)

_MODE_READING = (
    "<p>The loss pushes on the strongest mode of K_student - eta K_teacher: its |eigenvalue| (in sample and "
    "held out) should fall when training works, whatever its sign (positive: a group the student holds and "
    "the teacher does not; negative: the reverse). <b>Stability has no better direction</b>: high means the "
    "strongest remaining difference is one reproducible direction, low that it is spread over near-tied "
    "directions (noise-like, not one group). Read it with the held-out |eigenvalue|: a stable mode with a "
    "large held-out value is a real difference still to remove; a stable mode with a small one is a small "
    "real residue.</p>"
)


def align_summary(results: dict[str, Any]) -> str:
    """One plain-words sentence on the held-out SPEC-diff to the teacher before and after training, or ``""``
    when the run has no held-out SPEC-diff."""
    before = results.get("before", {}).get("heldout", {})
    after = results.get("after", {}).get("heldout", {})
    if "spec_diff" not in before or "spec_diff" not in after:
        return ""
    b, a = float(before["spec_diff"]), float(after["spec_diff"])
    steps = results.get("steps", "?")
    if a < b:
        change = f"{b / max(a, 1e-12):.2f}x lower: the student took on more of the teacher's groups"
    elif a > b:
        change = f"{a / max(b, 1e-12):.2f}x higher: the student moved away from the teacher"
    else:
        change = "unchanged"
    return (
        f"Held-out SPEC-diff to the teacher: {b:.4f} before, {a:.4f} after {steps} steps ({change}; "
        f"{results.get('n_heldout', '?')} held-out images)."
    )


def _moved(direction: str, before: float, after: float) -> str:
    if direction == "neither" or not (math.isfinite(before) and math.isfinite(after)):
        return "—"
    if after == before:
        return "unchanged"
    better = after < before if direction == "lower" else after > before
    return "better" if better else "worse"


def _metrics(results: dict[str, Any]) -> str:
    from ..align.evaluate import (
        DIRECTION_TITLE,
        TEACHER_CONSTANT,
        metric_direction,
        metric_label,
        metric_value,
    )

    parts = []
    before, after = results.get("before", {}), results.get("after", {})
    for name in [s for s in after if s in before]:
        rows = []
        for key, value in after[name].items():
            if key == "n" or key not in before[name] or key.startswith("lambda"):
                continue
            if key == TEACHER_CONSTANT:
                rows.append((key, "ceiling (the teacher's own score)", float(value), float(value), "—"))
                continue
            direction = metric_direction(key)
            b, a = metric_value(key, before[name][key]), metric_value(key, value)
            rows.append((metric_label(key), DIRECTION_TITLE[direction], b, a, _moved(direction, b, a)))
        n = int(after[name].get("n", 0))
        parts.append(f"<h3>{_e(name)} ({n} images)</h3>")
        parts.append(wide(_table(rows, ["metric", "better when", "before", "after", "moved"])))
    return "".join(parts)


def _modes(results: dict[str, Any]) -> str:
    before = results.get("before", {}).get("heldout", {})
    after = results.get("after", {}).get("heldout", {})
    rows = [(label, before[key], after[key]) for key, label in _MODE_ROWS if key in before and key in after]
    if not rows:
        return (
            '<p class="muted">No held-out modes: the split is too small or a kernel has no feature map.</p>'
        )
    return _MODE_READING + wide(_table(rows, ["the loss's mode on the held-out split", "before", "after"]))


def _settings(results: dict[str, Any]) -> str:
    config = results.get("config") or {}
    rows = [(key, _describe(config[key])) for key in _SETTINGS if key in config]
    rows += [
        ("seed", _fmt(config.get("seed"))),
        ("held out", _fmt(config.get("heldout"))),
        ("contrastive term", _fmt(results.get("contrastive"))),
        ("training samples", _fmt(results.get("n_train"))),
        ("resumed", _fmt(results.get("resumed"))),
        ("teacher", _describe(results.get("teacher"))),
        ("teacher feature cache", _fmt(results.get("teacher_cache"))),
    ]
    return wide(_table(rows, ["setting", "value"]))


def write_align_report(out_dir: str | os.PathLike, results: dict[str, Any], plot: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` from the ``results.json`` dict and the before/after plot ``plot``."""
    out_dir = Path(out_dir)
    config = results.get("config") or {}
    student = short_name(config.get("student"), "student")
    teacher = short_name(config.get("teacher"), "teacher")
    parts = [
        f"<h1>Alignment: {_e(student)} toward {_e(teacher)}</h1>",
        f'<p class="sub">{_e(results.get("steps", "?"))} steps, {_e(results.get("n_train", "?"))} training and '
        f"{_e(results.get('n_heldout', '?'))} held-out images, contrastive term "
        f"{_e(results.get('contrastive', '?'))}</p>",
    ]
    finding = align_summary(results)
    if finding:
        parts.append(f'<p class="finding">{_e(finding)}</p>')
    held_b = results.get("before", {}).get("heldout", {})
    held_a = results.get("after", {}).get("heldout", {})
    if "spec_diff" in held_b and "spec_diff" in held_a:
        parts.append(
            '<div class="headline">'
            f'<div class="stat"><b>{held_b["spec_diff"]:.4f}</b><span>held-out SPEC-diff before</span></div>'
            f'<div class="stat"><b>{held_a["spec_diff"]:.4f}</b><span>held-out SPEC-diff after</span></div>'
            "</div>"
        )
    parts.append("<h2>Metrics before and after</h2>")
    parts.append(
        "<p>Each metric with the direction that means the student is closer to the teacher or better at its "
        "task; <i>moved</i> says whether it went that way. SPEC-diff and the |eigenvalue| of the loss's "
        "strongest mode: lower is better. kNN accuracy, retrieval recall and zero-shot accuracy: higher is "
        "better.</p>"
    )
    parts.append(_metrics(results))
    parts.append("<h2>Plot: before and after, and over the training steps</h2>")
    parts.append(_img(Path(plot), "before/after metrics and training curves"))
    parts.append("<h2>The loss's strongest mode, before and after</h2>" + _modes(results))
    parts.append("<h2>Settings</h2>" + _settings(results))
    return write_page(out_dir / "report.html", f"Alignment: {student} toward {teacher}", parts)
