"""The encoder interface of the compare pipeline, and the weight-loading guards every family shares.

An :class:`Encoder` is an ``nn.Module`` that turns raw samples into embeddings in three steps, so that the
first two can run in DataLoader workers:

>>> enc = build_encoder("offline_colour")  # doctest: +SKIP
>>> batch = enc.collate([enc.preprocess(img) for img in images])  # [B, 3, H, W]  # doctest: +SKIP
>>> z = enc(batch)  # [B, enc.embed_dim]  # doctest: +SKIP

``enc.cache_key()`` hashes everything that changes the embeddings (family, model, weights, preprocessing),
so the feature cache is keyed by it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import SpecError

__all__ = [
    "Encoder",
    "move_to",
    "offline",
    "file_stamp",
    "seeded",
    "random_weights_guard",
    "quiet_random_init_warning",
    "close_names",
]


class Encoder(nn.Module):
    """Base class. Subclasses set ``family``, ``modality``, ``embed_dim`` and implement the three steps."""

    family: str = "encoder"
    modality: str = "image"  # "image" | "text"
    embed_dim: int = 0
    #: False for encoders whose arithmetic should stay float32 under CUDA autocast
    autocast_ok: bool = True

    def preprocess(self, raw: Any) -> Any:
        """One raw sample (``PIL.Image`` RGB or ``str``) -> model input (a ``[3, H, W]`` tensor or the text)."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> Any:
        """Preprocessed samples -> one batch (default: ``torch.stack`` -> ``[B, ...]``)."""
        return torch.stack(list(items))

    def forward(self, batch: Any) -> torch.Tensor:  # noqa: D102 - documented in the class docstring
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description: family, model, weights, preprocessing, embed_dim."""
        return {"family": self.family, "modality": self.modality, "embed_dim": self.embed_dim}

    def cache_key(self) -> str:
        """Hex hash of :meth:`describe`: the same key means the same embeddings."""
        text = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def extra_repr(self) -> str:
        return f"family={self.family!r}, modality={self.modality!r}, embed_dim={self.embed_dim}"


def move_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a tensor, or a dict/list/tuple of tensors) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def offline() -> bool:
    """True when the hubs are switched off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``SPEC_TORCH_OFFLINE``)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPEC_TORCH_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


_REACHABLE: dict[str, bool] = {}


def hub_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hugging Face hub (or ``url``'s host) be opened within ``timeout`` s?

    Checked once per host and process, so that a machine without internet fails at once instead of
    waiting through the hub client's retries (about a minute per file).
    """
    import socket
    from urllib.parse import urlparse

    if url is None:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    if host not in _REACHABLE:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def in_hf_cache(repo: str, filenames: Sequence[str], cache_dir: str | None = None) -> bool:
    """True when one of ``filenames`` of Hugging Face repo ``repo`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    repo = repo.strip("/").split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in filenames)


def file_stamp(path: str | os.PathLike, name: str) -> str:
    """``path`` resolved, with size and modification time: identifies a local weights file in cache keys."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise SpecError(f"{name}: no such weights file: {p}")
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded (random initialisation that is the same every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class _Trap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_RANDOM_WORDS = ("random", "initialized partially", "initialised partially", "no pretrained weights")


@contextlib.contextmanager
def random_weights_guard(model: str, what: str, loggers: Sequence[str] = ("", "timm")) -> Iterator[None]:
    """Turn a library's "continuing with random weights" log warning into a :class:`SpecError`.

    Use around model creation whenever pretrained weights were asked for.
    """
    trap = _Trap()
    targets = [logging.getLogger(n) for n in loggers]
    for lg in targets:
        lg.addHandler(trap)
    try:
        yield
    finally:
        for lg in targets:
            lg.removeHandler(trap)
    bad = [m for m in trap.messages if any(w in m.lower() for w in _RANDOM_WORDS)]
    if bad:
        raise SpecError(
            f"encoder.model: {what} for {model!r} were asked for, but the library fell back to random "
            f"weights ({bad[0]!r}); refusing to continue with random weights"
        )


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init_warning() -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning where random weights are what was asked for."""
    flt = _DropRandomInit()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def close_names(name: str, candidates: Sequence[str], n: int = 5) -> str:
    """``" (did you mean: a, b?)"`` for the closest ``candidates``, or ``""``."""
    near = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""
