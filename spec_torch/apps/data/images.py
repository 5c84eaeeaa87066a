"""Image folders on disk: any folder tree (``imagefolder``) and the ImageNet class-folder layout (``imagenet``).

Sample ids are paths relative to ``root`` (POSIX separators), in sorted order, so they do not depend on where
the data is mounted; the fingerprint also hashes the resolved root and each file's size and modification
time, so a cache is never reused for different or edited images. Linked folders are followed, each folder
once (by device and inode: a link loop neither hangs the scan nor repeats its images). A file whose name
cannot be recorded (a line break, a control character, bytes that are not UTF-8) gets an escaped id and is
skipped as corrupt with the reason (:func:`~spec_torch.apps.data.base.sample_ids`).
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import SpecError
from .base import (
    IMAGE_EXTENSIONS,
    CorruptSample,
    SampleDataset,
    existing_path,
    file_stamps,
    limit_rows,
    open_image,
    sample_ids,
)

__all__ = ["ImageFolderDataset", "ImageNetDataset", "imagenet_class_names"]


def _scan_images(root: Path, name: str) -> list[str]:
    """Sorted relative POSIX paths of every image file below ``root`` (hidden entries skipped).

    Linked folders are followed, but each folder is visited once, by ``(st_dev, st_ino)``: breadth first in
    sorted order, so the copy kept of a folder reached twice is always the same (the shallowest, first by
    name) and a link loop ends. Unreadable folders are passed over, as ``os.walk`` does.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    queue: deque[tuple[Path, str]] = deque([(root, "")])
    while queue:
        folder, rel = queue.popleft()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if is_dir:
                queue.append((Path(entry.path), f"{rel}{entry.name}/"))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(f"{rel}{entry.name}")
    if not found:
        raise SpecError(
            f"{name}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; check the path"
        )
    return sorted(found)


class ImageFolderDataset(SampleDataset):
    """Every image below ``root`` (recursive). Id = path relative to ``root``.

    Args:
        root: folder of images (any depth).
        label_from_folder: label each image by its first-level folder name (a class-folder tree).
        max_samples: keep at most this many images, evenly spaced in sorted order (None = all).
    """

    name = "imagefolder"
    modality = "image"

    def __init__(
        self, root: str | os.PathLike, label_from_folder: bool = False, max_samples: int | None = None
    ):
        super().__init__()
        self.root = existing_path(root, "data.root", kind="dir").resolve()
        self._keep(_scan_images(self.root, "data.root"), max_samples)
        self.label_from_folder = bool(label_from_folder)
        self.max_samples = max_samples

    def _keep(self, names: list[str], max_samples: int | None) -> None:
        """The samples: ``names`` (relative file names) thinned to ``max_samples``, and their ids."""
        names = [names[k] for k in limit_rows(len(names), max_samples, "data.max_samples")]
        self._ids, self._odd = sample_ids(names)
        self._files = names

    def load(self, i: int) -> Image.Image:
        if self._ids[i] in self._odd:
            raise CorruptSample(self._ids[i], self._odd[self._ids[i]])
        return open_image(self.root / self._files[i], self._ids[i])

    @property
    def labels(self) -> list[str] | None:
        if not self.label_from_folder:
            return None
        return [s.split("/", 1)[0] if "/" in s else "." for s in self._ids]

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root), "max_samples": self.max_samples}

    def content_stamp(self) -> str:
        return file_stamps(self.root, self._files)


@cache
def _imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in sorted order (= the standard class index order)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(sorted(info.label_names()))


def imagenet_class_names() -> dict[str, str]:
    """wnid -> readable class name (open_clip's ``IMAGENET_CLASSNAMES``, indexed in sorted-wnid order)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = _imagenet_wnids()
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise SpecError(
            f"imagenet: expected 1000 class names and wnids, got {len(IMAGENET_CLASSNAMES)} and {len(wnids)}"
        )
    return dict(zip(wnids, IMAGENET_CLASSNAMES, strict=True))


class ImageNetDataset(ImageFolderDataset):
    """ImageNet in the class-folder layout ``root/<wnid>/<image>`` (train or val). Labels = class names.

    Args:
        root: the split folder holding the ``n01440764``-style wnid folders, or the ImageNet root holding
            ``train/`` and ``val/`` (then ``split`` picks one).
        split: "val" or "train" when ``root`` is the ImageNet root; ignored when ``root`` holds wnid folders.
        max_per_class: keep at most this many images per class (first in sorted order; None = all).
        max_samples: keep at most this many images overall, evenly spaced (None = all).
    """

    name = "imagenet"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        max_per_class: int | None = None,
        max_samples: int | None = None,
    ):
        SampleDataset.__init__(self)
        base = existing_path(root, "data.root", kind="dir").resolve()
        names = imagenet_class_names()
        folder = base
        if not any(d.is_dir() and d.name in names for d in base.iterdir()) and (base / split).is_dir():
            folder = base / split
        class_dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise SpecError(
                f"data.root: expected class folders named by wnid (root/n01440764/*.JPEG) in {folder}, found none; "
                "a flat val folder must first be sorted into class folders (or use data=imagefolder)"
            )
        known = [d for d in class_dirs if d in names]
        if not known:
            raise SpecError(
                f"data.root: none of the {len(class_dirs)} folders in {folder} is an ImageNet wnid "
                f"(e.g. {class_dirs[0]!r}); expected n01440764-style names, or use data=imagefolder"
            )
        unknown = sorted(set(class_dirs) - set(known))
        if unknown:
            warnings.warn(
                f"imagenet: {len(unknown)} folder(s) are not ImageNet-1k wnids (e.g. {unknown[0]!r}); "
                "their folder names are used as labels",
                stacklevel=2,
            )
        if max_per_class is not None and (
            isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1
        ):
            raise SpecError(f"data.max_per_class: expected a positive integer or null, got {max_per_class!r}")
        ids: list[str] = []
        for d in class_dirs:
            files = sorted(
                f.name
                for f in (folder / d).iterdir()
                if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            ids.extend(f"{d}/{f}" for f in files[:max_per_class])
        if not ids:
            raise SpecError(f"data.root: the class folders in {folder} hold no image files")
        self.root = folder
        self._keep(ids, max_samples)
        self.split = split
        self.max_per_class = max_per_class
        self.max_samples = max_samples
        self.label_from_folder = True
        self._wnid_names = names

    @property
    def wnids(self) -> list[str]:
        """The class folder (wnid) of each sample."""
        return [s.split("/", 1)[0] for s in self._ids]

    @property
    def labels(self) -> list[str]:
        return [self._wnid_names.get(w, w) for w in self.wnids]

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "max_per_class": self.max_per_class,
            "max_samples": self.max_samples,
        }
