"""Cache housekeeping: info, ls, rm, find_cache, invalidate_chunks (behind `kd cache info|ls|rm|verify --repair`);
``verify`` checks the chunks."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from kdcore.cache.handle import CacheHandle, read_manifest
from kdcore.cache.manifest import Manifest, differences
from kdcore.cache.stores import list_children, open_store, parse_uri
from kdcore.cache.writer import CacheWriter
from kdcore.errors import CacheError


@dataclass
class CacheInfo:
    uri: str
    manifest: dict
    complete: bool
    chunks_done: int
    n_chunks: int
    n_rows: int
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CacheEntry:
    """One cache found by ``ls``."""

    uri: str
    teacher: str
    dataset: str
    complete: bool
    n_rows: int
    layers: list[str]
    created_at: str

    def to_dict(self) -> dict:
        return asdict(self)


def info(uri: str | os.PathLike, *, s3_endpoint: str | None = None) -> CacheInfo:
    """Manifest, completeness (markers written) and bytes stored of one cache."""
    handle = CacheHandle.open(uri, s3_endpoint=s3_endpoint, read_only=True)
    m = handle.manifest
    done = handle.done_chunks()
    return CacheInfo(handle.uri, m.to_dict(), m.complete, len(done), m.n_chunks, m.n_rows,
                     handle.store.size_bytes())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(ci: CacheInfo) -> str:
    m = ci.manifest
    state = "complete" if ci.complete else f"INCOMPLETE ({ci.chunks_done}/{ci.n_chunks} chunks; resume with `kd cache build JOB.yaml`)"
    lines = [
        f"cache {ci.uri}",
        f"  state:        {state}",
        f"  size:         {_human(ci.size_bytes)} ({ci.size_bytes} bytes)",
        f"  rows:         {ci.n_rows} = {m['n_samples']} samples x {m['views']} views, "
        f"{ci.n_chunks} chunks of {m['chunk_rows']}",
        f"  teacher:      {m['teacher']}",
        f"  dataset:      {m['dataset']}",
        f"  storage:      {m['dtype']}, compression {m['compression']}, checksums {m['checksum']}",
    ]
    for name, shape in m["layers"].items():
        lines.append(f"  layer:        {name} {tuple(shape)}")
    if m.get("num_classes") is not None:
        topk = f", top-{m['logits_topk']} stored" if m.get("logits_topk") else ""
        lines.append(f"  logits:       {m['num_classes']} classes{topk}")
    lines.append(f"  augmentation: {m['augmentation'] or '{}'} seed {m['aug_seed']}, {m['aug_params']} params/row")
    lines.append(f"  created:      {m['created_at']} by kd {m['tool_version']} (format {m['format_version']})")
    if m.get("completed_at"):
        lines.append(f"  completed:    {m['completed_at']}")
    return "\n".join(lines)


def ls(root: str | os.PathLike, *, s3_endpoint: str | None = None) -> list[CacheEntry]:
    """The caches directly under ``root`` (a directory, s3://bucket/prefix or memory://prefix), and
    ``root`` itself when it is a cache."""
    out = []
    candidates = [parse_uri(root).uri] + list_children(root, s3_endpoint=s3_endpoint)
    for uri in candidates:
        try:
            store = open_store(uri, s3_endpoint=s3_endpoint, read_only=True)
            m = read_manifest(store)
        except CacheError:
            continue
        if m is None:
            continue
        out.append(CacheEntry(store.uri, m.teacher, m.dataset, m.complete, m.n_rows, list(m.layers), m.created_at))
    return out


def format_ls(entries: list[CacheEntry]) -> str:
    if not entries:
        return "no caches found"
    lines = []
    for e in entries:
        state = "complete" if e.complete else "incomplete"
        lines.append(f"{e.uri}  {state}  rows={e.n_rows}  teacher={e.teacher[:19]}  dataset={e.dataset[:19]}  "
                     f"layers={','.join(e.layers)}  created={e.created_at}")
    return "\n".join(lines)


def find_cache(root: str | os.PathLike, expected: Manifest, *, s3_endpoint: str | None = None) -> str | None:
    """The URI of a complete cache under ``root`` that matches ``expected`` by fingerprint (teacher,
    dataset, layers, views, augmentation, ...), or None. Chunking and compression may differ."""
    key_uri = parse_uri(root).child(expected.key()).uri
    entries = ls(root, s3_endpoint=s3_endpoint)
    entries.sort(key=lambda e: e.uri != key_uri)  # the default location first
    for e in entries:
        if not e.complete or e.teacher != expected.teacher or e.dataset != expected.dataset:
            continue
        found = read_manifest(open_store(e.uri, s3_endpoint=s3_endpoint, read_only=True))
        if found is not None and found.complete and not differences(expected, found):
            return e.uri
    return None


def rm(uri: str | os.PathLike, *, s3_endpoint: str | None = None, force: bool = False) -> bool:
    """Delete a cache. Refuses (CacheError) a location that is not a kd cache unless ``force``.
    Returns False when there was nothing there."""
    try:
        store = open_store(uri, s3_endpoint=s3_endpoint)
    except CacheError:
        return False
    if read_manifest(store) is None and not force:
        if store.get("zarr.json") is None and not store.list_dir(""):
            return False
        raise CacheError(f"{store.uri} is not a kd cache (no manifest); not removing it (use force to remove anyway)")
    store.remove()
    return True


def invalidate_chunks(uri: str | os.PathLike, chunks, *, s3_endpoint: str | None = None) -> int:
    """Delete the done markers of ``chunks`` (e.g. the corrupted ones a verify found) so the next
    `kd cache build` rewrites them; the cache is marked incomplete. Returns how many were removed."""
    w = CacheWriter.open(uri, s3_endpoint=s3_endpoint)
    chunks = sorted({int(c) for c in chunks})
    for c in chunks:
        if not 0 <= c < w.n_chunks:
            raise CacheError(f"chunk {c} out of range (cache has {w.n_chunks} chunks)")
    existing = w.done_chunks()
    return w.invalidate([c for c in chunks if c in existing])
