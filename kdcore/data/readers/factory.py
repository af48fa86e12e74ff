"""Factory datasets: a function returning (x, y) arrays (held in memory) or a map-style dataset (read lazily).

A map-style dataset has ``__len__`` and ``rows(start, stop) -> (x, y)``; ``labels()`` and ``ids()`` are
optional (without ``labels()`` the labels are collected once by reading every row in windows)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcore.data.readers.base import ArrayReader, RowReader, check_labels
from kdcore.errors import DataError
from kdcore.spec.data import FactoryData


class MapReader(RowReader):
    def __init__(self, ds: Any, name: str) -> None:
        self.ds, self.name = ds, name
        self.num_classes = getattr(ds, "num_classes", None)
        if hasattr(ds, "labels"):
            labels = ds.labels()
        else:
            labels = np.concatenate([np.asarray(ds.rows(s, min(s + 4096, len(ds)))[1])
                                     for s in range(0, len(ds), 4096)]) if len(ds) else np.zeros(0, np.int64)
        self._labels = check_labels(labels, name)
        if len(self._labels) != len(ds):
            raise DataError(f"{name}: labels() gave {len(self._labels)} labels for {len(ds)} rows")
        self._ids = np.asarray(ds.ids(), dtype=np.int64) if hasattr(ds, "ids") else np.arange(len(ds), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> np.ndarray:
        return self._ids

    def _read(self, start: int, stop: int) -> np.ndarray:
        x = np.asarray(self.ds.rows(start, stop)[0])
        if len(x) != stop - start:
            raise DataError(f"{self.name}: rows({start}, {stop}) returned {len(x)} rows, expected {stop - start}")
        return x

    def describe(self) -> dict[str, Any]:
        desc = getattr(self.ds, "describe", None)
        return {"name": self.name, "rows": len(self), **(desc() if desc else {})}


def open_factory(spec: FactoryData) -> RowReader:
    from kdcore.modeling import resolve_target

    out = resolve_target(spec.target, what="dataset factory")(**spec.kwargs)
    if isinstance(out, tuple) and len(out) == 2:
        return ArrayReader(np.asarray(out[0]), np.asarray(out[1]), spec.target)
    if hasattr(out, "__len__") and hasattr(out, "rows"):
        return MapReader(out, spec.target)
    raise DataError(f"dataset factory {spec.target!r} must return (x, y) arrays or a map-style dataset with "
                    "__len__ and rows(start, stop) -> (x, y)")
