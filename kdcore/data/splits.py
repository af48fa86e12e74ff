"""The train/validation split, normalisation and the labeled subset, as row indices over a reader.

Nothing here holds the dataset: a :class:`DataSplit` keeps the training rows' source indices, labels, ids
and label mask (metadata), and reads inputs through its reader when asked, normalised. Training rows keep
the source's order, so a run of consecutive training rows is one contiguous source range (less the
validation rows inside it). The validation split takes whole blocks of ``data.block(n)`` consecutive rows
(one row per block for in-memory sources, which is the classic per-row split), or none at all when
``data.eval`` names a separate evaluation source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from kdcore.data.readers import ArrayReader, RowReader, open_reader
from kdcore.errors import DataError
from kdcore.spec.data import DataSpec


@dataclass(frozen=True)
class Normalizer:
    """x -> (x - mean) / std, with one value for all channels or one per channel (axis 1)."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __call__(self, x: np.ndarray, inplace: bool = False) -> np.ndarray:
        """Normalised float32 ``x``; ``inplace`` reuses ``x`` (when the caller owns it) instead of a new array."""
        if self.mean == (0.0,) and self.std == (1.0,):
            return x
        if len(self.mean) == 1:
            m, s = np.float32(self.mean[0]), np.float32(self.std[0])
        else:
            if x.ndim < 2 or x.shape[1] != len(self.mean):
                raise DataError(f"data.mean/std have {len(self.mean)} channels but inputs are shaped "
                                f"{tuple(x.shape[1:])}")
            shape = (1, len(self.mean)) + (1,) * (x.ndim - 2)
            m, s = np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape)
        out = x if inplace and x.dtype == np.float32 and x.flags.writeable else None
        out = np.subtract(x, m, out=out, dtype=np.float32)
        return np.divide(out, s, out=out)

    def as_dict(self) -> dict[str, Any]:
        one = len(self.mean) == 1
        return {"mean": self.mean[0] if one else list(self.mean), "std": self.std[0] if one else list(self.std)}


def val_rows_of(n: int, data: DataSpec) -> np.ndarray:
    """Source rows of the validation split: whole blocks chosen by ``split_seed`` (sorted)."""
    block = data.block(n)
    n_blocks = -(-n // block)
    order = np.random.default_rng(data.split_seed).permutation(n_blocks)
    k = max(1, int(round(n_blocks * data.val_fraction)))
    if k >= n_blocks:
        raise DataError(f"data.val_fraction {data.val_fraction} leaves no training rows with {n_blocks} split blocks "
                        f"of {block} rows; lower it or data.split_block")
    chosen = np.sort(order[:k])
    rows = (chosen[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return rows[rows < n]


def labeled_mask(n_train: int, data: DataSpec) -> np.ndarray:
    labeled = np.zeros(n_train, dtype=bool)
    if data.labeled_rows is not None:
        rows = np.asarray(data.labeled_rows, dtype=np.int64)
        if len(rows) and rows.max() >= n_train:
            raise DataError(f"data.labeled_rows: index {int(rows.max())} is beyond the {n_train} training rows")
        labeled[rows] = True
    elif data.labeled_fraction >= 1.0:
        labeled[:] = True
    else:
        k = max(1, int(round(n_train * data.labeled_fraction)))
        labeled[np.random.default_rng(data.labeled_seed).choice(n_train, size=k, replace=False)] = True
    return labeled


@dataclass
class DataSplit:
    """The prepared dataset, as indices: which source rows train (and which of those the student may see
    labeled), which evaluate, and how inputs are normalised. Inputs are read on demand."""

    reader: RowReader
    train_rows: np.ndarray  # (n_train,) int64 source rows, ascending
    y_train: np.ndarray
    ids_train: np.ndarray
    labeled: np.ndarray  # bool (n_train,): the task loss may use this row's label
    val_reader: RowReader
    val_rows: np.ndarray  # rows of val_reader that evaluate, ascending
    y_val: np.ndarray
    num_classes: int
    norm: Normalizer = field(default_factory=Normalizer)

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    @property
    def n_val(self) -> int:
        return len(self.val_rows)

    @property
    def mean(self):
        return self.norm.as_dict()["mean"]

    @property
    def std(self):
        return self.norm.as_dict()["std"]

    @property
    def in_memory(self) -> bool:
        return self.reader.in_memory

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.reader.sample_shape

    # -- reading ---------------------------------------------------------------------------------------
    def train_inputs(self, samples: np.ndarray) -> np.ndarray:
        """Normalised inputs of training rows ``samples`` (indices into the training rows, any order); reads
        contiguous source runs."""
        return self.norm(self.reader.take(self.train_rows[np.asarray(samples, dtype=np.int64)]), inplace=True)

    def _window(self, start: int, stop: int, read) -> tuple[np.ndarray, bool]:
        """``read(lo, hi)`` of the source range holding training rows [start, stop) (one contiguous read), less
        the evaluation rows inside it; whether the result is a new array (``read``'s own unless it picked rows)."""
        start, stop = max(0, start), min(self.n_train, stop)
        lo, hi = (int(self.train_rows[start]), int(self.train_rows[stop - 1]) + 1) if stop > start else (0, 0)
        x = read(lo, hi)
        if hi - lo != stop - start:
            return x[self.train_rows[start:stop] - lo], True
        return x, False

    def train_window(self, start: int, stop: int) -> np.ndarray:
        """Normalised inputs of training rows [start, stop): one contiguous source read."""
        if min(self.n_train, stop) <= max(0, start):
            return np.empty((0, *self.sample_shape), dtype=np.float32)
        x, picked = self._window(start, stop, self.reader.read)
        owned = picked or not self.reader.in_memory  # an in-memory reader hands out views of its array
        return self.norm(x, inplace=owned)

    def train_pixels(self, samples: np.ndarray) -> np.ndarray:
        """uint8 pixels (n, H, W, C) of training rows ``samples`` (readers that decode images)."""
        return self.reader.take(self.train_rows[np.asarray(samples, dtype=np.int64)], pixels=True)

    def train_pixels_window(self, start: int, stop: int) -> np.ndarray:
        """uint8 pixels of training rows [start, stop): one contiguous source read (readers that decode images)."""
        return self._window(start, stop, self.reader.read_pixels)[0]

    def sample(self, k: int = 2) -> np.ndarray:
        """The first ``k`` training inputs (shape probes)."""
        return self.train_window(0, min(k, self.n_train))

    def val_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The evaluation rows in order, as normalised (x, y) batches."""
        for s in range(0, self.n_val, batch_size):
            rows = self.val_rows[s:s + batch_size]
            yield self.norm(self.val_reader.take(rows), inplace=True), self.y_val[s:s + batch_size]

    # -- whole arrays (small in-memory datasets only) ----------------------------------------------------
    @property
    def x_train(self) -> np.ndarray:
        """Every training input, normalised: a whole-dataset copy, for small in-memory data (tests, digits)."""
        return self.train_window(0, self.n_train)

    @property
    def x_val(self) -> np.ndarray:
        return self.norm(self.val_reader.take(self.val_rows))

    def fingerprint(self) -> str:
        """Identity of the training inputs (ids, rows, content description, normalisation), without reading
        the dataset (in-memory sources hash their bytes)."""
        from kdcore.cache.fingerprint import canonical_json, dataset_fingerprint

        if self.reader.in_memory:
            return dataset_fingerprint(self.ids_train, self.x_train)
        desc = {"reader": self.reader.describe(), "norm": self.norm.as_dict(), "rows": len(self.train_rows),
                "rows_sum": int(self.train_rows.sum())}
        return dataset_fingerprint(self.ids_train, np.frombuffer(canonical_json(desc).encode(), dtype=np.uint8))


def _stats(reader: RowReader, rows: np.ndarray, data: DataSpec) -> Normalizer:
    if not data.normalize:
        return Normalizer()
    if data.mean is not None:
        return Normalizer(tuple(float(v) for v in data.mean), tuple(float(v) for v in data.std))
    if reader.in_memory and len(rows) <= data.stats_rows * 4:
        x = reader.take(rows)  # the classic: one mean/std over every training input
        return Normalizer((float(x.mean()),), (float(x.std() or 1.0),))
    # a bounded sample: up to stats_rows training rows in contiguous windows spread over the split
    window = 256
    n_windows = max(1, min(len(rows) // window, data.stats_rows // window))
    starts = np.linspace(0, max(0, len(rows) - window), n_windows).astype(np.int64)
    total, total_sq, count = 0.0, 0.0, 0
    for s in starts:
        r = rows[s:s + window]
        v = reader.read(int(r[0]), int(r[-1]) + 1)[r - r[0]].reshape(-1)
        total, total_sq, count = total + float(v.sum(dtype=np.float64)), total_sq + float(np.dot(v, v)), count + v.size
    mean = total / max(count, 1)
    std = float(np.sqrt(max(total_sq / max(count, 1) - mean * mean, 0.0))) or 1.0
    return Normalizer((float(mean),), (std,))


def make_split(data: DataSpec, reader: RowReader | None = None, eval_reader: RowReader | None = None) -> DataSplit:
    """Split ``data.source`` (or the given reader) by ``split_seed``; choose labeled rows; compute stats."""
    reader = reader if reader is not None else open_reader(data.source)
    n = len(reader)
    if n < 2:
        raise DataError(f"the dataset has {n} rows; need at least 2")
    labels = reader.labels()
    if data.eval is not None or eval_reader is not None:
        eval_reader = eval_reader if eval_reader is not None else open_reader(data.eval)
        train_rows = np.arange(n, dtype=np.int64)
        val_rows = np.arange(len(eval_reader), dtype=np.int64)
        y_val = eval_reader.labels()
    else:
        val_rows = val_rows_of(n, data)
        mask = np.ones(n, dtype=bool)
        mask[val_rows] = False
        train_rows = np.flatnonzero(mask).astype(np.int64)
        eval_reader, y_val = reader, labels[val_rows]
    y_train = labels[train_rows]
    num_classes = max(reader.num_classes or 0, eval_reader.num_classes or 0,
                      int(labels.max()) + 1 if len(labels) else 0, int(y_val.max()) + 1 if len(y_val) else 0)
    return DataSplit(reader=reader, train_rows=train_rows, y_train=y_train, ids_train=reader.ids()[train_rows],
                     labeled=labeled_mask(len(train_rows), data), val_reader=eval_reader, val_rows=val_rows,
                     y_val=y_val, num_classes=num_classes, norm=_stats(reader, train_rows, data))


def arrays_split(x: np.ndarray, y: np.ndarray, data: DataSpec, name: str = "arrays") -> DataSplit:
    """A split of in-memory arrays (tests, notebooks)."""
    return make_split(data, ArrayReader(x, y, name))
