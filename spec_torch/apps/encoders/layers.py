"""Intermediate layers of any encoder in one forward pass: :class:`LayerEncoder`.

A :class:`LayerEncoder` wraps a built encoder and puts forward hooks on named submodules; one forward pass of
the wrapped encoder gives every hooked layer, each pooled to ``[B, d_l]``, and ``forward`` returns their
concatenation ``[B, sum_l d_l]``. So the existing feature cache (``extract_features``) stores all layers of one
encoder in one extraction pass, keyed by the encoder, the layers and the pooling (all in :meth:`describe`), and
:func:`split_layers` cuts the cached matrix into one ``[n, d_l]`` array per layer, named
``"<prefix>/<layer>"``.

Layer names are module paths inside the wrapped encoder's network (``encoder.model``), as
``dict(model.named_modules())`` lists them, or ``"output"`` for the encoder's own final embedding. Per family:

- timm ViTs: ``blocks.0`` ... ``blocks.{depth-1}`` (tokens ``[B, T, d]``); CNNs: ``layer1`` ... / ``stages.0`` ...
  (maps ``[B, C, H, W]``).
- open_clip: image tower ``visual.transformer.resblocks.{i}``, text tower ``transformer.resblocks.{i}``
  (tokens; batch-first in open_clip >= 2.24, sequence-first ``[T, B, d]`` before: both are recognised).
- torchvision: the module names of ``torchvision.models.feature_extraction.get_graph_node_names`` that are
  modules, e.g. ``layer1`` ... ``layer4`` of a ResNet, ``features.3`` of a VGG/ConvNeXt.

:func:`default_layers` lists the repeated blocks of a network (``blocks.*``, ``resblocks.*``, ``layer*``).

Pooling (``pooling=``): ``"mean"`` (mean over tokens; global average over H, W for maps), ``"cls"`` (the first
token; maps refuse it), or ``"own"`` (the model's own choice: timm's ``global_pool`` ``"token"`` -> cls, else
mean; open_clip image tower -> cls; open_clip text tower -> the end-of-text token, as open_clip pools; maps ->
mean). The text tower's ``"mean"`` averages every position of the context, padding included. 2-D outputs ``[B, d]`` are used as
they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import SpecError
from .base import Encoder

__all__ = ["LayerEncoder", "build_layer_encoder", "split_layers", "default_layers", "POOLINGS"]

POOLINGS = ("mean", "cls", "own")


def _network(encoder: Encoder) -> torch.nn.Module:
    net = getattr(encoder, "model", None)
    return net if isinstance(net, torch.nn.Module) else encoder


def default_layers(encoder: Encoder) -> list[str]:
    """The repeated blocks of the encoder's network: ``blocks.{i}`` / ``resblocks.{i}`` (of the encoder's tower)
    / ``layer{k}`` / ``stages.{i}``, in forward order, plus ``"output"``."""
    net = _network(encoder)
    names = [n for n, _ in net.named_modules()]
    tower = "transformer." if getattr(encoder, "tower", "image") == "text" else "visual."
    picked = []
    for n in names:
        if getattr(encoder, "family", "") == "open_clip" and not n.startswith(tower):
            continue
        if re.search(r"(?:^|\.)(?:blocks|resblocks|stages)\.\d+$", n) or re.fullmatch(r"layer\d+", n):
            picked.append(n)
    return picked + ["output"]


class LayerEncoder(Encoder):
    """Pooled outputs of named submodules of ``base``, concatenated: ``[B, ...] -> [B, sum_l d_l]``.

    Args:
        base: a built encoder (any family).
        layers: module paths in ``base.model`` (module docstring) and/or ``"output"``; default
            :func:`default_layers`.
        pooling: ``"mean"``, ``"cls"`` or ``"own"`` (module docstring).

    Attributes:
        layer_dims: ``{layer: d_l}`` in order; ``embed_dim = sum(layer_dims.values())``.
    """

    def __init__(self, base: Encoder, layers: Sequence[str] | None = None, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise SpecError(f"encoder.pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.base, self.pooling = base, pooling
        self.family, self.modality = base.family, base.modality
        self.autocast_ok = base.autocast_ok
        net = _network(base)
        modules = dict(net.named_modules())
        layers = list(layers) if layers else default_layers(base)
        if len(set(layers)) != len(layers):
            raise SpecError(f"encoder.layers: duplicated names in {layers}")
        for name in layers:
            if name != "output" and name not in modules:
                close = [m for m in modules if m and (name in m or m in name)][:8]
                raise SpecError(
                    f"encoder.layers: {name!r} is not a module of {type(net).__name__}; similar: {close or 'none'} "
                    "(list them with dict(encoder.model.named_modules()))"
                )
        self.layers = layers
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in layers if name != "output"
        ]
        self.layer_dims = self._probe_dims()
        self.embed_dim = sum(self.layer_dims.values())

    def _hook(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._captured[name] = out

        return hook

    def _own(self) -> str:
        net = _network(self.base)
        if self.base.family == "open_clip":
            return "cls" if self.base.modality == "image" else "eot"
        return "cls" if getattr(net, "global_pool", "avg") == "token" else "mean"

    def _pool(self, name: str, out: torch.Tensor, batch: int) -> torch.Tensor:
        how = self._own() if self.pooling == "own" else self.pooling
        if out.dim() == 2:
            return out  # [B, d]
        if out.dim() == 3:  # tokens
            if out.shape[0] != batch and out.shape[1] == batch:
                out = out.transpose(0, 1)  # sequence-first [T, B, d] -> [B, T, d]
            if how == "eot":  # open_clip text: the end-of-text token has the largest id in each row
                return out[torch.arange(batch, device=out.device), self._tokens.argmax(-1)]
            return out[:, 0] if how == "cls" else out.mean(1)  # [B, T, d] -> [B, d]
        if out.dim() == 4:  # maps [B, C, H, W] (timm/torchvision CNNs are channels-first)
            if how == "cls":
                raise SpecError(
                    f"encoder.pooling: 'cls' needs tokens, but layer {name!r} gives maps {tuple(out.shape)}"
                )
            return out.mean((2, 3))  # [B, C]
        raise SpecError(
            f"encoder.layers: layer {name!r} gives shape {tuple(out.shape)}; expected 2-D, 3-D or 4-D"
        )

    def _probe_dims(self) -> dict[str, int]:
        raw: Any = "a photo" if self.modality == "text" else Image.fromarray(np.zeros((64, 64, 3), np.uint8))
        with torch.inference_mode():
            out = self.forward(self.collate([self.preprocess(raw)]), split=True)
        return {k: int(v.shape[1]) for k, v in out.items()}

    def preprocess(self, raw: Any) -> Any:
        return self.base.preprocess(raw)

    def collate(self, items: Sequence[Any]) -> Any:
        return self.base.collate(items)

    def forward(self, batch: Any, split: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[B, ...] -> [B, sum_l d_l]`` (or ``{layer: [B, d_l]}`` with ``split=True``)."""
        self._captured = {}
        self._tokens = batch if self.modality == "text" else None  # [B, T] token ids, for the "eot" pooling
        final = self.base(batch)  # [B, d]; the hooks fill self._captured during this one pass
        b = final.shape[0]
        out = {}
        for name in self.layers:
            z = final if name == "output" else self._pool(name, self._captured[name], b)
            out[name] = z.float() if z.dtype == torch.float64 else z
        self._captured = {}
        return out if split else torch.cat(list(out.values()), dim=1)

    def describe(self) -> dict[str, Any]:
        return {
            **self.base.describe(),
            "layers": list(self.layers),
            "pooling": self.pooling,
            "embed_dim": self.embed_dim,
        }


def split_layers(features: Any, layer_dims: dict[str, int], prefix: str = "") -> dict[str, Any]:
    """Cut ``[n, sum_l d_l]`` (a tensor, array or memmap) into ``{"<prefix>/<layer>": [n, d_l]}``, in order."""
    total = sum(layer_dims.values())
    if features.shape[-1] != total:
        raise SpecError(f"features: expected {total} columns (layers {layer_dims}), got {features.shape[-1]}")
    out, start = {}, 0
    for name, d in layer_dims.items():
        out[f"{prefix}/{name}" if prefix else name] = features[:, start : start + d]
        start += d
    return out


def build_layer_encoder(family: str, layers: Any = None, pooling: str = "mean", **kwargs: Any) -> Encoder:
    """``build_encoder(family, **kwargs)``, wrapped in a :class:`LayerEncoder` when ``layers`` is given
    (a list of names, or ``"all"`` for :func:`default_layers`); without ``layers`` the plain encoder."""
    from . import build_encoder

    base = build_encoder(family, **kwargs)
    if layers is None:
        return base
    if layers == "all":
        return LayerEncoder(base, None, pooling)
    if isinstance(layers, str) or not all(isinstance(x, str) for x in layers):
        raise SpecError(f"encoder.layers: expected a list of module names or 'all', got {layers!r}")
    return LayerEncoder(base, list(layers), pooling)
