"""What every dataset of the compare pipeline provides: raw samples with stable ids, in a fixed order.

A :class:`SampleDataset` is a map-style :class:`torch.utils.data.Dataset` whose items are *raw* samples
(``PIL.Image`` in RGB, or ``str``); the encoder's own ``preprocess`` turns them into tensors. Sample ``i`` has
the id ``ds.sample_id(i)`` (a relative path, ``coco:<image_id>``, ``cap:<caption_id>``, ``line:<k>``), and
``ds.fingerprint()`` hashes the ordered ids and the dataset settings: it names the feature cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ...errors import SpecError

__all__ = ["SampleDataset", "CorruptSample", "open_image", "existing_path"]

#: file name endings read as images (lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: longest side of ``display`` thumbnails
THUMBNAIL_SIZE = 256


class CorruptSample(SpecError):
    """Sample ``sample_id`` cannot be read (unreadable or truncated image, missing file).

    Raised by ``ds[i]``; feature extraction catches it, skips the sample and records its id.
    """

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: cannot be read: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class SampleDataset(Dataset):
    """Base class: subclasses set ``name``/``modality``, fill ``self._ids`` and implement :meth:`load`."""

    name: str = "dataset"
    modality: str = "image"  # "image" | "text"

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------- subclass hooks
    def load(self, i: int) -> Any:
        """Raw sample ``i`` (``PIL.Image`` RGB or ``str``); raise :class:`CorruptSample` if unreadable."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Settings that change the samples (hashed into :meth:`fingerprint`), JSON-serialisable."""
        return {"name": self.name}

    def content_stamp(self) -> str:
        """Extra text hashed into :meth:`fingerprint` (e.g. file sizes and times); empty by default."""
        return ""

    # -------------------------------------------------------------------------------------- public API
    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self._ids):
            raise IndexError(f"index {i} out of range for {len(self._ids)} samples")
        return self.load(i)

    @property
    def ids(self) -> list[str]:
        """All sample ids in dataset order."""
        return list(self._ids)

    def sample_id(self, i: int) -> str:
        """Stable id of sample ``i``."""
        return self._ids[i]

    @property
    def labels(self) -> list[str] | None:
        """A label per sample (class name, attribute combination), or None."""
        return None

    @property
    def attributes(self) -> dict[str, list[str]] | None:
        """Planted attributes per sample (``{"shape": [...], ...}``), or None."""
        return None

    @property
    def texts(self) -> list[str] | None:
        """A text per sample saying what it is (the text itself, an image's captions), or None: what the
        explain stage names modes by (:mod:`spec_torch.apps.explain`)."""
        return None

    def display(self, i: int) -> Image.Image | str:
        """Sample ``i`` as shown in the report: a thumbnail (longest side ``THUMBNAIL_SIZE``) or the text."""
        raw = self[i]
        if isinstance(raw, Image.Image):
            raw = raw.copy()
            raw.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        return raw

    def fingerprint(self) -> str:
        """Hex hash of the settings and the ordered sample ids (plus :meth:`content_stamp`)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.settings(), sort_keys=True, default=str).encode())
            h.update(b"\0")
            h.update("\n".join(self._ids).encode())
            h.update(b"\0")
            h.update(self.content_stamp().encode())
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, modality={self.modality!r})"


def file_stamps(root: Path, names: list[str]) -> str:
    """``size:mtime_ns`` (or ``missing``) of each file ``root / name``, one line each: what a cache key needs
    so that files added, restored or replaced later change it."""
    parts = []
    for name in names:
        try:
            st = os.stat(root / name)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append("missing")
    return "\n".join(parts)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB by bit depth, never by a per-image stretch.

    16-bit modes (``I;16*``, and ``I`` which PIL uses for 16-bit PNG/TIFF) map 0..65535 to 0..255 (x 255/65535);
    float images (``F``) are taken as intensities in [0, 1], clipped, x 255. Other modes go through
    PIL's ``convert("RGB")``.
    """
    if im.mode.startswith("I;16") or im.mode == "I" or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0.0, 1.0) * 255.0 if im.mode == "F" else np.clip(a, 0, 65535) * (255.0 / 65535.0)
        gray = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return im.convert("RGB")


def open_image(path: Path, sample_id: str) -> Image.Image:
    """Decode the image at ``path`` fully, as RGB (:func:`to_rgb`); :class:`CorruptSample` when unreadable."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return to_rgb(im)
    except FileNotFoundError:
        raise CorruptSample(sample_id, f"file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptSample(sample_id, f"{type(exc).__name__}: {exc}") from None


def existing_path(value: Any, name: str, *, kind: str = "any") -> Path:
    """``value`` as an existing path (``kind``: "file", "dir" or "any"), else :class:`SpecError` naming ``name``."""
    if value is None or str(value) in ("", "???"):
        raise SpecError(f"{name}: expected a path, got {value!r}")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise SpecError(f"{name}: no such file or directory: {path}")
    if kind == "file" and not path.is_file():
        raise SpecError(f"{name}: expected a file, got a directory: {path}")
    if kind == "dir" and not path.is_dir():
        raise SpecError(f"{name}: expected a directory, got a file: {path}")
    return path


def limit_rows(n: int, max_samples: int | None, name: str = "max_samples") -> list[int]:
    """Positions kept when at most ``max_samples`` of ``n`` are wanted: evenly spaced, in order."""
    if max_samples is None:
        return list(range(n))
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise SpecError(f"{name}: expected a positive integer or null, got {max_samples!r}")
    if max_samples >= n:
        return list(range(n))
    step = n / max_samples
    return [int(k * step) for k in range(max_samples)]
