"""Concurrent builders of one cache compute each chunk once (chunk leases in the cache's store), wait for
each other's chunks, and take over the chunks of a builder that died."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cache_fake_teacher import SAMPLE_IDS, build_reference, compute, manifest, snapshot, spawn_teacher

from kdcore.cache import CacheLoader, CacheWriter, build, verify
from kdcore.cache.lease import Lease, lease_key

N_CHUNKS = 10


class CountingTeacher:
    """compute_fn that counts the chunks it computes (thread-safe), slow enough for builders to overlap."""

    def __init__(self, sleep: float = 0.03) -> None:
        self.sleep = sleep
        self.chunks: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, start: int, stop: int):
        with self._lock:
            self.chunks.append(start // 64)
        time.sleep(self.sleep)
        return compute(start, stop)


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _builders(uri: str, n: int, teacher: CountingTeacher, **kw) -> list:
    """n builders in threads, started together, each opening (or creating) the cache itself."""
    go = threading.Barrier(n)
    reports: list = [None] * n
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            go.wait()
            w = CacheWriter.open_or_create(uri, manifest(), SAMPLE_IDS, s3_endpoint=kw.get("s3_endpoint"))
            reports[k] = build(w, teacher, poll_s=0.02)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return reports


def test_two_builder_processes_compute_each_chunk_once(tmp_path):
    ref = build_reference(tmp_path / "ref")
    uri = str(tmp_path / "shared")
    calls = [tmp_path / "calls0.jsonl", tmp_path / "calls1.jsonl"]
    barrier = tmp_path / "barrier"
    # both create-or-open the same empty location, then build all chunks at the same time
    procs = [spawn_teacher(uri, "--create", "--sleep", "0.1", "--calls-file", str(calls[k]), "--barrier",
                           str(barrier), "--ready-id", f"b{k}") for k in (0, 1)]
    _wait_for(lambda: all(Path(f"{barrier}.ready-b{k}").exists() for k in (0, 1)))
    Path(f"{barrier}.go").touch()  # both have opened (one of them created) the cache: build together
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    computed = [[json.loads(line)[0] // 64 for line in c.read_text().splitlines()] if c.exists() else []
                for c in calls]
    assert sorted(computed[0] + computed[1]) == list(range(N_CHUNKS)), f"computed twice or never: {computed}"
    assert computed[0] and computed[1], "the work was not shared"
    reports = [json.loads(o[0]) for o in outs]
    assert all(r["complete"] for r in reports), "each builder ends with a complete cache"
    assert sum(r["written"] for r in reports) == N_CHUNKS
    assert [r["skipped"] + r["calls"] + r["by_others"] for r in reports] == [N_CHUNKS, N_CHUNKS]
    assert snapshot(Path(uri)) == snapshot(Path(ref)), "differs from a single build"
    assert verify(uri).ok
    assert not (Path(uri) / "kd_lease").exists() or not list((Path(uri) / "kd_lease").iterdir())


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_concurrent_builders_forward_each_chunk_once(kind, tmp_path, memory_root, request):
    s3_endpoint = None
    if kind == "local":
        uri = str(tmp_path / "c")
    elif kind == "memory":
        uri = f"{memory_root}/c"
    else:
        s3_endpoint = request.getfixturevalue("s3_endpoint")
        uri = request.getfixturevalue("s3_root")
    teacher = CountingTeacher()
    reports = _builders(uri, 3, teacher, s3_endpoint=s3_endpoint)
    assert sorted(teacher.chunks) == list(range(N_CHUNKS)), "total teacher forwards != one build's"
    assert all(r.complete for r in reports)
    assert sum(r.compute_calls for r in reports) == N_CHUNKS
    assert all(r.skipped + r.compute_calls + r.by_others == N_CHUNKS for r in reports)
    assert verify(uri, s3_endpoint=s3_endpoint).ok
    rows = np.concatenate([b["row"] for b in CacheLoader(uri, batch_size=100, s3_endpoint=s3_endpoint)])
    assert sorted(rows.tolist()) == list(range(600))


def test_dead_builders_lease_is_taken_over(tmp_path):
    """A builder SIGKILLed while computing a chunk leaves its lease; the next build takes the chunk over
    at once (the lease names a dead process on this host) instead of waiting for the lease to expire."""
    uri = tmp_path / "c"
    CacheWriter.create(str(uri), manifest(), SAMPLE_IDS)
    proc = spawn_teacher(str(uri), "--sleep", "30")  # stuck computing chunk 0
    _wait_for(lambda: (uri / lease_key(0)).exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = Lease.from_json((uri / lease_key(0)).read_bytes())
    assert left.pid == proc.pid and left.expires_at > time.time() + 20 and left.expired()  # dead, not timed out
    teacher = CountingTeacher(sleep=0)
    t0 = time.monotonic()
    report = build(CacheWriter.open(str(uri), manifest()), teacher)  # default 60 s leases
    assert time.monotonic() - t0 < 30, "waited for the dead builder's lease to expire"
    assert report.complete and report.taken_over == 1 and sorted(teacher.chunks) == list(range(N_CHUNKS))
    assert verify(str(uri)).ok and not list((uri / "kd_lease").glob("*.json"))


def _foreign_lease(uri: Path, chunk: int, seconds: float) -> None:
    lease = Lease("someone-else", "another-host", 4242, "", time.time() + seconds, seconds)
    path = uri / lease_key(chunk)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(lease.to_json())


def test_expired_lease_of_another_host_is_taken_over_after_its_ttl(tmp_path):
    uri = tmp_path / "c"
    CacheWriter.create(str(uri), manifest(), SAMPLE_IDS)
    _foreign_lease(uri, 3, seconds=1.5)  # a builder on another machine that stopped renewing
    teacher = CountingTeacher(sleep=0)
    t0 = time.monotonic()
    report = build(CacheWriter.open(str(uri), manifest()), teacher, poll_s=0.05)
    assert time.monotonic() - t0 >= 1.0, "took a live lease"
    assert report.complete and report.taken_over == 1
    assert sorted(teacher.chunks) == list(range(N_CHUNKS)) and teacher.chunks[-1] == 3  # chunk 3 last


def test_a_live_lease_is_waited_for_not_recomputed(tmp_path):
    uri = tmp_path / "c"
    other = CacheWriter.create(str(uri), manifest(), SAMPLE_IDS)
    _foreign_lease(uri, 5, seconds=600)  # another builder is computing chunk 5
    teacher = CountingTeacher(sleep=0)
    out: list = []
    t = threading.Thread(target=lambda: out.append(build(CacheWriter.open(str(uri), manifest()), teacher,
                                                         poll_s=0.02)))
    t.start()
    _wait_for(lambda: len(teacher.chunks) == N_CHUNKS - 1)
    time.sleep(0.2)
    assert t.is_alive(), "finished without chunk 5"
    other.write_chunk(5, compute(320, 384))  # the other builder finishes its chunk
    (uri / lease_key(5)).unlink()
    t.join(30)
    (report,) = out
    assert report.complete and report.compute_calls == N_CHUNKS - 1 and report.by_others == 1
    assert 5 not in teacher.chunks and verify(str(uri)).ok


class GroupExecutor:
    """An executor like the Ray one: takes chunks in groups, several groups in flight (here: threads)."""

    def __init__(self, teacher: CountingTeacher, group: int = 3, in_flight: int = 2) -> None:
        self.teacher, self.group, self.in_flight = teacher, group, in_flight

    def run(self, cache, claims) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def write(chunks: list[int]) -> list[int]:
            for i in chunks:
                cache.write_chunk(i, self.teacher(*cache.chunk_bounds(i)), writer=7)
            return chunks

        with ThreadPoolExecutor(self.in_flight) as pool:
            running: list = []
            while True:
                while len(running) < self.in_flight:
                    got = claims.take(self.group, wait=not running)
                    if not got:
                        break
                    running.append(pool.submit(write, got))
                if not running:
                    return
                for i in running.pop(0).result():
                    claims.done(i)


def test_a_pluggable_executor_shares_chunks_with_another_builder(tmp_path):
    uri = str(tmp_path / "c")
    CacheWriter.create(uri, manifest(), SAMPLE_IDS)
    teacher = CountingTeacher()
    reports: list = []
    threads = [threading.Thread(target=lambda e=e: reports.append(build(CacheWriter.open(uri, manifest()), e,
                                                                        poll_s=0.02)))
               for e in (GroupExecutor(teacher), teacher)]  # a group executor and a plain compute_fn
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(teacher.chunks) == list(range(N_CHUNKS))
    assert len(reports) == 2 and all(r.complete for r in reports)
    assert sum(r.written for r in reports) == N_CHUNKS and verify(uri).ok
