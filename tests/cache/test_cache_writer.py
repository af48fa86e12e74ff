"""Writing: reuse without recompute, concurrent writers, chunk ownership, dtypes, top-k, input checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_fake_teacher import SAMPLE_IDS, build_cache, build_reference, compute, manifest, snapshot, spawn_teacher

from kdcore.cache import (
    CacheLoader,
    CacheWriter,
    bf16_bits_to_float32,
    build,
    chunk_assignment,
    float_to_bf16_bits,
    topk,
    verify,
)
from kdcore.errors import CacheError, UserError
from kdcore.spec.features import CacheSpec


class CountingTeacher:
    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, start: int, stop: int):
        self.calls += 1
        self.rows += stop - start
        return compute(start, stop)


def test_reuse_never_recomputes(tmp_path):
    teacher = CountingTeacher()
    spec = CacheSpec(uri=str(tmp_path / "c"), chunk_rows=64)
    m = manifest()
    first = build_cache(spec, m, SAMPLE_IDS, teacher)
    assert first.complete and not first.reused
    assert teacher.calls == 10 and teacher.rows == 600

    second = build_cache(spec, m, SAMPLE_IDS, teacher)
    assert second.reused and second.complete and second.compute_calls == 0
    for epoch in range(3):  # several reader runs
        loader = CacheLoader(spec.uri, expected=m, batch_size=128, seed=epoch)
        assert sum(len(b["row"]) for b in loader) == 600
    assert teacher.calls == 10, "the teacher ran again for a complete matching cache"


def test_reuse_found_by_fingerprint_under_root(tmp_path):
    teacher = CountingTeacher()
    root = tmp_path / "root"
    spec = CacheSpec(uri=None, chunk_rows=64)
    m = manifest()
    first = build_cache(spec, m, SAMPLE_IDS, teacher, root=root)
    assert first.uri.startswith(str(root)) and teacher.calls == 10
    # another job with the same teacher/dataset/layers/augmentation but another chunking finds it
    again = build_cache(CacheSpec(uri=None, chunk_rows=100), manifest(chunk_rows=100), SAMPLE_IDS, teacher, root=root)
    assert again.reused and again.uri == first.uri and teacher.calls == 10
    # a different teacher does not reuse it
    other = build_cache(spec, manifest(teacher="sha256:teacher-b"), SAMPLE_IDS, teacher, root=root)
    assert not other.reused and other.uri != first.uri and teacher.calls == 20


def test_reuse_false_rebuilds(tmp_path):
    teacher = CountingTeacher()
    spec = CacheSpec(uri=str(tmp_path / "c"), chunk_rows=64, reuse=False)
    build_cache(spec, manifest(), SAMPLE_IDS, teacher)
    build_cache(spec, manifest(), SAMPLE_IDS, teacher)
    assert teacher.calls == 20


def test_chunk_assignment_partitions():
    for n in (0, 1, 7, 10, 64, 1001):
        for writers in (1, 2, 3, 8):
            ranges = [chunk_assignment(n, w, writers) for w in range(writers)]
            flat = [i for r in ranges for i in r]
            assert flat == list(range(n))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(UserError):
        chunk_assignment(10, 2, 2)


def test_two_concurrent_writer_processes_equal_single_writer(tmp_path):
    ref = build_reference(tmp_path / "ref")
    uri = str(tmp_path / "multi")
    CacheWriter.create(uri, manifest(), SAMPLE_IDS)  # the driver creates; the writers only open
    calls = [tmp_path / "calls0.jsonl", tmp_path / "calls1.jsonl"]
    barrier = tmp_path / "barrier"
    procs = [spawn_teacher(uri, "--writer", str(w), "--n-writers", "2", "--sleep", "0.05",
                           "--calls-file", str(calls[w]), "--barrier", str(barrier)) for w in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(Path(f"{barrier}.ready-{w}").exists() for w in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.005)
    Path(f"{barrier}.go").touch()  # both opened the cache; start them together
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [[json.loads(line) for line in c.read_text().splitlines()] for c in calls]
    assert [sorted(r[0] // 64 for r in rec) for rec in records] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # they ran at the same time: each started computing before the other computed its last chunk
    first = [min(r[2] for r in rec) for rec in records]
    last = [max(r[2] for r in rec) for rec in records]
    assert first[0] < last[1] and first[1] < last[0]
    reports = [json.loads(o[0]) for o in outs]
    assert sum(r["written"] for r in reports) == 10
    assert any(r["complete"] for r in reports)

    markers = {i: json.loads((tmp_path / "multi" / "kd_done" / f"{i:08d}.json").read_text()) for i in range(10)}
    assert [markers[i]["writer"] for i in range(10)] == [0] * 5 + [1] * 5
    got, want = snapshot(tmp_path / "multi"), snapshot(tmp_path / "ref")
    for d in (got, want):  # the writer id is the only expected difference
        for k, v in d.items():
            if k.startswith("kd_done/0"):
                v.pop("writer")
    assert got == want
    assert verify(uri).ok and verify(ref).ok


def test_writer_threads_overlap_compute(tmp_path):
    """compute_fn runs in the calling thread while background writer threads store earlier chunks."""
    import threading

    m = manifest()
    w = CacheWriter.create(str(tmp_path / "c"), m, SAMPLE_IDS)
    writers: set[str] = set()
    computing: set[str] = set()
    overlap = threading.Event()
    busy = threading.Event()
    real = w.write_chunk

    def spy(i, arrays, **kw):
        writers.add(threading.current_thread().name)
        if busy.is_set():
            overlap.set()  # a chunk was being written while the teacher was computing
        return real(i, arrays, **kw)

    def teacher(a, b):
        computing.add(threading.current_thread().name)
        busy.set()
        try:
            time.sleep(0.02)
            return compute(a, b)
        finally:
            busy.clear()

    w.write_chunk = spy  # type: ignore[method-assign]
    seen = []
    report = build(w, teacher, progress=seen.append, writer_threads=2)
    assert report.written == 10 and report.complete
    assert computing == {threading.current_thread().name}
    assert writers and not writers & computing
    assert overlap.is_set()
    assert sorted(p.written for p in seen) == list(range(1, 11)) and seen[-1].todo == 10
    assert sorted(p.chunk for p in seen) == list(range(10))


def test_writer_failure_is_reported(tmp_path):
    w = CacheWriter.create(str(tmp_path / "c"), manifest(), SAMPLE_IDS)

    def boom(i, arrays, **kw):
        raise OSError("disk full")

    w.write_chunk = boom  # type: ignore[method-assign]
    with pytest.raises(CacheError, match="disk full"):
        build(w, compute)
    assert not w.finalize()


def test_compute_output_is_checked(tmp_path):
    w = CacheWriter.create(str(tmp_path / "c"), manifest(), SAMPLE_IDS)
    out = compute(0, 64)
    del out["aug"]
    with pytest.raises(CacheError, match="missing \\['aug'\\]"):
        w.write_chunk(0, out)
    out = compute(0, 64)
    out["embed"] = out["embed"][:, :7]
    with pytest.raises(CacheError, match="'embed'.*\\(64, 7\\).*\\(64, 8\\)"):
        w.write_chunk(0, out)
    out = compute(0, 64)
    out["extra"] = out["embed"]
    with pytest.raises(CacheError, match="unexpected \\['extra'\\]"):
        w.write_chunk(0, out)
    assert w.done_chunks() == set()


def test_bf16_round_to_nearest_even_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, 1e-40, 3.4e38, np.inf, -np.inf], dtype=np.float32)])
    ours = float_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(bf16_bits_to_float32(float_to_bf16_bits(np.array([np.nan], np.float32))))[0]
    assert np.array_equal(bf16_bits_to_float32(theirs), torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16)
                          .float().numpy())


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_storage_dtypes_round_trip(tmp_path, dtype):
    m = manifest(dtype=dtype)
    w = CacheWriter.create(str(tmp_path / "c"), m, SAMPLE_IDS)
    build(w, compute)
    full = compute(0, 600)
    for as_float32 in (False, True):
        loader = CacheLoader(str(tmp_path / "c"), batch_size=600, shuffle=False, as_float32=as_float32)
        (batch,) = list(loader)
        got = batch["features"]["embed"]
        if dtype == "fp16":
            want = full["embed"].astype(np.float16)
        elif dtype == "fp32":
            want = full["embed"]
        else:
            want = float_to_bf16_bits(full["embed"])
        if as_float32:
            want = bf16_bits_to_float32(want) if dtype == "bf16" else want.astype(np.float32)
            assert got.dtype == np.float32
        assert got.dtype == want.dtype and np.array_equal(got, want)
    if dtype == "bf16":  # torch reinterprets the stored bits for free
        raw = CacheLoader(str(tmp_path / "c"), batch_size=600, shuffle=False)
        (b,) = list(raw)
        t = torch.from_numpy(b["logits"].view(np.int16)).view(torch.bfloat16)
        assert torch.equal(t, torch.from_numpy(full["logits"]).to(torch.bfloat16))


def test_torch_tensors_are_accepted(tmp_path):
    w = CacheWriter.create(str(tmp_path / "c"), manifest(dtype="bf16"), SAMPLE_IDS)
    out = {k: torch.from_numpy(v) for k, v in compute(0, 64).items()}
    out["embed"] = out["embed"].to(torch.bfloat16)  # a bf16 teacher output keeps its bits
    w.write_chunk(0, out)
    got = w.arrays["layers/embed"].read(0)
    assert np.array_equal(got, out["embed"].view(torch.int16).numpy().view(np.uint16))


def test_topk_logits(tmp_path):
    logits = np.array([[1.0, 5.0, 3.0, 5.0, -1.0], [0.0, 0.0, 0.0, 2.0, 1.0]], dtype=np.float32)
    idx, val = topk(logits, 3)
    assert idx.tolist() == [[1, 3, 2], [3, 4, 0]] and val.tolist() == [[5, 5, 3], [2, 1, 0]]

    m = manifest(logits_topk=4)
    w = CacheWriter.create(str(tmp_path / "c"), m, SAMPLE_IDS)
    build(w, compute)
    (batch,) = list(CacheLoader(str(tmp_path / "c"), batch_size=600, shuffle=False, as_float32=True))
    assert "logits" not in batch
    full = compute(0, 600)["logits"]
    want_idx = np.argsort(-full, axis=1, kind="stable")[:, :4]
    assert np.array_equal(batch["logits_topk_idx"], want_idx)
    assert batch["logits_topk_idx"].dtype == np.int32
    assert np.array_equal(batch["logits_topk_val"], np.take_along_axis(full, want_idx, 1).astype(np.float16)
                          .astype(np.float32))


def test_no_aug_params_and_features_only(tmp_path):
    m = manifest(aug_params=0, num_classes=None, layers={"embed": (8,)})
    w = CacheWriter.create(str(tmp_path / "c"), m, SAMPLE_IDS)
    build(w, lambda a, b: {"embed": compute(a, b)["embed"]})
    (batch,) = list(CacheLoader(str(tmp_path / "c"), batch_size=600))
    assert batch["aug"].shape == (600, 0) and "logits" not in batch
    assert set(batch["features"]) == {"embed"}


def test_create_refuses_existing_cache_and_bad_ids(tmp_path):
    uri = str(tmp_path / "c")
    CacheWriter.create(uri, manifest(), SAMPLE_IDS)
    with pytest.raises(CacheError, match="already exists"):
        CacheWriter.create(uri, manifest(), SAMPLE_IDS)
    with pytest.raises(UserError, match="sample_ids"):
        CacheWriter.create(str(tmp_path / "d"), manifest(), SAMPLE_IDS[:-1])
    with pytest.raises(UserError, match="layer name"):
        CacheWriter.create(str(tmp_path / "e"), manifest(layers={"a/b": (3,)}), SAMPLE_IDS)


def test_never_creates_over_foreign_data(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(CacheError, match="not a kd cache"):
        CacheWriter.open_or_create(str(precious), manifest(), SAMPLE_IDS)
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_interrupted_creation_is_created_again(tmp_path):
    uri = tmp_path / "c"
    build(CacheWriter.create(str(uri), manifest(), SAMPLE_IDS), compute)
    (uri / "zarr.json").unlink()  # as if creation (or removal) stopped before the manifest
    w = CacheWriter.open_or_create(str(uri), manifest(), SAMPLE_IDS)
    assert w.done_chunks() == set(), "stale markers of the old cache must not count"
    assert build(w, compute).written == 10
