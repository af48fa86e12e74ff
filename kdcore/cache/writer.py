"""Filling a cache: crash-safe, resumable, several writers at once, writing overlapped with compute.

- A writer owns whole chunks (``chunk_assignment``); it writes every array of a chunk, then the chunk's
  done marker (with the checksums taken while writing). A build killed at any point leaves markers only
  for finished chunks (markers are put atomically; a chunk's data objects may be torn, but never
  marked); running it again computes and rewrites exactly the chunks without a marker.
- ``finalize`` sets ``complete: true`` once every chunk has its marker; any writer may call it, the one
  that finishes last succeeds.
- ``build`` runs ``compute_fn`` in the calling thread and writes in background writer threads behind a
  bounded queue, so the teacher computes the next chunks while earlier ones are stored.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from kdcore.cache import markers
from kdcore.cache.handle import CacheHandle, array_specs, create_cache, output_key, read_manifest
from kdcore.cache.layout import (
    AUG,
    LOGITS,
    TOPK_IDX,
    TOPK_VAL,
    chunk_assignment,
    to_numpy,
    to_storage,
)
from kdcore.cache.manifest import Manifest, check_manifest
from kdcore.cache.store import CacheStore, join_uri
from kdcore.errors import CacheError, UserError

if TYPE_CHECKING:
    from kdcore.spec.features import CacheSpec

ComputeFn = Callable[[int, int], Mapping[str, Any]]


@dataclass(frozen=True)
class BuildProgress:
    """Reported after each chunk a build writes."""

    chunk: int
    written: int  # chunks written by this build so far
    todo: int  # chunks this build has to write
    elapsed_s: float


@dataclass(frozen=True)
class BuildReport:
    uri: str
    n_chunks: int  # chunks in the cache
    assigned: int  # chunks owned by this writer
    skipped: int  # owned chunks already done before this build
    written: int  # chunks written by this build
    compute_calls: int  # calls of compute_fn (teacher forwards)
    rows_computed: int
    complete: bool  # the cache is complete after this build
    reused: bool  # an existing complete cache was reused as is
    seconds: float


@dataclass(frozen=True)
class PreparedChunk:
    """One chunk's checked arrays in storage form (by zarr path), ready to write."""

    index: int
    data: dict[str, np.ndarray]


class CacheWriter:
    """Writes whole chunks of one cache. Open with ``create``, ``open`` or ``open_or_create``."""

    def __init__(self, handle: CacheHandle, writer: int = 0) -> None:
        self.handle = handle
        self.writer = writer
        self.uri = handle.uri
        self._specs = array_specs(handle.manifest)
        self._algorithm = handle.manifest.checksum

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
               s3_endpoint: str | None = None, overwrite: bool = False, writer: int = 0) -> "CacheWriter":
        """Create a new empty cache (refuses an existing one unless ``overwrite``)."""
        return cls(create_cache(uri, manifest, sample_ids, s3_endpoint=s3_endpoint, overwrite=overwrite), writer)

    @classmethod
    def open(cls, uri: str | os.PathLike, expected: Manifest | None = None, *, s3_endpoint: str | None = None,
             writer: int = 0) -> "CacheWriter":
        """Open an existing cache to resume or help fill it; refuses one built for another job or with
        another chunk layout (CacheMismatchError)."""
        return cls(CacheHandle.open(uri, expected, s3_endpoint=s3_endpoint, read_only=False, layout=True), writer)

    @classmethod
    def open_or_create(cls, uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
                       reuse: bool = True, s3_endpoint: str | None = None, writer: int = 0) -> "CacheWriter":
        """The writer for ``manifest`` at ``uri``: a new cache when there is none, the existing one when it
        matches (complete: nothing to do; incomplete: resume), CacheMismatchError when it was built for
        another job. ``reuse=False`` rebuilds a matching complete cache from scratch."""
        store = CacheStore(uri, s3_endpoint=s3_endpoint, create=True)
        found = read_manifest(store)
        if found is None:
            return cls.create(uri, manifest, sample_ids, s3_endpoint=s3_endpoint, overwrite=True, writer=writer)
        check_manifest(manifest, found, uri=store.uri, layout=not found.complete)
        if found.complete and not reuse:
            return cls.create(uri, manifest, sample_ids, s3_endpoint=s3_endpoint, overwrite=True, writer=writer)
        return cls(CacheHandle(store, found), writer)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.handle.manifest

    @property
    def n_chunks(self) -> int:
        return self.handle.n_chunks

    @property
    def n_rows(self) -> int:
        return self.handle.n_rows

    @property
    def complete(self) -> bool:
        return self.handle.manifest.complete

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``."""
        return self.handle.chunk_bounds(i)

    def done_chunks(self) -> set[int]:
        return self.handle.done_chunks()

    def missing_chunks(self, chunks: Iterable[int] | None = None) -> list[int]:
        """Chunks (of ``chunks``, default all) without a done marker, in order."""
        wanted = range(self.n_chunks) if chunks is None else chunks
        done = self.done_chunks()
        return [i for i in wanted if i not in done]

    # ---- writing -------------------------------------------------------------------------------
    def prepare(self, i: int, arrays: Mapping[str, Any]) -> "PreparedChunk":
        """Check and convert compute_fn outputs for chunk ``i`` into the arrays to store (by zarr path).
        ``build`` runs this in the compute thread, off the writer threads."""
        start, stop = self.chunk_bounds(i)
        rows = stop - start
        m = self.manifest
        given = {str(k): v for k, v in arrays.items()}
        if m.logits_topk is not None and LOGITS in given and TOPK_IDX not in given:
            idx, val = topk(to_numpy(given.pop(LOGITS)), m.logits_topk)
            given[TOPK_IDX], given[TOPK_VAL] = idx, val
        want = {output_key(p): p for p in self._specs}
        missing = sorted(set(want) - set(given))
        extra = sorted(set(given) - set(want))
        if missing or extra:
            raise CacheError(
                f"compute_fn output for rows {start}:{stop} does not fit the cache at {self.uri}: "
                f"missing {missing}, unexpected {extra} (expected keys {sorted(want)})"
            )
        data: dict[str, np.ndarray] = {}
        for key, path in want.items():
            row_shape, _dtype = self._specs[path]
            if path == TOPK_IDX:
                value = to_numpy(given[key]).astype(np.int32, copy=False)
            elif path == AUG:
                value = to_numpy(given[key]).astype(np.float32, copy=False)
            else:
                value = to_storage(given[key], m.dtype)
            if value.shape != (rows, *row_shape):
                raise CacheError(
                    f"compute_fn output {key!r} for rows {start}:{stop} has shape {tuple(value.shape)}, "
                    f"the cache at {self.uri} expects {(rows, *row_shape)}"
                )
            data[path] = np.ascontiguousarray(value)
        return PreparedChunk(i, data)

    def write_chunk(self, i: int, arrays: "Mapping[str, Any] | PreparedChunk") -> markers.ChunkMarker:
        """Write every array of chunk ``i``, then its done marker with the checksums taken as the arrays were
        written. Keys of ``arrays``: layer
        names, "logits" (full; reduced to top-k when the cache stores top-k) or "logits_topk_idx" +
        "logits_topk_val", and "aug" when the cache has augmentation parameters."""
        chunk = arrays if isinstance(arrays, PreparedChunk) else self.prepare(i, arrays)
        if chunk.index != i:
            raise ValueError(f"prepared chunk {chunk.index} passed as chunk {i}")
        sums = {path: self.handle.arrays[path].write(i, value, self._algorithm) for path, value in chunk.data.items()}
        start, stop = self.chunk_bounds(i)
        marker = markers.ChunkMarker(chunk=i, row_start=start, row_stop=stop, checksums=sums,
                                     algorithm=self._algorithm, writer=self.writer)
        markers.write_marker(self.handle.store, marker)
        return marker

    def remove_partials(self, chunks: Iterable[int]) -> int:
        """Delete temporary files that killed writes of ``chunks`` left behind (local caches). Only call it
        for chunks this writer owns: another writer's temporary file may be a write in progress."""
        own = set(chunks)
        if not own or self.handle.store.kind != "local":
            return 0

        def owned(name: str) -> bool:
            head = name.split(".", 2)
            if name.startswith("c.") and len(head) > 1 and head[1].isdigit():
                return int(head[1]) in own
            return head[0].isdigit() and int(head[0]) in own

        n = self.handle.store.remove_partials(markers.DONE_PREFIX, owned)
        for path in self._specs:
            n += self.handle.store.remove_partials(path, owned)
        return n

    def finalize(self) -> bool:
        """Mark the cache complete if every chunk has its marker. Returns whether it is complete."""
        if self.handle.refresh().complete:
            return True
        if self.missing_chunks():
            return False
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.handle.write_manifest(self.manifest.with_updates(complete=True, completed_at=now))
        return True

    def invalidate(self, chunks: Iterable[int]) -> int:
        """Forget chunks (delete their markers) so the next build rewrites them; the cache becomes incomplete."""
        n = 0
        for i in chunks:
            markers.delete_marker(self.handle.store, int(i))
            n += 1
        if n and self.handle.refresh().complete:
            self.handle.write_manifest(self.manifest.with_updates(complete=False, completed_at=None))
        return n


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and values of the k largest logits per row, by descending value; among equal
    values the lower class index comes first (also at the cut-off). O(classes) per row."""
    x = np.asarray(logits, dtype=np.float32)
    rows, classes = x.shape
    kth = np.partition(x, classes - k, axis=1)[:, classes - k][:, None]  # k-th largest value per row
    above = x > kth
    tied = x == kth
    room = k - above.sum(axis=1, keepdims=True)  # how many tied values still fit
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    idx = np.nonzero(chosen)[1].reshape(rows, k)  # ascending class index within each row
    vals = np.take_along_axis(x, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties keep ascending index
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(vals, order, axis=1)


_DONE = object()


def build(cache: CacheWriter, compute_fn: ComputeFn, *, writer: int = 0, n_writers: int = 1,
          progress: Callable[[BuildProgress], None] | None = None, queue_size: int = 2,
          writer_threads: int = 2, finalize: bool = True) -> BuildReport:
    """Compute and write this writer's missing chunks; ``compute_fn(row_start, row_stop)`` returns the
    rows' arrays (see ``CacheWriter.write_chunk``). ``compute_fn`` runs in the calling thread; chunks are
    stored by ``writer_threads`` background threads behind a queue of ``queue_size`` chunks, so the teacher
    computes the next chunks while earlier ones are written. A complete cache returns at once with
    ``compute_calls == 0``.

    ``compute_fn`` must return arrays it does not reuse afterwards (not a buffer it fills again for the next
    chunk): they are written after it returns, while it computes the next chunks. ``progress`` is called
    from a writer thread after each chunk (one call at a time)."""
    t0 = time.perf_counter()
    cache.writer = writer
    mine = chunk_assignment(cache.n_chunks, writer, n_writers)
    if cache.handle.refresh().complete:
        return BuildReport(cache.uri, cache.n_chunks, len(mine), len(mine), 0, 0, 0, True, True,
                           time.perf_counter() - t0)
    todo = cache.missing_chunks(mine)
    cache.remove_partials(todo)
    q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
    failure: list[BaseException] = []
    written = [0]
    lock = threading.Lock()

    def drain() -> None:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if failure:
                continue  # keep draining so the producer never blocks
            try:
                cache.write_chunk(item.index, item)
                with lock:
                    written[0] += 1
                    if progress is not None:
                        progress(BuildProgress(item.index, written[0], len(todo), time.perf_counter() - t0))
            except BaseException as err:  # noqa: BLE001 - reported to the caller below
                failure.append(err)

    threads = [threading.Thread(target=drain, name=f"kd-cache-writer-{writer}.{k}", daemon=True)
               for k in range(max(1, writer_threads))]
    for t in threads:
        t.start()
    calls = rows = 0
    try:
        for i in todo:
            if failure:
                break
            start, stop = cache.chunk_bounds(i)
            out = compute_fn(start, stop)
            calls += 1
            rows += stop - start
            chunk = cache.prepare(i, out)  # checks and conversion here, in the compute thread
            while not failure:
                try:
                    q.put(chunk, timeout=0.5)
                    break
                except queue.Full:
                    pass
    finally:
        for _ in threads:
            q.put(_DONE)
        for t in threads:
            t.join()
    if failure:
        raise CacheError(f"writing to the cache at {cache.uri} failed: {failure[0]}") from failure[0]
    complete = cache.finalize() if finalize else cache.handle.refresh().complete
    return BuildReport(cache.uri, cache.n_chunks, len(mine), len(mine) - len(todo), written[0], calls, rows,
                       complete, False, time.perf_counter() - t0)


def build_cache(spec: "CacheSpec", manifest: Manifest, sample_ids: np.ndarray, compute_fn: ComputeFn, *,
                root: str | os.PathLike | None = None, writer: int = 0, n_writers: int = 1,
                progress: Callable[[BuildProgress], None] | None = None) -> BuildReport:
    """Build (or reuse, or resume) the cache a job asks for.

    The location is ``spec.uri``, else ``root/<manifest.key()>``. With ``spec.reuse`` and no explicit uri,
    a complete matching cache anywhere under ``root`` is reused (found by fingerprint). Writer 0 creates the
    cache; other writers only open it (create it first, then start them)."""
    if spec.uri is None and root is None:
        raise UserError("no cache location: set features.cache.uri (or give a cache root)")
    if spec.uri is None and spec.reuse:
        from kdcore.cache.admin import find_cache

        found = find_cache(root, manifest, s3_endpoint=spec.s3_endpoint)  # type: ignore[arg-type]
        if found is not None:
            n = manifest.n_chunks
            return BuildReport(found, n, n, n, 0, 0, 0, True, True, 0.0)
    uri = spec.uri or join_uri(root, manifest.key())  # type: ignore[arg-type]
    if writer == 0:
        w = CacheWriter.open_or_create(uri, manifest, sample_ids, reuse=spec.reuse, s3_endpoint=spec.s3_endpoint)
    else:
        w = CacheWriter.open(uri, manifest, s3_endpoint=spec.s3_endpoint, writer=writer)
    return build(w, compute_fn, writer=writer, n_writers=n_writers, progress=progress)
