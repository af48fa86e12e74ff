"""The image datasets and the cache-mode job that ``kd bench scale`` and ``kd bench input`` run.

Datasets are Parquet files of generated PNG images (``kdcore.data.synth.write_parquet_images``), written once
per work directory and reused while their parameters match (``dataset.json``). The job: an ``image_cnn``
teacher served by its Serve deployment fills a local feature cache, an ``image_cnn`` student trains on it
through the Ray Data pipeline with ``random_resized_crop`` + flip views. ``marker_build_rate`` reads a built
cache's steady-state build rate off its chunks' done markers."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

MODEL = "kdcore.zoo:image_cnn"
OBJECT_STORE_MB = 2048


def decoded_gb(rows: int, image_size: int, channels: int = 3) -> float:
    """Size of ``rows`` images decoded to float32 (C, H, W), in GB (1e9 bytes)."""
    return rows * channels * image_size * image_size * 4 / 1e9


def crop_of(image_size: int) -> int:
    """The random_resized_crop output size used with ``image_size`` inputs (7/8 of it, as 224 of 256)."""
    return max(8, (image_size * 7 // 8) // 4 * 4)


def dataset_rows(path: str | Path) -> int:
    """Rows of the Parquet files in directory ``path`` (from their footers)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(Path(path).glob("*.parquet")))


def write_dataset(root: str | Path, rows: int, image_size: int, shards: int = 1, seed: int = 0,
                  rows_per_group: int = 256, log: Callable[[str], None] | None = None) -> Path:
    """``rows`` PNG rows under ``root`` (write_parquet_images), reused when ``root`` already holds exactly them."""
    from kdcore.data.synth import write_parquet_images

    root = Path(root)
    stamp = root / "dataset.json"
    want = {"rows": rows, "image_size": image_size, "shards": shards, "seed": seed, "rows_per_group": rows_per_group}
    if stamp.exists() and json.loads(stamp.read_text()) == want and dataset_rows(root) == rows:
        return root
    shutil.rmtree(root, ignore_errors=True)
    if log:
        log(f"  writing {rows:,} PNG rows of 3x{image_size}x{image_size} to {root} ({shards} shard(s))")
    t0 = time.perf_counter()
    write_parquet_images(root, rows, size=image_size, shards=shards, rows_per_group=rows_per_group, seed=seed)
    stamp.write_text(json.dumps(want))
    if log:
        log(f"  written in {time.perf_counter() - t0:.0f} s")
    return root


def write_scale_datasets(work: Path, n: int, image_size: int, log=None) -> tuple[Path, Path, Path]:
    """(N rows, 4N rows, eval rows) directories. 4N is written as four shards of exactly N rows each
    (``linspace(0, 4N, 5)`` bounds are exact); N is a hard link (else a copy) of the first shard."""
    big = write_dataset(work / "data-4n", 4 * n, image_size, shards=4, log=log)
    small = work / "data-n"
    first = big / "part-00000.parquet"
    target = small / "part-00000.parquet"
    if not (target.exists() and target.stat().st_ino == first.stat().st_ino):
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir(parents=True)
        try:
            os.link(first, target)
        except OSError:
            shutil.copyfile(first, target)
    got_n, got_4n = dataset_rows(small), dataset_rows(big)
    if got_n != n or got_4n != 4 * n:
        raise RuntimeError(f"dataset rows {got_n} and {got_4n}, expected {n} and {4 * n}")
    ev = write_dataset(work / "data-eval", min(512, max(64, n // 4)), image_size, seed=1, log=log)
    return small, big, ev


def image_job(name: str, train_dir: str | Path, eval_dir: str | Path | None, work: str | Path, image_size: int, *,
              views: int = 2, chunk_rows: int = 512, epochs: int = 1, workers: int = 2, batch_size: int = 64,
              replicas: int | None = None, teacher_width: int = 16, student_width: int = 4,
              object_store_mb: int | None = OBJECT_STORE_MB) -> dict[str, Any]:
    """The benches' cache-mode job on a Parquet image dataset (a dict for ``JobSpec.from_dict``). Its private
    local Ray gets an object store of ``object_store_mb`` (as a cluster node has a set size), so the shared memory
    its processes touch is the same bound on every machine and for every dataset size."""
    def source(path) -> dict[str, Any]:
        return {"kind": "parquet", "path": str(path), "image_column": "image", "label_column": "label",
                "id_column": "id", "image_size": image_size, "num_classes": 10}

    replicas = replicas or max(1, min(2, os.cpu_count() or 1))
    data: dict[str, Any] = {"source": source(train_dir), "batch_size": batch_size, "views": views,
                            "mean": [0.5] * 3, "std": [0.25] * 3,
                            "augment": {"kind": "random_resized_crop", "size": crop_of(image_size), "flip": True}}
    if eval_dir is not None:
        data["eval"] = source(eval_dir)
    work = Path(work)
    return {
        "name": name,
        "teacher": {"model": {"kind": "factory", "target": MODEL, "kwargs": {"width": teacher_width, "stem_stride": 4}},
                    "taps": ["embed"], "serve": {"replicas": replicas, "num_cpus": 1}},
        "student": {"model": {"kind": "factory", "target": MODEL, "kwargs": {"width": student_width, "stem_stride": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": data,
        "features": {"mode": "cache", "cache": {"uri": str(work / "cache" / name), "chunk_rows": chunk_rows}},
        "train": {"epochs": epochs, "num_workers": workers, "optimizer": {"kind": "adam", "lr": 0.003}},
        "output": {"dir": str(work / "runs")},
        **({"ray": {"object_store_mb": object_store_mb}} if object_store_mb else {}),
    }


def marker_build_rate(uri: str | Path, skip: int = 1, min_chunks: int = 8) -> tuple[float, int, float] | None:
    """Steady-state build rate from a local cache's done markers (their mtimes): (rows/s, rows, seconds) between
    the markers at the first and the third quarter of the build (at least ``skip`` markers in). Both ends lie in
    the steady state, where as much work is in flight at one end as at the other, so the rows finished in
    between are the work done in between; the start-up before the first chunk and the drain at the end are left
    out. None with fewer than ``min_chunks`` markers."""
    done = Path(uri) / "kd_done"
    marks = []
    for p in done.glob("*.json"):
        try:
            m = json.loads(p.read_text())
            marks.append((p.stat().st_mtime, int(m["row_stop"]) - int(m["row_start"])))
        except (OSError, ValueError, KeyError):
            continue
    marks.sort()
    n = len(marks)
    if n < max(min_chunks, 2):
        return None
    k = max(skip, n // 4) - 1
    m = max(k + 1, (3 * n) // 4)
    rows = sum(r for _, r in marks[k + 1:m + 1])
    dt = marks[m][0] - marks[k][0]
    if dt <= 0:
        return None
    return rows / dt, rows, dt
