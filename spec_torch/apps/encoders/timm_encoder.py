"""timm image models, DINOv2 included (``family: timm``); pooled pre-logits features (``num_classes=0``).

Weights come from timm's own pretrained mechanism (the Hugging Face cache) or from a local checkpoint file.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ...errors import SpecError
from .base import (
    Encoder,
    close_names,
    file_stamp,
    hub_reachable,
    in_hf_cache,
    offline,
    random_weights_guard,
    seeded,
)

__all__ = ["TimmEncoder"]


def _create(timm, model: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model``; ``img_size`` is dropped for models that do not take it (CNNs: any size works)."""
    try:
        return timm.create_model(model, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc) or "img_size" not in kwargs:
            raise
        kwargs.pop("img_size")
        return timm.create_model(model, **kwargs)


def _in_hf_cache(cfg) -> bool:
    """True when a weights file of timm pretrained config ``cfg`` is in the local Hugging Face cache."""
    if not cfg.hf_hub_id:
        return False
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return in_hf_cache(cfg.hf_hub_id, names)


class TimmEncoder(Encoder):
    """``timm.create_model(model, pretrained=..., num_classes=0)``: ``[B, 3, H, W] -> [B, d]``.

    Args:
        model: a timm model name, optionally with its pretrained tag (``vit_base_patch14_dinov2.lvd142m``).
        pretrained: load timm's pretrained weights for ``model`` (never silently random).
        checkpoint: a local weights file, loaded through timm (``pretrained_cfg_overlay=dict(file=...)``);
            when given it is used instead of downloading.
        img_size: override the input size (ViTs resize their position embeddings; tests use tiny images).
        model_kwargs: more keyword arguments for ``timm.create_model`` (e.g. ``depth=2`` for tests).
        seed: seed of the random initialisation when no weights are loaded.
    """

    family = "timm"
    modality = "image"

    def __init__(
        self,
        model: str,
        pretrained: bool = False,
        checkpoint: str | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import timm
        from timm.data import create_transform, resolve_data_config

        if not timm.is_model(model):
            base = model.split(".")[0]
            raise SpecError(
                f"encoder.model: unknown timm model {model!r}{close_names(base, timm.list_models())}; "
                f"list the names with `python -c \"import timm; print(timm.list_models('*{base[:8]}*', pretrained=True))\"`"
            )
        self.model_name = model
        kwargs: dict[str, Any] = {"num_classes": 0, **(model_kwargs or {})}
        if img_size is not None:
            kwargs["img_size"] = int(img_size)
        try:
            if checkpoint:
                self.weights = "file:" + file_stamp(checkpoint, "encoder.checkpoint")
                overlay = {"file": os.path.expanduser(str(checkpoint))}
                with random_weights_guard(model, "checkpoint weights"):
                    net = _create(timm, model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            elif pretrained:
                self.weights = f"pretrained:{model}"
                self._check_has_weights(timm, model)
                with random_weights_guard(model, "timm pretrained weights"):
                    net = _create(timm, model, pretrained=True, **kwargs)
            else:
                self.weights = f"random(seed={seed})"
                with seeded(seed):
                    net = _create(timm, model, pretrained=False, **kwargs)
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(self._weights_message(timm, model, checkpoint, pretrained, exc)) from None
        self.model = net.eval().requires_grad_(False)
        data_cfg = resolve_data_config({}, model=net)
        if img_size is not None:
            data_cfg["input_size"] = (3, int(img_size), int(img_size))
        self.data_cfg = data_cfg
        self.transform = create_transform(**data_cfg, is_training=False)
        self.embed_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)

    def _check_has_weights(self, timm, model: str) -> None:
        """No weights defined -> error; offline and not in the Hugging Face cache -> error before any download."""
        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            tags = timm.list_pretrained(f"{model.split('.')[0]}*")
            raise SpecError(
                f"encoder.pretrained: timm model {model!r} has no pretrained weights; pretrained variants: "
                f"{tags[:10] or 'none'} (or give encoder.checkpoint=/path/to/weights)"
            )
        if cfg.file or _in_hf_cache(cfg):
            return
        if cfg.hf_hub_id and (offline() or not hub_reachable()):
            why = "hubs offline" if offline() else "the Hugging Face hub is unreachable"
            raise SpecError(
                self._weights_message(timm, model, None, True, RuntimeError(f"{why}, not in the cache"))
            )

    @staticmethod
    def _weights_message(timm, model, checkpoint, pretrained, exc) -> str:
        if checkpoint:
            return (
                f"encoder.checkpoint: cannot load {checkpoint} into timm model {model!r} "
                f"({type(exc).__name__}: {str(exc)[:300]}); it must be a state dict of that architecture"
            )
        if not pretrained:
            return f"encoder: cannot build timm model {model!r}: {type(exc).__name__}: {exc}"
        cfg = timm.models.get_pretrained_cfg(model)
        where = []
        if cfg is not None and cfg.hf_hub_id:
            where.append(f"model.safetensors / pytorch_model.bin in Hugging Face repo {cfg.hf_hub_id!r}")
        if cfg is not None and cfg.url:
            where.append(f"URL {cfg.url}")
        try:
            from huggingface_hub import constants

            cache = str(constants.HF_HUB_CACHE)
        except Exception:  # pragma: no cover
            cache = "the Hugging Face cache"
        return (
            f"encoder: pretrained weights of timm model {model!r} could not be loaded. Looked for: "
            f"{' or '.join(where) or model} in {cache}. This machine may be offline. Supply them by setting "
            "encoder.checkpoint=/path/to/weights (a local file), or pre-populate the cache: on a machine with "
            f"internet run `python -c \"import timm; timm.create_model('{model}', pretrained=True)\"` and copy the "
            f"Hugging Face cache here (HF_HOME / HF_HUB_CACHE). ({type(exc).__name__}: {str(exc)[:300]})"
        )

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        return self.transform(raw)  # PIL -> [3, H, W]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)  # [B, 3, H, W] -> [B, d] (pooled, pre-logits)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.model_name,
            "weights": self.weights,
            "preprocess": repr(self.transform),
        }
