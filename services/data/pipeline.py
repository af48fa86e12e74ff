"""The job's Ray Data pipelines.

``cache_training_dataset``: cache chunks (in a new random order each epoch, ``CacheRowsDatasource.get_read_tasks``)
joined with their input rows, decoded and augmented by a bounded number of Ray tasks, each read fused with its
decode (no barrier between them); Ray Train splits it across the workers
(``streaming_split``, equal shares), each worker consumes its shard with a local shuffle buffer. Memory is
bounded by Ray Data's streaming executor (a few blocks in flight per operator), not by the dataset.
"""

from __future__ import annotations

import os
from typing import Any

from kdcore.spec.job import JobSpec
from services.data.datasource import CacheRowsDatasource
from services.data.transforms import decode_inputs


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


def cache_training_dataset(job: JobSpec, job_json: dict[str, Any] | None = None):
    """The training dataset of a cache-mode job (see the module docstring)."""
    import ray.data

    job_json = job_json or job.model_dump(mode="json")
    spec = job.features.cache
    caches = [(t, job.teacher_cache_uri(t)) for t in job.teacher_names()] if job.multi_teacher else spec.uri
    source = CacheRowsDatasource(job_json, caches, spec.s3_endpoint)
    # Logical CPUs: 0. Ray Train's workers hold the CPUs of their placement group; reads and decodes that asked
    # for CPUs on top would never be scheduled on a small machine (2 CPUs, 2 workers), and the job would hang.
    # They run beside training on whatever cores are free; the decode pool's size bounds what they take.
    # Decoding runs as tasks in Ray's pooled worker processes (an actor pool would start again every epoch).
    n = decode_tasks(job)
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.chunks), num_cpus=0,
                                  compute=ray.data.TaskPoolStrategy(size=n))
    return ds.map_batches(decode_inputs, fn_kwargs={"job_json": job_json}, batch_size=None, batch_format="numpy",
                          num_cpus=0, compute=ray.data.TaskPoolStrategy(size=n), zero_copy_batch=False)
