"""Alignment of one encoder's cluster structure to another's: :class:`SpecAlignLoss`."""

from ...loss import SpecAlignLoss

__all__ = ["SpecAlignLoss"]
