"""Chunk leases: so that concurrent builders of one cache compute each chunk once.

A builder about to compute chunk ``i`` claims it by creating ``kd_lease/NNNNNNNN.json`` in the cache's
store, exclusively (a local ``link``, a locked dict in memory, an S3 put with ``If-None-Match: *``).
Another builder that finds the lease skips the chunk, and once it has nothing else to do waits for the
chunk's done marker. The holder renews its leases in the background every ``ttl / 3`` seconds and
deletes each after the chunk's marker is written. A lease that was not renewed for ``ttl`` seconds
(wall clocks, so hosts should keep them roughly in sync), or whose holder is a dead process on the same
host, has expired: any builder may take the chunk over (a crashed builder's chunks are not lost).

Leases only save work, they are not needed for correctness: chunk bytes are a pure function of the
chunk, done markers are put atomically, so a chunk written twice (two takers of one expired lease, a
holder presumed dead that was only slow) is written twice with identical bytes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from kdcore.cache.layout import LEASE_GROUP

DEFAULT_TTL_S = 60.0


def lease_key(name: int | str) -> str:
    return f"{LEASE_GROUP}/{name:08d}.json" if isinstance(name, int) else f"{LEASE_GROUP}/{name}.json"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


_HOST = socket.gethostname()
_PIDNS = _pid_namespace()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Lease:
    """Who holds a chunk, until when (seconds since the epoch)."""

    owner: str
    host: str
    pid: int
    pidns: str
    expires_at: float
    ttl: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Lease | None":
        try:
            d = json.loads(bytes(data))
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), str(d.get("pidns", "")),
                       float(d["expires_at"]), float(d["ttl"]))
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign object: treated as expired

    def expired(self, now: float | None = None) -> bool:
        if (time.time() if now is None else now) > self.expires_at:
            return True
        same_process_space = self.host == _HOST and self.pidns == _PIDNS
        return same_process_space and self.pid != os.getpid() and not _alive(self.pid)

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return f"builder {self.owner[:8]} (pid {self.pid} on {self.host}, lease {left:+.0f} s)"


class Leases:
    """The leases one builder takes on one cache's chunks; renewed in a background thread while open.

    ``store`` needs ``get``, ``set``, ``delete`` and ``create`` (exclusive put: False when the key exists)."""

    def __init__(self, store, *, ttl: float = DEFAULT_TTL_S, owner: str | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0 (got {ttl})")
        self.store = store
        self.ttl = float(ttl)
        self.owner = owner or uuid.uuid4().hex
        self.held: set[int | str] = set()
        self.taken_over = 0  # expired leases of other builders this one took
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new(self) -> Lease:
        return Lease(self.owner, _HOST, os.getpid(), _PIDNS, time.time() + self.ttl, self.ttl)

    def read(self, name: int | str) -> Lease | None:
        data = self.store.get(lease_key(name))
        if data is None:
            return None
        return Lease.from_json(data.tobytes()) or Lease("?", "?", 0, "", 0.0, 0.0)

    def claim(self, name: int | str) -> bool:
        """Take the lease on ``name`` (a chunk index, or a name such as "create"). True when this builder
        holds it now: it was free, already ours, or expired (taken over)."""
        key = lease_key(name)
        for _ in range(3):
            if self.store.create(key, self._new().to_json()):
                with self._lock:
                    self.held.add(name)
                return True
            current = self.read(name)
            if current is None:
                continue  # released in between: try again
            if current.owner == self.owner:
                with self._lock:
                    self.held.add(name)
                return True
            if not current.expired():
                return False
            if self.read(name) != current:  # renewed or taken by someone else meanwhile
                return False
            self.store.delete(key)
            if self.store.create(key, self._new().to_json()):
                with self._lock:
                    self.held.add(name)
                    self.taken_over += 1
                return True
        return False

    def release(self, name: int | str) -> None:
        """Give the lease up (after the chunk's marker is written, or when giving up on it)."""
        with self._lock:
            if name not in self.held:
                return
            self.held.discard(name)
        current = self.read(name)
        if current is not None and current.owner == self.owner:
            self.store.delete(lease_key(name))

    def renew(self) -> None:
        with self._lock:
            names = list(self.held)
        for name in names:
            current = self.read(name)
            if current is None or current.owner != self.owner:
                with self._lock:  # taken over (we were presumed dead), or cleaned up: not ours any more
                    self.held.discard(name)
                continue
            with self._lock:
                still = name in self.held
            if still:
                self.store.set(lease_key(name), self._new().to_json())

    # ---- the heartbeat -----------------------------------------------------------------------------
    def __enter__(self) -> "Leases":
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="kd-cache-leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            names = list(self.held)
        for name in names:
            try:
                self.release(name)
            except Exception:  # noqa: BLE001 - best effort: an unreleased lease just expires
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed renewal is retried at the next beat
                pass
