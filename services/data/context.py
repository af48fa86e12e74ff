"""What a Ray Data task needs to read a job's data, built once per process from the job's JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from kdcore.data.rows import RowMapper
from kdcore.data.splits import DataSplit, make_split
from kdcore.spec.job import JobSpec

_LOCK = threading.Lock()
_CONTEXTS: dict[str, "DataContext"] = {}


@dataclass
class DataContext:
    job: JobSpec
    split: DataSplit
    mapper: RowMapper


def job_key(job_json: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job_json.get("data"), sort_keys=True).encode()).hexdigest()[:16]


def data_context(job_json: dict[str, Any]) -> DataContext:
    """The job's split and row mapper in this process (opened once: a reader holds only metadata)."""
    key = job_key(job_json)
    with _LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            job = JobSpec.model_validate(job_json)
            split = make_split(job.data)
            ctx = _CONTEXTS[key] = DataContext(job, split, RowMapper(split, job.data))
        return ctx


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """No progress bars, 'Starting execution' lines or small-dataset concurrency warnings from Ray Data in this
    process (the cache build's many short executions, the benches' timed ones); restored on exit."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars, logger = ctx.enable_progress_bars, logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars = False
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # "concurrency limit ... only received N input(s)" on small datasets
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
            yield
    finally:
        ctx.enable_progress_bars = bars
        logger.setLevel(level)


FILE_SOURCES = ("parquet", "imagefolder", "npy_dir", "hf_disk")  # read lazily from files; the others are held in memory


def uses_ray_data(job: JobSpec) -> bool:
    """Whether the job's inputs go through Ray Data tasks (``features.cache.loader``; ``auto``: for datasets read
    from files, where decoding is the work; an in-memory dataset is cheaper read where it is held). Decides both
    the training workers' loader and who reads the cache build's inputs."""
    loader = job.features.cache.loader
    return loader == "ray_data" or (loader == "auto" and job.data.source.kind in FILE_SOURCES)


def decode_tasks(job: JobSpec) -> int:
    """Concurrent read and decode tasks: ``features.cache.decode_workers`` if set, else 2 (they share the
    node's cores with training; each is a Ray worker process with its own torch)."""
    return job.features.cache.decode_workers or max(1, min(2, os.cpu_count() or 2))
