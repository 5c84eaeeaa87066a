"""Safe file output: never half-written, never through a planted link, never over a file spec-torch did not write.

- **Atomic.** Every writer goes through :func:`atomic_open` (or :func:`atomic_path`): the content goes to a
  temporary file created beside the target with ``O_EXCL`` (``mkstemp``: never an existing file or link), is
  written through that descriptor, flushed to disk, and renamed onto the target only when writing succeeded;
  on any error the temporary file is removed and the target is left as it was.
- **No links.** A target that is a symbolic link is refused (:class:`~spec_torch.errors.SpecError` naming the
  path), and files written in place (the feature cache's ``partial.npy``) are opened with ``O_NOFOLLOW``
  (:func:`open_nofollow`): a link planted in a shared cache or output folder never redirects a write to a
  file elsewhere. A cache or output *folder* that is itself a link works as any folder.
- **Only its own files.** A run records every file it writes in the output folder's manifest
  :data:`OUTPUTS_MANIFEST` (rewritten atomically before each file is renamed into place, so it always lists
  every output on disk). A rerun there first removes the outputs the previous manifest lists, and nothing
  else (:func:`clear_previous_outputs`): the user's own files, Hydra's ``.hydra/`` and log are never touched,
  and a file of the run's own name that no manifest lists is refused, not overwritten. Files a rerun needs to
  resume (an alignment checkpoint) are recorded as ``resume`` state and kept.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import SpecError

__all__ = [
    "atomic_open",
    "atomic_path",
    "clean_stale_temporaries",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "open_nofollow",
    "open_fd_nofollow",
    "refuse_link",
    "prepare_output_dir",
    "begin_outputs",
    "clear_previous_outputs",
    "OUTPUTS_MANIFEST",
]


_STALE_FOREIGN_S = 24 * 3600.0  # a temporary of another host (shared filesystem) older than this is stale

#: the manifest of a run folder: the files the last run there wrote (``outputs``: removed by a rerun;
#: ``resume``: kept for the rerun to resume from)
OUTPUTS_MANIFEST = ".spec-torch-outputs.json"
_MANIFEST_FORMAT = 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -------------------------------------------------------------------------------------------- links
def _link_refused(path: Path, setting: str) -> SpecError:
    return SpecError(
        f"{setting}: {path} is a symbolic link; spec-torch does not write through links in its cache and "
        "output folders (one planted there would redirect the write elsewhere): remove it and run again"
    )


def refuse_link(path: str | os.PathLike, setting: str = "output_dir") -> None:
    """:class:`SpecError` naming ``path`` when it is a symbolic link (a missing path passes)."""
    if os.path.islink(path):
        raise _link_refused(Path(path), setting)


_MODES = {
    "rb": os.O_RDONLY,
    "r": os.O_RDONLY,
    "r+b": os.O_RDWR,
    "rb+": os.O_RDWR,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+b": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def open_fd_nofollow(path: str | os.PathLike, flags: int, *, setting: str = "output_dir") -> int:
    """``os.open(path, flags)`` that does not follow a link in the last path component (``O_NOFOLLOW``).

    A link, or anything but a regular file (a FIFO would block the run), is refused with a
    :class:`SpecError` naming ``path`` and ``setting``; other errors are the ``OSError`` of ``open``.
    """
    path = Path(path)
    try:  # O_NONBLOCK: opening a FIFO does not block
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise _link_refused(path, setting) from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader
            raise SpecError(f"{setting}: {path} is not a regular file; remove it and run again") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"{setting}: {path} is not a regular file; remove it and run again")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_nofollow(path: str | os.PathLike, mode: str = "rb", *, setting: str = "output_dir", **kwargs: Any):
    """``open(path, mode)`` through :func:`open_fd_nofollow`: a link in the last path component is refused.

    ``mode`` is one of ``rb r r+b wb w w+b ab a``; ``kwargs`` go to :func:`os.fdopen` (``encoding``,
    ``newline``).
    """
    fd = open_fd_nofollow(path, _MODES[mode], setting=setting)
    try:
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------------- temporaries
def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` (``.<name>.<host>.<pid>.*.tmp``) left by killed writers.

    A temporary is stale when its writer was on this host and is no longer running, or was on another host
    and the file is older than a day; a temporary without a writer in its name (older layout) is stale after
    an hour. Returns the removed paths.
    """
    path = Path(path)
    host, now, removed = socket.gethostname().replace(".", "_"), time.time(), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")  # [host, pid, random, "tmp"] or [random, "tmp"]
        try:
            age = now - tmp.lstat().st_mtime
        except OSError:
            continue
        if len(parts) >= 4 and parts[1].isdigit():
            pid = int(parts[1])
            stale = (pid != os.getpid() and not _alive(pid)) if parts[0] == host else age > _STALE_FOREIGN_S
        else:
            stale = age > 3600
        if stale:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def _temporary(path: Path, setting: str, record: bool, resume: bool) -> Iterator[tuple[int, Path]]:
    """``(fd, tmp)``: an ``O_EXCL`` temporary beside ``path``, renamed onto it when the block succeeds."""
    refuse_link(path, setting)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = _RUN if record else None
    rel = run.relative(path) if run is not None else None
    if rel is not None:
        run.check_ours(path, rel)
    clean_stale_temporaries(path)
    host = socket.gethostname().replace(".", "_")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{host}.{os.getpid()}.", suffix=".tmp")
    tmp_path = Path(tmp)
    try:
        yield fd, tmp_path
        os.fchmod(fd, 0o666 & ~_umask())  # a normal write's permissions, not mkstemp's 0600
        os.fsync(fd)  # on disk before the rename makes it visible
        os.close(fd)
        fd = -1
        refuse_link(path, setting)
        if rel is not None:
            run.add(rel, resume)  # the manifest lists it before it is in place
        os.replace(tmp_path, path)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    setting: str = "output_dir",
    record: bool = True,
    resume: bool = False,
    **kwargs: Any,
) -> Iterator[IO]:
    """Yield a file object (``mode`` ``"wb"`` or ``"w"``; ``kwargs`` to :func:`os.fdopen`) on an ``O_EXCL``
    temporary beside ``path``; on success rename it onto ``path``, on error remove it.

    Args:
        path: the target; a symbolic link there is refused (:class:`SpecError` naming it and ``setting``).
        setting: the config key named in errors (``output_dir``, ``cache_dir``).
        record: list the file in the manifest of the run folder it is in (:func:`begin_outputs`); a file
            there that no manifest lists is refused, not overwritten. False for files of a feature cache.
        resume: the file is state a rerun resumes from (kept by :func:`clear_previous_outputs`).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    with _temporary(Path(path), setting, record, resume) as (fd, _):
        fh = os.fdopen(os.dup(fd), mode, **kwargs)
        with fh:
            yield fh
            fh.flush()


@contextmanager
def atomic_path(
    path: str | os.PathLike, *, setting: str = "output_dir", record: bool = True, resume: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (for writers that take a file name); on success rename it onto
    ``path``, on error remove it. Prefer :func:`atomic_open`: the temporary is opened here by descriptor
    only, so a writer that opens the name itself must be given a folder nobody else can write to; the
    temporary is refused (not renamed) if it was replaced meanwhile.
    """
    with _temporary(Path(path), setting, record, resume) as (fd, tmp):
        mine = os.fstat(fd)
        yield tmp
        now = os.lstat(tmp)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino) or not stat.S_ISREG(now.st_mode):
            raise SpecError(f"{setting}: the temporary file {tmp} was replaced while it was written")


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``kwargs``: those of :func:`atomic_open`)."""
    with atomic_open(path, "wb", **kwargs) as fh:
        fh.write(text.encode("utf-8"))
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, default: Any = None, **kwargs: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN/Inf are refused (``allow_nan=False``), not written."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, allow_nan=False, default=default) + "\n", **kwargs
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``torch.save`` atomically: never a half-written checkpoint (``kwargs``: those of :func:`atomic_open`)."""
    import torch

    with atomic_open(path, "wb", **kwargs) as fh:
        torch.save(obj, fh)
    return Path(path)


# --------------------------------------------------------------------------------- the run manifest
class _Outputs:
    """The files this process's run writes in its output folder ``root``, mirrored in the manifest."""

    def __init__(self, root: Path, resume: list[str]):
        self.root = root
        self.real = os.path.realpath(root)
        self.outputs: list[str] = []
        self.resume: list[str] = list(resume)

    def relative(self, path: Path) -> str | None:
        """``path`` relative to the run folder (POSIX), or None outside it."""
        where = os.path.join(os.path.realpath(path.parent), path.name)
        rel = os.path.relpath(where, self.real)
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
            return None
        return Path(rel).as_posix()

    def check_ours(self, path: Path, rel: str) -> None:
        if rel in self.outputs or rel in self.resume or not os.path.lexists(path):
            return
        raise SpecError(
            f"output_dir: {path} already exists and no spec-torch run in {self.root} wrote it (its "
            f"{OUTPUTS_MANIFEST} does not list it), so it is not overwritten: move it away or choose another "
            "output_dir"
        )

    def add(self, rel: str, resume: bool) -> None:
        target = self.resume if resume else self.outputs
        if rel in target:
            return
        target.append(rel)
        _write_manifest(self.root, self.outputs, self.resume)


_RUN: _Outputs | None = None


def _write_manifest(root: Path, outputs: list[str], resume: list[str]) -> None:
    doc = {"format": _MANIFEST_FORMAT, "outputs": outputs, "resume": resume}
    atomic_write_text(root / OUTPUTS_MANIFEST, json.dumps(doc, indent=1) + "\n", record=False)


def _read_manifest(root: Path) -> tuple[list[str], list[str]] | None:
    """``(outputs, resume)`` of ``root``'s manifest, None without one; SpecError when it is unusable."""
    path = root / OUTPUTS_MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        with open_nofollow(path, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        doc = exc
    lists = [doc.get(k) for k in ("outputs", "resume")] if isinstance(doc, dict) else [None]
    if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in lists):
        raise SpecError(
            f"output_dir: {path}, the list of the files an earlier run wrote there, is broken, so nothing "
            "is cleared: remove that file (and the earlier run's outputs) or choose another output_dir"
        )
    for rel in lists[0] + lists[1]:
        parts = rel.split("/")
        if (
            not rel
            or rel.startswith("/")
            or "\0" in rel
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] in (".hydra", OUTPUTS_MANIFEST)
        ):
            raise SpecError(
                f"output_dir: {path} lists {rel!r}, which is not a file of a run inside {root}; nothing is "
                "cleared: remove that file or choose another output_dir"
            )
    return lists[0], lists[1]


def _unlink_inside(root: Path, rel: str) -> bool:
    """Remove the file ``root/rel`` without following a link on the way (a linked folder is not entered);
    only a file or a link is removed, never a folder. True when something was removed."""
    *dirs, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in dirs:
            try:
                nxt = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # gone, a link, or not a folder: nothing of ours below it
                return False
            os.close(fd)
            fd = nxt
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return False
        os.unlink(name, dir_fd=fd)
        return True
    finally:
        os.close(fd)


def clear_previous_outputs(root: str | os.PathLike) -> list[Path]:
    """Remove the outputs that the previous run in ``root`` lists in its manifest (:data:`OUTPUTS_MANIFEST`),
    and nothing else; keep its ``resume`` files. Returns the removed paths.

    The manifest is rewritten (resume files only) or removed after the files: a crash halfway leaves it
    listing what is still there. A broken or tampered manifest (a path outside ``root``, in ``.hydra/``) is
    refused with a :class:`SpecError` and nothing is removed.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    listed = _read_manifest(root)
    if listed is None:
        return []
    outputs, resume = listed
    removed = [root / rel for rel in outputs if _unlink_inside(root, rel)]
    if resume:
        if outputs:
            _write_manifest(root, [], resume)
    else:
        (root / OUTPUTS_MANIFEST).unlink(missing_ok=True)
    return removed


def begin_outputs(root: str | os.PathLike) -> list[Path]:
    """Start recording this process's outputs in ``root``: clear the previous run's outputs there
    (:func:`clear_previous_outputs`), then list every file :func:`atomic_open` writes below ``root`` in its
    manifest. Returns the removed paths."""
    global _RUN
    root = Path(root)
    removed = clear_previous_outputs(root)
    listed = _read_manifest(root)
    _RUN = _Outputs(root, listed[1] if listed else [])
    return removed


def prepare_output_dir(cfg: Any, results: Sequence[str] = ()) -> Path:
    """``cfg.output_dir``, else the Hydra run dir; created and checked writable before any work starts.

    On the main process, the outputs an earlier run left there are cleared and this run's are recorded
    (:func:`begin_outputs`); a file named in ``results`` (the run's result files) that is still there, which
    no manifest lists, is refused now rather than after the work (:class:`SpecError`: it is not overwritten).
    """
    from ..collectives import is_main_process

    out = cfg.get("output_dir")
    if out is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = HydraConfig.get().runtime.output_dir
        except ValueError:
            raise SpecError("output_dir: not set and no Hydra run dir; give output_dir=PATH") from None
    path = Path(str(out)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise SpecError(f"output_dir: {path} is not a writable directory ({exc.strerror or exc})") from None
    if is_main_process():
        begin_outputs(path)
        assert _RUN is not None
        for name in results:
            _RUN.check_ours(path / name, name)
    return path
