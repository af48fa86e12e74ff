"""Stores (local, memory://, s3:// against a real S3 API server) and the admin functions."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cache_fake_teacher import SAMPLE_IDS, build_cache, compute, manifest

from kdcore.cache import (
    CacheLoader,
    CacheWriter,
    build,
    find_cache,
    format_info,
    format_ls,
    format_verify,
    info,
    invalidate_chunks,
    ls,
    rm,
    verify,
)
from kdcore.errors import CacheError
from kdcore.spec.features import CacheSpec


def round_trip(uri: str, s3_endpoint: str | None = None) -> None:
    """Build through one handle, read through fresh ones: same rows, same values."""
    w = CacheWriter.open_or_create(uri, manifest(), SAMPLE_IDS, s3_endpoint=s3_endpoint)
    report = build(w, compute)
    assert report.complete and report.written == 10
    full = compute(0, 600)
    loader = CacheLoader(uri, expected=manifest(), batch_size=128, s3_endpoint=s3_endpoint, seed=2)
    rows = []
    for b in loader:
        rows.append(b["row"])
        assert np.array_equal(b["features"]["embed"], full["embed"][b["row"]].astype(np.float16))
        assert np.array_equal(b["sample_id"], SAMPLE_IDS[b["row"] // 2])
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(600))
    rep = verify(uri, s3_endpoint=s3_endpoint)
    assert rep.ok and rep.checked == 10, format_verify(rep)


def test_memory_round_trip_shared_by_name(memory_root):
    uri = f"{memory_root}/a"
    round_trip(uri)
    # a second writer handle opened by name sees the same store: nothing left to do
    again = build(CacheWriter.open(uri, manifest()), compute)
    assert again.reused and again.compute_calls == 0
    entries = ls(memory_root)
    assert [e.uri for e in entries] == [uri] and entries[0].complete
    assert rm(uri) and ls(memory_root) == []
    with pytest.raises(CacheError, match="no cache at memory://"):
        CacheLoader(uri)


def test_s3_round_trip_against_s3_server(s3_root, s3_endpoint):
    uri = f"{s3_root}/a"
    round_trip(uri, s3_endpoint=s3_endpoint)
    i = info(uri, s3_endpoint=s3_endpoint)
    assert i.complete and i.chunks_done == 10 and i.size_bytes > 600 * (8 + 12 + 10) * 2
    entries = ls(s3_root, s3_endpoint=s3_endpoint)
    assert [e.uri for e in entries] == [uri]
    assert entries[0].teacher == "sha256:teacher-a" and entries[0].dataset == "sha256:dataset-a"
    assert find_cache(s3_root, manifest(), s3_endpoint=s3_endpoint) == uri

    # corruption is found on S3 as well
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    key = f"{prefix}/layers/embed/c.3.0"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[5] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    rep = verify(uri, s3_endpoint=s3_endpoint)
    assert list(rep.corrupted) == [3]

    assert rm(uri, s3_endpoint=s3_endpoint)
    assert ls(s3_root, s3_endpoint=s3_endpoint) == []
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0


def test_s3_endpoint_from_environment(s3_root, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    spec = CacheSpec(uri=f"{s3_root}/env", chunk_rows=64)
    report = build_cache(spec, manifest(), SAMPLE_IDS, compute)
    assert report.complete and info(spec.uri).chunks_done == 10


def test_s3_resume_from_another_process(s3_root, s3_endpoint):
    """A build killed on S3 resumes; markers written by another process are seen (no stale listings)."""
    import signal
    import time

    from cache_fake_teacher import spawn_teacher

    uri = f"{s3_root}/crash"
    proc = spawn_teacher(uri, "--create", "--sleep", "0.2", "--s3-endpoint", s3_endpoint)
    w = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            w = w or CacheWriter.open(uri, manifest(), s3_endpoint=s3_endpoint)
            if len(w.done_chunks()) >= 2:
                break
        except CacheError:  # not created yet
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    w = CacheWriter.open(uri, manifest(), s3_endpoint=s3_endpoint)
    done = w.done_chunks()
    assert 2 <= len(done) < 10 and not w.complete
    calls = []
    build(w, lambda a, b: calls.append(a // 64) or compute(a, b))
    assert sorted(calls) == [i for i in range(10) if i not in done]
    assert verify(uri, s3_endpoint=s3_endpoint).ok


def test_local_admin(tmp_path):
    root = tmp_path / "root"
    a = str(root / "a")
    b = str(root / "b")
    build(CacheWriter.create(a, manifest(), SAMPLE_IDS), compute)
    w = CacheWriter.create(b, manifest(teacher="sha256:teacher-b"), SAMPLE_IDS)
    w.write_chunk(0, compute(0, 64))
    (root / "not-a-cache").mkdir()

    entries = {e.uri: e for e in ls(root)}
    assert set(entries) == {a, b}
    assert entries[a].complete and not entries[b].complete
    assert entries[b].teacher == "sha256:teacher-b"
    text = format_ls(list(entries.values()))
    assert a in text and "incomplete" in text and "teacher=sha256:teacher-b" in text

    i = info(a)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a) for f in fs)
    assert i.size_bytes == on_disk and i.chunks_done == 10 and i.n_rows == 600
    assert i.manifest["teacher"] == "sha256:teacher-a"
    text = format_info(i)
    assert "complete" in text and "sha256:teacher-a" in text and "block.3 (4, 3)" in text
    text = format_info(info(b))
    assert "INCOMPLETE (1/10 chunks" in text and "kd cache build" in text

    assert find_cache(root, manifest()) == a
    assert find_cache(root, manifest(teacher="sha256:teacher-b")) is None  # b is incomplete
    assert find_cache(root, manifest(aug_seed=99)) is None

    assert invalidate_chunks(a, [1, 2]) == 2 and not info(a).complete
    assert verify(a).missing == [1, 2]

    assert rm(root / "not-a-cache") is False  # empty: nothing to remove, left alone
    (root / "not-a-cache" / "x").write_text("keep me")
    with pytest.raises(CacheError, match="not a kd cache"):
        rm(root / "not-a-cache")
    assert (root / "not-a-cache" / "x").exists()
    assert rm(a) and not os.path.exists(a)
    assert rm(a) is False
    assert [e.uri for e in ls(root)] == [b]
