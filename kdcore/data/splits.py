"""Train/validation split, normalisation statistics and the labeled subset (transfer set)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcore.data.datasets import Arrays
from kdcore.errors import DataError
from kdcore.spec.data import DataSpec


@dataclass
class DataSplit:
    """The prepared dataset: normalised train/val arrays, ids, and which train rows the student may see labeled."""

    x_train: np.ndarray
    y_train: np.ndarray
    ids_train: np.ndarray
    labeled: np.ndarray  # bool (n_train,): the task loss may use this row's label
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    mean: float
    std: float

    @property
    def n_train(self) -> int:
        return len(self.y_train)


def make_split(arrays: Arrays, spec: DataSpec) -> DataSplit:
    """Split deterministically by ``split_seed``; pick labeled rows by ``labeled_rows`` or ``labeled_fraction``."""
    n = len(arrays)
    if n < 2:
        raise DataError(f"the dataset has {n} rows; need at least 2")
    order = np.random.default_rng(spec.split_seed).permutation(n)
    n_val = max(1, int(round(n * spec.val_fraction)))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    x_train, x_val = arrays.x[train_idx], arrays.x[val_idx]
    mean, std = 0.0, 1.0
    if spec.normalize:
        mean, std = float(x_train.mean()), float(x_train.std() or 1.0)
        x_train = (x_train - mean) / std
        x_val = (x_val - mean) / std
    n_train = len(train_idx)
    labeled = np.zeros(n_train, dtype=bool)
    if spec.labeled_rows is not None:
        rows = np.asarray(spec.labeled_rows, dtype=np.int64)
        if len(rows) and rows.max() >= n_train:
            raise DataError(f"data.labeled_rows: index {int(rows.max())} is beyond the {n_train} training rows")
        labeled[rows] = True
    elif spec.labeled_fraction >= 1.0:
        labeled[:] = True
    else:
        k = max(1, int(round(n_train * spec.labeled_fraction)))
        labeled[np.random.default_rng(spec.labeled_seed).choice(n_train, size=k, replace=False)] = True
    return DataSplit(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=arrays.y[train_idx],
        ids_train=arrays.ids[train_idx],
        labeled=labeled,
        x_val=np.ascontiguousarray(x_val, dtype=np.float32),
        y_val=arrays.y[val_idx],
        num_classes=arrays.num_classes,
        mean=mean,
        std=std,
    )
