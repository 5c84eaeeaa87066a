"""Datasets of raw samples for the compare pipeline, and loading of precomputed feature pairs.

>>> from spec_torch.apps.data import build_dataset
>>> ds = build_dataset("synthetic", n=8, seed=0)
>>> len(ds), ds.modality, ds.sample_id(0)
(8, 'image', 'syn:0')
"""

from __future__ import annotations

import inspect
from typing import Any

from ...errors import SpecError
from .base import CorruptSample, SampleDataset
from .coco import CocoDataset
from .features import load_feature_pair, load_features, load_ids
from .images import ImageFolderDataset, ImageNetDataset, imagenet_class_names
from .synthetic import SyntheticShapes
from .text import TextFileDataset

__all__ = [
    "build_dataset",
    "dataset_from_config",
    "SampleDataset",
    "CorruptSample",
    "load_feature_pair",
    "load_features",
    "load_ids",
    "ImageFolderDataset",
    "ImageNetDataset",
    "CocoDataset",
    "TextFileDataset",
    "SyntheticShapes",
    "imagenet_class_names",
    "DATASETS",
]

#: name -> dataset class; ``build_dataset(name, **kwargs)`` calls ``DATASETS[name](**kwargs)``
DATASETS: dict[str, type[SampleDataset]] = {
    "imagefolder": ImageFolderDataset,
    "imagenet": ImageNetDataset,
    "mscoco": CocoDataset,
    "textfile": TextFileDataset,
    "synthetic": SyntheticShapes,
}


def dataset_from_config(settings: Any) -> SampleDataset:
    """The dataset of a Hydra ``data`` config (``name`` plus its settings), as the pipelines build it: an
    empty dataset is refused with a :class:`SpecError` (nothing to compare)."""
    settings = dict(settings)
    name = settings.pop("name")
    dataset = build_dataset(name, **settings)
    if len(dataset) == 0:
        raise SpecError(f"data: the {name} dataset is empty; check its path settings")
    return dataset


def build_dataset(name: str, **kwargs: Any) -> SampleDataset:
    """Dataset ``name`` (one of :data:`DATASETS`) with the settings of its Hydra ``data`` config.

    Raises :class:`SpecError` for an unknown name or setting, a missing path, an empty folder or a bad
    annotation file. (Precomputed features, ``data=features``, go through :func:`load_feature_pair`.)
    """
    if name == "features":
        raise SpecError("data.name: 'features' holds precomputed arrays; load them with load_feature_pair")
    if name not in DATASETS:
        raise SpecError(f"data.name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        allowed = [p for p in params if p != "self"]
        raise SpecError(f"data: unknown setting(s) {unknown} for the {name} dataset; it takes {allowed}")
    return cls(**kwargs)
