"""Texts from a file: one text per line (id ``line:<k>``), or one column of a CSV/TSV file (id ``row:<k>``).

``line:<k>`` is the line number an editor shows (the first line is ``line:1``); ``row:<k>`` counts the CSV's
data rows from 0. Empty texts are counted too, so an id keeps naming the same text when blank lines are
skipped.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from ...errors import SpecError
from .base import SampleDataset, existing_path, limit_rows

__all__ = ["TextFileDataset"]


class TextFileDataset(SampleDataset):
    """Texts from ``path``.

    Args:
        path: a text file (one sample per line) or a ``.csv``/``.tsv`` file (then ``column`` is required).
        column: the CSV column holding the texts; giving it reads ``path`` as CSV whatever its ending.
        id_column: optional CSV column with sample ids (must be unique); default ``row:<k>``.
        label_column: optional CSV column used as labels in the report.
        max_samples: keep at most this many texts, evenly spaced (None = all).
    """

    name = "textfile"
    modality = "text"

    def __init__(
        self,
        path: str | os.PathLike,
        column: str | None = None,
        id_column: str | None = None,
        label_column: str | None = None,
        max_samples: int | None = None,
    ):
        super().__init__()
        self.path = existing_path(path, "data.path", kind="file").resolve()
        is_table = column is not None or self.path.suffix.lower() in (".csv", ".tsv")
        labels: list[str] | None = None
        try:
            if is_table:
                ids, texts, labels = self._read_table(column, id_column, label_column)
            else:
                with open(self.path, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
                pairs = [(f"line:{k}", t.strip()) for k, t in enumerate(lines, start=1) if t.strip()]
                ids, texts = [p[0] for p in pairs], [p[1] for p in pairs]
        except UnicodeDecodeError as exc:
            raise SpecError(f"data.path: {self.path} is not UTF-8 text ({exc})") from None
        if not texts:
            raise SpecError(f"data.path: {self.path} holds no non-empty texts")
        keep = limit_rows(len(texts), max_samples, "data.max_samples")
        self._ids = [ids[k] for k in keep]
        self._texts = [texts[k] for k in keep]
        self._labels = None if labels is None else [labels[k] for k in keep]
        self.column, self.id_column, self.label_column = column, id_column, label_column
        self.max_samples = max_samples

    def _read_table(
        self, column: str | None, id_column: str | None, label_column: str | None
    ) -> tuple[list[str], list[str], list[str] | None]:
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        with open(self.path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = reader.fieldnames or []
            if column is None:
                raise SpecError(f"data.column: {self.path} is a table; name the text column, one of {header}")
            for key, col in (("column", column), ("id_column", id_column), ("label_column", label_column)):
                if col is not None and col not in header:
                    raise SpecError(f"data.{key}: no column {col!r} in {self.path}; columns are {header}")
            ids, texts, labels = [], [], []
            for k, row in enumerate(reader):
                text = (row.get(column) or "").strip()
                if not text:
                    continue
                ids.append(str(row[id_column]) if id_column else f"row:{k}")
                texts.append(text)
                labels.append(str(row[label_column]) if label_column else "")
        if id_column and len(set(ids)) != len(ids):
            raise SpecError(f"data.id_column: the ids in column {id_column!r} of {self.path} are not unique")
        return ids, texts, labels if label_column else None

    def load(self, i: int) -> str:
        return self._texts[i]

    @property
    def texts(self) -> list[str]:
        return list(self._texts)

    @property
    def labels(self) -> list[str] | None:
        return None if self._labels is None else list(self._labels)

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "column": self.column,
            "id_column": self.id_column,
            "label_column": self.label_column,
            "max_samples": self.max_samples,
            "line_ids": "from 1",  # ids were 0-based before: a new cache key, so old caches are not misread
        }

    def content_stamp(self) -> str:
        st = self.path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
