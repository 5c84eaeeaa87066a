"""The ``spec-torch`` command (also ``python -m spec_torch``) and what the Hydra entry points share.

Usage::

    spec-torch compare experiment=demo hydra.run.dir=OUT     # one SPEC comparison -> OUT/spec.json, report.html
    spec-torch align experiment=align_tiny                    # fine-tune a student toward a teacher
    spec-torch summarize multirun/2026-01-01/12-00-00         # one table across the runs of a multirun
    spec-torch compare --help                                 # this command's presets and groups only

Each Hydra command takes Hydra overrides exactly as ``scripts/compare.py`` does (``key=value``,
``group=option``, ``-m`` for a multirun, ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]`` to add
your own config folder). Its configs ship inside the package: ``spec_torch/apps/configs/<command>/`` holds the
command's primary config and its ``experiment/`` presets, ``spec_torch/apps/configs/{data,encoder,kernel}/``
the groups the commands share.

A command is one entry of :data:`COMMANDS`; a new pipeline registers itself there (config folder
``configs/<name>/<name>.yaml`` plus a ``run(cfg)``).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from . import sharding as distributed

__all__ = ["COMMANDS", "Command", "main", "run_guarded", "launch", "check_required", "RESULT_FILES"]


#: files whose presence in a run folder shows a result (each written atomically at the end); an earlier run's
#: are removed when a run starts there through the run's manifest, so a failed rerun never leaves the previous
#: run's result beside its own config (:func:`spec_torch.apps._io.clear_previous_outputs`)
RESULT_FILES = ("spec.json", "results.json", "report.html")

#: write errors that are the environment's, not a bug: reported as one ``error:`` line naming the file
_ENV_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EIO,
    errno.ELOOP,
}
#: what to do about each, where it is not "free space or fix the permissions"
_ENV_HINTS = {
    errno.ELOOP: "a symbolic link loop, or a link where spec-torch does not follow one; remove the link"
}


@dataclass(frozen=True)
class Command:
    """One subcommand of ``spec-torch``.

    Attributes:
        name: the subcommand; a Hydra command's configs are ``configs/<name>/<name>.yaml`` (+ ``experiment/``).
        target: ``"module:function"``; for a Hydra command ``run(cfg)``, otherwise ``main(argv) -> int``.
        help: one line for ``spec-torch --help``.
        hydra: whether the command reads a Hydra config (else it parses its own arguments).
    """

    name: str
    target: str
    help: str
    hydra: bool = True

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


#: the subcommands (a Hydra command's configs: configs/<name>/<name>.yaml and configs/<name>/experiment/)
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("compare", "spec_torch.apps.compare:run", "compare two encoders on one dataset (SPEC)"),
        Command("align", "spec_torch.apps.align.pipeline:run", "fine-tune a student toward a teacher"),
        Command("matrix", "spec_torch.apps.matrix:run", "SPEC-diff, lead and CKA of many encoders / layers"),
        Command(
            "summarize", "spec_torch.apps.summarize:main", "one table across the runs of a folder", False
        ),
    )
}


def _usage() -> str:
    rows = "\n".join(f"  {c.name:<10} {c.help}" for c in COMMANDS.values())
    return (
        "usage: spec-torch COMMAND [overrides ...]\n\ncommands:\n"
        + rows
        + "\n\n`spec-torch COMMAND --help` lists the command's presets, groups and settings."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spec-torch`` and ``python -m spec_torch``: dispatch to one subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    from . import require

    require("hydra", "omegaconf")
    if not command.hydra:
        try:
            return int(command.load()(rest) or 0)
        except SpecError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    hydra_command(command, rest)
    return 0


#: the OmegaConf resolver that the commands' ``hydra.help.template`` calls to list the shared groups
#: (:func:`spec_torch.apps.config.shared_groups_help`)
GROUPS_RESOLVER = "spec_torch_shared_groups"


def hydra_command(command: Command, args: Sequence[str]) -> None:
    """Run ``command`` through ``@hydra.main`` with its packaged configs and the overrides ``args``."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from .config import shared_groups_help

    if not OmegaConf.has_resolver(GROUPS_RESOLVER):
        OmegaConf.register_new_resolver(GROUPS_RESOLVER, shared_groups_help)

    def _run(cfg: DictConfig) -> None:
        command.load()(cfg)  # imported after Hydra parsed the command line: --help stays fast

    @hydra.main(
        config_path=f"pkg://spec_torch.apps.configs.{command.name}",
        config_name=command.name,
        version_base="1.3",
    )
    def _main(cfg: DictConfig) -> None:
        run_guarded(_run, distributed.share_config(cfg))  # under torchrun: rank 0's config to every rank

    _check_env_overrides(args)

    from .config import check_overrides

    try:  # unknown keys and presets: one error line before Hydra's report; on every rank (the same verdict)
        notes = check_overrides(command.name, args)
    except SpecError as exc:
        _fail(str(exc))
    for note in notes if not distributed.is_follower() else ():
        print(f"warning: {' '.join(note.split())}", file=sys.stderr)
    argv0 = sys.argv[0] if sys.argv else "spec-torch"
    sys.argv = [f"{argv0} {command.name}", *args]
    try:
        launch(_main, _run)
    except KeyboardInterrupt as exc:  # while Hydra composes, before run_guarded
        _interrupted(exc)
    finally:
        sys.argv = [argv0, command.name, *args]


_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([^,}]*)\}")


def _check_env_overrides(args: Sequence[str]) -> None:
    """``key=${oc.env:NAME}`` with ``NAME`` unset (and no default) is one ``error:`` line naming the key and the
    variable; Hydra would raise it from its own composition, before :func:`run_guarded`."""
    for arg in args:
        for name in _ENV_INTERPOLATION.findall(arg):
            if name.strip() not in os.environ:
                key = arg.split("=", 1)[0] if "=" in arg else arg
                _fail(
                    f"{key}: the environment variable {name.strip()!r} in {arg!r} is not set; set it, or give a "
                    f"default: ${{oc.env:{name.strip()},DEFAULT}}"
                )


def run_guarded(run: Callable[[Any], Any], cfg: Any) -> None:
    """``run(cfg)``; a :class:`SpecError`, or an environment error on a file (full disk, read-only or
    missing folder, no permission), becomes one ``error: ...`` line on stderr and exit status 2.

    Before running, the outputs an earlier run in the same output folder listed in its manifest are removed
    (rank 0 only; :func:`clear_stale_results`), and ``seed`` is checked. Under torchrun the process group is destroyed on the way
    out, error or not: left to the interpreter's teardown, Gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception").
    """
    from omegaconf.errors import InterpolationResolutionError

    try:
        if distributed.is_main_process():
            clear_stale_results(cfg)
        check_seed(cfg)
        run(cfg)
    except SpecError as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except InterpolationResolutionError as exc:  # ${oc.env:UNSET} in a config file, resolved on first use
        _fail(f"{exc.full_key or 'config'}: {exc.msg if hasattr(exc, 'msg') else exc}")
    except ValueError as exc:
        if "embedded null" not in str(exc):
            raise
        _fail(f"a path holds a NUL byte ({exc}); rename that file or give another path")
    except OSError as exc:
        if exc.errno not in _ENV_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        hint = _ENV_HINTS.get(exc.errno, "free space, fix the permissions, or choose another path")
        _fail(f"cannot access{where}: {exc.strerror or exc} ({hint})")
    finally:
        distributed.destroy_distributed()


def plain_text(doc: str) -> str:
    """A reStructuredText docstring as terminal text (``--help``): ````code```` -> ``code``, ``Example::`` ->
    ``Example:``, ``:func:`name``` -> ``name``."""
    text = re.sub(r"``([^`]+)``", r"\1", doc)
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"::(\s*\n)", r":\1", text)
    return text.strip()


def _interrupted(exc: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying how far the run got (rank 0 only: every rank gets the signal) and exit 130."""
    from .interrupt import INTERRUPTED_STATUS, interrupted_message

    message = interrupted_message(exc)
    if distributed.is_main_process() and not distributed.is_follower():  # also before/after the group exists
        print(message, file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_STATUS)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def check_seed(cfg: Any) -> None:
    """``seed`` must be an integer with ``0 <= seed < 2**63`` (``seed=abc`` or ``seed=2**70`` is refused here, not
    deep in ``torch.manual_seed``)."""
    from .._validate import check_seed as check_seed_value

    seed = cfg.get("seed") if hasattr(cfg, "get") else None
    if seed is not None:
        check_seed_value(seed, "seed")


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
    """Remove the outputs an earlier run left in this run's output folder, as its manifest lists them
    (:func:`spec_torch.apps._io.clear_previous_outputs`): never a file spec-torch did not write. Returns the
    removed paths."""
    from ._io import clear_previous_outputs

    out = _output_dir(cfg)
    if out is None or not out.is_dir():
        return []
    try:
        return clear_previous_outputs(out)
    except OSError:
        return []  # an unwritable folder is reported by the run's own output check


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
