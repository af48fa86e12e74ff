"""Resident memory of a process tree, sampled while it runs, peak per process kind.

A process's kind comes from its title or command line (``kind_of``): the titles Ray 2.60 gives its workers and
actors (``ray::RayTrainWorker...``, ``ray::SERVE_REPLICA::kd-teacher-...``, ``ray::MapWorker(...)``), the Ray
daemons' command lines, and ``kd_driver`` for the root of the sampled tree only. An actor keeps the first kind
it shows for life (a Train worker running ``ray::execute.<fn>`` is still a Train worker); pooled workers take
the kind of the task they run at each sample. Linux only (reads /proc)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

# First match wins, so the specific titles come before the loose patterns below them.
_KINDS = [
    ("teacher_replica", re.compile(r"ray::(SERVE_REPLICA::kd-teacher|ServeReplica|TeacherServer|kd-teacher)")),
    ("ray_spill_worker", re.compile(r"ray::\w*_?(SpillWorker|RestoreWorker)")),  # objects spilled to disk
    ("ray_daemon", re.compile(r"ray/core/src/ray/raylet/raylet ")),  # its command line names default_worker.py
    ("data_decode", re.compile(r"ray::(_split_single_block|MapWorker|ReadCacheRows|Read|_MapWorker|MapBatches)")),
    ("data_coordinator", re.compile(r"ray::SplitCoordinator")),  # runs the streaming executor of a split dataset
    ("data_system", re.compile(r"ray::(_StatsActor|DatasetManager|_?AutoscalingCoordinator)")),
    ("serve_system", re.compile(r"ray::(SERVE_(CONTROLLER|PROXY)_ACTOR|ServeController|ProxyActor|HTTPProxyActor)")),
    ("train_system", re.compile(r"ray::(SynchronizationActor|PlacementGroupCleaner|PreemptionWatcher)")),
    ("kd_projector_registry", re.compile(r"ray::ProjectorRegistry")),
    ("ray_agent", re.compile(r"ray::(DashboardAgent|RuntimeEnvAgent)")),
    ("train_worker", re.compile(r"ray::(RayTrainWorker|_RayTrainWorker|TrainWorker)")),
    ("train_controller", re.compile(r"ray::(TrainController|_TrainController)")),
    ("bank_actor", re.compile(r"ray::BankActor")),
    ("ray_idle_worker", re.compile(r"ray::IDLE|default_worker\.py")),
    ("ray_daemon", re.compile(r"raylet|gcs_server|dashboard|runtime_env|log_monitor|monitor\.py|plasma|agent")),
]
# Kinds of pooled worker processes, which change with the task they run; every other ``ray::`` kind is an actor's.
_POOLED = ("ray_idle_worker", "data_decode", "other")


def kind_of(cmd: str, is_root: bool = False) -> str:
    """The kind of a process from its command line: ``kd_driver`` for the tree's root, the first ``_KINDS``
    match, else ``other``."""
    if is_root:
        return "kd_driver"
    for kind, pattern in _KINDS:
        if pattern.search(cmd):
            return kind
    return "other"


def _read(pid: int) -> tuple[str, int, int, int, int] | None:
    """(command line, ppid, rss, RssAnon, RssShmem bytes) of a live process, or None. Ray's object store is
    shared memory, counted in the RSS of every process that touched its pages: RssAnon is the private part."""
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return None

    def kb(field: str) -> int:
        m = re.search(rf"{field}:\s+(\d+) kB", status)
        return int(m.group(1)) * 1024 if m else 0

    ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
    return cmd, ppid, kb("VmRSS"), kb("RssAnon"), kb("RssShmem")


def tree(root: int) -> dict[int, tuple[str, int, int, int]]:
    """Every live process under ``root`` (itself included): pid -> (command line, rss, anon, shmem bytes)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            got = _read(int(name))
            if got:
                procs[int(name)] = got
    children: dict[int, list[int]] = {}
    for pid, got in procs.items():
        children.setdefault(got[1], []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            cmd, _, rss, anon, shm = procs[pid]
            out[pid] = (cmd, rss, anon, shm)
            todo.extend(children.get(pid, []))
    return out


class TreeSampler:
    """Samples the tree under ``root`` every ``every_s`` in a thread. Per kind: ``peaks`` (MB, the peak RSS of
    one process), ``anon_peaks`` and ``shmem_peaks`` (its private and shared parts), ``counts`` (the most
    processes seen at once) and ``titles`` (a few command lines); ``total_peak_mb``: the whole tree's peak;
    ``anon_series``: per kind, the peak private MB of one process in each ``bucket_s`` since the start (a flat
    series is a bound, a ramp a leak); ``shmem_series`` the same of the shared part (object-store pages)."""

    def __init__(self, root: int, every_s: float = 0.5, bucket_s: float = 10.0) -> None:
        self.root, self.every_s, self.bucket_s = root, every_s, bucket_s
        self.anon_series: dict[str, list[float]] = {}
        self.shmem_series: dict[str, list[float]] = {}
        self._t0 = time.monotonic()
        self.peaks: dict[str, float] = {}
        self.anon_peaks: dict[str, float] = {}
        self.shmem_peaks: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.titles: dict[str, set[str]] = {}
        self.total_peak_mb = 0.0
        self.samples = 0
        self._pid_kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        counts: dict[str, int] = {}
        total = 0.0
        for pid, (cmd, rss, anon, shm) in tree(self.root).items():
            if not cmd.strip():  # exiting, or between fork and exec
                continue
            kind = self._pid_kind.get(pid) or kind_of(cmd, pid == self.root)
            if kind not in _POOLED and cmd.startswith("ray::"):
                self._pid_kind[pid] = kind
            mb = rss / 2**20
            self.peaks[kind] = max(self.peaks.get(kind, 0.0), mb)
            self.anon_peaks[kind] = max(self.anon_peaks.get(kind, 0.0), anon / 2**20)
            b = int((time.monotonic() - self._t0) / self.bucket_s)
            for store, value in ((self.anon_series, anon), (self.shmem_series, shm)):
                series = store.setdefault(kind, [])
                series.extend([0.0] * (b + 1 - len(series)))
                series[b] = max(series[b], round(value / 2**20, 1))
            self.shmem_peaks[kind] = max(self.shmem_peaks.get(kind, 0.0), shm / 2**20)
            counts[kind] = counts.get(kind, 0) + 1
            total += mb
            seen = self.titles.setdefault(kind, set())
            if len(seen) < 8:
                seen.add(cmd.strip()[:70])
        for k, c in counts.items():
            self.counts[k] = max(self.counts.get(k, 0), c)
        self.total_peak_mb = max(self.total_peak_mb, total)
        self.samples += 1
