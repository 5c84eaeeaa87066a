"""The data side of alignment fine-tuning: samples with texts, teacher features looked up by sample id, a
deterministic train / held-out split, and a resumable (and shardable) batch sampler.

The one invariant: row ``i`` of a batch's student images and row ``i`` of its teacher features describe the
same sample. Batches carry their samples' ids, and :meth:`TeacherFeatures.lookup` reads the cached teacher
rows *by those ids*, so shuffling, sharding or dropping samples can never pair two different samples.

>>> from spec_torch.apps.data import build_dataset
>>> ds = build_dataset("synthetic", n=12, seed=0)
>>> texts = sample_texts(ds)
>>> texts.kind, len(texts.options(0)) >= 1
('prompts', True)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ...errors import SpecError
from ..data.base import SampleDataset
from ..extract import FeatureCache

__all__ = [
    "SampleTexts",
    "sample_texts",
    "TeacherFeatures",
    "split_rows",
    "AlignSamples",
    "ResumableBatchSampler",
    "collate_align",
]

#: the training prompt of class-labelled images (ImageNet, the synthetic demo)
TRAIN_TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------------------------------------ texts
@dataclass
class SampleTexts:
    """The texts paired with each image of a dataset.

    Attributes:
        kind: ``"captions"`` (several free captions per image, MS-COCO) or ``"prompts"`` (one class prompt
            per image; images of a class share it).
        texts: per dataset position, the texts to choose from (never empty).
        classes: per dataset position, the class name (``"prompts"`` only), else None.
    """

    kind: str
    texts: list[list[str]]
    classes: list[str] | None = None

    def options(self, i: int) -> list[str]:
        return self.texts[i]

    def pick(self, i: int, epoch: int, seed: int) -> str:
        """The text of sample ``i`` in ``epoch``: a caption that changes with the epoch, fixed by the seed."""
        opts = self.texts[i]
        if len(opts) == 1:
            return opts[0]
        return opts[random.Random(f"{seed}:{epoch}:{i}").randrange(len(opts))]


def sample_texts(dataset: SampleDataset) -> SampleTexts:
    """Texts for every image of ``dataset``: MS-COCO captions, ImageNet class prompts, synthetic prompts.

    Raises:
        SpecError: a dataset without captions or class labels (an image folder without labels).
    """
    from ..data import CocoDataset, ImageFolderDataset, SyntheticShapes

    if isinstance(dataset, CocoDataset):
        from ..data import build_dataset

        captions = build_dataset(
            "mscoco", annotations=str(dataset.annotations), modality="text", captions_per_image=None
        )
        by_image: dict[int, list[str]] = {}
        for k, img in enumerate(captions.image_ids):
            by_image.setdefault(img, []).append(captions[k])
        return SampleTexts("captions", [by_image[img] for img in dataset.image_ids])
    if isinstance(dataset, SyntheticShapes):
        attrs = dataset.attributes
        classes = [f"{c} {s}" for c, s in zip(attrs["colour"], attrs["shape"])]
    elif isinstance(dataset, ImageFolderDataset) and dataset.labels is not None:
        classes = list(dataset.labels)
    else:
        raise SpecError(
            f"data: the {dataset.name} dataset has neither captions nor class labels, so there is no text "
            "for the contrastive term; use data=mscoco or data=imagenet, or set loss.w_clip=0"
        )
    return SampleTexts("prompts", [[TRAIN_TEMPLATE.format(c)] for c in classes], classes)


def class_labels(dataset: SampleDataset, attribute: str | None = None) -> list[str] | None:
    """A class label per sample for kNN accuracy: a planted ``attribute`` if given, else ``dataset.labels``."""
    if attribute:
        attrs = dataset.attributes or {}
        if attribute not in attrs:
            raise SpecError(
                f"eval.label_attribute: the {dataset.name} dataset has no attribute {attribute!r}; "
                f"it has {sorted(attrs) or 'none'}"
            )
        return list(attrs[attribute])
    return dataset.labels


# --------------------------------------------------------------------------------------- teacher rows
class TeacherFeatures:
    """Cached teacher features addressed by sample id (never by position in a batch or a loader).

    Args:
        cache: the finished feature cache of the teacher on the training dataset.

    Example:
        >>> teacher = TeacherFeatures(cache)  # doctest: +SKIP
        >>> t = teacher.lookup(batch["ids"])  # [B, dt], row i = sample batch["ids"][i]  # doctest: +SKIP
    """

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.row_of = {sid: r for r, sid in enumerate(cache.ids)}

    @property
    def dim(self) -> int:
        return self.cache.dim

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.row_of

    def lookup(self, ids: Sequence[str]) -> torch.Tensor:
        """``[B, dt]`` float32 teacher features of the samples ``ids``, in that order."""
        missing = [s for s in ids if s not in self.row_of]
        if missing:
            raise SpecError(
                f"ids: {len(missing)} sample(s) have no cached teacher features, e.g. {missing[:3]}; the "
                "teacher cache was extracted for other samples"
            )
        rows = np.fromiter((self.row_of[s] for s in ids), dtype=np.int64, count=len(ids))
        return torch.from_numpy(np.asarray(self.cache.features[rows], dtype=np.float32))  # [B, dt]


def split_rows(n: int, heldout: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of positions ``0..n-1`` into (train, held-out), both sorted.

    Args:
        heldout: a count (int >= 1) or a fraction in (0, 1) of the samples held out.
    """
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)):
        raise SpecError(f"heldout: expected a count or a fraction in (0, 1), got {heldout!r}")
    m = int(round(heldout * n)) if isinstance(heldout, float) and heldout < 1 else int(heldout)
    if not 2 <= m <= n - 2:
        raise SpecError(
            f"heldout: expected between 2 and {n - 2} held-out samples of {n}, got {m} (from {heldout!r})"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


# ---------------------------------------------------------------------------------------------- samples
class AlignSamples(Dataset):
    """Student inputs of the samples at dataset positions ``positions``.

    ``ds[(k, epoch)]`` -> ``{"id", "index", "image" [3, H, W], "text"}`` for the ``k``-th position; the text is
    chosen with the epoch (a different caption each epoch, deterministic). Preprocessing is the student's own
    deterministic transform: no random augmentation, so the cached teacher features stay valid.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        positions: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        texts: SampleTexts | None,
        seed: int = 0,
    ):
        self.dataset, self.transform, self.texts, self.seed = dataset, transform, texts, seed
        self.positions = [int(p) for p in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        k, epoch = key if isinstance(key, tuple) else (key, 0)
        i = self.positions[k]
        text = self.texts.pick(i, epoch, self.seed) if self.texts is not None else ""
        return {
            "id": self.dataset.sample_id(i),
            "index": i,
            "image": self.transform(self.dataset[i]),
            "text": text,
        }


def collate_align(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"ids": [B], "index": LongTensor [B], "images": [B, 3, H, W], "texts": [B]}``."""
    return {
        "ids": [it["id"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "images": torch.stack([it["image"] for it in items]),
        "texts": [it["text"] for it in items],
    }


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches, an epoch at a time, that can start at any (epoch, batch) position.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a resumed run replays
    exactly the batches an uninterrupted run would have seen. Each item is ``(k, epoch)`` (see
    :class:`AlignSamples`). Incomplete last batches are dropped (SpecAlignLoss and the contrastive loss want
    full batches).

    Sharding hook for DDP: with ``world_size > 1`` every rank draws the same permutation and takes every
    ``world_size``-th sample of each global batch of ``batch_size * world_size`` samples (``batch_size`` is
    per rank); the number of batches per epoch is the same on every rank.

    Args:
        n: number of samples.
        batch_size: samples per batch (per rank).
        seed: seed of the shuffles.
        shuffle: False keeps the dataset order (evaluation, tests).
        rank, world_size: this process's shard.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise SpecError(f"batch_size: expected an integer >= 2, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise SpecError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
        if n < batch_size * world_size:
            raise SpecError(
                f"batch_size: {batch_size} x {world_size} rank(s) is more than the {n} training samples"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, batch: int) -> None:
        """The next iteration starts at batch ``batch`` of epoch ``epoch`` (then runs to the epoch's end)."""
        if not 0 <= batch <= self.batches_per_epoch:
            raise SpecError(f"batch: expected 0..{self.batches_per_epoch}, got {batch}")
        self.epoch, self.start_batch = int(epoch), int(batch)

    def order(self, epoch: int) -> np.ndarray:
        """``[n]`` the sample order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, g = self.order(self.epoch), self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = order[b * g : (b + 1) * g][self.rank :: self.world_size]  # [batch_size] this rank's share
            yield [(int(k), self.epoch) for k in chunk]
