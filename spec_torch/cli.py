"""What the Hydra entry points in ``scripts/`` share: one-line errors and the torchrun follower path."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from .errors import SpecError

__all__ = ["run_guarded", "launch", "check_required", "RESULT_FILES"]

#: files whose presence in a run folder shows a result: removed when a run starts there, so a failed rerun
#: never leaves the previous run's result beside its own config (every one is written atomically at the end)
RESULT_FILES = ("spec.json", "results.json", "report.html")

#: write errors that are the environment's, not a bug: reported as one ``error:`` line naming the file
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EIO}


def run_guarded(run: Callable[[Any], Any], cfg: Any) -> None:
    """``run(cfg)``; a :class:`SpecError`, or an environment error on a file (full disk, read-only or
    missing folder, no permission), becomes one ``error: ...`` line on stderr and exit status 2.

    Before running, the result files (:data:`RESULT_FILES`) of an earlier run in the same output folder are
    removed (rank 0 only), and ``seed`` is checked.
    """
    try:
        if distributed.is_main_process():
            clear_stale_results(cfg)
        check_seed(cfg)
        run(cfg)
    except SpecError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.errno not in _ENV_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        _fail(
            f"cannot access{where}: {exc.strerror or exc} (free space, fix the permissions, or choose another path)"
        )


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def check_seed(cfg: Any) -> None:
    """``seed`` must be an integer (``seed=abc`` is refused here, not deep in ``torch.manual_seed``)."""
    seed = cfg.get("seed") if hasattr(cfg, "get") else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SpecError(f"seed: expected an integer, got {seed!r}")


def _output_dir(cfg: Any) -> Path | None:
    out = cfg.get("output_dir") if hasattr(cfg, "get") else None
    if out is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = HydraConfig.get().runtime.output_dir
        except (ImportError, ValueError):
            return None
    return Path(str(out)).expanduser()


def clear_stale_results(cfg: Any) -> list[Path]:
    """Remove :data:`RESULT_FILES` left in the run's output folder by an earlier run; the removed paths."""
    out = _output_dir(cfg)
    removed = []
    if out is None or not out.is_dir():
        return removed
    for name in RESULT_FILES:
        path = out / name
        try:
            if path.is_file():
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # an unwritable folder is reported by the run's own output check
    return removed


def _check_run_dir(argv: list[str]) -> None:
    """Hydra creates its run folder before any spec_torch code runs: check an explicit ``hydra.run.dir=``
    (or, without one, the working directory that holds ``outputs/``) so that an unwritable one is one
    ``error:`` line, not Hydra's traceback."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "++hydra.run.dir="))]
    if given:
        path = Path(given[-1]).expanduser()
        if "${" in given[-1]:
            return  # interpolated: Hydra resolves it
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"hydra.run.dir: cannot create {path} ({exc.strerror or exc}); give a writable folder")
        if not os.access(path, os.W_OK):
            _fail(f"hydra.run.dir: {path} is not writable; give a writable folder")
    elif not os.access(Path.cwd(), os.W_OK):
        _fail(
            f"hydra.run.dir: the working directory {Path.cwd()} is not writable; cd elsewhere or give hydra.run.dir="
        )


def launch(hydra_main: Callable[[], None], run: Callable[[Any], Any]) -> None:
    """Start a script: Hydra on rank 0 (and without torchrun); under torchrun, ranks > 0 skip Hydra (no run
    dir, no logs of their own) and receive rank 0's composed config."""
    if distributed.is_follower():
        run_guarded(run, distributed.share_config())
    else:
        if not any(a in ("--help", "-h", "--cfg", "-c", "--info") for a in sys.argv[1:]):
            _check_run_dir(sys.argv[1:])
        hydra_main()


def check_required(cfg: Any) -> None:
    """Every ``???`` (mandatory) value of the composed config must be given; name them and how to give them."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " ".join(f"{key}=..." for key in missing)
        raise SpecError(f"{', '.join(missing)}: required by this config but not given; add {hint}")
