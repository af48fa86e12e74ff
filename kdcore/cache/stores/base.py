"""What every cache store does: the small protocol the cache needs besides zarr's own array I/O.

A store holds one cache (its zarr group at the root) and offers raw objects at keys relative to that
root: whole-chunk gets and puts, exclusive creates (leases), listing, sizing and removal. One class per
kind of location (``local``, ``memory``, ``s3``); this base implements the operations through the zarr
store, the kinds override what they do better. Nothing outside ``stores`` looks at the kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from kdcore.errors import CacheError, UserError

Kind = Literal["local", "memory", "s3"]

PROTO = default_buffer_prototype()


@dataclass(frozen=True)
class Location:
    """A parsed cache URI."""

    kind: Kind
    path: str  # local: absolute directory; memory: the name; s3: "bucket/prefix"
    uri: str  # canonical form

    def child(self, name: str) -> "Location":
        return parse_uri(join_uri(self.uri, name))


def parse_uri(uri: str | os.PathLike) -> Location:
    """Parse a cache location; refuses schemes kd cannot store to."""
    text = os.fspath(uri).strip()
    if not text:
        raise UserError("empty cache uri; set features.cache.uri to a directory, s3://bucket/prefix or memory://name")
    for scheme, kind, what in (("memory://", "memory", "memory://NAME"), ("s3://", "s3", "s3://bucket/prefix")):
        if text.startswith(scheme):
            path = text[len(scheme):].strip("/")
            if not path:
                raise UserError(f"cache uri {text!r} has no {'name' if kind == 'memory' else 'bucket'}; use {what}")
            return Location(kind, path, f"{scheme}{path}")  # type: ignore[arg-type]
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise UserError(
            f"cache uri {text!r}: scheme {scheme!r} is not supported; use a local directory, s3://bucket/prefix "
            "or memory://name"
        )
    path = str(Path(text).expanduser().absolute())
    return Location("local", path, path)


def join_uri(root: str | os.PathLike, name: str) -> str:
    """``root`` + ``/name`` for any kind of location."""
    root = os.fspath(root)
    if "://" in root:
        return root.rstrip("/") + "/" + name.strip("/")
    return str(Path(root) / name)


def as_bytes(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def truncated(uri: str, key: str, size: int, nbytes: int) -> CacheError:
    return CacheError(f"cache object {uri}/{key} is truncated ({size} of {nbytes} bytes); run "
                      f"`kd cache verify --repair {uri}`, then rerun")


class CacheStore:
    """The store of one cache. Open one with ``kdcore.cache.stores.open_store(uri)``."""

    kind: ClassVar[Kind]
    maps_files: ClassVar[bool] = False  # ``map`` is a zero-copy file mapping worth keeping across epochs

    def __init__(self, location: Location, zarr_store: Store, read_only: bool) -> None:
        self.location = location
        self.uri = location.uri
        self.zarr_store = zarr_store
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @classmethod
    def open(cls, location: Location, *, s3_endpoint: str | None, read_only: bool, create: bool) -> "CacheStore":
        raise NotImplementedError

    @classmethod
    def children(cls, location: Location, *, s3_endpoint: str | None = None) -> list[str]:
        """URIs directly under ``location`` (directories / prefixes / memory names), sorted."""
        raise NotImplementedError

    # ---- objects ---------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The bytes stored at ``key`` as a read-only uint8 array, or None when absent."""
        buf = sync(self.zarr_store.get(key, prototype=PROTO))
        return None if buf is None else buf.as_numpy_array()

    def map(self, key: str, nbytes: int) -> np.ndarray | None:
        """A read-only uint8 view of the first ``nbytes`` at ``key``, without a copy where the kind can
        (local files are memory-mapped). None when absent; CacheError when shorter than ``nbytes``."""
        data = self.get(key)
        if data is None:
            return None
        if data.nbytes < nbytes:
            raise truncated(self.uri, key, data.nbytes, nbytes)
        return data[:nbytes]

    def set(self, key: str, data: bytes | np.ndarray) -> None:
        """Store ``data`` at ``key`` in one put, atomically (readers see the old or the new bytes)."""
        sync(self.zarr_store.set(key, PROTO.buffer.from_array_like(as_bytes(data))))

    def put_chunk(self, key: str, data: np.ndarray, crc_bytes: int) -> str | None:
        """Store a chunk's data object. Returns the CRC32C (hex) of its first ``crc_bytes`` bytes when the
        kind takes it during the write (local), else None (the caller checksums)."""
        self.set(key, data)
        return None

    def create(self, key: str, data: bytes | np.ndarray) -> bool:
        """Store ``data`` at ``key`` only if nothing is there; of racing creators exactly one wins.
        Returns whether this call created it."""
        raise NotImplementedError

    def set_many(self, items: list[tuple[str, bytes | np.ndarray]]) -> None:
        for key, data in items:
            self.set(key, data)

    def exists(self, key: str) -> bool:
        return bool(sync(self.zarr_store.exists(key)))

    def delete(self, key: str) -> None:
        sync(self.zarr_store.delete(key))

    def list_dir(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (objects and "directories"), sorted."""

        async def collect() -> list[str]:
            return [k async for k in self.zarr_store.list_dir(prefix)]

        return sorted(sync(collect()))

    def size_bytes(self) -> int:
        """Bytes stored under the cache root."""
        raise NotImplementedError

    def remove(self, prefix: str = "") -> None:
        """Delete the object ``prefix`` and every object under it ("": the whole cache)."""
        if prefix and self.exists(prefix):
            self.delete(prefix)
        sync(self.zarr_store.delete_dir(prefix))

    # ---- temporary files of killed writes (local only: puts elsewhere are atomic) ---------------------
    def partials(self, prefix: str) -> list[str]:
        """Names of leftover temporary files (``*.partial``) directly under ``prefix``."""
        return []

    def delete_partial(self, prefix: str, name: str) -> None:
        pass
