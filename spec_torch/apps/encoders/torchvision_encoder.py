"""torchvision classifiers as feature extractors (``family: torchvision``): the input of the last linear layer.

Weights are a torchvision weights enum name (``IMAGENET1K_V2``, ``DEFAULT`` or ``ResNet50_Weights.IMAGENET1K_V2``)
loaded through torch.hub's cache, or a local state-dict file.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ...errors import SpecError
from .base import Encoder, close_names, file_stamp, hub_reachable, offline, seeded

__all__ = ["TorchvisionEncoder"]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _resolve_weights(model: str, weights: str):
    import torchvision.models as tvm

    enum = tvm.get_model_weights(model)
    name = weights.split(".", 1)[1] if "." in weights else weights
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise SpecError(
            f"encoder.weights: {weights!r} is not a weights name of torchvision model {model!r}; "
            f"expected one of {['DEFAULT', *(m for m in enum.__members__ if m != 'DEFAULT')]} (or null for random init)"
        ) from None


def _strip_classifier(net: nn.Module, model: str) -> int:
    """Replace the last ``nn.Linear`` of ``net`` by ``nn.Identity``; return its input width (the feature dim)."""
    last = None
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise SpecError(
            f"encoder.model: torchvision model {model!r} has no final linear classifier to remove"
        )
    name, mod = last
    parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return int(mod.in_features)


class TorchvisionEncoder(Encoder):
    """A torchvision classifier with its last linear layer removed: ``[B, 3, H, W] -> [B, d]``.

    Args:
        model: a torchvision classification model name (``torchvision.models.list_models()``).
        weights: a weights enum name, or None for random initialisation.
        checkpoint: a local state-dict file of the full classifier (used instead of ``weights``).
        image_size: centre-crop size (default: the weights' own transform, else 224).
        seed: seed of the random initialisation when no weights are loaded.
    """

    family = "torchvision"
    modality = "image"

    def __init__(
        self,
        model: str,
        weights: str | None = None,
        checkpoint: str | None = None,
        image_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        if model not in names:
            raise SpecError(
                f"encoder.model: unknown torchvision classifier {model!r}{close_names(model, names)}; list them "
                "with `python -c 'import torchvision; print(torchvision.models.list_models())'`"
            )
        self.model_name = model
        w = _resolve_weights(model, weights) if weights and not checkpoint else None
        if checkpoint:
            self.weights = "file:" + file_stamp(checkpoint, "encoder.checkpoint")
            with seeded(seed):
                net = tvm.get_model(model, weights=None)
            try:
                state = torch.load(os.path.expanduser(str(checkpoint)), map_location="cpu", weights_only=True)
                net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except Exception as exc:
                raise SpecError(
                    f"encoder.checkpoint: cannot load {checkpoint} into torchvision model {model!r} "
                    f"({type(exc).__name__}: {str(exc)[:300]})"
                ) from None
        elif w is not None:
            self.weights = str(w)
            net = self._load_pretrained(tvm, model, w)
        else:
            self.weights = f"random(seed={seed})"
            with seeded(seed):
                net = tvm.get_model(model, weights=None)
        self.embed_dim = _strip_classifier(net, model)
        self.model = net.eval().requires_grad_(False)
        if w is not None and image_size is None:
            self.transform = w.transforms()
        else:
            size = int(image_size or 224)
            self.transform = T.Compose(
                [
                    T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BILINEAR),
                    T.CenterCrop(size),
                    T.ToTensor(),
                    T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
                ]
            )

    @staticmethod
    def _load_pretrained(tvm, model: str, w) -> nn.Module:
        file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        how = (
            f"Supply them by setting encoder.checkpoint=/path/to/file.pth, or by copying the file to {file} "
            f"(download it from {w.url} on a machine with internet; TORCH_HOME moves the cache)."
        )
        if not os.path.isfile(file) and (offline() or not hub_reachable(w.url)):
            raise SpecError(
                f"encoder: torchvision weights {w} of {model!r} are not in the cache ({file}) and cannot be "
                f"downloaded (hubs offline or {w.url} unreachable). {how}"
            )
        try:
            return tvm.get_model(model, weights=w)
        except Exception as exc:
            raise SpecError(
                f"encoder: torchvision weights {w} of {model!r} could not be loaded from {file} or {w.url}. "
                f"This machine may be offline. {how} ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        return self.transform(raw)  # PIL -> [3, H, W]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)  # [B, 3, H, W] -> [B, d]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.model_name,
            "weights": self.weights,
            "preprocess": repr(self.transform),
        }
