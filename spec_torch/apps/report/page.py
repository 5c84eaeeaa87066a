"""The page around a report's parts, for the matrix and align reports: the compare report's CSS
(:data:`~spec_torch.apps.report.html._CSS`) plus wrappers that keep the page no wider than the window (a wide
table scrolls inside its box), assembled into one self-contained ``report.html``."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import atomic_write_text
from .html import _CSS, _e

__all__ = ["PAGE_CSS", "wide", "write_page"]

#: added to the compare report's CSS: wide tables scroll in their wrapper; long names break; no overflow
PAGE_CSS = """
main{max-width:1100px;box-sizing:border-box;overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%;margin:6px 0 12px}.wide table{margin:0}
pre{overflow-x:auto;max-width:100%;white-space:pre}
.note{border:1px solid #d4a72c;background:#fff8c5;border-radius:6px;padding:8px 14px;margin:10px 0}
.finding{font-size:1.08em;margin:10px 0 14px;padding:10px 14px;border-left:5px solid #2f6db5;background:#f6f8fa}
"""


def wide(html: str) -> str:
    """A table (or anything wider than the window) in a box that scrolls sideways instead of the page; a table
    of :func:`~spec_torch.apps.report.html._table` is in one already and comes back as it is."""
    if (
        html.startswith('<div class="wide"><table')
        and html.endswith("</table></div>")
        and html.count("<table") == 1
    ):
        return html
    return f'<div class="wide">{html}</div>'


def write_page(path: str | os.PathLike, title: str, parts: list[str]) -> Path:
    """Write one self-contained page (``parts`` joined inside ``<main>``) atomically."""
    page = (
        f'<!doctype html><html><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}{PAGE_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>"
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path
