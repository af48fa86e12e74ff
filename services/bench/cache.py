"""Benchmark of the Zarr feature cache against its limits, on the same data in one run.

Read: rows/s of one shuffled epoch of :class:`kdcore.cache.CacheLoader` (batches of ``batch`` rows,
fp16 features, no cast) against a numpy memmap of the same fp16 matrix (``np.save`` file) read in
random 256-row batches: each batch is a slice of a fresh permutation of all rows, *unsorted* indices,
one fancy-indexing copy per batch. Both files are read warm (one untimed warm-up epoch each), so both
sides read from the OS page cache; nothing is dropped.

The loader checks every chunk against its recorded checksum when it first reads it (a kept memory map
is not checked again), so the timed epochs above read already-checked maps. What the checks cost is
measured on its own: ``first_epoch_*`` is one epoch of a fresh loader (every chunk mapped and checked;
page cache warm) with the checks on, against the same with ``verify=False``, alternating, ``repeats``
times; ``verify_ratio`` = checked / unchecked rows/s.

Write: MB/s of feature bytes of a full cache build (create + ``build`` with a compute_fn that returns
slices of the in-memory matrix: checksums, markers, manifest and the writer threads included) against
``np.save`` of the same array into a fresh file. Neither side fsyncs; before each timed write the
previous output is deleted and ``os.sync()`` flushes dirty pages, so neither side is throttled by the
other's writeback.

Chunks default to 4096 rows (16 MiB of 2048-d fp16): every chunk costs two file creations (data and
done marker), which are slow on some filesystems, so small chunks lower write throughput (see the
``chunk_rows`` argument; 1024 rows = 4 MiB chunks is the CacheSpec default).

All figures are medians over ``repeats`` runs; the two sides of each comparison alternate. The
``*_pair_ratio`` entries are the medians of the per-repeat ratios (less sensitive to a noisy machine).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.cache import CacheLoader, CacheWriter, build, make_manifest, rm


def _matrix(rows: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((rows, dim), dtype=np.float16)
    step = max(1, (16 << 20) // (dim * 4))
    for start in range(0, rows, step):
        x[start:start + step] = rng.standard_normal((min(step, rows - start), dim), dtype=np.float32)
    return x


def run(
    rows: int = 65536,
    dim: int = 2048,
    batch: int = 256,
    chunk_rows: int = 4096,
    workdir: str | os.PathLike | None = None,
    *,
    repeats: int = 5,
    shuffle_window: int = 8,
    prefetch: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Loader vs memmap random-batch read, cache build vs ``np.save``; returns one dict of medians."""
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kd-bench-cache-") if own_dir else workdir)
    work.mkdir(parents=True, exist_ok=True)
    raw_path = work / "raw.npy"
    uri = str(work / "cache")
    x = _matrix(rows, dim, seed)
    mb = x.nbytes / 1e6
    manifest = make_manifest(teacher="bench", dataset="bench", n_samples=rows, layers={"feat": (dim,)},
                             chunk_rows=chunk_rows, dtype="fp16", compression="none")
    ids = np.arange(rows, dtype=np.int64)

    def compute(start: int, stop: int) -> dict[str, np.ndarray]:
        return {"feat": x[start:stop]}

    def write_raw() -> float:
        raw_path.unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        np.save(raw_path, x)
        return mb / (time.perf_counter() - t0)

    def write_cache() -> float:
        rm(uri, force=True)
        os.sync()
        t0 = time.perf_counter()
        writer = CacheWriter.create(uri, manifest, ids)
        report = build(writer, compute)
        dt = time.perf_counter() - t0
        assert report.complete and report.written == manifest.n_chunks
        return mb / dt

    try:
        raw_w, cache_w = [], []
        for _ in range(repeats):
            raw_w.append(write_raw())
            cache_w.append(write_cache())

        mm = np.load(raw_path, mmap_mode="r")
        loader = CacheLoader(uri, batch_size=batch, seed=seed, shuffle_window=shuffle_window, prefetch=prefetch)

        def read_memmap(epoch: int, mm=mm) -> float:
            perm = np.random.default_rng([seed, epoch]).permutation(rows)
            t0 = time.perf_counter()
            for k in range(0, rows, batch):
                out = mm[perm[k:k + batch]]
            dt = time.perf_counter() - t0
            assert out.dtype == np.float16
            return rows / dt

        def read_loader(loader: CacheLoader, epoch: int) -> float:
            loader.set_epoch(epoch)
            n = 0
            t0 = time.perf_counter()
            for b in loader:
                n += len(b["row"])
            dt = time.perf_counter() - t0
            assert n == rows
            return rows / dt

        read_memmap(repeats)  # warm-up epoch: both files in the page cache, mapping populated
        read_loader(loader, repeats)
        mm_r, ld_r = [], []
        for e in range(repeats):
            mm_r.append(read_memmap(e))
            ld_r.append(read_loader(loader, e))
        del mm
        loader.close()
        first_on, first_off = [], []
        for e in range(repeats):  # fresh loaders: every chunk is mapped (and checked) again
            for verify, out in ((True, first_on), (False, first_off)):
                fresh = CacheLoader(uri, batch_size=batch, seed=seed, shuffle_window=shuffle_window,
                                    prefetch=prefetch, verify=verify)
                out.append(read_loader(fresh, e))
                fresh.close()
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    loader_rps, memmap_rps = statistics.median(ld_r), statistics.median(mm_r)
    write_mbps, raw_mbps = statistics.median(cache_w), statistics.median(raw_w)
    return {
        "loader_rows_per_s": loader_rps,
        "memmap_rows_per_s": memmap_rps,
        "read_ratio": loader_rps / memmap_rps,
        "write_mb_per_s": write_mbps,
        "raw_write_mb_per_s": raw_mbps,
        "write_ratio": write_mbps / raw_mbps,
        "read_pair_ratio": statistics.median(a / b for a, b in zip(ld_r, mm_r)),
        "first_epoch_rows_per_s": statistics.median(first_on),
        "first_epoch_noverify_rows_per_s": statistics.median(first_off),
        "verify_ratio": statistics.median(first_on) / statistics.median(first_off),
        "verify_pair_ratio": statistics.median(a / b for a, b in zip(first_on, first_off)),
        "write_pair_ratio": statistics.median(a / b for a, b in zip(cache_w, raw_w)),
        "rows": rows,
        "dim": dim,
        "batch": batch,
        "chunk_rows": chunk_rows,
        "shuffle_window": shuffle_window,
        "prefetch": prefetch,
        "feature_mb": mb,
        "repeats": repeats,
        "memmap_batches": "unsorted random indices, fresh permutation per epoch",
        "samples": {"loader": ld_r, "memmap": mm_r, "write": cache_w, "raw_write": raw_w,
                    "first_epoch": first_on, "first_epoch_noverify": first_off},
    }


def main() -> None:  # python -m services.bench.cache
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
