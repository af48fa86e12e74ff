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

from kdcore.data.order import buffered_batches, epoch_order, rank_share
from kdcore.data.rows import RowMapper
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


def epoch_rows(n: int, seed: int, epoch: int, rank: int, world: int, window: int = 1, mix: int = 4) -> np.ndarray:
    """This rank's rows of a seeded shuffled epoch (windows of ``window`` consecutive rows); every rank gets the
    same count (the tail is dropped)."""
    return rank_share(epoch_order(n, seed, epoch, window, mix), rank, world)


def epoch_views(n: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """The view each row is read under this epoch (0 when there is one view)."""
    if views <= 1:
        return np.zeros(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 1]).integers(0, views, size=n)


def read_group(split: DataSplit, data: DataSpec, batch_size: int) -> int:
    """Rows decoded (and held) at once: about ``data.read_buffer_mb`` of inputs, a whole number of batches."""
    row_bytes = 4 * int(np.prod(split.sample_shape))
    rows = max(1, (data.read_buffer_mb << 20) // max(row_bytes, 1))
    return max(batch_size, rows // batch_size * batch_size)


class OnlineFeatures:
    """The baseline: run the teacher in-process on every batch."""

    def __init__(self, split: DataSplit, data: DataSpec, teacher, batch_size: int, seed: int) -> None:
        self.split, self.data, self.teacher = split, data, teacher
        self.batch_size, self.seed = batch_size, seed
        self.mapper = RowMapper(split, data)

    def steps_per_epoch(self, world: int = 1) -> int:
        return -(-(self.split.n_train // world) // self.batch_size)

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        d = self.data
        rows = epoch_rows(self.split.n_train, self.seed, epoch, rank, world, d.window(), d.mix_windows)
        views = epoch_views(self.split.n_train, d.views, self.seed, epoch)

        def read(grp: np.ndarray) -> dict:
            return {"x": self.mapper.inputs(grp, views[grp]).x}

        for r, got in buffered_batches(rows, self.batch_size, read_group(self.split, d, self.batch_size), read):
            x = torch.from_numpy(got["x"])
            yield Batch(x=x, y=torch.from_numpy(self.split.y_train[r]), labeled=torch.from_numpy(self.split.labeled[r]),
                        idx=torch.from_numpy(r.astype(np.int64)), teacher=self.teacher(x))
