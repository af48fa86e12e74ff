"""Checking a cache against the checksums its writers recorded in the done markers."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from kdcore.cache import markers
from kdcore.cache.arrays import ArrayIO
from kdcore.cache.handle import CacheHandle


@dataclass
class VerifyReport:
    """``missing``: chunks without a done marker. ``corrupted``: chunk -> what is wrong with it."""

    uri: str
    n_chunks: int
    checked: int
    missing: list[int] = field(default_factory=list)
    corrupted: dict[int, list[str]] = field(default_factory=dict)
    manifest_complete: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupted

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["corrupted"] = {str(k): v for k, v in self.corrupted.items()}
        return d


def _check_array(io: ArrayIO, i: int, marker: markers.ChunkMarker) -> str | None:
    start, stop = io.bounds(i)
    if marker.checksums.get(io.path) is None:
        return f"{io.path}: no checksum in the marker"
    try:
        if io.raw:
            data = io.store.get(io.key(i))
            if data is None:
                return f"{io.path}: chunk object missing"
            want = io.chunk_rows * io.row_bytes
            if data.nbytes != want:
                return f"{io.path}: chunk object has {data.nbytes} bytes, expected {want}"
            value = data[: (stop - start) * io.row_bytes]
        else:
            if not io.exists(i):
                return f"{io.path}: chunk object missing"
            value = np.ascontiguousarray(io.arr[start:stop])
    except Exception as err:  # noqa: BLE001 - any read/decode failure is corruption
        return f"{io.path}: unreadable ({type(err).__name__}: {err})"
    return markers.mismatch(marker, io.path, value)


def _check_chunk(handle: CacheHandle, i: int) -> list[str]:
    marker = markers.read_marker(handle.store, i)
    if marker is None:
        return ["done marker unreadable"]
    problems = []
    bounds = handle.chunk_bounds(i)
    if (marker.row_start, marker.row_stop) != bounds:
        problems.append(f"marker rows {marker.row_start}:{marker.row_stop} != chunk rows {bounds[0]}:{bounds[1]}")
    extra = sorted(set(marker.checksums) - set(handle.arrays))
    if extra:
        problems.append(f"marker lists unknown arrays {extra}")
    for path, io in handle.arrays.items():
        problem = _check_array(io, i, marker)
        if problem:
            problems.append(problem)
    return problems


def verify(uri: str | os.PathLike, *, s3_endpoint: str | None = None, threads: int = 4) -> VerifyReport:
    """Re-read every written chunk and compare it with the checksums recorded when it was written."""
    t0 = time.perf_counter()
    handle = CacheHandle.open(uri, s3_endpoint=s3_endpoint, read_only=True)
    m = handle.manifest
    done = handle.done_chunks()
    todo = sorted(i for i in done if i < m.n_chunks)
    report = VerifyReport(handle.uri, m.n_chunks, len(todo), manifest_complete=m.complete)
    report.missing = [i for i in range(m.n_chunks) if i not in done]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, problems in zip(todo, pool.map(lambda c: _check_chunk(handle, c), todo)):
            if problems:
                report.corrupted[i] = problems
    report.seconds = time.perf_counter() - t0
    return report


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def format_verify(report: VerifyReport) -> str:
    lines = [f"cache {report.uri}: {'OK' if report.ok else 'PROBLEMS FOUND'}"]
    lines.append(f"  chunks: {report.n_chunks}, verified: {report.checked}, missing: {len(report.missing)}, "
                 f"corrupted: {len(report.corrupted)} ({report.seconds:.1f} s)")
    if report.missing:
        lines.append(f"  missing chunks: {_ranges(report.missing)}")
        if report.manifest_complete:
            lines.append("  the manifest says complete but chunks lack markers")
    for i in sorted(report.corrupted):
        for problem in report.corrupted[i]:
            lines.append(f"  chunk {i}: {problem}")
    if not report.ok:
        lines.append(f"  fix: `kd cache verify --repair {report.uri}` marks corrupted chunks missing; then "
                     "`kd cache build JOB.yaml` (or rerun the job) writes the missing chunks")
    return "\n".join(lines)
