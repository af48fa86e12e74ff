"""``memory://NAME``: caches in a process-global registry, so a writer and a reader opened by name in one
process see the same data (tests, notebooks). They vanish with the process."""

from __future__ import annotations

import threading

import numpy as np
from zarr.storage import MemoryStore

from kdcore.cache.stores.base import PROTO, CacheStore, Location, as_bytes
from kdcore.errors import CacheError

# name -> the dict backing a zarr MemoryStore; shared by every store opened with that name.
_MEMORY: dict[str, dict] = {}
_LOCK = threading.Lock()


def memory_names() -> list[str]:
    """Names of the ``memory://`` caches alive in this process."""
    with _LOCK:
        return sorted(_MEMORY)


def clear_memory(name: str | None = None) -> None:
    """Drop one ``memory://`` store (or all of them)."""
    with _LOCK:
        if name is None:
            _MEMORY.clear()
        else:
            _MEMORY.pop(name.strip("/"), None)


class MemoryCacheStore(CacheStore):
    kind = "memory"

    @classmethod
    def open(cls, location: Location, *, s3_endpoint=None, read_only: bool, create: bool) -> "MemoryCacheStore":
        with _LOCK:
            if location.path not in _MEMORY:
                if not create:
                    raise CacheError(f"no cache at {location.uri}: no memory store of that name in this process")
                _MEMORY[location.path] = {}
            backing = _MEMORY[location.path]
        return cls(location, MemoryStore(store_dict=backing, read_only=read_only), read_only)

    @classmethod
    def children(cls, location: Location, *, s3_endpoint=None) -> list[str]:
        prefix = location.path + "/"
        names = {n[len(prefix):].split("/", 1)[0] for n in memory_names() if n.startswith(prefix)}
        return sorted(f"memory://{location.path}/{c}" for c in names)

    def get(self, key: str) -> np.ndarray | None:
        buf = self.zarr_store.get_sync(key, prototype=PROTO)  # type: ignore[attr-defined]
        return None if buf is None else buf.as_numpy_array()

    def set(self, key: str, data) -> None:
        # MemoryStore keeps the buffer object itself: never alias the caller's array.
        self.zarr_store.set_sync(key, PROTO.buffer.from_array_like(as_bytes(data).copy()))  # type: ignore[attr-defined]

    def create(self, key: str, data) -> bool:
        with _LOCK:
            backing = _MEMORY.get(self.location.path)
            if backing is None or key in backing:
                return False
            self.set(key, data)
            return True

    def delete(self, key: str) -> None:
        self.zarr_store.delete_sync(key)  # type: ignore[attr-defined]

    def size_bytes(self) -> int:
        with _LOCK:
            backing = dict(_MEMORY.get(self.location.path, {}))
        return sum(len(v) for v in backing.values())

    def remove(self, prefix: str = "") -> None:
        if not prefix:
            with _LOCK:
                _MEMORY.pop(self.location.path, None)
            return
        super().remove(prefix)
