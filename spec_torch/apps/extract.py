"""Feature extraction into a resumable on-disk cache: dataset x encoder -> memory-mapped ``[n, d]`` float32.

One cache folder per key (dataset fingerprint, ``encoder.cache_key()``, precision) under ``cache_dir``::

    <cache_dir>/<dataset>-<family>-<key>/
        all_ids.txt     every dataset id, in order (written first)
        manifest.json   progress: rows done, rows skipped as corrupt (rewritten atomically after each chunk)
        partial.npy     [N, d] float32 memmap being filled, chunk by chunk
        features.npy    [n, d] float32, only the rows kept (n = N - skipped)      } written at the end;
        ids.txt         the n kept ids, skipped.txt the skipped ones                } complete.json last,
        complete.json   the marker: present = finished                              } atomically

An interrupted run resumes after the last complete chunk (rows already written are never recomputed); a
finished cache is reused without touching the encoder; a cache whose ids do not match the dataset is
refused; one process at a time writes a cache folder (``.lock``; others wait, then reuse it). Crash-safety
comes from ordering: rows are flushed before the manifest that counts them, and the
marker is renamed into place after everything it vouches for.

>>> cache = extract_features(build_dataset("synthetic", n=32), build_encoder("offline_colour"), "/tmp/c")  # doctest: +SKIP
>>> cache.features.shape == (cache.n, cache.dim)  # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._validate import resolve_device
from ..errors import SpecError
from ._io import atomic_write_text
from .data.base import CorruptSample, SampleDataset
from .encoders.base import Encoder, move_to

__all__ = ["extract_features", "FeatureCache", "cache_folder"]

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when the layout changes
_COMPLETE, _MANIFEST, _PARTIAL = "complete.json", "manifest.json", "partial.npy"
_FEATURES, _IDS, _SKIPPED, _ALL_IDS = "features.npy", "ids.txt", "skipped.txt", "all_ids.txt"
_COPY_ROWS = 65536  # rows per block when compacting
_LOCK_POLL_S = 1.0  # seconds between two looks at a held lock


# ------------------------------------------------------------------------------------------ the result
@dataclass
class FeatureCache:
    """A finished feature cache: ``features[i]`` is the embedding of sample ``ids[i]``.

    Attributes:
        path: the cache folder.
        ids: ids of the rows kept, in dataset order (corrupt samples excluded).
        skipped: ids of the samples skipped as corrupt.
        features: ``[n, d]`` float32, a read-only ``np.memmap``.
        meta: the completion record (dataset, encoder description, precision).
    """

    path: Path
    ids: list[str]
    skipped: list[str]
    features: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def iter_batches(
        self, rows: np.ndarray | Sequence[int] | None = None, batch_size: int = 1024
    ) -> Iterator[torch.Tensor]:
        """Yield ``[B, d]`` float32 tensors of ``features[rows]`` in the order of ``rows`` (None = all rows).

        Only one batch is read from disk at a time.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if rows is None:
            for start in range(0, self.n, batch_size):
                yield torch.from_numpy(np.array(self.features[start : start + batch_size], dtype=np.float32))
            return
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise SpecError(f"rows: expected a 1-D array of row indices, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise SpecError(
                f"rows: expected indices in [0, {self.n}), got range [{rows.min()}, {rows.max()}]"
            )
        for start in range(0, rows.size, batch_size):
            yield torch.from_numpy(
                np.asarray(self.features[rows[start : start + batch_size]], dtype=np.float32)
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureCache:
        """Open the finished cache in folder ``path`` (:class:`SpecError` when it is not complete)."""
        path = Path(path)
        if not (path / _COMPLETE).is_file():
            raise SpecError(f"path: {path} holds no finished feature cache ({_COMPLETE} missing)")
        meta = json.loads((path / _COMPLETE).read_text())
        ids = _read_lines(path / _IDS)
        skipped = _read_lines(path / _SKIPPED)
        features = np.load(path / _FEATURES, mmap_mode="r")
        if features.shape != (len(ids), meta.get("dim")):
            raise SpecError(
                f"path: the feature cache in {path} is inconsistent: features {features.shape}, {len(ids)} ids, "
                f"dim {meta.get('dim')}; delete the folder and extract again"
            )
        return cls(path=path, ids=ids, skipped=skipped, features=features, meta=meta)


# ----------------------------------------------------------------------------------------- file helpers
def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


def _lines(items: Sequence[str]) -> str:
    return "".join(f"{s}\n" for s in items)


def cache_folder(
    dataset: SampleDataset, encoder: Encoder, cache_dir: str | os.PathLike, precision: str = "fp32"
) -> Path:
    """The folder that holds (or will hold) the features of ``encoder`` on ``dataset``."""
    h = hashlib.sha256(f"{_FORMAT}|{dataset.fingerprint()}|{encoder.cache_key()}|{precision}".encode())
    return Path(cache_dir).expanduser() / f"{dataset.name}-{encoder.family}-{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------- DataLoader plumbing
class _Rows(Dataset):
    """Rows ``start..N-1`` of ``dataset`` preprocessed by ``encoder``; a corrupt sample becomes ``(i, None, why)``."""

    def __init__(self, dataset: SampleDataset, encoder: Encoder, start: int):
        self.dataset, self.encoder, self.start = dataset, encoder, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, k: int) -> tuple[int, Any, str]:
        i = self.start + k
        try:
            return i, self.encoder.preprocess(self.dataset[i]), ""
        except CorruptSample as exc:
            return i, None, exc.reason


class _Collate:
    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, items: list[tuple[int, Any, str]]) -> tuple[list[int], list[tuple[int, str]], Any]:
        ok = [(i, x) for i, x, _ in items if x is not None]
        bad = [(i, why) for i, x, why in items if x is None]
        batch = self.encoder.collate([x for _, x in ok]) if ok else None
        return [i for i, _ in ok], bad, batch


def _precision(device: torch.device, encoder: Encoder, amp: bool) -> tuple[str, torch.dtype | None]:
    if device.type != "cuda" or not amp or not getattr(encoder, "autocast_ok", True):
        return "fp32", None
    if torch.cuda.is_bf16_supported():
        return "amp-bf16", torch.bfloat16
    return "amp-fp16", torch.float16


# ------------------------------------------------------------------------------------------ the driver
def extract_features(
    dataset: SampleDataset,
    encoder: Encoder,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    chunk_rows: int = 4096,
    amp: bool = True,
    lock_timeout: float = 24 * 3600.0,
) -> FeatureCache:
    """Embed every sample of ``dataset`` with ``encoder`` into the cache under ``cache_dir``; resume or reuse.

    Batched, in ``torch.inference_mode``, with autocast on CUDA (``amp``; bf16 where supported), a
    DataLoader with ``num_workers`` workers, and a progress bar with rate and ETA. Every ``chunk_rows`` rows
    the features are flushed and the progress recorded. Corrupt samples (:class:`CorruptSample`) are
    skipped with a warning and listed in ``cache.skipped``.

    Args:
        dataset: a :class:`~spec_torch.apps.data.SampleDataset` of the encoder's modality.
        encoder: a :class:`~spec_torch.apps.encoders.Encoder`.
        cache_dir: root folder of the caches (created if missing).
        batch_size, num_workers: DataLoader settings.
        device: "cpu", "cuda", "cuda:N" or "auto".
        progress: show the tqdm progress bar.
        chunk_rows: rows between two checkpoints (the most work an interruption can lose).
        amp: use autocast on CUDA.
        lock_timeout: seconds to wait for another process extracting into the same cache folder.

    Returns:
        The finished :class:`FeatureCache`.

    Raises:
        SpecError: modality mismatch, bad settings, an unwritable ``cache_dir``, a cache whose ids do not
            match ``dataset``, an encoder that returns the wrong width or non-finite values.
    """
    if not isinstance(dataset, SampleDataset):
        raise SpecError(
            f"dataset: expected a spec_torch.apps.data.SampleDataset, got {type(dataset).__name__}"
        )
    if not isinstance(encoder, Encoder):
        raise SpecError(f"encoder: expected a spec_torch.apps.encoders.Encoder, got {type(encoder).__name__}")
    if encoder.modality != dataset.modality:
        raise SpecError(
            f"encoder: a {encoder.modality} encoder ({encoder.family}) cannot embed the {dataset.modality} "
            f"samples of the {dataset.name} dataset"
        )
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("chunk_rows", chunk_rows, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(f"{name}: expected an integer >= {low}, got {value!r}")
    if len(dataset) == 0:
        raise SpecError(f"dataset: the {dataset.name} dataset is empty")
    dev = resolve_device(device)
    precision, amp_dtype = _precision(dev, encoder, amp)
    folder = cache_folder(dataset, encoder, cache_dir, precision)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"cache_dir: cannot create the feature cache folder {folder}: {exc}") from None
    if not os.access(folder, os.W_OK):
        raise SpecError(f"cache_dir: the feature cache folder {folder} is not writable")
    ids = dataset.ids
    if (folder / _COMPLETE).is_file():
        return _reuse(folder, ids)
    with _Lock(folder, lock_timeout):
        if (folder / _COMPLETE).is_file():  # another process finished it while we waited
            return _reuse(folder, ids)
        state = _start_or_resume(folder, dataset, encoder, precision, ids)
        if state["rows_done"] < len(ids):
            _run(
                dataset, encoder, folder, state, batch_size, num_workers, dev, amp_dtype, progress, chunk_rows
            )
        return _finalise(folder, state, ids)


def _reuse(folder: Path, ids: list[str]) -> FeatureCache:
    cache = FeatureCache.load(folder)
    _check_ids(folder, ids, cache.ids, cache.skipped)
    log.info("reusing the finished feature cache %s", folder)
    return cache


class _Lock:
    """One writer per cache folder: ``.lock`` created exclusively, holding ``host pid``.

    A second process (another DDP rank, a second run) waits until the holder finishes, then reuses its
    cache; a lock left by a dead process on this host is taken over; after ``timeout`` seconds of waiting
    a :class:`SpecError` says who holds it.
    """

    def __init__(self, folder: Path, timeout: float):
        self.path, self.timeout = folder / ".lock", float(timeout)
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def _holder(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def __enter__(self) -> _Lock:
        t0, told = time.monotonic(), False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and holder[0] == socket.gethostname() and not _alive(holder[1]):
                    log.warning("removing the stale lock %s of dead process %d", self.path, holder[1])
                    self.path.unlink(missing_ok=True)
                    continue
                waited = time.monotonic() - t0
                if waited > self.timeout:
                    who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
                    raise SpecError(
                        f"cache_dir: {who} has been extracting into {self.path.parent} for over {self.timeout:.0f} s "
                        f"(lock {self.path}); wait for it, or delete the lock file if that process is gone"
                    ) from None
                if not told:
                    log.info("waiting for another process to finish the feature cache %s", self.path.parent)
                    told = True
                time.sleep(min(_LOCK_POLL_S, max(self.timeout - waited, 0.01)))
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self.me)
            return self

    def __exit__(self, *exc: object) -> None:
        if self._holder() == (self.me.split()[0], int(self.me.split()[1])):
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_ids(folder: Path, ids: list[str], kept: list[str], skipped: list[str]) -> None:
    """The cache's kept + skipped ids must be exactly the dataset's ids, in order."""
    skipped_set = set(skipped)
    expected = [s for s in ids if s not in skipped_set]
    if expected != kept or len(skipped_set) + len(kept) != len(ids):
        first = next(
            (k for k, (a, b) in enumerate(zip(expected, kept, strict=False)) if a != b),
            min(len(expected), len(kept)),
        )
        raise SpecError(
            f"cache_dir: the feature cache in {folder} does not match the dataset: {len(kept)} + {len(skipped)} "
            f"skipped ids there, {len(ids)} in the dataset, first difference at row {first}; "
            "refusing to use it: delete that folder (or choose another cache_dir) and extract again"
        )


def _start_or_resume(
    folder: Path, dataset: SampleDataset, encoder: Encoder, precision: str, ids: list[str]
) -> dict:
    manifest = folder / _MANIFEST
    if manifest.is_file():
        state = json.loads(manifest.read_text())
        stored = _read_lines(folder / _ALL_IDS) if (folder / _ALL_IDS).is_file() else None
        same = (
            stored == ids
            and state.get("fingerprint") == dataset.fingerprint()
            and state.get("encoder_key") == encoder.cache_key()
            and state.get("n_total") == len(ids)
            and state.get("dim") == encoder.embed_dim
            and 0 <= state.get("rows_done", -1) <= len(ids)
        )
        if not same:
            raise SpecError(
                f"cache_dir: the unfinished feature cache in {folder} was written for other samples or another "
                "encoder (its ids or settings differ from this dataset's); refusing to resume it: delete that "
                "folder (or choose another cache_dir) and extract again"
            )
        if state["rows_done"] < len(ids) and not (folder / _PARTIAL).is_file():
            raise SpecError(
                f"cache_dir: the unfinished feature cache in {folder} lost {_PARTIAL}; delete the folder"
            )
        log.info("resuming the feature cache %s at row %d of %d", folder, state["rows_done"], len(ids))
        return state
    atomic_write_text(folder / _ALL_IDS, _lines(ids))
    state = {
        "format": _FORMAT,
        "dataset": dataset.settings(),
        "fingerprint": dataset.fingerprint(),
        "encoder": encoder.describe(),
        "encoder_key": encoder.cache_key(),
        "precision": precision,
        "n_total": len(ids),
        "dim": int(encoder.embed_dim),
        "rows_done": 0,
        "skipped_rows": [],
    }
    np.lib.format.open_memmap(
        folder / _PARTIAL, mode="w+", dtype=np.float32, shape=(len(ids), state["dim"])
    ).flush()
    atomic_write_text(manifest, json.dumps(state, indent=1, default=str))
    return state


def _run(
    dataset, encoder, folder, state, batch_size, num_workers, dev, amp_dtype, progress, chunk_rows
) -> None:
    """Embed rows ``state["rows_done"]..N-1`` into ``partial.npy``, checkpointing every ``chunk_rows`` rows."""
    n_total, dim, start = state["n_total"], state["dim"], state["rows_done"]
    out = np.load(folder / _PARTIAL, mmap_mode="r+")  # [N, d] float32
    if out.shape != (n_total, dim) or out.dtype != np.float32:
        raise SpecError(
            f"cache_dir: {folder / _PARTIAL} has shape {out.shape}, expected {(n_total, dim)}; delete the folder"
        )
    loader = DataLoader(
        _Rows(dataset, encoder, start),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(encoder),
        pin_memory=dev.type == "cuda",
    )
    encoder.to(dev).eval()
    skipped = list(state["skipped_rows"])
    done, last_checkpoint = start, start
    autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    bar = tqdm(
        total=n_total,
        initial=start,
        unit="sample",
        desc=f"{encoder.family} on {dataset.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for rows_ok, rows_bad, batch in loader:
            if batch is not None:
                with torch.inference_mode(), autocast:
                    z = encoder(move_to(batch, dev))  # [B, d]
                z = z.float().cpu().numpy()
                _check_output(z, len(rows_ok), dim, encoder, dataset, rows_ok)
                out[np.asarray(rows_ok)] = z  # [B, d] into the memmap rows
            for i, why in rows_bad:
                warnings.warn(
                    f"skipping corrupt sample {dataset.sample_id(i)!r}: {why}", RuntimeWarning, stacklevel=2
                )
                skipped.append(i)
            done += len(rows_ok) + len(rows_bad)
            bar.update(len(rows_ok) + len(rows_bad))
            if done - last_checkpoint >= chunk_rows or done == n_total:
                out.flush()  # rows first, then the manifest that counts them
                state["rows_done"], state["skipped_rows"] = done, sorted(skipped)
                atomic_write_text(folder / _MANIFEST, json.dumps(state, indent=1, default=str))
                last_checkpoint = done
    finally:
        bar.close()
        del out


def _check_output(
    z: np.ndarray, b: int, dim: int, encoder: Encoder, dataset: SampleDataset, rows: list[int]
) -> None:
    if z.shape != (b, dim):
        raise SpecError(
            f"encoder: {encoder.family} returned shape {z.shape} for a batch of {b}, expected [{b}, {dim}] "
            "(embed_dim); this is a bug in the encoder"
        )
    finite = np.isfinite(z).all(axis=1)
    if not finite.all():
        bad = [dataset.sample_id(rows[k]) for k in np.flatnonzero(~finite)[:5]]
        raise SpecError(
            f"encoder: {encoder.family} returned NaN/Inf embeddings for sample(s) {bad}; "
            "if this happens under autocast on CUDA, run with amp disabled"
        )


def _finalise(folder: Path, state: dict, ids: list[str]) -> FeatureCache:
    """Compact the kept rows into ``features.npy``, write the id lists, then the ``complete.json`` marker."""
    n_total, dim = state["n_total"], state["dim"]
    skipped_rows = sorted(set(state["skipped_rows"]))
    keep = np.setdiff1d(np.arange(n_total), np.asarray(skipped_rows, dtype=np.int64))  # [n]
    partial, final = folder / _PARTIAL, folder / _FEATURES
    if partial.is_file():
        if not skipped_rows:
            os.replace(partial, final)
        else:
            src = np.load(partial, mmap_mode="r")
            tmp = folder / ".features.tmp.npy"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(keep.size, dim))
            for start in range(0, keep.size, _COPY_ROWS):
                dst[start : start + _COPY_ROWS] = src[keep[start : start + _COPY_ROWS]]
            dst.flush()
            del dst, src
            os.replace(tmp, final)
            partial.unlink()
    elif not final.is_file():
        raise SpecError(f"cache_dir: the feature cache in {folder} lost its features; delete the folder")
    kept_ids = [ids[i] for i in keep]
    skipped_ids = [ids[i] for i in skipped_rows]
    atomic_write_text(folder / _IDS, _lines(kept_ids))
    atomic_write_text(folder / _SKIPPED, _lines(skipped_ids))
    meta = {
        k: state[k]
        for k in ("format", "dataset", "fingerprint", "encoder", "encoder_key", "precision", "dim")
    }
    meta.update(n=int(keep.size), n_skipped=len(skipped_ids))
    atomic_write_text(folder / _COMPLETE, json.dumps(meta, indent=1, default=str))  # the marker, last
    return FeatureCache.load(folder)
