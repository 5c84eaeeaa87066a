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

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from . import sharding as distributed

__all__ = ["COMMANDS", "Command", "main", "run_guarded", "launch", "check_required"]


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


#: the subcommands; the SPEC-matrix pipeline registers ``"matrix"`` here
#: (``Command("matrix", "spec_torch.apps.matrix:run", ...)`` with configs/matrix/matrix.yaml)
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("compare", "spec_torch.apps.compare:run", "compare two encoders on one dataset (SPEC)"),
        Command("align", "spec_torch.apps.align.pipeline:run", "fine-tune a student toward a teacher"),
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


def hydra_command(command: Command, args: Sequence[str]) -> None:
    """Run ``command`` through ``@hydra.main`` with its packaged configs and the overrides ``args``."""
    import hydra
    from omegaconf import DictConfig

    def _run(cfg: DictConfig) -> None:
        command.load()(cfg)  # imported after Hydra parsed the command line: --help stays fast

    @hydra.main(
        config_path=f"pkg://spec_torch.apps.configs.{command.name}",
        config_name=command.name,
        version_base="1.3",
    )
    def _main(cfg: DictConfig) -> None:
        run_guarded(_run, distributed.share_config(cfg))  # under torchrun: rank 0's config to every rank

    argv0 = sys.argv[0] if sys.argv else "spec-torch"
    sys.argv = [f"{argv0} {command.name}", *args]
    try:
        launch(_main, _run)
    finally:
        sys.argv = [argv0, command.name, *args]


def run_guarded(run: Callable[[Any], Any], cfg: Any) -> None:
    """``run(cfg)``; a :class:`SpecError` becomes one ``error: ...`` line on stderr and exit status 2."""
    try:
        run(cfg)
    except SpecError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


def launch(hydra_main: Callable[[], None], run: Callable[[Any], Any]) -> None:
    """Start a script: Hydra on rank 0 (and without torchrun); under torchrun, ranks > 0 skip Hydra (no run
    dir, no logs of their own) and receive rank 0's composed config."""
    if distributed.is_follower():
        run_guarded(run, distributed.share_config())
    else:
        hydra_main()


def check_required(cfg: Any) -> None:
    """Every ``???`` (mandatory) value of the composed config must be given; name them and how to give them."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " ".join(f"{key}=..." for key in missing)
        raise SpecError(f"{', '.join(missing)}: required by this config but not given; add {hint}")
