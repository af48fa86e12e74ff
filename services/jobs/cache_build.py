"""Building or reusing a job's feature cache (``kd cache build`` and the cache stage of ``kd run``)."""

from __future__ import annotations

import time
from typing import Any, Callable

from kdcore.cache.handle import CacheHandle
from kdcore.cache.source import compute_rows, job_manifest
from kdcore.cache.writer import BuildProgress, CacheWriter, build
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
    otherwise the teacher runs in this process (``runner``: one the caller already loaded). Returns what happened (uri, reused, chunks, rows/s, forwards).
    """
    job = resolve_paths(job)
    spec = job.features.cache
    if not spec.uri:
        raise UserError("features.cache.uri is not set; set it to a directory, s3://bucket/prefix or memory://name")
    say = log or (lambda _m: None)
    runner = runner or build_teacher(job, device="cpu")
    manifest = job_manifest(job, split, runner)
    writer = CacheWriter.open_or_create(spec.uri, manifest, split.ids_train, reuse=spec.reuse,
                                        s3_endpoint=spec.s3_endpoint)
    if writer.complete:
        say(f"[{job.name}] reusing the complete cache at {spec.uri} (teacher {manifest.teacher[:19]}...): "
            "the teacher does not run")
        return {"uri": spec.uri, "reused": True, "chunks_written": 0, "teacher_forwards": 0,
                "manifest": writer.manifest.to_dict()}
    missing = writer.missing_chunks()
    say(f"[{job.name}] building the cache at {spec.uri}: {len(missing)} of {writer.n_chunks} chunks to write")
    t0 = time.perf_counter()
    if replicas and _serve_available():
        from services.teacher.cache_fill import fill_with_replicas

        report = fill_with_replicas(job, writer, missing, log=say)
        forwards = report["teacher_rows"]
    else:
        rows_total = sum(writer.chunk_bounds(i)[1] - writer.chunk_bounds(i)[0] for i in missing)
        with Progress(rows_total, f"[{job.name}] cache", enabled=log is not None) as bar:
            def progress(p: BuildProgress) -> None:
                start, stop = writer.chunk_bounds(p.chunk)
                bar.update(stop - start)

            build(writer, compute_rows(job, split, runner), progress=progress)
        forwards = runner.forwards
    handle = CacheHandle.open(spec.uri, manifest, s3_endpoint=spec.s3_endpoint)
    if not handle.complete:
        raise CacheError(f"the cache build at {spec.uri} ended incomplete; rerun `kd cache build` to resume")
    seconds = time.perf_counter() - t0
    say(f"[{job.name}] cache complete: {manifest.n_rows} rows in {seconds:.1f} s")
    return {"uri": spec.uri, "reused": False, "chunks_written": len(missing), "teacher_forwards": forwards,
            "seconds": seconds, "manifest": handle.manifest.to_dict()}


def _serve_available() -> bool:
    try:
        import ray

        if not ray.is_initialized():
            return False
        import services.teacher.cache_fill  # noqa: F401 - present once the teacher server can fill caches
        return True
    except ImportError:
        return False
