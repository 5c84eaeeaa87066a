"""What the pipelines say: Python ``logging`` (Hydra writes it to the console and to the run folder's
``<command>.log``), timed phase lines, and third-party chatter kept at WARNING unless ``verbose``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NOISY", "quiet_third_party", "phase"]

#: libraries whose INFO lines (model loading, hub lookups, font caches) drown the pipeline's own
NOISY = (
    "open_clip",
    "timm",
    "urllib3",
    "huggingface_hub",
    "filelock",
    "matplotlib",
    "PIL",
    "sentence_transformers",
)


def quiet_third_party(verbose: bool = False) -> None:
    """Set the loggers of :data:`NOISY` libraries to WARNING (INFO when ``verbose``)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def phase(log: logging.Logger, what: str) -> Iterator[None]:
    """Log ``what ...`` when a phase starts and ``what: 1.2 s`` when it ends (a silent step gets a line)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)
