"""Writing whole chunks of a cache: crash-safe, resumable, several writers at once.

- A chunk is written array by array, then its done marker (with the checksums taken while writing).
  A build killed at any point leaves markers only for finished chunks (markers are put atomically; a
  chunk's data objects may be torn, but never marked); running it again computes and rewrites exactly
  the chunks without a marker.
- ``finalize`` sets ``complete: true`` once every chunk has its marker; any writer may call it, the one
  that finishes last succeeds.

Which chunks to compute, and how, is ``build``'s business (``kdcore.cache.build``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import numpy as np

from kdcore.cache import markers
from kdcore.cache.handle import CacheHandle
from kdcore.cache.layout import AUG, LEASE_GROUP, LOGITS, TOPK_IDX, TOPK_VAL, array_specs, output_key, to_numpy, to_storage, topk
from kdcore.cache.manifest import Manifest
from kdcore.errors import CacheError


@dataclass(frozen=True)
class PreparedChunk:
    """One chunk's checked arrays in storage form (by zarr path), ready to write."""

    index: int
    data: dict[str, np.ndarray]


def _chunk_of(name: str) -> int | None:
    """The chunk index in a temporary file name (``c.<i>.0...partial`` of data, ``<i>.json...`` of markers)."""
    head = name.split(".", 2)
    if name.startswith("c.") and len(head) > 1 and head[1].isdigit():
        return int(head[1])
    return int(head[0]) if head[0].isdigit() else None


class CacheWriter(CacheHandle):
    """An opened cache that writes whole chunks. Opens like a ``CacheHandle`` (``open`` read-write, checking
    the chunk layout too; ``create``; ``open_or_create``); ``writer`` is recorded in the markers it writes."""

    writable = True
    writer = 0

    @classmethod
    def open(cls, uri: str | os.PathLike, expected: Manifest | None = None, *, s3_endpoint: str | None = None,
             writer: int = 0, **kw) -> "CacheWriter":
        """Open an existing cache to resume or help fill it; refuses one built for another job or with
        another chunk layout (CacheMismatchError)."""
        w = super().open(uri, expected, s3_endpoint=s3_endpoint, **kw)
        w.writer = writer
        return w

    def prepare(self, i: int, arrays: Mapping[str, Any]) -> PreparedChunk:
        """Check and convert compute_fn outputs for chunk ``i`` into the arrays to store (by zarr path).
        Builds run this in the compute thread, off the writer threads."""
        start, stop = self.chunk_bounds(i)
        rows = stop - start
        m = self.manifest
        given = {str(k): v for k, v in arrays.items()}
        if m.logits_topk is not None and LOGITS in given and TOPK_IDX not in given:
            given[TOPK_IDX], given[TOPK_VAL] = topk(to_numpy(given.pop(LOGITS)), m.logits_topk)
        specs = array_specs(m)
        want = {output_key(p): p for p in specs}
        missing, extra = sorted(set(want) - set(given)), sorted(set(given) - set(want))
        if missing or extra:
            raise CacheError(
                f"compute_fn output for rows {start}:{stop} does not fit the cache at {self.uri}: "
                f"missing {missing}, unexpected {extra} (expected keys {sorted(want)})"
            )
        data: dict[str, np.ndarray] = {}
        for key, path in want.items():
            row_shape, _dtype = specs[path]
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

    def write_chunk(self, i: int, arrays: "Mapping[str, Any] | PreparedChunk", *,
                    writer: int | None = None) -> markers.ChunkMarker:
        """Write every array of chunk ``i``, then its done marker with the checksums taken as the arrays
        were written. Keys of ``arrays``: layer names, "logits" (full; reduced to top-k when the cache
        stores top-k) or "logits_topk_idx" + "logits_topk_val", and "aug" when the cache has augmentation
        parameters."""
        chunk = arrays if isinstance(arrays, PreparedChunk) else self.prepare(i, arrays)
        if chunk.index != i:
            raise ValueError(f"prepared chunk {chunk.index} passed as chunk {i}")
        algorithm = self.manifest.checksum
        sums = {path: self.arrays[path].write(i, value, algorithm) for path, value in chunk.data.items()}
        start, stop = self.chunk_bounds(i)
        marker = markers.ChunkMarker(chunk=i, row_start=start, row_stop=stop, checksums=sums, algorithm=algorithm,
                                     writer=self.writer if writer is None else writer)
        markers.write_marker(self.store, marker)
        return marker

    def partial_files(self) -> dict[int, list[tuple[str, str]]]:
        """Temporary files that killed writes left behind (local stores), by chunk: (directory, name)."""
        out: dict[int, list[tuple[str, str]]] = {}
        for prefix in (markers.DONE_PREFIX, *self.arrays):
            for name in self.store.partials(prefix):
                chunk = _chunk_of(name)
                if chunk is not None:
                    out.setdefault(chunk, []).append((prefix, name))
        return out

    def remove_partials(self, chunks: Iterable[int], partials: dict[int, list[tuple[str, str]]] | None = None) -> int:
        """Delete the temporary files of killed writes of ``chunks`` (``partials``: as listed by
        ``partial_files``). Only for chunks this writer holds: another writer's temporary file may be a
        write in progress."""
        found = self.partial_files() if partials is None else partials
        n = 0
        for i in set(chunks):
            for prefix, name in found.get(i, ()):
                self.store.delete_partial(prefix, name)
                n += 1
        return n

    def finalize(self) -> bool:
        """Mark the cache complete if every chunk has its marker, and drop any leases left (by builders
        killed after writing their chunks' markers). Returns whether it is complete."""
        if self.refresh().complete:
            return True
        if self.missing_chunks():
            return False
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.write_manifest(self.manifest.with_updates(complete=True, completed_at=now))
        self.store.remove(LEASE_GROUP)
        return True

    def invalidate(self, chunks: Iterable[int]) -> int:
        """Forget chunks (delete their markers) so the next build rewrites them; the cache becomes incomplete."""
        n = 0
        for i in chunks:
            markers.delete_marker(self.store, int(i))
            n += 1
        if n and self.refresh().complete:
            self.write_manifest(self.manifest.with_updates(complete=False, completed_at=None))
        return n
