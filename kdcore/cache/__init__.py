"""The Zarr feature cache: the teacher's tapped features and logits, computed once, read by many runs.

Generic: the cache does not know how the teacher is run; a builder passes ``compute_fn(row_start,
row_stop) -> {layer: array, "logits": array, "aug": array}``. See ``layout`` for the on-store layout,
``writer`` for crash-safe, resumable, multi-writer builds and ``reader`` for the training loader.

Typical use::

    m = make_manifest(teacher=teacher_fingerprint(model, arch), dataset=dataset_fingerprint(ids, x),
                      n_samples=len(ids), layers={"layer4": (512,)}, num_classes=1000, views=2,
                      augmentation={"crop": 0.8}, aug_seed=0, aug_params=4, spec=job.features.cache)
    report = build_cache(job.features.cache, m, ids, compute_fn, root="runs/cache")
    loader = CacheLoader(report.uri, expected=m, batch_size=256, rank=rank, world_size=world, seed=0)
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
from kdcore.cache.fingerprint import dataset_fingerprint, teacher_fingerprint
from kdcore.cache.handle import CacheHandle, create_cache
from kdcore.cache.layout import (
    bf16_bits_to_float32,
    chunk_assignment,
    float_to_bf16_bits,
    rows_to_samples,
    view_seed,
)
from kdcore.cache.manifest import FORMAT_VERSION, Manifest, check_manifest, make_manifest
from kdcore.cache.markers import ChunkMarker
from kdcore.cache.reader import CacheLoader
from kdcore.cache.store import clear_memory, memory_names
from kdcore.cache.verify import VerifyReport, format_verify, verify
from kdcore.cache.writer import BuildProgress, BuildReport, CacheWriter, build, build_cache

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
    "Manifest",
    "VerifyReport",
    "bf16_bits_to_float32",
    "build",
    "build_cache",
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
    "verify",
    "view_seed",
]
