"""The job's Ray Data pipelines.

``cache_training_dataset``: cache chunks (in a new random order each epoch, ``CacheRowsDatasource.get_read_tasks``)
joined with their input rows and mixed by windows of ``shuffle_window`` chunks, decoded and augmented by a
bounded number of Ray tasks, each read fused with its decode (no barrier between them); Ray Train splits it
across the workers (``streaming_split``, equal shares), each worker cuts batches from its shard's blocks as they
come. Memory is bounded by Ray Data's streaming executor (a few blocks in flight per operator), not by the
dataset.
"""

from __future__ import annotations

from typing import Any

from kdcore.spec.job import JobSpec
from services.data.context import decode_tasks
from services.data.datasource import CacheRowsDatasource
from services.data.transforms import decode_inputs


def cache_training_dataset(job: JobSpec, job_json: dict[str, Any] | None = None):
    """The training dataset of a cache-mode job (see the module docstring)."""
    import ray.data

    job_json = job_json or job.model_dump(mode="json")
    spec = job.features.cache
    caches = [(t, job.teacher_cache_uri(t)) for t in job.teacher_names()] if job.multi_teacher else spec.uri
    source = CacheRowsDatasource(job_json, caches, spec.s3_endpoint, window=spec.shuffle_window)
    # Logical CPUs: 0. Ray Train's workers hold the CPUs of their placement group; reads and decodes that asked
    # for CPUs on top would never be scheduled on a small machine (2 CPUs, 2 workers), and the job would hang.
    # They run beside training on whatever cores are free; the decode pool's size bounds what they take.
    # Decoding runs as tasks in Ray's pooled worker processes (an actor pool would start again every epoch).
    n = decode_tasks(job)
    # One block request per read task (asked for more, Ray Data splits each task's output by rows). Ray Data also
    # merges a task's small blocks up to its target block size (128 MiB of encoded rows could be thousands), so
    # decoding goes by batches of a chunk's rows: outputs stream out as they are decoded, and a decode task holds
    # one chunk's decoded rows, not a window's.
    ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks, num_cpus=0,
                                  compute=ray.data.TaskPoolStrategy(size=n))
    return ds.map_batches(decode_inputs, fn_kwargs={"job_json": job_json}, batch_size=spec.chunk_rows,
                          batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=n), zero_copy_batch=False)
