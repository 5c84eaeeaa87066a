"""What the pipelines say: Python ``logging`` (Hydra writes it to the console and to the run folder's
``<command>.log``), timed phase lines, and third-party chatter kept at WARNING unless ``verbose``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NOISY", "OwnInfoOnly", "quiet_third_party", "phase"]

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


class OwnInfoOnly(logging.Filter):
    """Pass every record at WARNING or above, and below it only spec_torch's own (loggers ``spec_torch.*``).

    A handler filter, so it holds for libraries that log through the root logger (open_clip calls
    ``logging.info``) and for loggers not in :data:`NOISY`, while handlers added for other purposes (the
    random-weights trap of ``spec_torch.apps.encoders.base``) still see every record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "spec_torch" or record.name.startswith("spec_torch.")
        return own or record.levelno >= logging.WARNING


def quiet_third_party(verbose: bool = False) -> None:
    """Set the loggers of :data:`NOISY` libraries to WARNING (INFO when ``verbose``); unless ``verbose``, the root
    logger's handlers (Hydra's console and ``<command>.log``) pass only spec_torch's records below WARNING
    (:class:`OwnInfoOnly`)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        for flt in [f for f in handler.filters if isinstance(f, OwnInfoOnly)]:
            handler.removeFilter(flt)
        if not verbose:
            handler.addFilter(OwnInfoOnly())


@contextmanager
def phase(log: logging.Logger, what: str) -> Iterator[None]:
    """Log ``what ...`` when a phase starts and ``what: 1.2 s`` when it ends (a silent step gets a line)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)
