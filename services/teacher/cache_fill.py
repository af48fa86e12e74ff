"""Filling a feature cache through the teacher deployment: the build executor (``kdcore.cache.build``) whose
inputs come from Ray Data tasks and whose replicas only forward and write whole chunks.

The executor leases chunks a window at a time (``Claims.take``: concurrent builders of one cache share the work
window by window) and runs each window through ``services.data.cache_feed.feed_dataset``. Two windows are in
flight, so the replicas never wait while the next window's pipeline starts; ``tasks`` chunks are in flight between
them (two per replica: one forwards while the other's write finishes). A dataset held in memory is read by the
replicas themselves: there is nothing to decode off their node, so the chunks are sent from threads here
(``send_chunk`` without a row mapper), with no Ray Data pipeline to start.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from kdcore.cache.build import Claims
from kdcore.cache.writer import CacheWriter
from kdcore.errors import CacheError
from kdcore.spec.job import JobSpec
from services.data.cache_feed import feed_dataset, send_chunk
from services.rayerrors import as_kd_error
from services.data.context import decode_tasks, quiet_ray_data, uses_ray_data
from services.teacher.lifecycle import teacher_app

WINDOWS_IN_FLIGHT = 2


class ReplicaExecutor:
    """Brings up the teacher deployment and has its replicas write the chunks the build leases to it. Inputs of
    datasets read from files are decoded by Ray Data tasks; in-memory datasets are read by the replicas."""

    def __init__(self, job: JobSpec, *, log: Callable[[str], None] | None = print, window: int | None = None,
                 retries: int = 3) -> None:
        self.job, self.log, self.window, self.retries = job, log, window, retries
        self.per_replica: dict[str, int] = {}  # chunks each replica wrote
        self.rows_decoded = {"ray_data": 0, "replicas": 0}  # whose process decoded the inputs of the rows written
        self._count = threading.Lock()

    def tasks(self) -> int:
        """Chunks in flight in all: two per replica, at least the job's decode tasks (split between the
        windows in flight, so a window's tail and the next one's start together keep about this many)."""
        serve = self.job.teacher.serve
        replicas = serve.replicas if serve.autoscaling is None else serve.autoscaling.max_replicas
        return max(2 * replicas, decode_tasks(self.job))

    def run(self, cache: CacheWriter, claims: Claims) -> None:
        job, spec = self.job, self.job.features.cache
        manifest = cache.manifest.to_dict()
        job_json = job.model_dump(mode="json") if uses_ray_data(job) else None
        window = self.window or 2 * self.tasks()
        per_window = -(-self.tasks() // WINDOWS_IN_FLIGHT)
        failed = threading.Event()

        def windows(app: str) -> None:
            while not failed.is_set():
                got = claims.take(window)
                if not got:
                    return
                bounds = [(i, *cache.chunk_bounds(i)) for i in got]
                if job_json is None:
                    rows = self._sent_from_here(app, spec, manifest, bounds, per_window)
                else:
                    rows = feed_dataset(job_json, app, spec.uri, manifest, spec.s3_endpoint, bounds, per_window,
                                        self.retries).iter_rows()
                for row in rows:
                    with self._count:
                        self.per_replica[row["replica"]] = self.per_replica.get(row["replica"], 0) + 1
                        self.rows_decoded["ray_data" if row["decoded_here"] else "replicas"] += int(row["rows"])
                    claims.done(int(row["chunk"]))

        quiet = quiet_ray_data() if job_json is not None else contextlib.nullcontext()
        with teacher_app(job, log=self.log) as app, quiet:
            with ThreadPoolExecutor(WINDOWS_IN_FLIGHT, thread_name_prefix="kd-cache-window") as pool:
                futures = [pool.submit(windows, app) for _ in range(WINDOWS_IN_FLIGHT)]
                errors = []
                for f in futures:
                    try:
                        f.result()
                    except Exception as e:  # noqa: BLE001 - reported below, once both windows stopped
                        failed.set()
                        errors.append(e)
        if errors:
            raise as_kd_error(errors[0], CacheError, f"building the cache at {spec.uri} failed") from None

    def _sent_from_here(self, app: str, spec, manifest: dict, bounds: list[tuple[int, int, int]],
                        tasks: int) -> Iterator[dict]:
        """``feed_dataset``'s rows for a dataset the replicas read themselves: ``tasks`` chunks in flight from
        threads of this process."""
        with ThreadPoolExecutor(max(1, tasks), thread_name_prefix="kd-cache-chunk") as pool:
            yield from pool.map(lambda b: send_chunk(app, spec.uri, manifest, *b, spec.s3_endpoint, self.retries),
                                bounds)
