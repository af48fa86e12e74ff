"""Per-chunk done markers: one small JSON object per finished chunk, ``kd_done/NNNNNNNN.json`` (the data,
and its I/O over any ``CacheStore``).

A marker is written only after every array of its chunk is stored, so "marker exists" means "chunk
done". One object per chunk (not a shared done-array) means two writers never touch the same
object. The marker also keeps the checksum of each array's chunk, taken at write time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from kdcore.cache.checksum import checksum
from kdcore.cache.layout import DONE_GROUP

if TYPE_CHECKING:
    from kdcore.cache.stores import CacheStore

_NAME = re.compile(r"^(\d{8,})\.json$")

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


def mismatch(marker: ChunkMarker, path: str, data) -> str | None:
    """What is wrong with ``data`` (the chunk's rows of array ``path``, without padding) against the
    checksum the marker recorded; None when it matches."""
    want = marker.checksums.get(path)
    if want is None:
        return f"{path}: no checksum in the marker"
    got = checksum(data, marker.algorithm)
    return None if got == want else f"{path}: {marker.algorithm} {got} != recorded {want}"


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


def is_done(store: CacheStore, i: int) -> bool:
    return store.exists(marker_key(i))


def delete_marker(store: CacheStore, i: int) -> None:
    store.delete(marker_key(i))
