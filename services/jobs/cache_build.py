"""Building or reusing a job's feature cache (``kd cache build`` and the cache stage of ``kd run``)."""

from __future__ import annotations

import time
from typing import Any, Callable

from kdcore.cache.build import BuildProgress, ThreadExecutor, build
from kdcore.cache.jobs import compute_rows, job_manifest
from kdcore.cache.writer import CacheWriter
from kdcore.data.splits import DataSplit
from kdcore.errors import CacheError, UserError
from kdcore.loop import build_teacher
from kdcore.progress import Progress
from kdcore.spec.job import JobSpec
from kdcore.spec.paths import resolve_paths
from kdcore.teacher import TeacherRunner


def ensure_cache(job: JobSpec, split: DataSplit, log: Callable[[str], None] | None = print,
                 replicas: bool = True, runner: TeacherRunner | None = None) -> dict[str, Any]:
    """Reuse a complete matching cache at ``features.cache.uri``, else build (or resume) it.

    With ``replicas`` and Ray running, the teacher deployment's replicas compute and write the chunks;
    otherwise the teacher runs in this process (``runner``: one the caller already loaded). Another run
    building the same cache at the same time shares the work (each chunk is computed once). Returns what
    happened (uri, reused, chunks, forwards).
    """
    job = resolve_paths(job)
    spec = job.features.cache
    if not spec.uri:
        raise UserError("features.cache.uri is not set; set it to a directory, s3://bucket/prefix or memory://name")
    say = log or (lambda _m: None)
    runner = runner or build_teacher(job, device="cpu")
    manifest = job_manifest(job, split, runner)
    cache = CacheWriter.open_or_create(spec.uri, manifest, split.ids_train, reuse=spec.reuse,
                                       s3_endpoint=spec.s3_endpoint)
    if cache.complete:
        say(f"[{job.name}] reusing the complete cache at {spec.uri} (teacher {manifest.teacher[:19]}...): "
            "the teacher does not run")
        return {"uri": spec.uri, "reused": True, "chunks_written": 0, "teacher_forwards": 0,
                "manifest": cache.manifest.to_dict()}
    missing = cache.missing_chunks()
    say(f"[{job.name}] building the cache at {spec.uri}: {len(missing)} of {cache.n_chunks} chunks to write")
    t0 = time.perf_counter()
    on_ray = replicas and _ray_running()
    if on_ray:
        from services.teacher.cache_fill import ReplicaExecutor

        executor: Any = ReplicaExecutor(job, log=say)
    else:
        executor = ThreadExecutor(compute_rows(job, split, runner))
    rows_total = sum(cache.chunk_bounds(i)[1] - cache.chunk_bounds(i)[0] for i in missing)
    with Progress(rows_total, f"[{job.name}] cache", enabled=log is not None) as bar:
        def progress(p: BuildProgress) -> None:
            start, stop = cache.chunk_bounds(p.chunk)
            bar.update(stop - start)

        report = build(cache, executor, progress=progress)
    if not report.complete:
        raise CacheError(f"the cache build at {spec.uri} ended incomplete; rerun `kd cache build` to resume")
    forwards = report.rows_computed if on_ray else runner.forwards
    seconds = time.perf_counter() - t0
    shared = f"; {report.by_others} chunk(s) written by another build" if report.by_others else ""
    say(f"[{job.name}] cache complete: {manifest.n_rows} rows in {seconds:.1f} s{shared}")
    out = {"uri": spec.uri, "reused": False, "chunks_written": report.written, "teacher_forwards": forwards,
           "seconds": seconds, "rows_per_s": report.rows_computed / seconds if seconds > 0 else None,
           "manifest": cache.manifest.to_dict()}
    if on_ray:  # who decoded the inputs (Ray Data tasks, or the replicas for in-memory data) and who wrote
        out.update(inputs_decoded_by=dict(executor.rows_decoded), chunks_by_replica=dict(executor.per_replica))
    return out


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()
