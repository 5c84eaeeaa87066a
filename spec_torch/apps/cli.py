"""What the Hydra entry points in ``scripts/`` share: one-line errors and the torchrun follower path."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..errors import SpecError
from . import sharding as distributed

__all__ = ["run_guarded", "launch", "check_required"]


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
