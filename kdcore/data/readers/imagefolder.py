"""root/<class>/<image> trees: the file list and labels in memory, images decoded on read.

Rows are ordered by a stable hash of each file's relative path, not by class, so that contiguous windows
(what the cache and loaders read) hold a mix of classes; the order does not change when files are added
elsewhere in the tree."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.data.images import decode_pixel_batch, pixels_to_float
from kdcore.data.readers.base import RowReader
from kdcore.errors import DataError
from kdcore.spec.data import ImageFolderData

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class ImageFolderReader(RowReader):
    def __init__(self, spec: ImageFolderData) -> None:
        self.spec, self.name = spec, f"imagefolder {spec.root}"
        root = Path(spec.root)
        if not root.is_dir():
            raise DataError(f"data.source.root: not a directory: {root}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"data.source.root: {root} has no class sub-folders")
        entries = [(f"{name}/{f.name}", label) for label, name in enumerate(self.classes)
                   for f in (root / name).iterdir() if f.suffix.lower() in SUFFIXES]
        if not entries:
            raise DataError(f"data.source.root: no images under {root}")
        entries.sort(key=lambda e: (zlib.crc32(e[0].encode()), e[0]))
        self.root = root
        self.files = [e[0] for e in entries]
        self._labels = np.asarray([e[1] for e in entries], dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> np.ndarray:
        return self._labels

    def fetch(self, start: int, stop: int) -> list[bytes]:
        return [(self.root / f).read_bytes() for f in self.files[start:stop]]

    def decodes_images(self) -> bool:
        return True

    def decode_pixels(self, raw, start: int = 0) -> np.ndarray:
        return decode_pixel_batch(list(raw), self.spec.image_size, self.spec.grayscale,
                                  lambda i: str(self.root / self.files[start + i]))

    def decode(self, raw, start: int = 0) -> np.ndarray:
        return pixels_to_float(self.decode_pixels(raw, start))

    def describe(self) -> dict[str, Any]:
        h = zlib.crc32("\n".join(self.files).encode())
        return {"name": self.name, "rows": len(self), "classes": self.classes, "files_crc": h,
                "image_size": self.spec.image_size, "grayscale": self.spec.grayscale}
