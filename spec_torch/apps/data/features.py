"""Precomputed embeddings: two arrays of the same samples in the same order, plus optional sample ids.

Formats (by file ending): ``.npy`` (memory-mapped, never read whole), ``.npz``, ``.pt``/``.pth`` (a tensor or
a dict of tensors), ``.safetensors``. Files holding several arrays need ``x_key``/``y_key``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SpecError
from .base import existing_path

__all__ = ["load_feature_pair", "load_features", "load_ids"]

FEATURE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def _pick(arrays: dict[str, Any], key: str | None, path: Path, name: str) -> Any:
    if key is not None:
        if key not in arrays:
            raise SpecError(f"{name}: no array {key!r} in {path}; it holds {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise SpecError(
            f"{name}: {path} holds {len(arrays)} arrays {sorted(arrays)}; name one with the key setting"
        )
    return next(iter(arrays.values()))


def load_features(path: str | os.PathLike, name: str = "x_path", key: str | None = None) -> np.ndarray:
    """One feature matrix ``[N, D]`` as a numpy array (an ``np.memmap`` for ``.npy``)."""
    p = existing_path(path, name, kind="file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arr = _pick({k: z[k] for k in z.files}, key, p, name)
        elif suffix in (".pt", ".pth"):
            import torch

            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(obj, dict):
                obj = _pick(obj, key, p, name)
            if not isinstance(obj, torch.Tensor):
                raise SpecError(f"{name}: {p} holds a {type(obj).__name__}, expected a tensor [N, D]")
            arr = obj.detach().float().numpy() if obj.dtype == torch.bfloat16 else obj.detach().numpy()
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            arr = _pick(load_file(str(p)), key, p, name)
        else:
            raise SpecError(
                f"{name}: unsupported feature file {p.name!r}; expected one of {FEATURE_SUFFIXES}"
            )
    except SpecError:
        raise
    except Exception as exc:  # unreadable / wrong format: name the file, not the library internals
        raise SpecError(
            f"{name}: cannot read {p} as {suffix} features ({type(exc).__name__}: {exc})"
        ) from None
    if arr.ndim != 2:
        raise SpecError(f"{name}: expected a 2-D array [N, D] in {p}, got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SpecError(f"{name}: expected numbers in {p}, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SpecError(f"{name}: {p} is empty (shape {tuple(arr.shape)})")
    return arr


def load_ids(path: str | os.PathLike, name: str = "ids_path", unique: bool = True) -> list[str]:
    """Sample ids from a text file (one a line), a ``.json`` list or a ``.npy`` string array.

    ``unique=False`` reads per-row labels or display names the same way (repeats allowed)."""
    p = existing_path(path, name, kind="file")
    what = "ids (unique, one a line)" if unique else "values (one a line, one per row)"
    if p.stat().st_size == 0:
        raise SpecError(f"{name}: {p} is empty (0 bytes); expected {what}")
    try:
        if p.suffix.lower() == ".json":
            ids = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(ids, list):
                raise SpecError(f"{name}: expected a JSON list of ids in {p}, got {type(ids).__name__}")
        elif p.suffix.lower() == ".npy":
            ids = np.load(p, allow_pickle=False).tolist()
        else:
            ids = p.read_text(encoding="utf-8").splitlines()
            while ids and not ids[-1].strip():
                ids.pop()
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, EOFError, OSError) as exc:
        raise SpecError(f"{name}: cannot read {what} from {p} ({exc})") from None
    ids = [str(s) for s in ids]
    if unique and len(set(ids)) != len(ids):
        raise SpecError(f"{name}: the ids in {p} are not unique")
    return ids


def load_feature_pair(
    x_path: str | os.PathLike,
    y_path: str | os.PathLike,
    ids_path: str | os.PathLike | None = None,
    x_key: str | None = None,
    y_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Load paired embeddings ``x: [N, p]``, ``y: [N, q]`` and their ids (None when ``ids_path`` is None).

    Raises :class:`SpecError` for missing files, unreadable formats, arrays that are not 2-D, different row
    counts, or an id list of the wrong length. ``.npy`` files come back as read-only ``np.memmap``.

    Example:
        >>> x, y, ids = load_feature_pair("clip.npy", "dino.npy")  # doctest: +SKIP
        >>> ids is None or len(ids) == x.shape[0]  # doctest: +SKIP
        True
    """
    x = load_features(x_path, "x_path", x_key)
    y = load_features(y_path, "y_path", y_key)
    if x.shape[0] != y.shape[0]:
        raise SpecError(
            f"x_path and y_path: expected the same samples in the same order, got {x.shape[0]} rows in "
            f"{x_path} and {y.shape[0]} rows in {y_path}"
        )
    ids = None
    if ids_path is not None and str(ids_path) not in ("", "None"):
        ids = load_ids(ids_path)
        if len(ids) != x.shape[0]:
            raise SpecError(
                f"ids_path: expected {x.shape[0]} ids (one per row), got {len(ids)} in {ids_path}"
            )
    return x, y, ids
