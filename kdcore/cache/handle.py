"""An opened cache: its store, zarr group, manifest and per-row arrays; opening and creating one.

``CacheHandle.open`` opens an existing cache, ``create`` makes a new empty one, ``open_or_create`` is
what a build uses: the matching cache when there is one, else a new one (created by one builder at a
time: concurrent builders of one location take the ``create`` lease, see ``lease``). ``CacheWriter``
(``writer``) is a handle that also writes; it opens the same ways.
"""

from __future__ import annotations

import os
import time
from typing import Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from kdcore.cache import markers
from kdcore.cache.arrays import ArrayIO
from kdcore.cache.layout import (
    AUG,
    DONE_GROUP,
    LEASE_GROUP,
    LOGITS,
    SAMPLE_IDS,
    TOPK_IDX,
    TOPK_VAL,
    array_specs,
    chunk_bounds,
    logical_dtype,
)
from kdcore.cache.lease import Leases
from kdcore.cache.manifest import ATTR_KEY, Manifest, check_manifest
from kdcore.cache.stores import CacheStore, open_store
from kdcore.errors import CacheError, UserError

# top-level names a cache (or its interrupted creation) may hold, up to the first "."
_CACHE_ENTRIES = {"zarr", "layers", LOGITS, TOPK_IDX, TOPK_VAL, AUG, SAMPLE_IDS, DONE_GROUP, LEASE_GROUP}

RESUME_HINT = "resume it with `kd cache build JOB.yaml` (only the missing chunks are computed)"


def _compressors(compression: str):
    if compression == "none":
        return None
    if compression == "zstd":
        return (ZstdCodec(level=3),)
    if compression == "blosc":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    raise UserError(f"unknown compression {compression!r}")


def read_manifest(store: CacheStore) -> Manifest | None:
    """The manifest of the cache in ``store``; None when there is no (finished) group metadata."""
    raw = store.get("zarr.json")
    return None if raw is None else Manifest.from_group_meta(raw.tobytes(), uri=store.uri)


class CacheHandle:
    """An opened cache. Use ``open``, ``create`` or ``open_or_create``."""

    writable = False  # what ``open`` opens by default; a CacheWriter opens read-write, checking the layout

    def __init__(self, store: CacheStore, manifest: Manifest) -> None:
        self.store = store
        self.uri = store.uri
        self.manifest = manifest
        self.group = zarr.open_group(store=store.zarr_store, mode="r" if store.read_only else "r+", zarr_format=3)
        self.arrays: dict[str, ArrayIO] = {}
        for path in array_specs(manifest):
            try:
                arr = self.group[path]
            except KeyError:
                raise CacheError(f"cache at {self.uri} lacks its array {path!r}; it is damaged, remove it and rebuild")
            self.arrays[path] = ArrayIO(store, arr, path, manifest.n_rows, manifest.chunk_rows)
        self._sample_ids: np.ndarray | None = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str | os.PathLike, expected: Manifest | None = None, *, s3_endpoint: str | None = None,
             read_only: bool | None = None, layout: bool | None = None):
        """Open an existing cache; with ``expected``, refuse one built for another job (CacheMismatchError;
        ``layout``: also another chunk layout, as resuming needs)."""
        read_only = not cls.writable if read_only is None else read_only
        store = open_store(uri, s3_endpoint=s3_endpoint, read_only=read_only)
        found = read_manifest(store)
        if found is None:
            raise CacheError(f"no kd cache at {store.uri} (no manifest); build it with `kd cache build JOB.yaml`")
        if expected is not None:
            check_manifest(expected, found, uri=store.uri, layout=cls.writable if layout is None else layout)
        return cls(store, found)

    @classmethod
    def create(cls, uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
               s3_endpoint: str | None = None, overwrite: bool = False):
        """Create an empty cache: group, arrays, sample ids, then the manifest (``complete: false``) last,
        so a cache whose creation was interrupted has no manifest and is simply created again.
        Refuses (CacheError) when a kd cache already exists at ``uri`` unless ``overwrite``."""
        store = open_store(uri, s3_endpoint=s3_endpoint, create=True)
        _create(store, manifest, sample_ids, overwrite=overwrite)
        return cls(store, manifest.with_updates(complete=False, completed_at=None))

    @classmethod
    def open_or_create(cls, uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
                       reuse: bool = True, s3_endpoint: str | None = None, poll_s: float = 0.2):
        """The cache for ``manifest`` at ``uri``: a new one when there is none, the existing one when it
        matches (complete: nothing to do; incomplete: resume), CacheMismatchError when it was built for
        another job. ``reuse=False`` rebuilds a matching complete cache from scratch."""
        store = open_store(uri, s3_endpoint=s3_endpoint, create=True)
        leases = Leases(store)
        while True:
            found = read_manifest(store)
            if found is not None:
                check_manifest(manifest, found, uri=store.uri, layout=not found.complete)
                if not found.complete or reuse:
                    return cls(store, found)
            if leases.claim("create"):
                try:
                    if read_manifest(store) == found:  # nobody created (or recreated) it meanwhile
                        _create(store, manifest, sample_ids, overwrite=True)
                        return cls(store, manifest.with_updates(complete=False, completed_at=None))
                finally:
                    leases.release("create")
                reuse = True  # another builder (re)created it: use theirs
            else:
                time.sleep(poll_s)  # another builder is creating it

    # ---- manifest ------------------------------------------------------------------------------
    def refresh(self) -> Manifest:
        found = read_manifest(self.store)
        if found is None:
            raise CacheError(f"the manifest of {self.uri} disappeared (was the cache removed?)")
        self.manifest = found
        return found

    def write_manifest(self, manifest: Manifest) -> None:
        self.group.attrs.update({ATTR_KEY: manifest.to_dict()})
        self.manifest = manifest

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def require_complete(self) -> None:
        """Raise CacheError unless the cache is complete (re-reads the manifest)."""
        m = self.refresh()
        if m.complete:
            return
        done = len(markers.done_chunks(self.store))
        raise CacheError(
            f"cache at {self.uri} is incomplete ({done} of {m.n_chunks} chunks written) and cannot be used for "
            f"training; {RESUME_HINT}"
        )

    # ---- rows and chunks ------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    @property
    def n_chunks(self) -> int:
        return self.manifest.n_chunks

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``."""
        return chunk_bounds(i, self.manifest.n_rows, self.manifest.chunk_rows)

    def done_chunks(self) -> set[int]:
        return markers.done_chunks(self.store)

    def missing_chunks(self, chunks: Iterable[int] | None = None) -> list[int]:
        """Chunks (of ``chunks``, default all) without a done marker, in order."""
        done = self.done_chunks()
        return [i for i in (range(self.n_chunks) if chunks is None else chunks) if i not in done]

    def sample_ids(self) -> np.ndarray:
        """The dataset ids, one per sample (row r holds sample r // views)."""
        if self._sample_ids is None:
            self._sample_ids = np.asarray(self.group[SAMPLE_IDS][:], dtype=np.int64)
        return self._sample_ids


def create_cache(uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
                 s3_endpoint: str | None = None, overwrite: bool = False) -> CacheHandle:
    """``CacheHandle.create``."""
    return CacheHandle.create(uri, manifest, sample_ids, s3_endpoint=s3_endpoint, overwrite=overwrite)


def _create(store: CacheStore, manifest: Manifest, sample_ids: np.ndarray, *, overwrite: bool) -> None:
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.shape[0] != manifest.n_samples:
        raise UserError(f"sample_ids must be 1-D with {manifest.n_samples} entries, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise UserError(f"sample_ids must be integers, got dtype {ids.dtype}")
    existing = read_manifest(store)
    if existing is not None and not overwrite:
        raise CacheError(f"a kd cache already exists at {store.uri}; open it, or remove it with `kd cache rm`")
    entries = [e.strip("/") for e in store.list_dir("")]
    if existing is None and entries:
        # leftovers of an interrupted creation or removal are ours to clear; anything else is not
        foreign = [e for e in entries if e.split(".", 1)[0] not in _CACHE_ENTRIES]
        if foreign:
            raise CacheError(
                f"{store.uri} is not empty and is not a kd cache (it holds {sorted(foreign)[:5]}); "
                "refusing to create a cache over it: point features.cache.uri at a new or empty location"
            )
    for entry in entries:
        if entry != LEASE_GROUP:  # the create lease of the builder doing this
            store.remove(entry)
    m = manifest.with_updates(complete=False, completed_at=None)
    # Lay the hierarchy out in memory with zarr, then upload it in one go (a few objects instead of
    # zarr's many existence checks per node: that matters on S3), the root document with the manifest last.
    staging: dict = {}
    group = zarr.create_group(store=MemoryStore(store_dict=staging), zarr_format=3, attributes={})
    compressors = _compressors(m.compression)
    for path, (row_shape, dtype) in array_specs(m).items():
        group.create_array(
            path, shape=(m.n_rows, *row_shape), dtype=dtype, chunks=(m.chunk_rows, *row_shape),
            compressors=compressors, filters=None, fill_value=0, config={"write_empty_chunks": True},
            chunk_key_encoding={"name": "default", "separator": "."},
            attributes={"kd_dtype": logical_dtype(path, m.dtype)},
        )
    ids_arr = group.create_array(
        SAMPLE_IDS, shape=(m.n_samples,), dtype=np.int64, chunks=(min(m.n_samples, 1 << 20),),
        compressors=None, filters=None, fill_value=0, config={"write_empty_chunks": True},
    )
    ids_arr[:] = ids.astype(np.int64)
    group.create_group(DONE_GROUP, attributes={"kd": "per-chunk done markers NNNNNNNN.json"})
    group.attrs.update({ATTR_KEY: m.to_dict()})
    root = staging.pop("zarr.json")
    store.set_many([(key, buf.as_numpy_array()) for key, buf in sorted(staging.items())])
    store.set("zarr.json", root.as_numpy_array())
