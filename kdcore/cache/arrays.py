"""Whole-chunk I/O on one per-row zarr array.

Uncompressed arrays (the default, and the fastest to read) have chunks that are just the rows'
little-endian C-order bytes, padded with zeros to ``chunk_rows`` at the end of the array: exactly
what zarr's ``bytes`` codec stores. For those, a chunk is written as one raw object (one put) and read
without a copy (a memory map of the local file, or the fetched object), skipping zarr's per-call codec
machinery. Compressed arrays go through zarr. Either way the result is a standard zarr v3 array, which
zarr itself reads back unchanged.
"""

from __future__ import annotations

import sys

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from kdcore.cache.checksum import checksum
from kdcore.cache.stores import CacheStore
from kdcore.errors import CacheError


def _is_raw(arr: zarr.Array) -> bool:
    codecs = tuple(arr.metadata.codecs)
    if sys.byteorder != "little" or len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    return endian is None or endian.value == "little"


class ArrayIO:
    """Chunk-granular reads and writes of the per-row array at ``path`` of a cache."""

    def __init__(self, store: CacheStore, arr: zarr.Array, path: str, n_rows: int, chunk_rows: int) -> None:
        self.store = store
        self.arr = arr
        self.path = path
        self.n_rows = n_rows
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(arr.dtype)
        self.row_shape = tuple(int(d) for d in arr.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.raw = _is_raw(arr)
        self._zeros = (0,) * len(self.row_shape)

    def key(self, i: int) -> str:
        return f"{self.path}/{self.arr.metadata.encode_chunk_key((i, *self._zeros))}"

    def bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def write(self, i: int, data: np.ndarray, algorithm: str = "crc32c") -> str:
        """Store chunk ``i`` (``data``: exactly its rows, storage dtype); returns the checksum of ``data``.

        Uncompressed chunks are checksummed while they are written where the store can (local: one pass
        over memory)."""
        start, stop = self.bounds(i)
        data = np.ascontiguousarray(data, dtype=self.dtype)
        if self.raw:
            payload = data
            if stop - start < self.chunk_rows:  # last chunk: zarr stores it padded to the full chunk shape
                payload = np.zeros((self.chunk_rows, *self.row_shape), dtype=self.dtype)
                payload[: stop - start] = data
            fused = self.store.put_chunk(self.key(i), payload, crc_bytes=data.nbytes if algorithm == "crc32c" else 0)
            return fused if fused is not None and algorithm == "crc32c" else checksum(data, algorithm)
        self.arr[start:stop] = data
        return checksum(data, algorithm)

    def view(self, i: int) -> np.ndarray:
        """Chunk ``i``'s rows, ``(rows, *row_shape)``, read-only. Uncompressed local chunks are memory-mapped
        (no copy; pages populated by the calling thread), other raw chunks are the fetched object,
        compressed ones are decoded by zarr."""
        start, stop = self.bounds(i)
        rows = stop - start
        if self.raw:
            data = self.store.map(self.key(i), rows * self.row_bytes)
            if data is None:
                raise CacheError(
                    f"chunk {i} of {self.path} is missing from {self.store.uri}; run `kd cache verify --repair "
                    f"{self.store.uri}`, then rerun", chunk=i, array=self.path, uri=self.store.uri)
            return data.view(self.dtype).reshape(rows, *self.row_shape)
        try:
            return self.arr[start:stop]
        except Exception as err:  # decode failures of a damaged object
            raise CacheError(
                f"chunk {i} of {self.path} in {self.store.uri} cannot be decoded ({err}); "
                f"run `kd cache verify --repair {self.store.uri}`, then rerun", chunk=i, array=self.path,
                uri=self.store.uri) from err

    def read(self, i: int) -> np.ndarray:
        """Chunk ``i``'s rows as a fresh writable array."""
        return np.array(self.view(i))

    def exists(self, i: int) -> bool:
        return self.store.exists(self.key(i))
