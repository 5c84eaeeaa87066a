"""Feature extraction into a resumable on-disk cache: dataset x encoder -> memory-mapped ``[n, d]`` float32.

One cache folder per key (dataset fingerprint, ``encoder.cache_key()``, precision) under ``cache_dir``::

    <cache_dir>/<dataset>-<family>-<key>/
        all_ids.txt     every dataset id, in order (written first)
        manifest.json   progress: rows done, rows skipped as corrupt, a blake2b checksum of each chunk of
                        rows written (rewritten atomically after each chunk)
        partial.npy     [N, d] float32, preallocated, filled chunk by chunk with plain writes
        features.npy    [n, d] float32, only the rows kept (n = N - skipped)      } written at the end;
        ids.txt         the n kept ids, skipped.txt the skipped ones                } complete.json last,
        complete.json   the marker: present = finished; checksums of features.npy  } atomically

An interrupted run resumes after the last complete chunk whose checksum still matches (rows already written
are never recomputed; a chunk changed or cut off on disk is extracted again); a finished cache is verified
against its checksums and reused without touching the encoder (a mismatch fails naming the folder); a cache
whose ids do not match the dataset is refused. Crash-safety comes from ordering: rows are written and
fsynced before the manifest that counts them, and the marker is renamed into place after everything it
vouches for.

Locking: one process at a time writes a cache folder. The lock is an OS lock (``flock`` via the
``filelock`` package) on ``.lock`` inside the folder: the kernel releases it when its holder dies, so a crashed run never blocks the next one, whatever the lock file contains. The holder
writes ``host pid`` to ``.lock.holder`` so that a waiting process can say who it waits for; after
``lock_timeout`` seconds (config ``cache_lock_timeout``) it fails naming that holder. On network
filesystems the lock is only as good as the filesystem's ``flock``: NFSv4 and Lustre/GPFS (mounted with
``flock``) honour it across hosts; NFSv3 without ``lockd``, or a ``local_lock`` mount, lock per host only,
so give concurrent runs on several hosts a cache_dir on a filesystem that locks, or separate cache_dirs.

Disk space: before extracting, the free space must hold ``N x d x 4`` bytes plus a margin (and, before
compacting away skipped rows at the end, the kept rows' size again); ``partial.npy`` is preallocated (``posix_fallocate``) and written
with ``pwrite``, so a full disk is an ``error:`` line, never a SIGBUS, and the chunks already written stay
resumable.

>>> cache = extract_features(build_dataset("synthetic", n=32), build_encoder("offline_colour"), "/tmp/c")  # doctest: +SKIP
>>> cache.features.shape == (cache.n, cache.dim)  # doctest: +SKIP
True
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._validate import resolve_device
from ..errors import SpecError
from ._io import atomic_write_text as _atomic_write_text
from ._io import open_fd_nofollow, open_nofollow, refuse_link
from .data.base import CorruptSample, SampleDataset
from .encoders.base import Encoder, move_to
from .interrupt import interrupt_note

__all__ = ["extract_features", "FeatureCache", "cache_folder"]

log = logging.getLogger(__name__)

_FORMAT = 2  # bump when the layout changes (2: checksums, preallocated partial.npy)
_COMPLETE, _MANIFEST, _PARTIAL = "complete.json", "manifest.json", "partial.npy"
_FEATURES, _IDS, _SKIPPED, _ALL_IDS = "features.npy", "ids.txt", "skipped.txt", "all_ids.txt"
_COPY_ROWS = 65536  # rows per block when compacting, and per checksum of features.npy
_SPACE_MARGIN = 1.05  # free space needed: the bytes to write x this, plus _SPACE_EXTRA
_SPACE_EXTRA = 64 << 20
DEFAULT_LOCK_TIMEOUT = 24 * 3600.0  # a live holder may be extracting a large dataset for hours


def atomic_write_text(path: Path, text: str) -> Path:
    """A cache file, atomically and never through a link (errors name ``cache_dir``; a cache inside a run
    folder is not listed in the run's manifest of outputs)."""
    return _atomic_write_text(path, text, setting="cache_dir", record=False)


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
    def load(cls, path: str | os.PathLike, verify: bool = True) -> FeatureCache:
        """Open the finished cache in folder ``path``.

        Args:
            path: the cache folder.
            verify: check ``features.npy`` against the checksums in ``complete.json`` (one read of the file;
                ``bench/bench_faults.py`` measures it next to extraction).

        Raises:
            SpecError: naming the folder, when it is not complete, a file is missing, broken or truncated, or
                the features do not match their checksums.
        """
        path = Path(path)
        for name in (_COMPLETE, _IDS, _SKIPPED, _FEATURES):  # a planted link must not stand in for one
            refuse_link(path / name, "cache_dir")
        if not (path / _COMPLETE).is_file():
            raise SpecError(f"path: {path} holds no finished feature cache ({_COMPLETE} missing)")
        meta = _read_json(path / _COMPLETE, path)
        ids = _read_lines(path / _IDS, path)
        skipped = _read_lines(path / _SKIPPED, path)
        try:
            features = np.load(path / _FEATURES, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise SpecError(
                f"cache_dir: the feature cache {path} has a missing, empty or truncated {_FEATURES} ({exc}); "
                "delete that folder and extract again"
            ) from None
        if features.dtype != np.float32 or features.shape != (len(ids), meta.get("dim")):
            raise SpecError(
                f"cache_dir: the feature cache in {path} is inconsistent: features {features.shape} "
                f"{features.dtype}, {len(ids)} ids, dim {meta.get('dim')}; delete that folder and extract again"
            )
        if verify:
            _verify_features(path, meta)
        return cls(path=path, ids=ids, skipped=skipped, features=features, meta=meta)


# ----------------------------------------------------------------------------------------- file helpers
def _read_lines(path: Path, folder: Path | None = None) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        where = folder if folder is not None else path.parent
        raise SpecError(
            f"cache_dir: the feature cache {where} has a missing or unreadable {path.name} "
            f"({type(exc).__name__}: {exc}); delete that folder and extract again"
        ) from None
    return text.split("\n")[:-1] if text else []


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        doc = exc
    if not isinstance(doc, dict):
        why = f"{type(doc).__name__}: {doc}" if isinstance(doc, Exception) else "not a JSON object"
        raise SpecError(
            f"cache_dir: the feature cache {folder} has a broken {path.name} ({why}); delete that folder and "
            "extract again"
        )
    return doc


# ------------------------------------------------------------------------------ checksums and raw rows
_READ_BYTES = 16 << 20  # bytes per read when hashing


def _digest_range(fd: int, offset: int, nbytes: int) -> str | None:
    """blake2b of ``nbytes`` bytes of ``fd`` from ``offset``; None when the file ends before them."""
    h = hashlib.blake2b(digest_size=16)
    done = 0
    while done < nbytes:
        block = os.pread(fd, min(_READ_BYTES, nbytes - done), offset + done)
        if not block:
            return None
        h.update(block)
        done += len(block)
    return h.hexdigest()


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """``(data offset, shape, dtype)`` of a C-order ``.npy`` file; ValueError when the header is broken."""
    with open_nofollow(path, "rb", setting="cache_dir") as fh:
        version = np.lib.format.read_magic(fh)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if fortran:
            raise ValueError("Fortran order")
        return fh.tell(), shape, dtype


def _new_npy(path: Path, shape: tuple[int, int]) -> int:
    """Write the ``.npy`` header of a float32 ``shape`` array; the data offset."""
    with open_nofollow(path, "wb", setting="cache_dir") as fh:
        np.lib.format.write_array_header_1_0(
            fh,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": shape,
            },
        )
        return fh.tell()


def _preallocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` on disk (no sparse holes to discover ENOSPC in later)."""
    fd = open_fd_nofollow(path, os.O_RDWR, setting="cache_dir")
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # e.g. some network filesystems
                os.ftruncate(fd, size)
            else:
                raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[n:], offset + n


def _check_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse to start when ``folder``'s filesystem cannot hold ``nbytes`` more (with a margin)."""
    need = int(nbytes * _SPACE_MARGIN) + _SPACE_EXTRA
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SpecError(
            f"cache_dir: {folder} has {free / 2**30:.2f} GiB free, {what} need about {need / 2**30:.2f} GiB; "
            "free some space or choose another cache_dir (what is already extracted stays resumable)"
        )


def _write_failed(folder: Path, exc: OSError, done: int, n_total: int) -> SpecError:
    return SpecError(
        f"cache_dir: writing the feature cache {folder} failed ({exc.strerror or exc}); the {done} of {n_total} "
        "rows checkpointed so far are kept and a rerun resumes from there once the disk has room"
    )


def _feature_checksums(path: Path, n: int, dim: int) -> dict[str, Any]:
    offset = _npy_layout(path)[0]
    row = dim * 4
    fd = open_fd_nofollow(path, os.O_RDONLY, setting="cache_dir")
    try:
        sums = [
            _digest_range(fd, offset + start * row, (min(start + _COPY_ROWS, n) - start) * row)
            for start in range(0, n, _COPY_ROWS)
        ]
    finally:
        os.close(fd)
    return {"rows_per_block": _COPY_ROWS, "blake2b": sums}


def _verify_features(folder: Path, meta: dict[str, Any]) -> None:
    """Compare ``features.npy`` with the checksums of ``complete.json``; SpecError naming the folder."""
    sums = meta.get("checksums")
    n, dim = int(meta.get("n", -1)), int(meta.get("dim", -1))
    if not isinstance(sums, dict) or not isinstance(sums.get("blake2b"), list):
        raise SpecError(
            f"cache_dir: the feature cache {folder} has no checksums; delete that folder and extract again"
        )
    now = _feature_checksums(folder / _FEATURES, n, dim)
    if now["rows_per_block"] != sums.get("rows_per_block") or now["blake2b"] != sums["blake2b"]:
        rows = int(sums.get("rows_per_block") or _COPY_ROWS)
        bad = [k for k, (a, b) in enumerate(zip(now["blake2b"], sums["blake2b"], strict=False)) if a != b]
        first = bad[0] * rows if bad else 0
        raise SpecError(
            f"cache_dir: the feature cache {folder} was changed after it was written: {_FEATURES} no longer "
            f"matches its checksums (first at rows {first}..{min(first + rows, n) - 1}); refusing to use it: "
            "delete that folder and extract again"
        )


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
def extraction_settings(cfg: Any, device: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`extract_features` that a pipeline config sets (``batch_size``,
    ``num_workers``, ``progress``, ``chunk_rows``, ``amp``, ``cache_lock_timeout``), for ``device``."""
    return {
        "batch_size": int(cfg.batch_size),
        "num_workers": int(cfg.num_workers),
        "device": str(device),
        "progress": bool(cfg.get("progress", True)),
        "chunk_rows": int(cfg.get("chunk_rows", 4096)),
        "amp": bool(cfg.get("amp", True)),
        "lock_timeout": float(cfg.get("cache_lock_timeout", 86400)),
    }


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
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
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
        lock_timeout: seconds to wait for another process extracting into the same cache folder (config
            ``cache_lock_timeout``); then :class:`SpecError` naming the holder's host and pid.

    Returns:
        The finished :class:`FeatureCache`.

    Raises:
        SpecError: modality mismatch, bad settings, an unwritable ``cache_dir``, a cache whose ids do not
            match ``dataset`` or its checksums, too little disk space, a failed write, an encoder that
            returns the wrong width or non-finite values.
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
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
        raise SpecError(f"cache_lock_timeout: expected a number of seconds >= 0, got {lock_timeout!r}")
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
    for name in (
        _COMPLETE,
        _MANIFEST,
        _PARTIAL,
        _FEATURES,
        _IDS,
        _SKIPPED,
        _ALL_IDS,
        ".lock",
        ".lock.holder",
    ):
        refuse_link(folder / name, "cache_dir")  # a planted link: refused, never read or written through
    ids = dataset.ids
    if (folder / _COMPLETE).is_file():
        return _reuse(folder, ids)
    with _Lock(folder, lock_timeout):
        if (folder / _COMPLETE).is_file():  # another process finished it while we waited
            return _reuse(folder, ids)
        state = _start_or_resume(folder, dataset, encoder, precision, ids)
        if state["rows_done"] < len(ids):
            # Ctrl-C: the rows the manifest counts (the last checkpoint) are what a rerun starts from
            with interrupt_note(lambda: f"interrupted; a rerun resumes from row {state['rows_done']}"):
                _run(
                    dataset,
                    encoder,
                    folder,
                    state,
                    batch_size,
                    num_workers,
                    dev,
                    amp_dtype,
                    progress,
                    chunk_rows,
                )
        return _finalise(folder, state, ids)


def _reuse(folder: Path, ids: list[str]) -> FeatureCache:
    cache = FeatureCache.load(folder)
    _check_ids(folder, ids, cache.ids, cache.skipped)
    log.info("reusing the finished feature cache %s", folder)
    return cache


class _Lock:
    """One writer per cache folder: an OS lock on ``.lock`` (:class:`filelock.FileLock`, ``flock``), released
    by the kernel when its holder dies; ``.lock.holder`` names the holder (``host pid``) for the message a
    waiting process gives after ``timeout`` seconds."""

    def __init__(self, folder: Path, timeout: float):
        self.folder, self.timeout = folder, float(timeout)
        self.lock = FileLock(str(folder / ".lock"), timeout=self.timeout)
        self.holder_path = folder / ".lock.holder"
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def _holder(self) -> str:
        try:
            host, pid = self.holder_path.read_text(encoding="utf-8").split()[:2]
            return f"process {int(pid)} on host {host}"
        except (OSError, UnicodeDecodeError, ValueError):
            return "another process (it left no readable .lock.holder)"

    def __enter__(self) -> _Lock:
        try:
            self._acquire(0)
        except Timeout:
            log.info("waiting for %s to finish the feature cache %s", self._holder(), self.folder)
            try:
                self._acquire(self.timeout)
            except Timeout:
                raise SpecError(
                    f"cache_dir: {self._holder()} has held the lock of the feature cache {self.folder} for over "
                    f"{self.timeout:.0f} s (cache_lock_timeout); wait for it to finish, stop it, or raise "
                    "cache_lock_timeout"
                ) from None
        try:
            atomic_write_text(self.holder_path, self.me)
        except OSError:  # the lock itself holds; the name is only for messages
            pass
        except SpecError:  # a link planted as .lock.holder
            self.lock.release()
            raise
        return self

    def _acquire(self, timeout: float) -> None:
        """Take the lock; a link planted as ``.lock`` (not followed: ELOOP) is one error naming it."""
        lock_path = self.folder / ".lock"
        refuse_link(lock_path, "cache_dir")
        try:
            self.lock.acquire(timeout=timeout)
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(lock_path):
                refuse_link(lock_path, "cache_dir")
                raise SpecError(
                    f"cache_dir: {lock_path} is a symbolic link; remove it and run again"
                ) from None
            raise

    def __exit__(self, *exc: object) -> None:
        self.holder_path.unlink(missing_ok=True)
        self.lock.release()


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
        state = _read_json(manifest, folder)
        stored = _read_lines(folder / _ALL_IDS, folder) if (folder / _ALL_IDS).is_file() else None
        same = (
            stored == ids
            and state.get("fingerprint") == dataset.fingerprint()
            and state.get("encoder_key") == encoder.cache_key()
            and state.get("n_total") == len(ids)
            and state.get("dim") == encoder.embed_dim
            and isinstance(state.get("rows_done"), int)
            and 0 <= state["rows_done"] <= len(ids)
            and isinstance(state.get("chunks"), list)
            and isinstance(state.get("skipped_rows"), list)
        )
        if not same:
            raise SpecError(
                f"cache_dir: the unfinished feature cache in {folder} was written for other samples or another "
                "encoder (its ids or settings differ from this dataset's); refusing to resume it: delete that "
                "folder (or choose another cache_dir) and extract again"
            )
        if (folder / _PARTIAL).is_file():
            _verify_partial(folder, state)
        elif state["rows_done"] < len(ids) or not (folder / _FEATURES).is_file():
            raise SpecError(
                f"cache_dir: the unfinished feature cache in {folder} lost {_PARTIAL}; delete that folder"
            )
        log.warning("resuming the feature cache %s at row %d of %d", folder, state["rows_done"], len(ids))
        return state
    dim = int(encoder.embed_dim)
    _check_space(folder, len(ids) * dim * 4, f"the {len(ids)} x {dim} float32 features")
    atomic_write_text(folder / _ALL_IDS, _lines(ids))
    state = {
        "format": _FORMAT,
        "dataset": dataset.settings(),
        "fingerprint": dataset.fingerprint(),
        "encoder": encoder.describe(),
        "encoder_key": encoder.cache_key(),
        "precision": precision,
        "n_total": len(ids),
        "dim": dim,
        "rows_done": 0,
        "skipped_rows": [],
        "chunks": [],  # [start, stop, blake2b of partial.npy rows start..stop-1]
    }
    try:
        offset = _new_npy(folder / _PARTIAL, (len(ids), dim))
        _preallocate(folder / _PARTIAL, offset + len(ids) * dim * 4)
    except OSError as exc:
        (folder / _PARTIAL).unlink(missing_ok=True)
        raise SpecError(
            f"cache_dir: cannot reserve {len(ids) * dim * 4 / 2**30:.2f} GiB for the feature cache {folder} "
            f"({exc.strerror or exc}); free some space or choose another cache_dir"
        ) from None
    atomic_write_text(manifest, json.dumps(state, indent=1, default=str))
    return state


def _verify_partial(folder: Path, state: dict) -> None:
    """Check each recorded chunk of ``partial.npy`` against its checksum; rewind ``state`` to the first chunk
    that was changed or cut off (it and everything after is extracted again)."""
    n_total, dim = state["n_total"], state["dim"]
    path = folder / _PARTIAL
    try:
        offset, shape, dtype = _npy_layout(path)
        ok_header = shape == (n_total, dim) and dtype == np.float32
    except (OSError, ValueError, EOFError):
        ok_header = False
    if not ok_header:
        log.warning(
            "the feature cache %s: %s has a broken header; extracting everything again", folder, _PARTIAL
        )
        offset = _new_npy(path, (n_total, dim))
        state.update(rows_done=0, skipped_rows=[], chunks=[])
    row = dim * 4
    fd = open_fd_nofollow(path, os.O_RDONLY, setting="cache_dir")
    try:
        good, expect = 0, 0
        for chunk in state["chunks"]:
            start, stop, digest = chunk
            if start != expect or _digest_range(fd, offset + start * row, (stop - start) * row) != digest:
                break
            good, expect = good + 1, stop
    finally:
        os.close(fd)
    if good < len(state["chunks"]) or expect != state["rows_done"]:
        log.warning(
            "the feature cache %s: rows %d.. of %s changed or were cut off since they were written; "
            "extracting them again",
            folder,
            expect,
            _PARTIAL,
        )
        state["chunks"] = state["chunks"][:good]
        state["rows_done"] = expect
        state["skipped_rows"] = [r for r in state["skipped_rows"] if r < expect]
    size = offset + n_total * row
    if path.stat().st_size < size:
        _check_space(folder, size - path.stat().st_size, "the remaining features")
        try:
            _preallocate(path, size)
        except OSError as exc:
            raise SpecError(f"cache_dir: cannot reserve space in {folder} ({exc.strerror or exc})") from None


def _run(
    dataset, encoder, folder, state, batch_size, num_workers, dev, amp_dtype, progress, chunk_rows
) -> None:
    """Embed rows ``state["rows_done"]..N-1`` into ``partial.npy``, checkpointing every ``chunk_rows`` rows.

    Rows are written with ``pwrite`` into the preallocated file; at each checkpoint they are fsynced, read
    back and hashed (the chunk's checksum), then the manifest counting them is written. A failed write (a full
    disk) raises :class:`SpecError`; the chunks checkpointed before it stay valid for a resume.
    """
    n_total, dim, start = state["n_total"], state["dim"], state["rows_done"]
    offset, shape, dtype = _npy_layout(folder / _PARTIAL)
    if shape != (n_total, dim) or dtype != np.float32:
        raise SpecError(
            f"cache_dir: {folder / _PARTIAL} has shape {shape}, expected {(n_total, dim)}; delete that folder"
        )
    row = dim * 4
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
    fd = open_fd_nofollow(folder / _PARTIAL, os.O_RDWR, setting="cache_dir")
    try:
        for rows_ok, rows_bad, batch in loader:
            if batch is not None:
                with torch.inference_mode(), autocast:
                    z = encoder(move_to(batch, dev))  # [B, d]
                z = np.ascontiguousarray(z.float().cpu().numpy())
                _check_output(z, len(rows_ok), dim, encoder, dataset, rows_ok)
                try:
                    for a, b in _runs(rows_ok):  # contiguous row runs: one write each
                        _pwrite_all(fd, z[a:b].tobytes(), offset + rows_ok[a] * row)  # [b - a, d]
                except OSError as exc:
                    raise _write_failed(folder, exc, last_checkpoint, n_total) from None
            for i, why in rows_bad:
                warnings.warn(
                    f"skipping corrupt sample {dataset.sample_id(i)!r}: {why}", RuntimeWarning, stacklevel=2
                )
                skipped.append(i)
            done += len(rows_ok) + len(rows_bad)
            bar.update(len(rows_ok) + len(rows_bad))
            if done - last_checkpoint >= chunk_rows or done == n_total:
                try:
                    os.fsync(fd)  # rows first, then the manifest that counts them
                    digest = _digest_range(fd, offset + last_checkpoint * row, (done - last_checkpoint) * row)
                    state["chunks"].append([last_checkpoint, done, digest])
                    state["rows_done"], state["skipped_rows"] = done, sorted(skipped)
                    atomic_write_text(folder / _MANIFEST, json.dumps(state, indent=1, default=str))
                except OSError as exc:
                    raise _write_failed(folder, exc, last_checkpoint, n_total) from None
                last_checkpoint = done
    finally:
        bar.close()
        os.close(fd)


def _runs(rows: list[int]) -> Iterator[tuple[int, int]]:
    """``(a, b)`` positions of each run of consecutive values in the ascending ``rows``."""
    a = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[k - 1] + 1:
            yield a, k
            a = k


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
    """Compact the kept rows into ``features.npy``, write the id lists and checksums, then ``complete.json``."""
    n_total, dim = state["n_total"], state["dim"]
    skipped_rows = sorted(set(state["skipped_rows"]))
    keep = np.setdiff1d(np.arange(n_total), np.asarray(skipped_rows, dtype=np.int64))  # [n]
    partial, final = folder / _PARTIAL, folder / _FEATURES
    try:
        if partial.is_file():
            if not skipped_rows:
                os.replace(partial, final)
            else:
                _check_space(folder, keep.size * dim * 4, f"the {keep.size} kept rows (compacted)")
                src = np.load(partial, mmap_mode="r")
                tmp = folder / ".features.tmp.npy"
                offset = _new_npy(tmp, (keep.size, dim))
                with open_nofollow(tmp, "r+b", setting="cache_dir") as fh:
                    fh.seek(offset)
                    for start in range(0, keep.size, _COPY_ROWS):
                        fh.write(np.ascontiguousarray(src[keep[start : start + _COPY_ROWS]]).tobytes())
                    fh.flush()
                    os.fsync(fh.fileno())
                del src
                os.replace(tmp, final)
                partial.unlink()
        elif not final.is_file():
            raise SpecError(f"cache_dir: the feature cache in {folder} lost its features; delete that folder")
        kept_ids = [ids[i] for i in keep]
        skipped_ids = [ids[i] for i in skipped_rows]
        atomic_write_text(folder / _IDS, _lines(kept_ids))
        atomic_write_text(folder / _SKIPPED, _lines(skipped_ids))
        meta = {
            k: state[k]
            for k in ("format", "dataset", "fingerprint", "encoder", "encoder_key", "precision", "dim")
        }
        meta.update(n=int(keep.size), n_skipped=len(skipped_ids))
        meta["checksums"] = _feature_checksums(final, int(keep.size), dim)
        atomic_write_text(folder / _COMPLETE, json.dumps(meta, indent=1, default=str))  # the marker, last
    except OSError as exc:
        (folder / ".features.tmp.npy").unlink(missing_ok=True)
        raise _write_failed(folder, exc, state["rows_done"], n_total) from None
    return FeatureCache.load(folder, verify=False)
