"""Per-chunk done markers: one small JSON object per finished chunk, ``kd_done/NNNNNNNN.json``.

A marker is written only after every array of its chunk is stored, so "marker exists" means "chunk
done". One object per chunk (not a shared done-array) means two writers never touch the same
object. The marker also keeps the checksum of each array's chunk, taken at write time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from kdcore.cache.layout import DONE_GROUP
from kdcore.cache.store import CacheStore

_NAME = re.compile(r"^(\d{8,})\.json$")

try:  # hardware CRC32C, ~10 GB/s; zarr itself depends on google-crc32c
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover - zarr requires it
    _crc32c = None


def checksum(data: np.ndarray, algorithm: str = "crc32c") -> str:
    """Checksum of an array's C-order bytes (the rows of one chunk, without padding), as hex text."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if algorithm == "crc32c":
        if _crc32c is None:  # pragma: no cover
            raise RuntimeError("google-crc32c is not installed")
        return f"{_crc32c.value(flat):08x}"
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256(flat).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def crc32c_extend(crc: int, data: np.ndarray) -> int:
    """CRC32C of ``data`` (uint8, contiguous) continuing ``crc``."""
    if _crc32c is None:  # pragma: no cover
        raise RuntimeError("google-crc32c is not installed")
    return _crc32c.extend(crc, data)


def default_algorithm() -> str:
    return "crc32c" if _crc32c is not None else "sha256"


DONE_PREFIX = DONE_GROUP


def marker_key(i: int) -> str:
    return f"{DONE_GROUP}/{i:08d}.json"


@dataclass(frozen=True)
class ChunkMarker:
    """Proof that chunk ``chunk`` (rows ``row_start:row_stop``) is written, with its checksums."""

    chunk: int
    row_start: int
    row_stop: int
    checksums: dict[str, str]
    algorithm: str = "crc32c"
    writer: int = 0
    written_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ChunkMarker":
        d = json.loads(bytes(data))
        return cls(chunk=int(d["chunk"]), row_start=int(d["row_start"]), row_stop=int(d["row_stop"]),
                   checksums={str(k): str(v) for k, v in d["checksums"].items()}, algorithm=str(d["algorithm"]),
                   writer=int(d.get("writer", 0)), written_at=str(d.get("written_at", "")))


def write_marker(store: CacheStore, marker: ChunkMarker) -> None:
    store.set(marker_key(marker.chunk), marker.to_json())


def read_marker(store: CacheStore, i: int) -> ChunkMarker | None:
    """The marker of chunk ``i``; None when absent or unreadable (an unreadable marker is not done)."""
    data = store.get(marker_key(i))
    if data is None:
        return None
    try:
        return ChunkMarker.from_json(data.tobytes())
    except (ValueError, KeyError, TypeError):
        return None


def done_chunks(store: CacheStore) -> set[int]:
    """Indices of the chunks that have a marker (temporary ``*.partial`` files are ignored)."""
    out = set()
    for name in store.list_dir(DONE_GROUP):
        m = _NAME.match(name.rsplit("/", 1)[-1])
        if m:
            out.add(int(m.group(1)))
    return out


def delete_marker(store: CacheStore, i: int) -> None:
    store.delete(marker_key(i))
