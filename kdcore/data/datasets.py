"""A whole dataset as arrays: x (N, ...) float32, y (N,) int64, ids (N,) int64 — for small data only.

kd itself reads datasets through row readers (:mod:`kdcore.data.readers`) and never holds them whole;
this is for notebooks, tests and tools that want the arrays of a small dataset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcore.data.readers import check_finite, open_reader


@dataclass
class Arrays:
    """A whole dataset in memory. ``ids`` are stable sample ids (row numbers unless the source has ids)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0


def load_arrays(source) -> Arrays:
    """Read every row of the dataset a spec names."""
    reader = open_reader(source)
    try:
        return Arrays(reader.read(0, len(reader)), reader.labels(), reader.ids())
    finally:
        reader.close()


__all__ = ["Arrays", "check_finite", "load_arrays"]
