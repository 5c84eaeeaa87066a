"""Input checks shared by the public entry points. Each raises :class:`SpecError` naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import SpecError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_matrix(
    value: Any,
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Return ``value`` as a floating 2-D tensor ``[N, D]``; numpy arrays and tensors are accepted.

    float64 input stays float64, other floats and integers become float32 unless ``dtype`` is given.
    """
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise SpecError(f"{name}: expected a numeric array, got dtype {value.dtype}")
        try:
            value = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:  # np.longdouble, ...: no torch dtype
            raise SpecError(
                f"{name}: numpy dtype {value.dtype} has no torch equivalent; cast it with .astype(np.float64)"
            ) from None
    elif not isinstance(value, torch.Tensor):
        raise SpecError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if value.is_meta or value.layout != torch.strided:
        what = "a meta tensor (no data)" if value.is_meta else f"a {value.layout} tensor"
        raise SpecError(
            f"{name}: expected a dense tensor with data, got {what}; use .to_dense() or real data"
        )
    if value.dim() != 2:
        raise SpecError(f"{name}: expected a 2-D array [N, D], got shape {tuple(value.shape)}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise SpecError(
            f"{name}: expected a non-empty array [N, D] with N, D >= 1, got shape {tuple(value.shape)}"
        )
    if dtype is None:
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if value.is_complex() or value.dtype == torch.bool:
        raise SpecError(f"{name}: expected real numbers, got dtype {value.dtype}")
    value = value.to(device=device if device is not None else value.device, dtype=dtype)
    if check_finite and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).any(dim=1).sum())
        raise SpecError(f"{name}: contains NaN or Inf in {bad} row(s); clean the embeddings first")
    return value


def check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    """Both embeddings must describe the same samples: same number of rows."""
    if x.shape[0] != y.shape[0]:
        raise SpecError(
            f"{names[0]} and {names[1]}: expected the same samples in the same order, "
            f"got {x.shape[0]} rows in {names[0]} and {y.shape[0]} rows in {names[1]}"
        )


def as_scalar(value: Any, name: str) -> Any:
    """A Python number from ``value``: Python, numpy and 0-d tensor scalars are accepted, as they are."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    elif isinstance(value, np.generic) and (
        np.issubdtype(type(value), np.integer) or np.issubdtype(type(value), np.floating)
    ):
        value = value.item()
    return value


def check_positive(value: Any, name: str, *, integer: bool = False, max_value: float | None = None) -> Any:
    """``value`` must be a finite positive (integer) number, at most ``max_value``; returns it as a Python number.

    numpy and 0-d tensor scalars are accepted (``np.float32(0.5)``, ``torch.tensor(3)``).
    """
    value = as_scalar(value, name)
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value)
    if bad or (max_value is not None and value > max_value):
        what = "a positive integer" if integer else "a positive number"
        limit = f" at most {max_value:g}" if max_value is not None else ""
        raise SpecError(f"{name}: expected {what}{limit}, got {value!r}")
    return value


def check_accumulate_dtype(dtype: Any, name: str = "accumulate_dtype") -> torch.dtype | None:
    """``None`` (float64), ``torch.float32`` or ``torch.float64``: the dtypes the streamed sums may use."""
    if dtype is None:
        return None
    if dtype not in (torch.float32, torch.float64):
        raise SpecError(f"{name}: expected torch.float32, torch.float64 or None (float64), got {dtype!r}")
    return dtype


def memory_available(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (host RAM for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def memory_total(device: torch.device) -> int:
    """Bytes of memory ``device`` has in all (host RAM for CPU): a property of the machine, not of its load."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def check_fits(n_bytes: int, device: torch.device, what: str, name: str) -> None:
    """Refuse work whose dense matrices would not fit in the memory of ``device``.

    Asked before anything is allocated. Sizes beyond the device's total memory are refused from the sizes
    alone (the same verdict whatever the machine's load); below that, the memory available now is consulted.
    Either error names the setting ``name``, what it sizes and the bytes it would need.
    """
    device = torch.device(device)
    total = memory_total(device)
    if n_bytes > total:
        raise SpecError(
            f"{name}: {what} needs about {_gib(n_bytes)} on {device}, more than its total memory "
            f"({_gib(total)}); reduce it"
        )
    avail = memory_available(device)
    if n_bytes > avail:
        raise SpecError(
            f"{name}: {what} needs about {_gib(n_bytes)} on {device}, "
            f"but only {_gib(avail)} is available; reduce it"
        )


def _gib(n_bytes: float) -> str:
    """``n_bytes`` in GiB, readable from a few MiB to exabytes."""
    gib = n_bytes / 2**30
    return f"{gib:.1f} GiB" if gib < 1e5 else f"{gib:.3g} GiB"


#: allocations below this size skip :func:`check_alloc` (no system call on every small batch)
SMALL_ALLOCATION = 64 * 2**20


def check_alloc(n_bytes: int, device: torch.device, what: str, name: str) -> None:
    """:func:`check_fits` for allocations made per batch: sizes below :data:`SMALL_ALLOCATION` pass unasked."""
    if n_bytes >= SMALL_ALLOCATION:
        check_fits(n_bytes, device, what, name)


#: seeds accepted everywhere a seed is taken: what ``torch.Generator.manual_seed`` takes as a signed 64-bit int
MAX_SEED = 2**63


def check_seed(value: Any, name: str = "seed") -> int:
    """``0 <= value < 2**63`` (Python, numpy or 0-d tensor integer); returns it as a Python int."""
    value = as_scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}: expected an integer, got {value!r}")
    if not 0 <= value < MAX_SEED:
        raise SpecError(f"{name}: expected an integer with 0 <= {name} < 2**63, got {value!r}")
    return value


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; a CUDA device asked for without CUDA -> :class:`SpecError`."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise SpecError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {name!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"device: {str(name)!r} was asked for but CUDA is not available; use device=cpu or auto"
        )
    return device
