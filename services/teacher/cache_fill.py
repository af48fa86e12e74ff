"""Filling a feature cache through the teacher deployment: the build executor whose replicas compute and
write whole chunks (``kdcore.cache.build`` with ``ReplicaExecutor``)."""

from __future__ import annotations

from typing import Any, Callable

from kdcore.cache.build import Claims
from kdcore.cache.writer import CacheWriter
from kdcore.errors import CacheError, KDError
from kdcore.spec.job import JobSpec
from services.teacher.app import get_handle
from services.teacher.lifecycle import teacher_app


class ReplicaExecutor:
    """Brings up the teacher deployment and has its replicas write the chunks the build leases to it,
    ``chunks_per_call`` per call, up to two calls per replica in flight; a call whose replica died is sent
    again (the replica computes only its chunks still missing)."""

    def __init__(self, job: JobSpec, *, log: Callable[[str], None] | None = print, chunks_per_call: int = 2,
                 retries: int = 3) -> None:
        self.job, self.log = job, log
        self.chunks_per_call, self.retries = chunks_per_call, retries
        self.per_replica: dict[str, int] = {}

    def run(self, cache: CacheWriter, claims: Claims) -> None:
        job, spec = self.job, self.job.features.cache
        manifest = cache.manifest.to_dict()
        serve = job.teacher.serve
        replicas = serve.replicas if serve.autoscaling is None else serve.autoscaling.max_replicas
        in_flight = max(2, 2 * replicas)
        with teacher_app(job, log=self.log) as name:
            handle = get_handle(name)
            attempts: dict[tuple[int, ...], int] = {}
            queue: list[list[int]] = []
            running: list[tuple[list[int], Any]] = []
            while True:
                while len(queue) + len(running) < in_flight:
                    group = claims.take(self.chunks_per_call, wait=not (queue or running))
                    if not group:
                        break
                    queue.append(group)
                if not queue and not running:
                    return
                while queue and len(running) < in_flight:
                    g = queue.pop(0)
                    writer_id = 1 + g[0]  # distinct per group: markers record who wrote a chunk
                    running.append((g, handle.fill_cache_chunks.remote(spec.uri, manifest, g, writer_id,
                                                                      spec.s3_endpoint)))
                g, resp = running.pop(0)
                try:
                    r = resp.result()
                except KDError:
                    raise
                except Exception as e:  # noqa: BLE001 - a replica died mid-call: send the group again
                    attempts[tuple(g)] = attempts.get(tuple(g), 0) + 1
                    if attempts[tuple(g)] > self.retries:
                        raise CacheError(f"cache chunks {g} failed {self.retries + 1} times; last error: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
                    if self.log:
                        self.log(f"[{job.name}] chunks {g} failed ({type(e).__name__}); retrying")
                    queue.append(g)
                    continue
                self.per_replica[r["replica"]] = self.per_replica.get(r["replica"], 0) + r["chunks"]
                for i in g:
                    claims.done(i)
