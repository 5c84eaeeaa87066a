"""The report layer: context metrics, plots and a self-contained ``report.html``.

Example:
    >>> from spec_torch.apps.report import metrics, plots, write_report, ModeView
"""

from __future__ import annotations

from . import flags, metrics, plots, summary
from .html import ModeView, write_report

__all__ = ["flags", "metrics", "plots", "summary", "write_report", "ModeView"]
