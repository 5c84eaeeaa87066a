"""open_clip image and text towers (``family: open_clip``).

Weights come from an open_clip pretrained tag (through open_clip's own download/cache, i.e. the Hugging Face
cache) or from a local checkpoint file; both None means random initialisation, seeded (tests only).
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
    quiet_random_init_warning,
    random_weights_guard,
    seeded,
)

__all__ = ["OpenClipEncoder"]


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of open_clip
        return "~/.cache/huggingface/hub"


class OpenClipEncoder(Encoder):
    """One tower of an open_clip model; ``forward`` returns the (unnormalised) projected embedding ``[B, d]``.

    Args:
        model: an open_clip model name (``open_clip.list_models()``), or an ``hf-hub:``/``local-dir:`` name.
        pretrained: an open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(model)``) or None.
        checkpoint: a local checkpoint file; when given it is loaded instead of the ``pretrained`` tag.
        tower: "image" or "text".
        cache_dir: where open_clip looks for / stores downloaded weights (default: the Hugging Face cache).
        image_size: override the image tower's input size (random-init tests use tiny images).
        context_length: override the text context length.
        model_kwargs: architecture overrides passed to ``open_clip.create_model`` (e.g. a tiny ``vision_cfg``).
        seed: seed of the random initialisation when no weights are loaded.
    """

    family = "open_clip"

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        tower: str = "image",
        cache_dir: str | None = None,
        image_size: int | None = None,
        context_length: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import open_clip

        if tower not in ("image", "text"):
            raise SpecError(f"encoder.tower: expected 'image' or 'text', got {tower!r}")
        has_schema = model.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and model not in open_clip.list_models():
            raise SpecError(
                f"encoder.model: unknown open_clip model {model!r}{close_names(model, open_clip.list_models())}; "
                "list the names with `python -c 'import open_clip; print(open_clip.list_models())'`"
            )
        self.model_name, self.tower, self.modality = model, tower, tower
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if image_size is not None:
            kwargs["force_image_size"] = int(image_size)
        if context_length is not None:
            kwargs["force_context_length"] = int(context_length)
        if checkpoint:
            self.weights = "file:" + file_stamp(checkpoint, "encoder.checkpoint")
            source = os.path.expanduser(str(checkpoint))
        elif pretrained:
            tags = [] if has_schema else open_clip.list_pretrained_tags_by_model(model)
            if not has_schema and pretrained not in tags:
                raise SpecError(
                    f"encoder.pretrained: {pretrained!r} is not an open_clip tag of {model!r}; its tags are "
                    f"{tags} (or use encoder.checkpoint=/path/to/weights for a local file)"
                )
            self.weights = f"tag:{pretrained}"
            source = pretrained
            if not has_schema:
                self._check_reachable(open_clip, model, pretrained, cache_dir)
        else:
            self.weights, source = f"random(seed={seed})", None
        self._load(open_clip, model, source, cache_dir, kwargs, seed, pretrained)
        self.model.eval().requires_grad_(False)
        if tower == "text":
            try:
                self.tokenizer = open_clip.get_tokenizer(
                    model, context_length=context_length, cache_dir=cache_dir
                )
            except Exception as exc:
                raise SpecError(
                    f"encoder: cannot load the tokenizer of open_clip model {model!r}: {exc}"
                ) from None
        self.embed_dim = self._output_dim()

    def _load(self, open_clip, model, source, cache_dir, kwargs, seed, tag) -> None:
        try:
            if source is None:
                with seeded(seed), quiet_random_init_warning():
                    m, _, pre = open_clip.create_model_and_transforms(
                        model, pretrained=None, cache_dir=cache_dir, pretrained_text=False, **kwargs
                    )
            else:
                with random_weights_guard(model, "open_clip weights"):
                    m, _, pre = open_clip.create_model_and_transforms(
                        model, pretrained=source, cache_dir=cache_dir, require_pretrained=True, **kwargs
                    )
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(self._weights_message(open_clip, model, tag, source, cache_dir, exc)) from None
        self.model, self.transform = m, pre

    def _check_reachable(self, open_clip, model: str, tag: str, cache_dir: str | None) -> None:
        """Weights neither cached nor downloadable (offline, or the hub unreachable) -> error before trying."""
        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        repo = cfg.get("hf_hub", "")
        if not repo:
            return  # URL-only weights: open_clip's own download reports its failure
        parts = repo.split("/")
        repo_id = "/".join(parts[:2])
        names = (
            [parts[2]]
            if len(parts) > 2 and parts[2]
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        if in_hf_cache(repo_id, names, cache_dir):
            return
        if offline() or not hub_reachable():
            why = "hubs offline" if offline() else "the Hugging Face hub is unreachable"
            exc = RuntimeError(f"{why}, not in the cache")
            raise SpecError(self._weights_message(open_clip, model, tag, tag, cache_dir, exc))

    def _weights_message(self, open_clip, model, tag, source, cache_dir, exc) -> str:
        if source is None:
            return f"encoder: cannot build open_clip model {model!r}: {type(exc).__name__}: {exc}"
        if self.weights.startswith("file:"):
            return (
                f"encoder.checkpoint: cannot load {source} into open_clip model {model!r} "
                f"({type(exc).__name__}: {exc}); it must be an open_clip/CLIP state dict of that architecture"
            )
        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        where = []
        if cfg.get("hf_hub"):
            where.append(
                f"open_clip_model.safetensors / open_clip_pytorch_model.bin in Hugging Face repo {cfg['hf_hub'].strip('/')!r}"
            )
        if cfg.get("url"):
            where.append(f"URL {cfg['url']}")
        return (
            f"encoder: pretrained weights of open_clip model {model!r} (tag {tag!r}) could not be loaded. "
            f"Looked for: {' or '.join(where) or tag} in the cache {cache_dir or _hf_cache()}. "
            "This machine may be offline. Supply them by setting encoder.checkpoint=/path/to/weights "
            "(a local checkpoint file), or by pre-populating the cache: on a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{tag}')\"` and copy "
            f"the Hugging Face cache here (HF_HOME / HF_HUB_CACHE, or encoder.cache_dir). "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        )

    def _output_dim(self) -> int:
        with torch.inference_mode():
            if self.tower == "text":
                z = self.model.encode_text(self.tokenizer(["a"]))
            else:
                size = self.model.visual.image_size
                size = size if isinstance(size, (tuple, list)) else (size, size)
                z = self.model.encode_image(torch.zeros(1, 3, *size))
        return int(z.shape[-1])

    def preprocess(self, raw: Image.Image | str) -> torch.Tensor | str:
        if self.tower == "text":
            return str(raw)
        return self.transform(raw)  # PIL -> [3, H, W]

    def collate(self, items):
        if self.tower == "text":
            return self.tokenizer(list(items))  # [B, context_length] token ids
        return torch.stack(list(items))  # [B, 3, H, W]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.tower == "text":
            return self.model.encode_text(batch)  # [B, L] -> [B, d]
        return self.model.encode_image(batch)  # [B, 3, H, W] -> [B, d]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.model_name,
            "tower": self.tower,
            "weights": self.weights,
            "preprocess": repr(self.transform)
            if self.tower == "image"
            else repr(getattr(self.tokenizer, "context_length", None)),
        }
