"""``kd bench input``: student-epoch input rows/s through the Ray Data pipeline, and the cache build's rows/s,
each against a limit measured in the same run on the same cores.

The data: ``rows`` generated PNG images (3 x ``image_size``^2) in Parquet (``write_parquet_images``), the job of
``kd bench scale`` (``random_resized_crop`` + flip, 2 views, chunks of 512 cache rows, an ``image_cnn`` teacher of
width 16 served by 2 replicas of 1 CPU). Ray: a private local Ray (all the machine's CPUs), or the one this
process already has.

**Build.** The cache is built the real way, ``services.jobs.cache_build.ensure_cache`` on Ray (the teacher
deployment's replicas forward and write the chunks). Its rate ``build_rows_per_s`` is the steady state, taken
from the chunks' done markers (``services.bench.imagejob.marker_build_rate``: between the first and the third
quarter of the build; the teacher deployment's start-up is not counted, ``build_rows_per_s_total`` includes it). Its limits, measured in this process with one torch thread
on the same inputs and scaled to the cores the build can use:

- teacher forward: rows/s of the teacher on ``serve.max_batch_size`` batches of the job's augmented inputs
  (with the replicas' allocator setting, ``services.memtune.tune_for_models``),
  x min(replicas x CPUs per replica, cores);
- build input: rows/s of ``RowMapper.cache_rows`` over whole chunks (one contiguous read, decode, normalise,
  draw and apply the augmentation: what the build computes per chunk), x cores.

``build_ratio`` = build / min(those two) (target >= 0.8). Both stages share the same cores on one machine, so
the build cannot beat cores / (1/forward + 1/input) per-core rates either; ``build_ratio_shared`` is the build
against that (tighter, reachable) limit.

**Student input.** ``pipeline_rows_per_s``: ``services.data.pipeline.cache_training_dataset`` (cache chunks joined
with their stored input rows, decoded and augmented in ``map_batches`` by ``k = decode_tasks(job)`` tasks)
iterated to the end in this process the way a training worker iterates its shard (``ShardFeatures``: the job's
batch size, 2 batches prefetched, the views' pixels converted to model inputs; the blocks come already mixed by
windows of ``shuffle_window`` chunks); batches are dropped. One untimed epoch
first (Ray's pooled workers import torch once), then ``repeats`` timed epochs; ``ratio_steady`` leaves out each
epoch's start-up (the rows/s after its first batch: what a long epoch runs at). The limit is the same work in a
tight single-process loop without Ray (``input_rows_per_s``: per chunk, its stored rows from the reader, the
aug parameters from the cache chunk, one decode per sample, the views (``RowMapper.replay_pixels`` for images)
and their conversion to model inputs batch by batch (``RowMapper.to_model``), one thread,
with the decode tasks' allocator setting (``services.memtune.ENV``), alternating with the timed epochs:
``limit = input_rows_per_s x min(k, cores)``; ``ratio`` = pipeline / limit (target >= 0.8). Figures are medians
over the repeats.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

TARGETS = {"ratio": ">= 0.8", "build_ratio": ">= 0.8"}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TightLoop:
    """The student's input work of the Ray Data pipeline (``CacheRowsDatasource.read_block`` + ``DecodeInputs``)
    as a plain loop over cache chunks in this process: kdcore's reader, the cache chunk read and the row mapper."""

    def __init__(self, job, split) -> None:
        from kdcore.cache.handle import CacheHandle
        from kdcore.data.rows import RowMapper

        self.job, self.split = job, split
        self.mapper = RowMapper(split, job.data)
        self.handle = CacheHandle.open(job.features.cache.uri, read_only=True)
        self.views = self.handle.manifest.views
        self.n_chunks = self.handle.n_chunks

    def chunk(self, i: int) -> int:
        """Inputs of cache chunk ``i`` as the student gets them; returns its rows."""
        from kdcore.cache.layout import AUG, TOPK_IDX, output_key
        from kdcore.cache.reader import read_chunk
        from kdcore.data.rows import rows_to_samples

        split, reader = self.split, self.split.reader
        arrays = read_chunk(self.handle, i)  # checksums verified, as the pipeline's read does
        aug = None
        for path, value in arrays.items():  # teacher outputs travel as float32, like the pipeline's blocks
            if output_key(path) == AUG:
                aug = np.ascontiguousarray(value, dtype=np.float32)
            elif output_key(path) != TOPK_IDX:
                np.ascontiguousarray(value, dtype=np.float32)
        a, b = self.handle.chunk_bounds(i)
        samples, _ = rows_to_samples(a, b, self.views)
        first, last = int(split.train_rows[samples[0]]), int(split.train_rows[samples[-1]]) + 1
        raw = reader.fetch(first, last)
        uniq, inverse = np.unique(samples, return_inverse=True)  # views share a decode
        pick = (split.train_rows[uniq] - first).tolist()
        stored = [raw[j] for j in pick] if isinstance(raw, list) else np.asarray(raw)[pick]
        if aug is None:
            aug = np.zeros((b - a, 0), np.float32)
        x = self.mapper.stored_views(stored, int(split.train_rows[uniq[0]]), aug, inverse)
        bs = self.job.data.batch_size  # pixels are converted batch by batch, as the training worker does
        n = sum(len(self.mapper.to_model(x[s:s + bs])) for s in range(0, len(x), bs))
        assert n == b - a
        return b - a

    def epoch(self, chunks: list[int] | None = None) -> float:
        """rows/s of the chunks (default all), one thread."""
        chunks = list(range(self.n_chunks)) if chunks is None else chunks
        with _one_thread():
            t0 = time.perf_counter()
            n = sum(self.chunk(i) for i in chunks)
            return n / (time.perf_counter() - t0)

    def build_inputs(self, chunks: list[int]) -> float:
        """rows/s of ``RowMapper.cache_rows`` over whole chunks (the build's input work), one thread."""
        with _one_thread():
            t0 = time.perf_counter()
            n = 0
            for i in chunks:
                a, b = self.handle.chunk_bounds(i)
                n += len(self.mapper.cache_rows(a, b).x)
            return n / (time.perf_counter() - t0)


def forward_rows_per_s(job, split, rows: int = 1024, repeats: int = 5) -> float:
    """rows/s of the teacher forward (one thread) on ``max_batch_size`` batches of the job's augmented inputs."""
    from kdcore.data.rows import RowMapper
    from kdcore.loop import build_teacher

    mapper = RowMapper(split, job.data)
    x = mapper.cache_rows(0, min(rows, mapper.n_rows)).x
    bs = job.teacher.serve.max_batch_size
    import torch

    batches = [torch.from_numpy(np.ascontiguousarray(x[s:s + bs])) for s in range(0, len(x), bs)]
    with _one_thread():
        runner = build_teacher(job, device="cpu")
        runner(batches[0])  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                runner(b)
            rates.append(len(x) / (time.perf_counter() - t0))
    return statistics.median(rates)


def pipeline_epoch(ds, job, split, epoch: int) -> dict[str, float]:
    """One pass over the Ray Data pipeline as a training worker iterates its shard (``ShardFeatures``: batches
    cut from the blocks, the views converted to model inputs, the teacher outputs to tensors); batches are
    dropped."""
    from services.data.shard import ShardFeatures

    feats = ShardFeatures(job, split, ds, num_classes=split.num_classes)
    n = n_first = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_first = None  # the execution's start-up and the first block
    for b in feats.epoch(epoch):
        n += len(b.x)
        if t_first is None:
            t_first, n_first = time.perf_counter() - t0, n
    dt = time.perf_counter() - t0
    after = dt - (t_first or 0.0)
    return {"rows": n, "seconds": dt, "rows_per_s": n / dt, "first_batch_s": t_first or float("nan"),
            # the epoch after its first batch: the rate a long epoch runs at, start-up amortised
            "steady_rows_per_s": (n - n_first) / after if after > 0 else float("nan"),
            "consumer_cpu_s": time.process_time() - cpu0}


def run(rows: int = 4096, image_size: int = 128, workdir: str | os.PathLike | None = None, keep: bool = False,
        repeats: int = 3, views: int = 2, chunk_rows: int = 512, replicas: int | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """The input bench (see the module docstring); returns one dict of medians."""
    import ray

    from kdcore.loop import load_split
    from kdcore.spec.job import JobSpec
    from kdcore.spec.paths import resolve_paths
    from services.bench.imagejob import decoded_gb, image_job, marker_build_rate, write_dataset

    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kd-bench-input-") if own else workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    out: dict[str, Any] = {"rows": rows, "image_size": image_size, "views": views, "chunk_rows": chunk_rows,
                           "cache_rows": rows * views, "decoded_gb": decoded_gb(rows, image_size),
                           "repeats": repeats, "cores": cores(), "targets": dict(TARGETS),
                           "loadavg_before": os.getloadavg()[0]}
    started = None
    try:
        train = write_dataset(work / "data", rows, image_size, shards=max(1, rows // 16384), log=say)
        ev = write_dataset(work / "data-eval", 64, image_size, seed=1, log=say)
        spec = image_job("bench-input", train, ev, work, image_size, views=views, chunk_rows=chunk_rows,
                         replicas=replicas)
        shutil.rmtree(spec["features"]["cache"]["uri"], ignore_errors=True)
        job = resolve_paths(JobSpec.from_dict(spec))
        split = load_split(job)
        if not ray.is_initialized():
            from services.raysession import ray_session

            started = ray_session(job.ray, log=None)
            started.__enter__()
        from services.data.context import quiet_ray_data
        from services.data.context import decode_tasks
        from services.data.pipeline import cache_training_dataset
        from services.jobs.cache_build import ensure_cache

        serve = job.teacher.serve
        out.update(replicas=serve.replicas, cpus_per_replica=serve.num_cpus, decode_tasks=decode_tasks(job))
        say(f"  building the cache ({rows * views:,} rows) through the teacher deployment ...")
        t0 = time.perf_counter()
        with quiet_ray_data():
            info = ensure_cache(job, split, log=None)
        out["build_s_total"] = time.perf_counter() - t0
        assert not info.get("reused"), "the cache was reused; the bench needs a fresh build"
        out["build_rows_per_s_total"] = rows * views / out["build_s_total"]
        steady = marker_build_rate(job.features.cache.uri, skip=serve.replicas)
        if steady is not None:
            out["build_rows_per_s"], out["build_basis"], out["build_s_steady"] = steady[0], "markers", steady[2]
        else:
            out["build_rows_per_s"], out["build_basis"] = out["build_rows_per_s_total"], "total"

        say("  limits in this process, one thread: teacher forward, build inputs ...")
        from services.memtune import DATA_MMAP_THRESHOLD, tune_for_models, tune_malloc

        tight = TightLoop(job, split)
        out["chunks"] = tight.n_chunks
        tune_for_models()  # each limit with the allocator setting of the processes whose work it measures
        out["forward_rows_per_s"] = forward_rows_per_s(job, split, repeats=max(3, repeats))
        tune_malloc(DATA_MMAP_THRESHOLD)  # the decode tasks' (services.memtune.ENV)
        sub = list(range(min(tight.n_chunks, 8)))
        out["build_input_rows_per_s"] = statistics.median(tight.build_inputs(sub) for _ in range(repeats))

        say(f"  student input: Ray Data pipeline ({out['decode_tasks']} decode tasks) vs the tight loop, "
            f"{repeats} epochs each ...")
        ds = cache_training_dataset(job)
        with quiet_ray_data():
            first = pipeline_epoch(ds, job, split, epoch=0)  # untimed: pooled workers start and import torch
            tight.epoch(sub[:2])  # warm the reader and the cache files
            pipe, loop = [], []
            for e in range(repeats):
                loop.append(tight.epoch())
                pipe.append(pipeline_epoch(ds, job, split, epoch=e + 1))
                say(f"    epoch {e + 1}: pipeline {pipe[-1]['rows_per_s']:,.0f} rows/s, tight loop {loop[-1]:,.0f} rows/s")
    finally:
        if started is not None:
            started.__exit__(None, None, None)
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not keep:
            shutil.rmtree(work / "cache", ignore_errors=True)

    c, k = out["cores"], out["decode_tasks"]
    out["pipeline_rows_per_s"] = statistics.median(p["rows_per_s"] for p in pipe)
    out["pipeline_first_batch_s"] = statistics.median(p["first_batch_s"] for p in pipe)
    out["pipeline_first_epoch_rows_per_s"] = first["rows_per_s"]
    out["pipeline_epoch_s"] = statistics.median(p["seconds"] for p in pipe)
    # CPU this process spent receiving, shuffling and batching (taken from the same cores as the decode tasks)
    out["pipeline_consumer_cpu_s"] = statistics.median(p["consumer_cpu_s"] for p in pipe)
    out["pipeline_rows_per_epoch"] = pipe[0]["rows"]
    out["input_rows_per_s"] = statistics.median(loop)
    out["limit_cores"] = min(k, c)
    out["limit_rows_per_s"] = out["input_rows_per_s"] * out["limit_cores"]
    out["limit"] = f"input_rows_per_s x min(decode_tasks={k}, cores={c})"
    out["ratio"] = out["pipeline_rows_per_s"] / out["limit_rows_per_s"]
    out["ratio_pair_median"] = statistics.median(p["rows_per_s"] / (t * out["limit_cores"]) for p, t in zip(pipe, loop))
    out["pipeline_steady_rows_per_s"] = statistics.median(p["steady_rows_per_s"] for p in pipe)
    out["ratio_steady"] = out["pipeline_steady_rows_per_s"] / out["limit_rows_per_s"]
    # the consumer (a training worker) receives and batches on the same cores as the decode tasks here
    out["pipeline_consumer_cpu_ms_per_row"] = 1e3 * out["pipeline_consumer_cpu_s"] / max(1, out["pipeline_rows_per_epoch"])

    fwd_cores = min(max(1, int(out["replicas"] * out["cpus_per_replica"])), c)
    out["forward_limit_rows_per_s"] = out["forward_rows_per_s"] * fwd_cores
    out["build_input_limit_rows_per_s"] = out["build_input_rows_per_s"] * c
    out["build_limit_rows_per_s"] = min(out["forward_limit_rows_per_s"], out["build_input_limit_rows_per_s"])
    out["build_limit"] = (f"min(forward_rows_per_s x min(replicas x cpus = {out['replicas'] * out['cpus_per_replica']:g}, "
                          f"cores = {c}), build_input_rows_per_s x cores = {c})")
    out["build_ratio"] = out["build_rows_per_s"] / out["build_limit_rows_per_s"]
    shared = c / (1 / out["forward_rows_per_s"] + 1 / out["build_input_rows_per_s"])
    out["build_shared_limit_rows_per_s"] = min(shared, out["build_limit_rows_per_s"])
    out["build_ratio_shared"] = out["build_rows_per_s"] / out["build_shared_limit_rows_per_s"]
    # the most build_ratio can reach where the forwards and the input work share the cores (one machine)
    out["build_ratio_ceiling_shared_cores"] = out["build_shared_limit_rows_per_s"] / out["build_limit_rows_per_s"]
    out["loadavg_after"] = os.getloadavg()[0]  # other work on the machine skews both sides
    out["samples"] = {"pipeline": [p["rows_per_s"] for p in pipe], "tight_loop": loop}
    return out


def lines(r: dict[str, Any]) -> list[str]:
    """The human report of ``run``'s result."""
    s = r["image_size"]
    out = [f"input bench: {r['rows']:,} PNG rows of 3x{s}x{s} ({r['decoded_gb']:.2f} GB decoded), {r['views']} views "
           f"= {r['cache_rows']:,} cache rows in {r['chunks']} chunks; {r['cores']} cores; medians of {r['repeats']}",
           "  student input (rows/s):",
           f"    Ray Data pipeline, {r['decode_tasks']} decode tasks {r['pipeline_rows_per_s']:>10,.0f}  "
           f"(first batch after {r['pipeline_first_batch_s']:.2f} s; the consumer "
           f"used {r['pipeline_consumer_cpu_s']:.1f} CPU-s of a {r['pipeline_epoch_s']:.1f} s epoch)",
           f"    tight loop, one process       {r['input_rows_per_s']:>10,.0f}",
           f"    limit = tight x {r['limit_cores']}            {r['limit_rows_per_s']:>10,.0f}",
           f"    ratio                         {r['ratio']:>10.3f}  (target {TARGETS['ratio']})",
           f"    after the first batch         {r['pipeline_steady_rows_per_s']:>10,.0f}  ratio {r['ratio_steady']:.3f} "
           f"(a long epoch's rate)",
           "  cache build (rows/s):",
           f"    build, steady ({r['build_basis']})        {r['build_rows_per_s']:>10,.0f}  (with the deployment's "
           f"start-up {r['build_rows_per_s_total']:,.0f})",
           f"    teacher forward, 1 thread     {r['forward_rows_per_s']:>10,.0f}  -> limit {r['forward_limit_rows_per_s']:,.0f}",
           f"    build inputs, 1 thread        {r['build_input_rows_per_s']:>10,.0f}  -> limit "
           f"{r['build_input_limit_rows_per_s']:,.0f}",
           f"    build_ratio (vs the min)      {r['build_ratio']:>10.3f}  (target {TARGETS['build_ratio']})",
           f"    vs the shared-core limit {r['build_shared_limit_rows_per_s']:,.0f}: {r['build_ratio_shared']:.3f} (on shared "
           f"cores build_ratio can reach at most {r['build_ratio_ceiling_shared_cores']:.2f})",
           f"  load average {r['loadavg_before']:.1f} before, {r['loadavg_after']:.1f} after (other work skews both sides)"]
    return out
