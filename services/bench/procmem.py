"""Resident memory of a process tree, sampled while it runs, peak per process kind.

Kinds come from the process titles Ray gives its workers (``ray::TeacherServer...``,
``ray::RayTrainWorker...``, ``ray::MapWorker(...)``, ``ray::ReadCacheRows...``), the Ray daemons' names
and ``kd`` for the driver. Linux only (reads /proc)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_KINDS = [
    ("teacher_replica", re.compile(r"ray::(ServeReplica|TeacherServer|kd-teacher)")),
    ("train_worker", re.compile(r"ray::(RayTrainWorker|_RayTrainWorker|TrainWorker)")),
    ("train_controller", re.compile(r"ray::(TrainController|_TrainController)")),
    ("data_decode", re.compile(r"ray::(MapWorker|ReadCacheRows|Read|_MapWorker|MapBatches)")),
    ("serve_system", re.compile(r"ray::(ServeController|ProxyActor|HTTPProxyActor)")),
    ("bank_actor", re.compile(r"ray::BankActor")),
    ("ray_idle_worker", re.compile(r"ray::IDLE|default_worker\.py")),
    ("ray_daemon", re.compile(r"raylet|gcs_server|dashboard|runtime_env|log_monitor|monitor\.py|plasma|agent")),
    ("kd_driver", re.compile(r"\bkd\b|services\.cli\.main|bin/kd ")),
]


def _read(pid: int) -> tuple[str, int, int] | None:
    """(command line, ppid, rss bytes) of a live process, or None."""
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return None
    ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    return cmd, ppid, int(m.group(1)) * 1024 if m else 0


def kind_of(cmd: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(cmd):
            return kind
    return "other"


def tree(root: int) -> dict[int, tuple[str, int]]:
    """Every live process under ``root`` (itself included): pid -> (command line, rss bytes)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            got = _read(int(name))
            if got:
                procs[int(name)] = got
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out[pid] = (procs[pid][0], procs[pid][2])
            todo.extend(children.get(pid, []))
    return out


class PeakRSS:
    """Samples the tree under ``root`` every ``every_s`` in a thread; ``peaks``: kind -> peak MB of one process."""

    def __init__(self, root: int, every_s: float = 0.5) -> None:
        self.root, self.every_s = root, every_s
        self.peaks: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
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
        for cmd, rss in tree(self.root).values():
            kind = kind_of(cmd)
            self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss / 2**20)
        self.samples += 1
