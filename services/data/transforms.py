"""``map_batches`` steps: decode stored input rows, replay each row's augmentation (decoded images as uint8
pixels, converted to model inputs by the consumer: ``RowMapper.to_model``; other inputs normalised here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from services.data.context import data_context
from services.data.datasource import RAW


def decode_inputs(batch: dict[str, np.ndarray], job_json: dict[str, Any]) -> dict[str, np.ndarray]:
    """``raw`` (stored rows) + ``aug`` (parameters) -> ``x``: the exact input the teacher saw for each row.
    A plain function, so Ray Data runs it as tasks in Ray's pooled worker processes (an actor pool would be
    started again for every epoch's execution)."""
    return DecodeInputs(job_json)(batch)


class DecodeInputs:
    """``raw`` (stored rows) + ``aug`` (parameters) -> ``x``: the exact input the teacher saw for each row, or for
    decoded images (``RowMapper.pixels``) its uint8 pixels (N, H, W, C), a quarter of the bytes through the object
    store; ``RowMapper.to_model`` makes them the same input."""

    def __init__(self, job_json: dict[str, Any]) -> None:
        self.job_json = job_json

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        torch.set_num_threads(1)
        ctx = data_context(self.job_json)
        raw = batch.pop(RAW)
        samples = np.asarray(batch["sample"])
        uniq, first, inverse = np.unique(samples, return_index=True, return_inverse=True)  # views share a decode
        stored = [raw[j] for j in first.tolist()] if raw.dtype == object else raw[first]
        start = int(ctx.split.train_rows[uniq[0]]) if len(uniq) else 0
        batch["x"] = ctx.mapper.stored_views(stored, start, np.asarray(batch["aug"], dtype=np.float32), inverse)
        return batch
