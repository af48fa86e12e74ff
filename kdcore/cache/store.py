"""Where a cache lives: a local directory, ``memory://name`` or ``s3://bucket/prefix``.

``CacheStore`` wraps the zarr store of one cache (the zarr group sits at its root) and adds the few
raw-object operations the cache needs besides zarr's own array I/O: whole-chunk gets and puts, done
markers, listing, sizing and removal.

``memory://NAME`` stores are kept in a process-global registry, so a writer and a reader opened by
name in one process see the same data (tests, notebooks). They vanish with the process.

S3 goes through fsspec/s3fs. The endpoint is, in order: the ``s3_endpoint`` argument (from
``CacheSpec.s3_endpoint``), ``$AWS_ENDPOINT_URL``, else AWS itself; credentials come from the usual
AWS environment/config. Listing caches are disabled so that markers written by other processes are
seen at once.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from kdcore.errors import CacheError, UserError

Kind = Literal["local", "memory", "s3"]

_PROTO = default_buffer_prototype()

# name -> the dict backing a zarr MemoryStore; shared by every store opened with that name.
_MEMORY: dict[str, dict] = {}
_MEMORY_LOCK = threading.Lock()


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
    if text.startswith("memory://"):
        name = text[len("memory://"):].strip("/")
        if not name:
            raise UserError(f"cache uri {text!r} has no name; use memory://NAME")
        return Location("memory", name, f"memory://{name}")
    if text.startswith("s3://"):
        path = text[len("s3://"):].strip("/")
        if not path:
            raise UserError(f"cache uri {text!r} has no bucket; use s3://bucket/prefix")
        return Location("s3", path, f"s3://{path}")
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


def s3_storage_options(s3_endpoint: str | None = None) -> dict:
    """fsspec/s3fs options for an S3 cache."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    opts: dict = {"use_listings_cache": False}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def memory_names() -> list[str]:
    """Names of the ``memory://`` caches alive in this process."""
    with _MEMORY_LOCK:
        return sorted(_MEMORY)


def clear_memory(name: str | None = None) -> None:
    """Drop one ``memory://`` store (or all of them)."""
    with _MEMORY_LOCK:
        if name is None:
            _MEMORY.clear()
        else:
            _MEMORY.pop(name.strip("/"), None)


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _atomic_write(path: Path, data: np.ndarray) -> None:
    """Write ``data`` to ``path`` atomically: ``path`` has the old or the new bytes, never a mix.

    The temporary name follows zarr's LocalStore (``<name>.<hex>.partial``)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


_BLOCK = 1 << 20


def _write_in_place(path: Path, data: np.ndarray, crc_bytes: int = 0) -> int:
    """Write ``data`` to ``path`` directly (no temporary file, no rename: fewer metadata operations) and
    return the CRC32C of its first ``crc_bytes`` bytes, taken block by block while each block is still
    in the CPU cache (one pass over memory instead of two).

    Only for chunk data: a chunk counts as written when its done marker exists, and the marker is
    written (atomically) after the data, so a torn data file is never taken for a finished chunk.
    The file is overwritten, not truncated first, so a reader that maps it never faults past its end."""
    from kdcore.cache.markers import crc32c_extend

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    crc = 0
    try:
        if os.fstat(fd).st_size == 0 and data.nbytes:
            try:
                os.posix_fallocate(fd, 0, data.nbytes)
            except (OSError, AttributeError):
                pass
        for start in range(0, data.nbytes, _BLOCK):
            block = data[start:start + _BLOCK]
            if start < crc_bytes:
                crc = crc32c_extend(crc, block[: crc_bytes - start])
            view = memoryview(block)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        if os.fstat(fd).st_size != data.nbytes:
            os.ftruncate(fd, data.nbytes)
    finally:
        os.close(fd)
    return crc


def _as_bytes(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


class CacheStore:
    """The store of one cache: zarr's store plus raw object access at keys relative to the cache root."""

    def __init__(self, uri: str | os.PathLike, *, s3_endpoint: str | None = None, read_only: bool = False,
                 create: bool = False) -> None:
        self.location = parse_uri(uri)
        self.uri = self.location.uri
        self.kind: Kind = self.location.kind
        self.read_only = read_only
        if self.kind == "local":
            root = Path(self.location.path)
            if not create and not root.is_dir():
                raise CacheError(f"no cache at {self.uri}: directory does not exist")
            self.root: Path | None = root
            self.zarr_store: Store = LocalStore(root, read_only=read_only)
        elif self.kind == "memory":
            self.root = None
            with _MEMORY_LOCK:
                if self.location.path not in _MEMORY:
                    if not create:
                        raise CacheError(f"no cache at {self.uri}: no memory store of that name in this process")
                    _MEMORY[self.location.path] = {}
                backing = _MEMORY[self.location.path]
            self.zarr_store = MemoryStore(store_dict=backing, read_only=read_only)
        else:
            self.root = None
            self.zarr_store = FsspecStore.from_url(
                self.uri, storage_options=s3_storage_options(s3_endpoint), read_only=read_only
            )

    def __repr__(self) -> str:
        return f"CacheStore({self.uri!r})"

    # ---- raw objects -------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The bytes stored at ``key`` as a read-only uint8 array, or None when absent."""
        store = self.zarr_store
        if self.kind in ("local", "memory"):
            buf = store.get_sync(key, prototype=_PROTO)  # type: ignore[attr-defined]
        else:
            buf = sync(store.get(key, prototype=_PROTO))
        return None if buf is None else buf.as_numpy_array()

    def map(self, key: str, nbytes: int) -> np.ndarray | None:
        """A read-only uint8 view of the first ``nbytes`` at ``key`` without copying where possible: local
        files are memory-mapped (pages populated up front, so the caller's thread pays the I/O), other
        stores return the fetched object. None when absent; CacheError when shorter than ``nbytes``."""
        if self.kind == "local":
            path = self.root / key  # type: ignore[operator]
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            try:
                size = os.fstat(fd).st_size
                if size < nbytes:
                    raise CacheError(f"cache object {self.uri}/{key} is truncated ({size} of {nbytes} bytes); "
                                     f"run `kd cache verify {self.uri}`")
                if nbytes == 0:
                    return np.zeros(0, dtype=np.uint8)
                m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            return np.frombuffer(m, dtype=np.uint8)
        data = self.get(key)
        if data is None:
            return None
        if data.nbytes < nbytes:
            raise CacheError(f"cache object {self.uri}/{key} is truncated ({data.nbytes} of {nbytes} bytes); "
                             f"run `kd cache verify {self.uri}`")
        return data[:nbytes]

    def set(self, key: str, data: bytes | np.ndarray) -> None:
        """Store ``data`` at ``key`` in one put, atomically on every backend (locally: a temporary file in
        the same directory, renamed over ``key``)."""
        arr = _as_bytes(data)
        if self.kind == "local":
            _atomic_write(self.root / key, arr)  # type: ignore[operator]
        elif self.kind == "memory":
            # MemoryStore keeps the buffer object itself: never alias the caller's array.
            self.zarr_store.set_sync(key, _PROTO.buffer.from_array_like(arr.copy()))  # type: ignore[attr-defined]
        else:
            sync(self.zarr_store.set(key, _PROTO.buffer.from_array_like(arr)))

    def put_chunk(self, key: str, data: np.ndarray, crc_bytes: int) -> str | None:
        """Store a chunk's data object. Locally it is written in place (the done marker written after it
        is what makes the chunk count) and the CRC32C of its first ``crc_bytes`` bytes is returned, taken
        during the write; other stores put atomically and return None (the caller checksums)."""
        arr = _as_bytes(data)
        if self.kind == "local":
            return f"{_write_in_place(self.root / key, arr, crc_bytes):08x}"  # type: ignore[operator]
        self.set(key, arr)
        return None

    def set_many(self, items: list[tuple[str, bytes | np.ndarray]]) -> None:
        """Store several objects (concurrently on S3)."""
        if self.kind != "s3":
            for key, data in items:
                self.set(key, data)
            return

        async def put_all() -> None:
            await asyncio.gather(*(self.zarr_store.set(key, _PROTO.buffer.from_array_like(_as_bytes(data)))
                                   for key, data in items))

        sync(put_all())

    def exists(self, key: str) -> bool:
        if self.kind == "local":
            return (self.root / key).is_file()  # type: ignore[operator]
        return bool(sync(self.zarr_store.exists(key)))

    def delete(self, key: str) -> None:
        if self.kind == "local":
            (self.root / key).unlink(missing_ok=True)  # type: ignore[operator]
        elif self.kind == "memory":
            self.zarr_store.delete_sync(key)  # type: ignore[attr-defined]
        else:
            sync(self.zarr_store.delete(key))

    def list_dir(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (objects and "directories")."""

        async def collect() -> list[str]:
            return [k async for k in self.zarr_store.list_dir(prefix)]

        if self.kind == "local":
            base = self.root / prefix  # type: ignore[operator]
            try:
                return sorted(p.name for p in base.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted(sync(collect()))

    def size_bytes(self) -> int:
        """Bytes stored under the cache root."""
        if self.kind == "local":
            total = 0
            for dirpath, _dirs, files in os.walk(self.root):  # type: ignore[arg-type]
                for name in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, name))
                    except OSError:
                        pass
            return total
        if self.kind == "memory":
            with _MEMORY_LOCK:
                backing = dict(_MEMORY.get(self.location.path, {}))
            return sum(len(v) for v in backing.values())
        fs = self.zarr_store.fs  # type: ignore[attr-defined]
        found = sync(fs._find(self.location.path, detail=True, withdirs=False))
        return int(sum(int(info.get("size") or 0) for info in found.values()))

    def remove_all(self) -> None:
        """Delete every object of this cache."""
        if self.kind == "local":
            shutil.rmtree(self.root, ignore_errors=True)  # type: ignore[arg-type]
        elif self.kind == "memory":
            with _MEMORY_LOCK:
                _MEMORY.pop(self.location.path, None)
        else:
            sync(self.zarr_store.delete_dir(""))

    def remove_partials(self, prefix: str, owned: Callable[[str], bool]) -> int:
        """Delete the leftover temporary files (``*.partial``, left by a killed local write) directly under
        ``prefix`` for which ``owned(name)`` is true. Local stores only: puts elsewhere are atomic."""
        if self.kind != "local":
            return 0
        n = 0
        for name in self.list_dir(prefix):
            if name.endswith(".partial") and owned(name):
                (self.root / prefix / name).unlink(missing_ok=True)  # type: ignore[operator]
                n += 1
        return n


def list_children(root: str | os.PathLike, *, s3_endpoint: str | None = None) -> list[str]:
    """URIs directly under ``root`` (directories / prefixes / memory names), sorted."""
    loc = parse_uri(root)
    if loc.kind == "local":
        base = Path(loc.path)
        if not base.is_dir():
            return []
        return sorted(str(p) for p in base.iterdir() if p.is_dir())
    if loc.kind == "memory":
        prefix = loc.path + "/"
        children = {n[len(prefix):].split("/", 1)[0] for n in memory_names() if n.startswith(prefix)}
        return sorted(f"memory://{loc.path}/{c}" for c in children)
    store = FsspecStore.from_url(loc.uri, storage_options=s3_storage_options(s3_endpoint), read_only=True)

    async def collect() -> list[str]:
        return [k async for k in store.list_dir("")]

    names = [n.strip("/") for n in sync(collect())]
    return sorted(f"{loc.uri}/{n}" for n in names if n)

