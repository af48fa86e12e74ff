"""``CacheRowsDatasource``: blocks of feature-cache rows, each holding the rows' teacher outputs and augmentation
parameters joined with the stored (still encoded) input rows they were computed from, already mixed.

A chunk is a contiguous range of cache rows, hence of training rows, hence one contiguous read of the
source. Each epoch the chunks come in a new random order, grouped into windows of ``shuffle_window`` chunks;
one read task per window reads its chunks (one sequential read each), deals the window's samples at random
into blocks (a sample's views stay in one block, so it is decoded once) and shuffles each block's rows. The
blocks are sized (``block_rows``) so that Ray Data passes each one to the decode as it is and the decoded
block leaves the task at once: Ray Data holds a task's output until it exceeds the target block size, so a
block of encoded rows cut to that size would decode to a little less (the views' pixels are often smaller
than the encoded bytes) and wait for the next one; the first batch of an epoch would wait two decodes. Consumers cut batches from the blocks as they come: the mixing a local shuffle buffer of the
window's rows would give, with no buffer to fill and no copy in the training worker. Decoding and the
augmentation replay are :class:`services.data.transforms.DecodeInputs` (``map_batches``), which Ray Data fuses
into the read's task, a block at a time; any CPU node can run them.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from kdcore.cache.handle import CacheHandle
from kdcore.cache.jobs import check_shared
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
    """Blocks of ``{row, sample, view, raw, aug, f.<layer>..., logits | logits_topk_*}``: a window of ``window``
    chunks dealt into blocks of ``block_rows`` rows (as many as it has chunks without ``block_bytes``;
    ``window=1``: a block is one chunk's rows, in order).

    ``uri``: the cache, or ``[(teacher, uri), ...]``: the caches of a multi-teacher job (they hold the same rows in
    the same chunks, checked), whose chunk ``i`` is read from each and joined: features as ``f.<teacher>/<layer>``
    and logits (top-k ones filled in) as ``f.<teacher>/logits``, the keys the distiller reads."""

    def __init__(self, job_json: dict[str, Any], uri: str | list[tuple[str, str]], s3_endpoint: str | None = None,
                 chunks: list[int] | None = None, window: int = 1, block_bytes: int | None = None) -> None:
        super().__init__()
        self.job_json, self.s3_endpoint, self.window = job_json, s3_endpoint, max(1, int(window))
        self.block_bytes = block_bytes  # the dataset's target block size: blocks are sized to it (block_rows)
        self.caches: list[tuple[str | None, str]] = [(None, uri)] if isinstance(uri, str) else list(uri)
        handles = [CacheHandle.open(u, s3_endpoint=s3_endpoint, read_only=True) for _, u in self.caches]
        for (name, _), other in zip(self.caches[1:], handles[1:]):
            check_shared(self.caches[0][0], handles[0], name, other)
        handle = handles[0]
        self.views = handle.manifest.views
        self.chunks = list(range(handle.n_chunks)) if chunks is None else list(chunks)
        self.bounds = {i: handle.chunk_bounds(i) for i in self.chunks}
        self.row_bytes = int(sum(np.prod(s) * 4 for h in handles for s in h.manifest.layers.values()) + 4096)

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum((b - a) * self.row_bytes for a, b in self.bounds.values()))

    @property
    def num_tasks(self) -> int:
        """How many read tasks an epoch has (one per window)."""
        return -(-len(self.chunks) // self.window)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        """One task per window of chunks, in a new random order at each call: Ray Data plans every execution
        (each epoch of a Train run) again, so this is the per-epoch shuffle. (``randomize_block_order`` would
        reorder blocks too, but in Ray 2.60 it waits for every read to finish before the first decode, so every
        chunk's stored rows would sit in the object store at once: memory growing with the dataset.)"""
        rng = np.random.default_rng()
        order = rng.permutation(self.chunks).tolist()
        nonce = int(rng.integers(2**62))
        tasks = []
        for w, start in enumerate(range(0, len(order), self.window)):
            chunks = order[start:start + self.window]
            rows = sum(self.bounds[i][1] - self.bounds[i][0] for i in chunks)
            meta = BlockMetadata(num_rows=rows, size_bytes=int(rows * self.row_bytes), input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(lambda chunks=chunks, seed=(nonce, w): self.read_window(chunks, seed), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def read_window(self, chunks: list[int], seed: tuple[int, ...]) -> Iterator[Any]:
        """The blocks of one window: each chunk read whole, the samples dealt at random into blocks of
        ``block_rows`` (without ``block_bytes``: ``len(chunks)`` blocks, and one chunk alone comes back as it
        is), each block's rows shuffled (seeded by ``seed``)."""
        if len(chunks) == 1 and self.block_bytes is None:
            yield self.read_block(chunks[0])
            return
        parts = [self.read_columns(i) for i in chunks]
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(cols["sample"])
        # blocks of at most block_rows, as even as a window allows (over 0.8x of it from five blocks up)
        blocks = len(chunks) if self.block_bytes is None else -(-n // self.block_rows(cols))
        for pick in mix_window(cols["sample"], blocks, np.random.default_rng(list(seed))):
            yield BlockAccessor.batch_to_block({k: v[pick] for k, v in cols.items()})

    def block_rows(self, cols: dict[str, np.ndarray]) -> int:
        """Most rows per block: encoded in up to 1.3x ``block_bytes`` and decoded to as much (the larger of the
        two sizes 1.3x, capped at 1.45x), so that Ray Data neither cuts a block (it cuts from 1.5x) nor holds its
        decode back (it holds a task's output until it exceeds 1x): both hold while the encoded and the decoded
        rows differ in size by less than ~1.4x, and the blocks of a window are within 0.8x of this."""
        n = max(1, len(cols["sample"]))
        raw = cols[RAW]
        raw_bytes = sum(len(v) for v in raw.tolist()) + 8 * len(raw) if raw.dtype == object else raw.nbytes
        other = sum(v.nbytes for k, v in cols.items() if k != RAW)
        mapper = data_context(self.job_json).mapper
        x_row = int(np.prod(mapper.input_shape)) * (1 if mapper.pixels else 4)
        enc, dec = (raw_bytes + other) / n, other / n + x_row  # bytes a row takes before and after the decode
        t = float(self.block_bytes)
        want = min(1.45 * t, 1.3 * t * max(1.0, enc / dec))  # a block's encoded bytes, at most
        return max(1, int(want / enc))

    def read_block(self, chunk: int):
        """Chunk ``chunk``'s rows as one block, in order."""
        return BlockAccessor.batch_to_block(self.read_columns(chunk))

    def read_columns(self, chunk: int) -> dict[str, np.ndarray]:
        """Chunk ``chunk``'s rows as numpy columns (the encoded rows a 1-D object array)."""
        ctx = data_context(self.job_json)
        a, b = self.bounds[chunk]
        samples, views = rows_to_samples(a, b, self.views)
        split = ctx.split
        first, last = int(split.train_rows[samples[0]]), int(split.train_rows[samples[-1]]) + 1
        raw = split.reader.fetch(first, last)
        pick = split.train_rows[samples] - first
        # Every row carries its sample's stored row (encoded bytes are small next to the decoded input), so a
        # block cut or merged anywhere by Ray Data still decodes; DecodeInputs decodes each sample once per batch.
        if isinstance(raw, list):
            raw = raw_column([raw[j] for j in pick.tolist()])
        else:
            raw = raw_column(np.asarray(raw)[pick])
        block: dict[str, np.ndarray] = {"row": np.arange(a, b, dtype=np.int64), "sample": samples, "view": views,
                                        RAW: raw}
        for name, uri in self.caches:
            block.update(_teacher_columns(_handle(uri, self.s3_endpoint), chunk, name))
        block.setdefault(AUG, np.zeros((b - a, 0), dtype=np.float32))
        return block


def _teacher_columns(handle: CacheHandle, chunk: int, teacher: str | None) -> dict[str, np.ndarray]:
    """Chunk ``chunk`` of one teacher's cache as block columns (``teacher``: its name in a multi-teacher job)."""
    arrays = read_chunk(handle, chunk)  # checksums verified: a corrupted chunk stops the run, named
    m = handle.manifest
    out: dict[str, np.ndarray] = {}
    for path, value in arrays.items():
        key = output_key(path)
        if key not in (TOPK_IDX, AUG):  # features and logits travel as float32
            value = bf16_bits_to_float32(value) if m.dtype == "bf16" else np.asarray(value, dtype=np.float32)
        if key == AUG:
            out.setdefault(AUG, np.ascontiguousarray(value))  # every teacher's cache holds the same parameters
        elif teacher is None:
            out[key if key in (LOGITS, TOPK_IDX, TOPK_VAL) else FEATURE_PREFIX + key] = np.ascontiguousarray(value)
        elif key not in (TOPK_IDX, TOPK_VAL):
            out[f"{FEATURE_PREFIX}{teacher}/{key}"] = np.ascontiguousarray(value)
    if teacher is not None and TOPK_IDX in {output_key(p) for p in arrays}:
        idx = np.asarray(next(v for p, v in arrays.items() if output_key(p) == TOPK_IDX), dtype=np.int64)
        val = next(v for p, v in arrays.items() if output_key(p) == TOPK_VAL)
        val = bf16_bits_to_float32(val) if m.dtype == "bf16" else np.asarray(val, dtype=np.float32)
        dense = np.full((len(idx), m.num_classes or 0), -1e4, dtype=np.float32)  # as shard.teacher_logits fills them
        np.put_along_axis(dense, idx, val, axis=1)
        out[f"{FEATURE_PREFIX}{teacher}/{LOGITS}"] = dense
    return out


def mix_window(samples: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of ``parts`` blocks that deal a window's samples out at random: every row of a sample goes
    to the same block (so it is decoded once), blocks differ in rows by at most two
    samples' rows (a sample cut by a chunk boundary has fewer here), and each block's rows come in random order
    (a sample's views end up apart)."""
    uniq, inverse = np.unique(samples, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uniq))
    order = rng.permutation(len(uniq))  # samples in a random order, then cut into ``parts`` runs of equal rows
    starts = np.cumsum(counts[order]) - counts[order]
    block_of_sample = np.empty(len(uniq), dtype=np.int64)
    block_of_sample[order] = starts * parts // max(1, len(samples))
    block_of = block_of_sample[inverse]
    out = []
    for k in range(parts):
        rows = np.flatnonzero(block_of == k)
        out.append(rows[rng.permutation(len(rows))])
    return [rows for rows in out if len(rows)]


_HANDLES: dict[tuple[str, str | None], CacheHandle] = {}


def _handle(uri: str, s3_endpoint: str | None) -> CacheHandle:
    key = (uri, s3_endpoint)
    if key not in _HANDLES:
        _HANDLES[key] = CacheHandle.open(uri, s3_endpoint=s3_endpoint, read_only=True)
    return _HANDLES[key]
