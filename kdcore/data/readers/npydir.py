"""A directory of .npy arrays, memory-mapped: nothing is read until a window is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcore.data.readers.base import RowReader, check_labels
from kdcore.errors import DataError
from kdcore.spec.data import NpyDirData


class NpyDirReader(RowReader):
    def __init__(self, spec: NpyDirData) -> None:
        root = Path(spec.path)
        self.spec, self.name = spec, f"npy_dir {root}"
        for f in [spec.x_file, spec.y_file] + ([spec.ids_file] if spec.ids_file else []):
            if not (root / f).is_file():
                raise DataError(f"data.source: {root / f} not found; the directory has "
                                f"{sorted(p.name for p in root.glob('*.npy')) if root.is_dir() else 'nothing'}")
        self.x = np.load(root / spec.x_file, mmap_mode="r", allow_pickle=False)
        self._labels = check_labels(np.load(root / spec.y_file, allow_pickle=False), self.name)
        if len(self.x) != len(self._labels):
            raise DataError(f"{self.name}: {len(self.x)} inputs but {len(self._labels)} labels")
        self._ids = (np.load(root / spec.ids_file, allow_pickle=False).astype(np.int64) if spec.ids_file
                     else np.arange(len(self._labels), dtype=np.int64))
        self._shape = tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> np.ndarray:
        return self._ids

    def _read(self, start: int, stop: int) -> np.ndarray:
        x = np.asarray(self.x[start:stop], dtype=np.float32)
        return x * np.float32(self.spec.scale) if self.spec.scale != 1.0 else x

    def describe(self) -> dict[str, Any]:
        root = Path(self.spec.path)
        return {"name": self.name, "rows": len(self), "shape": list(self._shape), "dtype": str(self.x.dtype),
                "bytes": (root / self.spec.x_file).stat().st_size, "scale": self.spec.scale}
