"""Feature sources: where a training step gets its batch and the teacher's features for it.

Every source yields :class:`Batch` objects for ``epoch(e, rank, world)``; the loop does not care whether
the features were computed in-process (``OnlineFeatures``), streamed from the teacher deployment
(``services``) or read back from the Zarr cache (``kdcore.cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from kdcore.data.augment import apply_augment, augment_params
from kdcore.data.splits import DataSplit
from kdcore.spec.data import DataSpec


@dataclass
class Batch:
    """One training batch: inputs (as the student sees them), labels, label mask, row indices, teacher features."""

    x: torch.Tensor
    y: torch.Tensor
    labeled: torch.Tensor
    idx: torch.Tensor
    teacher: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.y)


class FeatureSource(Protocol):
    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]: ...

    def steps_per_epoch(self, world: int = 1) -> int: ...


def epoch_rows(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's rows of a seeded shuffled epoch; every rank gets the same count (the tail is dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world
    return order[rank * per_rank:(rank + 1) * per_rank]


def epoch_views(n: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """The view each row is read under this epoch (0 when there is one view)."""
    if views <= 1:
        return np.zeros(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 1]).integers(0, views, size=n)


def student_inputs(split: DataSplit, data: DataSpec, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """The augmented inputs of ``rows`` under ``views``: exactly what the teacher saw for those views."""
    x = split.x_train[rows]
    params = augment_params(data.augment, split.ids_train[rows], views)
    return apply_augment(data.augment, x, params)


class OnlineFeatures:
    """The baseline: run the teacher in-process on every batch."""

    def __init__(self, split: DataSplit, data: DataSpec, teacher, batch_size: int, seed: int) -> None:
        self.split, self.data, self.teacher = split, data, teacher
        self.batch_size, self.seed = batch_size, seed

    def steps_per_epoch(self, world: int = 1) -> int:
        return -(-(self.split.n_train // world) // self.batch_size)

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        rows = epoch_rows(self.split.n_train, self.seed, epoch, rank, world)
        views = epoch_views(self.split.n_train, self.data.views, self.seed, epoch)
        for start in range(0, len(rows), self.batch_size):
            r = rows[start:start + self.batch_size]
            x = torch.from_numpy(student_inputs(self.split, self.data, r, views[r]))
            yield Batch(x=x, y=torch.from_numpy(self.split.y_train[r]), labeled=torch.from_numpy(self.split.labeled[r]),
                        idx=torch.from_numpy(r.astype(np.int64)), teacher=self.teacher(x))
