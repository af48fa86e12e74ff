"""``CacheRowsDatasource``: one block per feature-cache chunk, holding the chunk's teacher outputs and
augmentation parameters joined with the stored (still encoded) input rows they were computed from.

A chunk is a contiguous range of cache rows, hence of training rows, hence one contiguous read of the
source; decoding and the augmentation replay happen later, in :class:`services.data.transforms.DecodeInputs`
(``map_batches``), so the read tasks stay I/O-bound and any CPU node can decode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from kdcore.cache.handle import CacheHandle
from kdcore.cache.layout import AUG, LOGITS, TOPK_IDX, TOPK_VAL, bf16_bits_to_float32, output_key
from kdcore.cache.reader import read_chunk
from kdcore.data.rows import rows_to_samples
from services.data.context import data_context

RAW = "raw"  # stored input rows (bytes or numbers), decoded by DecodeInputs into "x"
FEATURE_PREFIX = "f."  # teacher feature columns: "f.<layer>"


def raw_column(raw: Any) -> np.ndarray:
    """A stored-rows column: encoded images as a 1-D object array of bytes, numbers as an array."""
    if isinstance(raw, list):
        out = np.empty(len(raw), dtype=object)
        out[:] = raw
        return out
    return np.asarray(raw)


class CacheRowsDatasource(Datasource):
    """Blocks of ``{row, sample, view, raw, aug, f.<layer>..., logits | logits_topk_*}``, one per cache chunk."""

    def __init__(self, job_json: dict[str, Any], uri: str, s3_endpoint: str | None = None,
                 chunks: list[int] | None = None) -> None:
        super().__init__()
        self.job_json, self.uri, self.s3_endpoint = job_json, uri, s3_endpoint
        handle = CacheHandle.open(uri, s3_endpoint=s3_endpoint, read_only=True)
        self.views = handle.manifest.views
        self.chunks = list(range(handle.n_chunks)) if chunks is None else list(chunks)
        self.bounds = {i: handle.chunk_bounds(i) for i in self.chunks}
        self.row_bytes = int(sum(np.prod(s) * 4 for s in handle.manifest.layers.values()) + 4096)

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum((b - a) * self.row_bytes for a, b in self.bounds.values()))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for i in self.chunks:
            a, b = self.bounds[i]
            meta = BlockMetadata(num_rows=b - a, size_bytes=int((b - a) * self.row_bytes), input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(lambda i=i: [self.read_block(i)], meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def read_block(self, chunk: int):
        ctx = data_context(self.job_json)
        handle = _handle(self.uri, self.s3_endpoint)
        arrays = read_chunk(handle, chunk)  # checksums verified: a corrupted chunk stops the run, named
        a, b = self.bounds[chunk]
        samples, views = rows_to_samples(a, b, self.views)
        split = ctx.split
        first, last = int(split.train_rows[samples[0]]), int(split.train_rows[samples[-1]]) + 1
        raw = split.reader.fetch(first, last)
        pick = split.train_rows[samples] - first
        raw = raw_column([raw[j] for j in pick.tolist()] if isinstance(raw, list) else np.asarray(raw)[pick])
        block: dict[str, np.ndarray] = {"row": np.arange(a, b, dtype=np.int64), "sample": samples, "view": views,
                                        RAW: raw}
        bf16 = handle.manifest.dtype == "bf16"
        for path, value in arrays.items():
            key = output_key(path)
            if key not in (TOPK_IDX, AUG):  # features and logits travel as float32
                value = bf16_bits_to_float32(value) if bf16 else np.asarray(value, dtype=np.float32)
            block[key if key in (LOGITS, TOPK_IDX, TOPK_VAL, AUG) else FEATURE_PREFIX + key] = np.ascontiguousarray(value)
        block.setdefault(AUG, np.zeros((b - a, 0), dtype=np.float32))
        return BlockAccessor.batch_to_block(block)


_HANDLES: dict[tuple[str, str | None], CacheHandle] = {}


def _handle(uri: str, s3_endpoint: str | None) -> CacheHandle:
    key = (uri, s3_endpoint)
    if key not in _HANDLES:
        _HANDLES[key] = CacheHandle.open(uri, s3_endpoint=s3_endpoint, read_only=True)
    return _HANDLES[key]
