"""Filling a feature cache through the teacher deployment: each replica computes and writes whole chunks."""

from __future__ import annotations

import time
from typing import Any, Callable

from kdcore.cache.writer import CacheWriter
from kdcore.errors import CacheError, KDError
from kdcore.progress import Progress
from kdcore.spec.job import JobSpec
from services.teacher.app import get_handle
from services.teacher.lifecycle import teacher_app


def _groups(chunks: list[int], size: int) -> list[list[int]]:
    return [chunks[i:i + size] for i in range(0, len(chunks), size)]


def fill_with_replicas(job: JobSpec, writer: CacheWriter, missing: list[int], log: Callable[[str], None] | None = print,
                       chunks_per_call: int = 2, retries: int = 3) -> dict[str, Any]:
    """Bring up the teacher deployment and have its replicas write ``missing`` chunks; a call whose replica
    died is sent again (only its chunks still missing are computed). Finalizes the cache."""
    spec = job.features.cache
    manifest = writer.manifest.to_dict()
    replicas = job.teacher.serve.replicas if job.teacher.serve.autoscaling is None else \
        job.teacher.serve.autoscaling.max_replicas
    in_flight = max(2, 2 * replicas)
    rows_of = {i: writer.chunk_bounds(i)[1] - writer.chunk_bounds(i)[0] for i in missing}
    groups = _groups(missing, chunks_per_call)
    t0 = time.perf_counter()
    per_replica: dict[str, int] = {}
    with teacher_app(job, log=log) as name:
        handle = get_handle(name)
        attempts = {tuple(g): 0 for g in groups}
        queue = list(groups)
        running: list[tuple[list[int], Any]] = []
        with Progress(sum(rows_of.values()), f"[{job.name}] cache", enabled=log is not None) as bar:
            while queue or running:
                while queue and len(running) < in_flight:
                    g = queue.pop(0)
                    writer_id = 1 + missing.index(g[0])  # distinct per group: markers record who wrote a chunk
                    running.append((g, handle.fill_cache_chunks.remote(spec.uri, manifest, g, writer_id,
                                                                      spec.s3_endpoint)))
                g, resp = running.pop(0)
                try:
                    r = resp.result()
                    per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + r["chunks"]
                    bar.update(sum(rows_of[i] for i in g))
                except KDError:
                    raise
                except Exception as e:  # noqa: BLE001 - a replica died mid-call: send the group again
                    attempts[tuple(g)] += 1
                    if attempts[tuple(g)] > retries:
                        raise CacheError(f"cache chunks {g} failed {retries + 1} times; last error: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
                    if log:
                        log(f"[{job.name}] chunks {g} failed ({type(e).__name__}); retrying")
                    queue.append(g)
    complete = writer.finalize()
    return {"teacher_rows": sum(rows_of.values()), "seconds": time.perf_counter() - t0, "complete": complete,
            "chunks_per_replica": per_replica}
