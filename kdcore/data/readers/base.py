"""The row reader: a dataset read by row ranges, holding only its metadata (labels, ids, file offsets).

Every source kind (Parquet shards, image folders, memory-mapped .npy, factories, in-memory arrays) is a
:class:`RowReader`. ``read(start, stop)`` returns the decoded float32 inputs of a contiguous row range,
which is how everything in kd reads encoded data: contiguous windows, in shuffled window order. ``take``
reads arbitrary rows by grouping them into contiguous runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from kdcore.errors import DataError


def check_finite(x: np.ndarray, what: str, row_offset: int = 0) -> None:
    """Refuse NaN/Inf inputs, naming the first rows that hold them (they would poison normalisation and
    every step after it)."""
    if not x.size or np.isfinite(x).all():
        return
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    bad = np.flatnonzero(~finite)
    shown = ", ".join(str(int(r) + row_offset) for r in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise DataError(f"{what}: {len(bad)} row(s) hold NaN or Inf values (rows {shown}); fix or drop those rows "
                    "in the dataset")


def check_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (y.size and np.all(np.mod(y, 1) == 0))):
        raise DataError(f"{what}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if y.size and y.min() < 0:
        bad = np.flatnonzero(y < 0)[:5].tolist()
        raise DataError(f"{what}: labels must be >= 0 (found {int(y.min())} at rows {bad})")
    return y.astype(np.int64)


class RowReader(ABC):
    """A dataset addressed by row number. Subclasses set ``name`` (used in messages)."""

    name: str = "dataset"
    in_memory: bool = False  # the whole dataset is an array in this process already (digits, npz)
    num_classes: int | None = None  # from metadata, when the source knows it

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def labels(self) -> np.ndarray:
        """(N,) int64 labels of every row (metadata: cheap)."""

    def ids(self) -> np.ndarray:
        """(N,) int64 stable sample ids (row numbers unless the source has ids)."""
        return np.arange(len(self), dtype=np.int64)

    def fetch(self, start: int, stop: int) -> Any:
        """The stored form of rows [start, stop) (e.g. encoded image bytes): the I/O half of a read. What it
        returns goes to :meth:`decode`, maybe in another process (a Ray Data transform)."""
        return self._read(start, stop)

    def decode(self, raw: Any, start: int = 0) -> np.ndarray:
        """The CPU half of a read: stored rows (from :meth:`fetch`, the first being row ``start``) as float32."""
        return np.asarray(raw)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Decoded inputs of rows [start, stop) as float32 (n, ...)."""
        return self.decode(self.fetch(start, stop), start)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Decoded float32 inputs of rows [start, stop), checked finite."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        if stop <= start:
            return np.empty((0, *self.sample_shape), dtype=np.float32)
        return self.finish(self._read(start, stop), start)

    def decodes_images(self) -> bool:
        """Whether ``decode`` turns encoded images into pixels (finite by construction: no check needed); such
        readers also decode to uint8 pixels (:meth:`decode_pixels`)."""
        return False

    def decode_pixels(self, raw: Any, start: int = 0) -> np.ndarray:
        """Stored rows as uint8 pixels (n, H, W, C), for readers that decode images."""
        raise NotImplementedError(f"{type(self).__name__} does not decode images")

    def read_pixels(self, start: int, stop: int) -> np.ndarray:
        """uint8 pixels (n, H, W, C) of rows [start, stop) (readers that decode images)."""
        return self.decode_pixels(self.fetch(max(0, int(start)), min(len(self), int(stop))), max(0, int(start)))

    def finish(self, x: np.ndarray, start: int = 0) -> np.ndarray:
        """Decoded rows as contiguous float32, checked finite (rows named from ``start``; decoded images are
        finite by construction and not scanned)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.decodes_images():
            check_finite(x, self.name, row_offset=start)
        return x

    def take(self, rows: np.ndarray, max_gap: int = 64, pixels: bool = False) -> np.ndarray:
        """Inputs of any ``rows`` (in that order), read as contiguous runs (gaps under ``max_gap`` rows are read
        and dropped); ``pixels``: as uint8 pixels (:meth:`read_pixels`)."""
        rows = np.asarray(rows, dtype=np.int64)
        read = self.read_pixels if pixels else self.read
        if not len(rows):
            return read(0, 0) if pixels else np.empty((0, *self.sample_shape), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        cuts = np.flatnonzero(np.diff(srt) > max_gap) + 1
        out = None
        at = 0
        for run in np.split(srt, cuts):
            block = read(int(run[0]), int(run[-1]) + 1)
            if out is None:
                out = np.empty((len(rows), *block.shape[1:]), dtype=block.dtype)
            out[order[at:at + len(run)]] = block[run - run[0]]
            at += len(run)
            del block
        return out

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-row input shape (from the first row)."""
        if not hasattr(self, "_shape"):
            self._shape = tuple(self._read(0, 1).shape[1:])
        return self._shape

    def describe(self) -> dict[str, Any]:
        """What identifies this dataset's content cheaply (files, sizes, row count) for cache fingerprints."""
        return {"name": self.name, "rows": len(self)}

    def close(self) -> None:
        """Release open files."""


class ArrayReader(RowReader):
    """A dataset already in memory as arrays (built-in digits, .npz files, factories returning arrays)."""

    in_memory = True

    def __init__(self, x: np.ndarray, y: np.ndarray, name: str, ids: np.ndarray | None = None) -> None:
        x = np.asarray(x)
        y = check_labels(y, name)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name}: {x.shape[0]} inputs but {y.shape[0]} labels; both must have one row per sample")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        check_finite(self.x, name)
        self.y, self.name = y, name
        self._ids = np.arange(len(y), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self._shape = tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def labels(self) -> np.ndarray:
        return self.y

    def ids(self) -> np.ndarray:
        return self._ids

    def _read(self, start: int, stop: int) -> np.ndarray:
        return self.x[start:stop]

    def take(self, rows: np.ndarray, max_gap: int = 64) -> np.ndarray:
        return self.x[np.asarray(rows, dtype=np.int64)]

    def describe(self) -> dict[str, Any]:
        import hashlib

        h = hashlib.sha256(self.x[:: max(1, len(self.x) // 64)].tobytes()).hexdigest()[:16]
        return {"name": self.name, "rows": len(self), "shape": list(self._shape), "sample_sha": h}
