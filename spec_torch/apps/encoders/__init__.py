"""Encoders for the compare pipeline: one factory, one class per family.

>>> from spec_torch.apps.encoders import build_encoder
>>> enc = build_encoder("offline_colour")
>>> enc.modality, enc.embed_dim
('image', 36)

Families: ``open_clip``, ``timm``, ``torchvision``, ``minilm`` (real models; pretrained weights fail fast with a
message saying how to supply them) and ``offline_colour`` / ``offline_shape`` (weight-free, for the demo).
"""

from __future__ import annotations

import inspect
from typing import Any

from ...errors import SpecError
from .base import Encoder, move_to
from .minilm import MiniLMEncoder
from .offline import ColourHistogramEncoder, EdgeOrientationEncoder
from .openclip import OpenClipEncoder
from .timm_encoder import TimmEncoder
from .torchvision_encoder import TorchvisionEncoder

__all__ = [
    "build_encoder",
    "Encoder",
    "move_to",
    "OpenClipEncoder",
    "TimmEncoder",
    "TorchvisionEncoder",
    "MiniLMEncoder",
    "ColourHistogramEncoder",
    "EdgeOrientationEncoder",
    "ENCODERS",
]

#: family -> encoder class; ``build_encoder(family, **kwargs)`` calls ``ENCODERS[family](**kwargs)``
ENCODERS: dict[str, type[Encoder]] = {
    "open_clip": OpenClipEncoder,
    "timm": TimmEncoder,
    "torchvision": TorchvisionEncoder,
    "minilm": MiniLMEncoder,
    "offline_colour": ColourHistogramEncoder,
    "offline_shape": EdgeOrientationEncoder,
}


def build_encoder(family: str, **kwargs: Any) -> Encoder:
    """Encoder of ``family`` (one of :data:`ENCODERS`) with the settings of its Hydra ``encoder`` config.

    Raises :class:`SpecError` for an unknown family, setting or model name, and when requested pretrained
    weights cannot be loaded (never falls back to random weights).
    """
    if family not in ENCODERS:
        raise SpecError(
            f"encoder.family: unknown encoder family {family!r}; expected one of {sorted(ENCODERS)}"
        )
    cls = ENCODERS[family]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise SpecError(f"encoder: unknown setting(s) {unknown} for the {family} family; it takes {params}")
    return cls(**kwargs)
