"""An opened cache: its store, zarr group, manifest and per-row arrays. Creation lives here too."""

from __future__ import annotations

import json
import os

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from kdcore.cache import markers
from kdcore.cache.arrays import ArrayIO
from kdcore.cache.layout import (
    AUG,
    DONE_GROUP,
    LOGITS,
    SAMPLE_IDS,
    TOPK_IDX,
    TOPK_VAL,
    chunk_bounds,
    layer_array,
    storage_dtype,
)
from kdcore.cache.manifest import ATTR_KEY, Manifest, check_manifest
from kdcore.cache.store import CacheStore
from kdcore.errors import CacheError, UserError

# top-level names a cache (or its interrupted creation) may hold, up to the first "."
_CACHE_ENTRIES = {"zarr", "layers", "logits", "logits_topk_idx", "logits_topk_val", "aug", "sample_ids", "kd_done"}

RESUME_HINT = "resume it with `kd cache build JOB.yaml` (only the missing chunks are computed)"


def _compressors(compression: str):
    if compression == "none":
        return None
    if compression == "zstd":
        return (ZstdCodec(level=3),)
    if compression == "blosc":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    raise UserError(f"unknown compression {compression!r}")


def array_specs(m: Manifest) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row arrays of a cache: zarr path -> (row shape, storage dtype). Keys of compute_fn outputs are
    layer names, "logits" (or the two top-k arrays) and "aug"; see ``output_key``."""
    dt = storage_dtype(m.dtype)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, shape in m.layers.items():
        specs[layer_array(name)] = (tuple(shape), dt)
    if m.num_classes is not None:
        if m.logits_topk is None:
            specs[LOGITS] = ((m.num_classes,), dt)
        else:
            specs[TOPK_IDX] = ((m.logits_topk,), np.dtype(np.int32))
            specs[TOPK_VAL] = ((m.logits_topk,), dt)
    if m.aug_params > 0:
        specs[AUG] = ((m.aug_params,), np.dtype(np.float32))
    return specs


def output_key(path: str) -> str:
    """The compute_fn / batch key of an array path (``layers/x`` -> ``x``)."""
    return path[len("layers/"):] if path.startswith("layers/") else path


def read_manifest(store: CacheStore) -> Manifest | None:
    """The manifest of the cache in ``store``; None when there is no (finished) group metadata."""
    raw = store.get("zarr.json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw.tobytes())
    except ValueError:
        raise CacheError(f"{store.uri}/zarr.json is not valid JSON; the cache is damaged, remove it and rebuild")
    attrs = (meta.get("attributes") or {}).get(ATTR_KEY)
    if attrs is None:
        return None
    return Manifest.from_dict(attrs)


class CacheHandle:
    """An opened cache. Use ``CacheHandle.open`` / ``create_cache``."""

    def __init__(self, store: CacheStore, manifest: Manifest) -> None:
        self.store = store
        self.uri = store.uri
        self.manifest = manifest
        mode = "r" if store.read_only else "r+"
        self.group = zarr.open_group(store=store.zarr_store, mode=mode, zarr_format=3)
        m = manifest
        self.arrays: dict[str, ArrayIO] = {}
        for path in array_specs(m):
            try:
                arr = self.group[path]
            except KeyError:
                raise CacheError(f"cache at {self.uri} lacks its array {path!r}; it is damaged, remove it and rebuild")
            self.arrays[path] = ArrayIO(store, arr, path, m.n_rows, m.chunk_rows)
        self._sample_ids: np.ndarray | None = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str | os.PathLike, expected: Manifest | None = None, *, s3_endpoint: str | None = None,
             read_only: bool = True, layout: bool = False) -> "CacheHandle":
        """Open an existing cache; with ``expected``, refuse one built for another job (CacheMismatchError)."""
        store = CacheStore(uri, s3_endpoint=s3_endpoint, read_only=read_only)
        found = read_manifest(store)
        if found is None:
            raise CacheError(
                f"no kd cache at {store.uri} (no manifest); build it with `kd cache build JOB.yaml`"
            )
        if expected is not None:
            check_manifest(expected, found, uri=store.uri, layout=layout)
        return cls(store, found)

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
        return chunk_bounds(i, self.manifest.n_rows, self.manifest.chunk_rows)

    def done_chunks(self) -> set[int]:
        return markers.done_chunks(self.store)

    def sample_ids(self) -> np.ndarray:
        """The dataset ids, one per sample (row r holds sample r // views)."""
        if self._sample_ids is None:
            self._sample_ids = np.asarray(self.group[SAMPLE_IDS][:], dtype=np.int64)
        return self._sample_ids


def create_cache(uri: str | os.PathLike, manifest: Manifest, sample_ids: np.ndarray, *,
                 s3_endpoint: str | None = None, overwrite: bool = False) -> CacheHandle:
    """Create an empty cache: group, arrays, sample ids, then the manifest (``complete: false``) last,
    so a cache whose creation was interrupted has no manifest and is simply created again.

    Refuses (CacheError) when a kd cache already exists at ``uri`` unless ``overwrite``."""
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.shape[0] != manifest.n_samples:
        raise UserError(f"sample_ids must be 1-D with {manifest.n_samples} entries, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise UserError(f"sample_ids must be integers, got dtype {ids.dtype}")
    store = CacheStore(uri, s3_endpoint=s3_endpoint, create=True)
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
    if entries:
        store.remove_all()
        store = CacheStore(uri, s3_endpoint=s3_endpoint, create=True)
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
            attributes={"kd_dtype": m.dtype if path not in (TOPK_IDX, AUG) else str(dtype)},
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
    return CacheHandle(store, m)
