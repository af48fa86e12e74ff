"""The order training rows are read in: contiguous windows in a seeded shuffled order, mixed a few windows
at a time — random enough to train on, sequential enough to read encoded data fast.

With ``window=1`` (in-memory datasets) this is a plain seeded permutation of the rows. Every rank gets the
same number of rows (the tail of the epoch is dropped when ``world > 1``)."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, window: int = 1, mix: int = 4) -> np.ndarray:
    """All ``n`` row indices of one epoch: windows of ``window`` consecutive rows in shuffled order, the rows of
    each group of ``mix`` consecutive windows shuffled among themselves."""
    rng = np.random.default_rng([seed, epoch])
    if window <= 1:
        return rng.permutation(n)
    starts = rng.permutation(-(-n // window)) * window
    order = np.concatenate([np.arange(s, min(s + window, n)) for s in starts])
    group = window * mix
    for g in range(0, n, group):
        rng.shuffle(order[g:g + group])
    return order


def rank_share(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of an epoch order; every rank gets ``len(order) // world`` rows."""
    per_rank = len(order) // world
    return order[rank * per_rank:(rank + 1) * per_rank]


def buffered_batches(rows: np.ndarray, batch_size: int, group: int,
                     read: Callable[[np.ndarray], dict]) -> Iterator[tuple[np.ndarray, dict]]:
    """Batches of ``rows`` (in order), reading ``group`` rows at a time with ``read(rows) -> {name: array}``
    (arrays with one row per index): each group is read once, batches are slices of it."""
    for g in range(0, len(rows), group):
        grp = rows[g:g + group]
        data = read(grp)
        for b in range(0, len(grp), batch_size):
            yield grp[b:b + batch_size], {k: v[b:b + batch_size] for k, v in data.items()}
