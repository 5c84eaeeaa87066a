"""Atomic file output and run directories: nothing spec_torch writes is ever seen half-written.

Every writer goes through :func:`atomic_path`: the content goes to a temporary name in the target's folder
(so the final rename is atomic on one filesystem), is flushed to disk, and is renamed onto the target only
when writing succeeded; on any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import SpecError

__all__ = [
    "atomic_path",
    "clean_stale_temporaries",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "prepare_output_dir",
]


_STALE_FOREIGN_S = 24 * 3600.0  # a temporary of another host (shared filesystem) older than this is stale


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
            age = now - tmp.stat().st_mtime
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
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    The file gets the permissions of a normal write (``0o666`` minus the umask), not ``mkstemp``'s 0600.
    Temporaries of the same target left by killed writers are removed first (:func:`clean_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    host = socket.gethostname().replace(".", "_")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{host}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, default: Any = None) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN/Inf are refused (``allow_nan=False``), not written."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: never a half-written checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prepare_output_dir(cfg: Any) -> Path:
    """``cfg.output_dir``, else the Hydra run dir; created and checked writable before any work starts."""
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
    return path
