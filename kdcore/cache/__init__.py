"""The Zarr feature cache: the teacher's tapped features and logits, computed once, read by many runs.

Generic: the cache does not know how the teacher is run; a builder passes ``compute_fn(row_start,
row_stop) -> {layer: array, "logits": array, "aug": array}`` (or an executor). The package in layers,
each importing only the ones above it:

- ``checksum``                      CRC32C / sha256 of chunk bytes (the leaf)
- ``layout``, ``manifest``, ``markers``, ``fingerprint``
                                    pure data: array names, rows and chunks, dtypes, top-k; what a cache
                                    holds; per-chunk done markers; teacher and dataset fingerprints
- ``stores``                        where it lives: one class per kind (local, memory, s3) behind
                                    ``CacheStore``; ``open_store(uri)``
- ``arrays``, ``handle``            whole-chunk I/O of one array; an opened cache (open / create)
- ``lease``                         per-chunk leases of concurrent builders
- ``writer``, ``build``             ``CacheWriter`` writes chunks; ``build(cache, compute_fn | executor)``
                                    fills the missing ones, each once across builders
- ``reader``                        ``CacheLoader``, the training loader (checks every chunk it reads)
- ``admin``, ``verify``             info / ls / rm / find_cache / invalidate_chunks; verify
- ``jobs``                          jobs meet the cache (a job's manifest, compute_fn, feature source)

Typical use::

    m = make_manifest(teacher=teacher_fingerprint(model, arch), dataset=dataset_fingerprint(ids, x),
                      n_samples=len(ids), layers={"layer4": (512,)}, num_classes=1000, views=2,
                      augmentation={"crop": 0.8}, aug_seed=0, aug_params=4, spec=job.features.cache)
    report = build(CacheWriter.open_or_create(uri, m, ids), compute_fn)
    loader = CacheLoader(uri, expected=m, batch_size=256, rank=rank, world_size=world, seed=0)
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader: ...
"""

from kdcore.cache.admin import (
    CacheEntry,
    CacheInfo,
    find_cache,
    format_info,
    format_ls,
    info,
    invalidate_chunks,
    ls,
    rm,
)
from kdcore.cache.build import BuildProgress, BuildReport, Claims, Executor, ThreadExecutor, build
from kdcore.cache.fingerprint import dataset_fingerprint, teacher_fingerprint
from kdcore.cache.handle import CacheHandle, create_cache
from kdcore.cache.layout import (
    bf16_bits_to_float32,
    chunk_assignment,
    float_to_bf16_bits,
    rows_to_samples,
    topk,
)
from kdcore.cache.manifest import FORMAT_VERSION, Manifest, check_manifest, make_manifest
from kdcore.cache.markers import ChunkMarker
from kdcore.cache.reader import CacheLoader
from kdcore.cache.stores import clear_memory, memory_names
from kdcore.cache.verify import VerifyReport, format_verify, verify
from kdcore.cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "BuildProgress",
    "BuildReport",
    "CacheEntry",
    "CacheHandle",
    "CacheInfo",
    "CacheLoader",
    "CacheWriter",
    "ChunkMarker",
    "Claims",
    "Executor",
    "Manifest",
    "ThreadExecutor",
    "VerifyReport",
    "bf16_bits_to_float32",
    "build",
    "check_manifest",
    "chunk_assignment",
    "clear_memory",
    "create_cache",
    "dataset_fingerprint",
    "find_cache",
    "float_to_bf16_bits",
    "format_info",
    "format_ls",
    "format_verify",
    "info",
    "invalidate_chunks",
    "ls",
    "make_manifest",
    "memory_names",
    "rm",
    "rows_to_samples",
    "teacher_fingerprint",
    "topk",
    "verify",
]
