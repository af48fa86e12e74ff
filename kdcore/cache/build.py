"""The one build function: fill a cache's missing chunks with a pluggable executor, each chunk once.

``build(cache, executor)`` decides *which* chunks to compute; the executor decides *how*: a
``ThreadExecutor`` (the default for a ``compute_fn``: the teacher in the calling thread, writes in
background threads, so chunk i+1 computes while chunk i is stored) or, on Ray, the teacher deployment's
replicas (``services.teacher.cache_fill.ReplicaExecutor``). An executor takes chunks from ``Claims``
and reports each one once its done marker is written.

Claims are lazy: a chunk is leased (see ``lease``) just before it is computed, so concurrent builders
of one cache split the work chunk by chunk; a chunk another builder holds is skipped, then waited for
(its marker), and taken over if that builder's lease expires. Builders started with ``n_writers > 1``
only build their own share (``chunk_assignment``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from kdcore.cache import markers
from kdcore.cache.layout import chunk_assignment
from kdcore.cache.lease import DEFAULT_TTL_S, Leases
from kdcore.cache.writer import CacheWriter
from kdcore.errors import CacheError

ComputeFn = Callable[[int, int], Mapping[str, Any]]


@dataclass(frozen=True)
class BuildProgress:
    """Reported after each chunk a build writes."""

    chunk: int
    written: int  # chunks written by this build so far
    todo: int  # chunks missing when this build started (some may be written by other builders)
    elapsed_s: float


@dataclass(frozen=True)
class BuildReport:
    uri: str
    n_chunks: int  # chunks in the cache
    assigned: int  # chunks owned by this writer
    skipped: int  # owned chunks already done before this build
    written: int  # chunks written by this build
    compute_calls: int  # chunks computed by this build (calls of compute_fn: teacher forwards)
    rows_computed: int
    complete: bool  # the cache is complete after this build
    reused: bool  # an existing complete cache was reused as is
    seconds: float
    by_others: int = 0  # missing chunks another builder wrote while this one ran
    taken_over: int = 0  # chunks whose expired lease (a dead or stuck builder's) this build took


class Claims:
    """The chunks one build still has to write, leased one at a time as an executor takes them."""

    def __init__(self, cache: CacheWriter, todo: list[int], leases: Leases, *, writer: int, poll_s: float,
                 progress: Callable[[BuildProgress], None] | None, t0: float) -> None:
        self.cache, self.leases, self.writer = cache, leases, writer
        self._next = list(todo)  # not looked at yet, in order
        self._deferred: list[int] = []  # held by another builder when looked at
        self._partials = cache.partial_files()
        self._poll, self._progress, self._t0, self._n = poll_s, progress, t0, len(todo)
        self._lock = threading.Lock()  # take() is called from one thread at a time; done() from any
        self._count = threading.Lock()
        self.taken: list[int] = []
        self.written = 0

    def _try(self, i: int, done: set[int] | None) -> bool:
        """Lease chunk ``i`` if it is still to do (``done``: the done chunks as just listed, else asked)."""
        finished = i in done if done is not None else markers.is_done(self.cache.store, i)
        if finished:
            return False
        if not self.leases.claim(i):
            self._deferred.append(i)
            return False
        if markers.is_done(self.cache.store, i):  # finished just before we claimed it
            self.leases.release(i)
            return False
        self.cache.remove_partials([i], self._partials)
        self.taken.append(i)
        return True

    def take(self, n: int = 1, wait: bool = True) -> list[int]:
        """Lease up to ``n`` chunks to compute. Empty when none is left to take: every chunk is done or
        taken by this build (``wait``), or none can be taken right now (``wait=False``)."""
        out: list[int] = []
        while True:
            with self._lock:
                while self._next and len(out) < n:
                    i = self._next.pop(0)
                    if self._try(i, None):
                        out.append(i)
                if out or not self._deferred:
                    return out
                done = markers.done_chunks(self.cache.store)
                pending, self._deferred = self._deferred, []
                for k, i in enumerate(pending):  # others' chunks: done, still leased, or expired
                    if len(out) == n:
                        self._deferred.extend(pending[k:])
                        break
                    if self._try(i, done):
                        out.append(i)
                if out or not self._deferred or not wait:
                    return out
            time.sleep(self._poll)

    def done(self, i: int) -> None:
        """Chunk ``i``'s marker is written: give its lease up, report progress."""
        self.leases.release(i)
        with self._count:
            self.written += 1
            written = self.written
        if self._progress is not None:
            self._progress(BuildProgress(i, written, self._n, time.perf_counter() - self._t0))


class Executor(Protocol):
    """Computes and writes the chunks it takes from ``claims`` (``claims.take``), calling ``claims.done(i)``
    after each chunk's marker is written; returns when ``take`` has nothing more. Raises on failure."""

    def run(self, cache: CacheWriter, claims: Claims) -> None: ...


_DONE = object()


class ThreadExecutor:
    """``compute_fn(row_start, row_stop)`` in the calling thread; chunks stored by ``writer_threads``
    background threads behind a queue of ``queue_size`` chunks, so the teacher computes the next chunks
    while earlier ones are written. ``compute_fn`` must return arrays it does not reuse afterwards."""

    def __init__(self, compute_fn: ComputeFn, *, queue_size: int = 2, writer_threads: int = 2) -> None:
        self.compute_fn = compute_fn
        self.queue_size, self.writer_threads = max(1, queue_size), max(1, writer_threads)

    def run(self, cache: CacheWriter, claims: Claims) -> None:
        q: queue.Queue = queue.Queue(maxsize=self.queue_size)
        failure: list[BaseException] = []

        def drain() -> None:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if failure:
                    continue  # keep draining so the producer never blocks
                try:
                    cache.write_chunk(item.index, item, writer=claims.writer)
                    claims.done(item.index)
                except BaseException as err:  # noqa: BLE001 - reported to the caller below
                    failure.append(err)

        threads = [threading.Thread(target=drain, name=f"kd-cache-writer-{claims.writer}.{k}", daemon=True)
                   for k in range(self.writer_threads)]
        for t in threads:
            t.start()
        try:
            while not failure:
                got = claims.take(1)
                if not got:
                    break
                start, stop = cache.chunk_bounds(got[0])
                chunk = cache.prepare(got[0], self.compute_fn(start, stop))  # checks here, in this thread
                while not failure:
                    try:
                        q.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        pass
        finally:
            for _ in threads:
                q.put(_DONE)
            for t in threads:
                t.join()
        if failure:
            raise CacheError(f"writing to the cache at {cache.uri} failed: {failure[0]}") from failure[0]


def build(cache: CacheWriter, work: "ComputeFn | Executor", *, writer: int = 0, n_writers: int = 1,
          progress: Callable[[BuildProgress], None] | None = None, queue_size: int = 2, writer_threads: int = 2,
          finalize: bool = True, lease_ttl: float = DEFAULT_TTL_S, poll_s: float = 0.2) -> BuildReport:
    """Compute and write this writer's missing chunks, then mark the cache complete when every chunk is.

    ``work`` is an ``Executor``, or a ``compute_fn(row_start, row_stop)`` returning the rows' arrays (see
    ``CacheWriter.write_chunk``), run by a ``ThreadExecutor(compute_fn, queue_size, writer_threads)``.
    A complete cache returns at once with ``compute_calls == 0``. Chunks other builders hold are waited
    for; ``lease_ttl``: how long this build's leases outlive it if it dies (renewed while it runs).
    ``progress`` is called after each chunk this build writes (from a writer thread, one at a time)."""
    t0 = time.perf_counter()
    mine = chunk_assignment(cache.n_chunks, writer, n_writers)
    if cache.refresh().complete:
        return BuildReport(cache.uri, cache.n_chunks, len(mine), len(mine), 0, 0, 0, True, True,
                           time.perf_counter() - t0)
    executor = work if hasattr(work, "run") else ThreadExecutor(work, queue_size=queue_size,  # type: ignore[arg-type]
                                                                writer_threads=writer_threads)
    todo = cache.missing_chunks(mine)
    with Leases(cache.store, ttl=lease_ttl) as leases:
        claims = Claims(cache, todo, leases, writer=writer, poll_s=poll_s, progress=progress, t0=t0)
        executor.run(cache, claims)  # type: ignore[union-attr]
    complete = cache.finalize() if finalize else cache.refresh().complete
    rows = sum(cache.chunk_bounds(i)[1] - cache.chunk_bounds(i)[0] for i in claims.taken)
    return BuildReport(cache.uri, cache.n_chunks, len(mine), len(mine) - len(todo), claims.written,
                       len(claims.taken), rows, complete, False, time.perf_counter() - t0,
                       by_others=len(todo) - len(claims.taken), taken_over=leases.taken_over)
