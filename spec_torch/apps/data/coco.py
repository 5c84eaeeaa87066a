"""MS-COCO captions: an image folder plus a ``captions_*.json`` annotation file, as images or as captions.

- ``modality="image"``: one sample per annotated image, id ``coco:<image_id>``, sorted by image id; its
  ``texts`` are all its captions, one a line (what the explain stage names modes by).
- ``modality="text"``: one sample per caption, id ``cap:<caption_id>``, sorted by (image id, caption id);
  the images are not needed (``root`` may be null).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import SpecError
from .base import SampleDataset, existing_path, file_stamps, limit_rows, open_image

__all__ = ["CocoDataset"]


def _read_annotations(path: Path) -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """-> ({image_id: file_name}, [(image_id, caption_id, caption)]) from a COCO captions json."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"data.annotations: cannot read {path} as JSON: {exc}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise SpecError(
            f"data.annotations: {path} is not a COCO captions file: expected a JSON object with lists "
            "'images' and 'annotations'"
        )
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
        caps = [(int(a["image_id"]), int(a["id"]), str(a["caption"]).strip()) for a in doc["annotations"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(
            f"data.annotations: {path}: every image needs 'id' and 'file_name', every annotation 'id', "
            f"'image_id' and 'caption' ({type(exc).__name__}: {exc})"
        ) from None
    if not caps:
        raise SpecError(f"data.annotations: {path} holds no captions")
    orphans = sorted({img for img, _, _ in caps} - files.keys())
    if orphans:
        raise SpecError(f"data.annotations: {path}: captions refer to unknown image ids, e.g. {orphans[:3]}")
    return files, sorted(caps)


def _confine(files: list[str], root: Path, annotations: Path) -> None:
    """Refuse ``file_name`` entries that are absolute or climb out of ``root`` (``../../etc/passwd``)."""
    bad = [f for f in files if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == os.pardir]
    if bad:
        raise SpecError(
            f"data.annotations: {annotations}: {len(bad)} file_name(s) point outside data.root ({root}), "
            f"e.g. {bad[:3]}; file names must be relative paths inside the image folder"
        )


class CocoDataset(SampleDataset):
    """MS-COCO (or any COCO-format captions file).

    Args:
        root: folder of the images (e.g. ``/data/coco/val2017``); needed for ``modality="image"``.
        annotations: the ``captions_*.json`` file, or a folder holding exactly one ``captions_*.json``.
        modality: "image" (one sample per image) or "text" (one sample per caption).
        captions_per_image: with "text", keep at most this many captions of each image (None = all).
        max_samples: keep at most this many samples, evenly spaced (None = all).
    """

    name = "mscoco"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        annotations: str | os.PathLike | None = None,
        modality: str = "image",
        captions_per_image: int | None = None,
        max_samples: int | None = None,
    ):
        super().__init__()
        if modality not in ("image", "text"):
            raise SpecError(f"data.modality: expected 'image' or 'text', got {modality!r}")
        self.modality = modality
        ann = existing_path(annotations, "data.annotations")
        if ann.is_dir():
            found = sorted(ann.glob("captions_*.json"))
            if len(found) != 1:
                raise SpecError(
                    f"data.annotations: expected exactly one captions_*.json in {ann}, found {len(found)}; "
                    "give the file itself"
                )
            ann = found[0]
        self.annotations = ann.resolve()
        files, caps = _read_annotations(self.annotations)
        self.root: Path | None = None
        if modality == "image":
            self.root = existing_path(root, "data.root", kind="dir").resolve()
            image_ids = sorted({img for img, _, _ in caps})
            _confine([files[i] for i in image_ids], self.root, self.annotations)
            first = self.root / files[image_ids[0]]
            if not first.exists():
                raise SpecError(
                    f"data.root: the first annotated image {files[image_ids[0]]!r} is not in {self.root}; "
                    "root must be the folder of the annotated images (e.g. val2017/)"
                )
            keep = limit_rows(len(image_ids), max_samples, "data.max_samples")
            self._image_ids = [image_ids[k] for k in keep]
            self._files = [files[i] for i in self._image_ids]
            self._ids = [f"coco:{i}" for i in self._image_ids]
            by_image: dict[int, list[str]] = {}
            for img, _, caption in caps:  # sorted by (image id, caption id)
                by_image.setdefault(img, []).append(caption)
            self._texts: list[str] = ["\n".join(by_image[i]) for i in self._image_ids]  # all its captions
        else:
            if captions_per_image is not None and (
                isinstance(captions_per_image, bool)
                or not isinstance(captions_per_image, int)
                or captions_per_image < 1
            ):
                raise SpecError(
                    f"data.captions_per_image: expected a positive integer or null, got {captions_per_image!r}"
                )
            if captions_per_image is not None:
                seen: dict[int, int] = {}
                kept = []
                for c in caps:
                    seen[c[0]] = seen.get(c[0], 0) + 1
                    if seen[c[0]] <= captions_per_image:
                        kept.append(c)
                caps = kept
            caps = [caps[k] for k in limit_rows(len(caps), max_samples, "data.max_samples")]
            self._image_ids = [c[0] for c in caps]
            self._files = [files[c[0]] for c in caps]
            self._ids = [f"cap:{c[1]}" for c in caps]
            self._texts = [c[2] for c in caps]
        self.captions_per_image = captions_per_image
        self.max_samples = max_samples

    def load(self, i: int) -> Image.Image | str:
        if self.modality == "text":
            return self._texts[i]
        assert self.root is not None
        return open_image(self.root / self._files[i], self._ids[i])

    @property
    def texts(self) -> list[str]:
        """Each sample's text: the caption, or for an image all its captions, one a line."""
        return list(self._texts)

    @property
    def image_ids(self) -> list[int]:
        """COCO image id of each sample (the captioned image for text samples)."""
        return list(self._image_ids)

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "annotations": str(self.annotations),
            "root": str(self.root) if self.root else None,
            "captions_per_image": self.captions_per_image,
            "max_samples": self.max_samples,
        }

    def content_stamp(self) -> str:
        """The annotation file's size and time, and for images each listed file's size and time (or
        ``missing``): an image restored or replaced later changes the cache key. One ``os.stat`` per image,
        computed once per dataset object (``bench/bench_cache.py`` times it on 118,287 files)."""
        st = self.annotations.stat()
        parts = [f"{st.st_size}:{st.st_mtime_ns}"]
        if self.modality == "image":
            assert self.root is not None
            parts.append(file_stamps(self.root, self._files))
        return "\n".join(parts)
