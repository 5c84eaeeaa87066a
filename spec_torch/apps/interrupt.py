"""What a Ctrl-C says: one line telling how far the run got, by phase, instead of a KeyboardInterrupt traceback.

A phase that can be resumed registers a note for its duration (:func:`interrupt_note`); :func:`cli.run_guarded`
prints the innermost note when the run is interrupted, and exits with status 130 (128 + SIGINT)::

    with interrupt_note(lambda: f"interrupted; a rerun resumes from row {state['rows_done']}"):
        ...  # the extraction loop

Without a note (e.g. during the solve) the line is ``interrupted``. The note is a function, evaluated when the
interrupt arrives, so it tells the position the run had actually saved then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["INTERRUPTED_STATUS", "interrupt_note", "interrupted_message"]

#: exit status of an interrupted command (128 + SIGINT, as a shell reports it)
INTERRUPTED_STATUS = 130

_NOTES: list[Callable[[], str]] = []
#: attribute of a KeyboardInterrupt holding the note of the innermost phase it left (the phase is gone by the
#: time the interrupt is reported; kept on the exception, so one handled elsewhere leaves nothing behind)
_ATTRIBUTE = "spec_torch_note"


@contextmanager
def interrupt_note(note: Callable[[], str]) -> Iterator[None]:
    """While the block runs, a Ctrl-C is reported as ``note()`` (the innermost note wins)."""
    _NOTES.append(note)
    try:
        yield
    except KeyboardInterrupt as exc:
        if not hasattr(exc, _ATTRIBUTE):  # evaluated when the interrupt leaves the innermost phase
            setattr(exc, _ATTRIBUTE, _evaluate(note))
        raise
    finally:
        _NOTES.remove(note)


def _evaluate(note: Callable[[], str]) -> str:
    try:
        return " ".join(str(note()).split())
    except Exception:  # a note must never turn the interrupt into a traceback
        return "interrupted"


def interrupted_message(exc: BaseException | None = None) -> str:
    """The line to print for the Ctrl-C ``exc``: the note of the innermost phase it interrupted, or
    ``interrupted``."""
    note = getattr(exc, _ATTRIBUTE, None)
    if note is not None:
        return note
    return _evaluate(_NOTES[-1]) if _NOTES else "interrupted"
