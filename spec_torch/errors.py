"""The one error class of spec_torch."""

from __future__ import annotations

__all__ = ["SpecError"]


class SpecError(ValueError):
    """Bad input to a spec_torch entry point.

    The message names the argument and what was expected, e.g.
    ``x: expected a 2-D array [N, D], got shape (5,)``.
    """
