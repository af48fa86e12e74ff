"""The job's Ray Data pipelines.

``cache_training_dataset``: cache chunks (in a new random order each epoch, ``CacheRowsDatasource.get_read_tasks``)
joined with their input rows and mixed by windows of ``shuffle_window`` chunks, decoded and augmented by
``map_batches`` a block at a time; Ray Data fuses the read and the decode into one task (``batch_size=None``: a
``batch_size`` would stop the fusion), so only decoded blocks reach the object store, never the encoded rows,
and the first block is ready after one block's decode, not a window's. A bounded number of those tasks run at
once; Ray Train splits the dataset across the workers (``streaming_split``, equal shares), each worker cuts
batches from its shard's blocks as they come.
Memory is bounded by Ray Data's streaming executor, not by the dataset: the decoded blocks in the object store
by ``features.cache.input_store_mb`` (``execution_options``: the dataset's Ray Data budget, which Ray Train
must be given again, ``train_data_config``), each task's window of encoded rows by its own heap.
"""

from __future__ import annotations

from typing import Any

from kdcore.spec.job import JobSpec
from services.data.context import decode_tasks
from services.data.datasource import CacheRowsDatasource
from services.data.transforms import decode_inputs

# The dataset's target block size. In the fused task Ray Data shapes blocks to it twice: the read's blocks of
# encoded rows are merged up to it before each decode call, and the decoded blocks are sliced to it (zero-copy).
# Ray Data's default (128 MiB) is 850 decoded rows of 3x112x112 float32: two tasks' blocks in flight plus the
# consumers' would fill a 1 GiB store, and the first batch would wait for a decode of 3,000 encoded rows.
# Measured on 4,096 PNG rows (2 cores, 3x128x128 -> 112): 24-32 MiB ran 1,190-1,390 rows/s with the first batch
# at 1.0-1.4 s (blocks of 167 decoded rows); 16 MiB 1,250-1,320; 8 MiB 940-1,140; unfused (a map_batches
# batch_size of 512 rows) 1,040-1,210 and 2.5-2.9 s.
BLOCK_BYTES = 24 * 2**20


def execution_options(job: JobSpec):
    """Ray Data's options for the job's input pipeline: the object-store budget ``input_store_mb`` on top of the
    current defaults."""
    import copy

    import ray.data

    opts = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=job.features.cache.input_store_mb * 2**20)
    return opts


def train_data_config(job: JobSpec):
    """Ray Train's ``DataConfig`` for the ``train`` dataset: Train replaces a dataset's execution options with
    its own when it splits it, so the pipeline's budget is handed to it here."""
    from ray.train import DataConfig

    return DataConfig(execution_options={"train": execution_options(job)})


def cache_training_dataset(job: JobSpec, job_json: dict[str, Any] | None = None):
    """The training dataset of a cache-mode job (see the module docstring)."""
    import ray.data

    job_json = job_json or job.model_dump(mode="json")
    spec = job.features.cache
    caches = [(t, job.teacher_cache_uri(t)) for t in job.teacher_names()] if job.multi_teacher else spec.uri
    source = CacheRowsDatasource(job_json, caches, spec.s3_endpoint, window=spec.shuffle_window,
                                 block_bytes=BLOCK_BYTES)
    # Logical CPUs: 0. Ray Train's workers hold the CPUs of their placement group; reads and decodes that asked
    # for CPUs on top would never be scheduled on a small machine (2 CPUs, 2 workers), and the job would hang.
    # They run beside training on whatever cores are free; the decode pool's size bounds what they take.
    # Decoding runs as tasks in Ray's pooled worker processes (an actor pool would start again every epoch).
    n = decode_tasks(job)
    # One block request per read task (asked for more, Ray Data would split each task's output by rows; every row
    # carries its sample's stored bytes, so a block cut or merged anywhere still decodes).
    ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks, num_cpus=0,
                                  compute=ray.data.TaskPoolStrategy(size=n))
    ds = ds.map_batches(decode_inputs, fn_kwargs={"job_json": job_json}, batch_size=None, batch_format="numpy",
                        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=n), zero_copy_batch=False)
    ds.context.target_max_block_size = BLOCK_BYTES  # this dataset's own context (a copy)
    ds.context.execution_options = execution_options(job)
    return ds
