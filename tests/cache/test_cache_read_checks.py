"""The training loader checks every chunk it reads against the checksums recorded at write time: corrupted
bytes (decoding to NaN, or to finite garbage) stop the read with an error naming the chunk, the array and
the fix, instead of training on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cache_fake_teacher import build_reference

from kdcore.cache import CacheLoader, verify
from kdcore.errors import CacheError

FIX = r"kd cache verify --repair .*then rerun"


def _epoch(loader: CacheLoader) -> list[dict]:
    return list(loader)


def _nan_rows(path: Path, rows: slice, row_elems: int) -> None:
    """Overwrite whole fp16 rows of a raw chunk object with NaN bit patterns (0x7E00)."""
    data = np.frombuffer(path.read_bytes(), dtype=np.float16).copy().reshape(-1, row_elems)
    data[rows] = np.float16(np.nan)
    path.write_bytes(data.tobytes())


def _garbage(path: Path, offset: int, n: int, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_chunk_decoding_to_nan_stops_the_read_naming_chunk_array_and_fix(tmp_path):
    root = tmp_path / "c"
    uri = build_reference(root)
    _nan_rows(root / "layers" / "embed" / "c.4.0", slice(3, 9), 8)
    unchecked = np.concatenate([b["features"]["embed"] for b in CacheLoader(uri, batch_size=64, verify=False)])
    assert np.isnan(unchecked.astype(np.float32)).any(), "the corruption decodes to NaN"
    with pytest.raises(CacheError, match=rf"chunk 4 \(rows 256:320\) of array 'layers/embed' .*corrupted.*{FIX}") as e:
        _epoch(CacheLoader(uri, batch_size=64))
    assert e.value.details == {"chunk": 4, "array": "layers/embed", "uri": uri}
    assert list(verify(uri).corrupted) == [4]  # what the fix would repair


def test_chunk_decoding_to_finite_garbage_stops_the_read(tmp_path):
    root = tmp_path / "c"
    uri = build_reference(root)
    path = root / "logits" / "c.7.0"
    _garbage(path, 40, 64)
    assert np.isfinite(np.frombuffer(path.read_bytes(), dtype=np.float16)[:640].astype(np.float32)).all(), \
        "this garbage decodes to finite values: no NaN check would catch it"
    for world in (1, 2):  # whichever rank reads chunk 7 stops
        errors = []
        for rank in range(world):
            try:
                _epoch(CacheLoader(uri, batch_size=50, rank=rank, world_size=world, shuffle=rank % 2 == 0))
            except CacheError as err:
                errors.append(err)
        assert len(errors) == 1 and errors[0].details["chunk"] == 7 and errors[0].details["array"] == "logits"
        assert "chunk 7 (rows 448:512) of array 'logits'" in str(errors[0])


def test_corrupted_compressed_chunk_stops_the_read(tmp_path):
    root = tmp_path / "c"
    uri = build_reference(root, compression="zstd")
    _garbage(root / "layers" / "block.3" / "c.2.0.0", 20, 16)
    with pytest.raises(CacheError, match=rf"chunk 2 .*layers/block.3.*{FIX}"):
        _epoch(CacheLoader(uri, batch_size=64, shuffle=False))


def test_intact_cache_reads_checked_and_unchecked_the_same(tmp_path):
    uri = build_reference(tmp_path / "c")
    a = _epoch(CacheLoader(uri, batch_size=100, seed=2))
    b = _epoch(CacheLoader(uri, batch_size=100, seed=2, verify=False))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["row"], y["row"]) and np.array_equal(x["logits"], y["logits"])


def test_training_source_stops_on_a_corrupted_chunk_and_repair_fixes_it(tmp_path, digits_job, capsys):
    """Through the job-level feature source (what a training worker iterates) and the CLI fix."""
    import yaml

    from kdcore.cache.jobs import CachedFeatures
    from kdcore.loop import load_split
    from kdcore.spec import JobSpec
    from services.cli.main import main

    uri = tmp_path / "cache"
    digits_job["features"] = {"mode": "cache", "cache": {"uri": str(uri), "chunk_rows": 256}}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    assert main(["cache", "build", "--local", str(spec)]) == 0
    job = JobSpec.from_yaml(spec)
    split = load_split(job)
    row_elems = int(np.prod(CachedFeatures(job, split).manifest.layers["embed"]))
    _nan_rows(uri / "layers" / "embed" / "c.3.0", slice(0, 4), row_elems)
    with pytest.raises(CacheError, match=rf"chunk 3 .*layers/embed.*{FIX}"):
        for _ in CachedFeatures(job, split).epoch(0):
            pass
    capsys.readouterr()
    assert main(["cache", "verify", "--repair", str(uri)]) == 1
    assert main(["cache", "build", "--local", str(spec)]) == 0
    rows = sum(len(b.idx) for b in CachedFeatures(job, split).epoch(0))
    assert rows == split.n_train * job.data.views
