"""Crash safety: builds SIGKILLed at several points resume to a cache identical to an uninterrupted build;
verify finds missing and corrupted chunks."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from cache_fake_teacher import build_reference, compute, manifest, run_teacher, snapshot, spawn_teacher

from kdcore.cache import CacheLoader, CacheWriter, build, invalidate_chunks, verify
from kdcore.errors import CacheError

N_CHUNKS = 10


def markers_of(root: Path) -> set[int]:
    return {int(p.name.split(".")[0]) for p in (root / "kd_done").glob("[0-9]*.json")}


def computed(calls_file: Path) -> list[int]:
    if not calls_file.exists():
        return []
    return [json.loads(line)[0] // 64 for line in calls_file.read_text().splitlines()]


def assert_killed_and_incomplete(proc_rc: int, uri: str) -> None:
    assert proc_rc == -signal.SIGKILL
    with pytest.raises(CacheError, match="kd cache build"):
        CacheLoader(uri, batch_size=16)


def test_killed_builds_resume_to_identical_cache(tmp_path):
    ref = build_reference(tmp_path / "ref")
    uri = tmp_path / "crashy"
    calls = tmp_path / "calls.jsonl"

    # 1. killed before computing anything: only the empty cache exists
    p = run_teacher(str(uri), "--create", "--kill-after-computes", "0", "--calls-file", str(calls), check=False)
    assert_killed_and_incomplete(p.returncode, str(uri))
    assert markers_of(uri) == set() and computed(calls) == []

    # 2. killed when asked for the 4th chunk: at most the 3 computed chunks are done
    p = run_teacher(str(uri), "--kill-after-computes", "3", "--calls-file", str(calls), check=False)
    assert_killed_and_incomplete(p.returncode, str(uri))
    assert computed(calls) == [0, 1, 2]
    assert markers_of(uri) <= {0, 1, 2}

    # 3. killed after all the data of its 3rd finished chunk is stored but before that chunk's marker
    before = markers_of(uri)
    calls.unlink()
    victim_file = tmp_path / "victim"
    p = run_teacher(str(uri), "--kill-after-writes", "2", "--victim-file", str(victim_file), "--calls-file",
                    str(calls), check=False)
    assert_killed_and_incomplete(p.returncode, str(uri))
    assert not set(computed(calls)) & before, "a done chunk was computed again"
    victim = int(victim_file.read_text())
    assert victim in computed(calls) and victim not in markers_of(uri)
    for array in ("layers/embed/c.{}.0", "layers/block.3/c.{}.0.0", "logits/c.{}.0", "aug/c.{}.0"):
        assert (uri / array.format(victim)).exists(), "the chunk's data should all be there, unmarked"
    assert markers_of(uri) >= before

    # 4. killed from outside at an arbitrary moment
    before = markers_of(uri)
    calls.unlink()
    proc = spawn_teacher(str(uri), "--sleep", "0.15", "--calls-file", str(calls))
    deadline = time.monotonic() + 30
    while len(markers_of(uri)) < len(before) + 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_killed_and_incomplete(proc.returncode, str(uri))
    assert not set(computed(calls)) & before
    assert len(markers_of(uri)) < N_CHUNKS

    # 5. the resumed build computes exactly the chunks without a marker, and nothing else
    before = markers_of(uri)
    calls.unlink()
    out = run_teacher(str(uri), "--calls-file", str(calls))
    assert sorted(computed(calls)) == [i for i in range(N_CHUNKS) if i not in before]
    assert json.loads(out.stdout)["complete"] is True

    assert snapshot(uri) == snapshot(Path(ref)), "resumed cache differs from the uninterrupted build"
    assert not list(uri.rglob("*.partial")), "temporary files of killed writes were left behind"
    report = verify(str(uri))
    assert report.ok and report.checked == N_CHUNKS
    loader = CacheLoader(str(uri), batch_size=50)
    assert sum(len(b["row"]) for b in loader) == 600


def _corrupt(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    for k in range(offset, offset + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_verify_detects_corruption_and_repair_rewrites(tmp_path, compression):
    root = tmp_path / "c"
    uri = build_reference(root, compression=compression)
    good = snapshot(root)
    assert verify(uri).ok

    _corrupt(root / "layers" / "embed" / "c.4.0", offset=20)
    (root / "logits" / "c.7.0").unlink()
    (root / "kd_done" / "00000002.json").unlink()
    report = verify(uri)
    assert not report.ok
    assert report.missing == [2]
    assert sorted(report.corrupted) == [4, 7]
    assert any("layers/embed" in p for p in report.corrupted[4])
    assert any("logits" in p and "missing" in p for p in report.corrupted[7])
    assert not any("block.3" in p for p in report.corrupted[4]), "an intact array was reported"

    # repair: forget the bad chunks, resume the build: only they are recomputed
    assert invalidate_chunks(uri, sorted(report.corrupted)) == 2
    w = CacheWriter.open(uri, manifest(compression=compression))
    assert not w.complete
    calls = []
    result = build(w, lambda a, b: calls.append(a // 64) or compute(a, b))
    assert sorted(calls) == [2, 4, 7] and result.complete
    assert verify(uri).ok
    after = snapshot(root)  # rewritten chunks are bit-identical (zstd is deterministic too)
    assert after.keys() == good.keys()
    for key, value in good.items():
        assert after[key] == value, key


def test_verify_reports_truncated_raw_chunk(tmp_path):
    root = tmp_path / "c"
    uri = build_reference(root)
    p = root / "layers" / "block.3" / "c.9.0.0"  # (rows, 4, 3): key c.<chunk>.0.0
    p.write_bytes(p.read_bytes()[:50])
    report = verify(uri)
    assert list(report.corrupted) == [9]
    assert "bytes" in report.corrupted[9][0]
    with pytest.raises(CacheError, match="truncated"):
        for _ in CacheLoader(uri, batch_size=600, shuffle=False):
            pass


def test_data_written_exactly_once_per_chunk_file(tmp_path):
    """Sanity of the raw layout: the chunk object is the rows' bytes, padded to chunk_rows at the end."""
    root = tmp_path / "c"
    build_reference(root)
    raw = np.frombuffer((root / "layers" / "embed" / "c.9.0").read_bytes(), dtype=np.float16).reshape(64, 8)
    expect = compute(576, 600)["embed"].astype(np.float16)
    assert np.array_equal(raw[:24], expect)
    assert not raw[24:].any()
