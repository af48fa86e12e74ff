"""Identity: fingerprints, the manifest, and refusing a cache built for another job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_fake_teacher import SAMPLE_IDS, compute, manifest

from kdcore.cache import (
    CacheHandle,
    CacheLoader,
    CacheWriter,
    Manifest,
    build,
    dataset_fingerprint,
    teacher_fingerprint,
)
from kdcore.cache.manifest import FORMAT_VERSION
from kdcore.errors import CacheError, CacheMismatchError, UserError


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def test_teacher_fingerprint_tracks_weights_buffers_and_arch():
    arch = {"kind": "mlp", "widths": [4, 3, 2]}
    fp = teacher_fingerprint(_net(0), arch)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert teacher_fingerprint(_net(0), dict(reversed(list(arch.items())))) == fp  # key order irrelevant
    assert teacher_fingerprint(_net(1), arch) != fp
    net = _net(0)
    with torch.no_grad():
        net[0].weight[1, 2] += 1e-6
    assert teacher_fingerprint(net, arch) != fp
    net = _net(0)
    net[1].running_mean += 1  # buffers are part of the teacher
    assert teacher_fingerprint(net, arch) != fp
    assert teacher_fingerprint(_net(0), {**arch, "widths": [4, 3, 3]}) != fp
    half = _net(0).to(torch.bfloat16)
    assert teacher_fingerprint(half, arch) not in (fp, None)


def test_dataset_fingerprint_tracks_ids_and_content():
    ids = np.arange(10)
    x = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float32)
    fp = dataset_fingerprint(ids, x)
    assert fp == dataset_fingerprint(ids.astype(np.int32), x.copy())
    assert dataset_fingerprint(ids[::-1].copy(), x) != fp
    y = x.copy()
    y[7, 2, 1] += 1e-3
    assert dataset_fingerprint(ids, y) != fp
    assert dataset_fingerprint(ids, x.reshape(10, 12)) != fp  # shape is content
    assert dataset_fingerprint(ids, x.astype(np.float64)) != fp


def test_manifest_round_trip_and_contents(tmp_path):
    uri = str(tmp_path / "c")
    build(CacheWriter.create(uri, manifest(), SAMPLE_IDS), compute)
    meta = json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]["kd_cache"]
    for key in ("format_version", "teacher", "dataset", "layers", "views", "augmentation", "aug_seed",
                "created_at", "tool_version", "complete", "num_classes", "dtype", "chunk_rows", "checksum"):
        assert key in meta, key
    assert meta["format_version"] == FORMAT_VERSION and meta["complete"] is True
    assert meta["layers"] == {"embed": [8], "block.3": [4, 3]}
    assert meta["augmentation"] == {"crop": [0.8, 1.0], "flip": True}
    assert meta["tool_version"] == "0.1.0"
    assert Manifest.from_dict(meta) == CacheHandle.open(uri).manifest


CHANGES = {
    "teacher": dict(teacher="sha256:teacher-b"),
    "dataset": dict(dataset="sha256:dataset-b"),
    "n_samples": dict(n_samples=301),
    "layers": dict(layers={"embed": (8,), "block.4": (4, 3)}),
    "num_classes": dict(num_classes=11),
    "logits_topk": dict(logits_topk=5),
    "views": dict(views=3),
    "augmentation": dict(augmentation={"crop": [0.5, 1.0], "flip": True}),
    "aug_seed": dict(aug_seed=8),
    "aug_params": dict(aug_params=2),
    "dtype": dict(dtype="fp32"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("mm") / "c")
    build(CacheWriter.create(uri, manifest(), SAMPLE_IDS), compute)
    return uri


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_mismatch_is_refused_naming_the_field(built, field):
    expected = manifest(**CHANGES[field])
    found = manifest()
    for opener in (lambda: CacheHandle.open(built, expected), lambda: CacheLoader(built, expected=expected),
                   lambda: CacheWriter.open_or_create(built, expected, np.arange(expected.n_samples))):
        with pytest.raises(CacheMismatchError) as info:
            opener()
        err = info.value
        assert err.field == field
        assert err.expected == getattr(expected, field) and err.found == getattr(found, field)
        assert f"{field} (" in err.message and "expected" in err.message and "found" in err.message
        assert err.exit_code == 2  # a user error: the CLI prints one line, no traceback
    assert CacheHandle.open(built).manifest.complete  # refusing did not touch the cache


def test_mismatch_message_shows_expected_and_found_values(built):
    with pytest.raises(CacheMismatchError) as info:
        CacheHandle.open(built, manifest(teacher="sha256:other", views=3))
    msg = info.value.message
    assert "expected sha256:other, found sha256:teacher-a" in msg
    assert "views" in msg and "expected 3, found 2" in msg
    assert info.value.details["fields"] == ["teacher", "views"]


def test_layout_only_matters_when_resuming(tmp_path, built):
    # a complete cache with other chunking/compression serves the job
    assert CacheLoader(built, expected=manifest(chunk_rows=100, compression="zstd")).manifest.chunk_rows == 64
    # resuming an incomplete one with another chunking is refused
    uri = str(tmp_path / "c")
    CacheWriter.create(uri, manifest(), SAMPLE_IDS).write_chunk(0, compute(0, 64))
    with pytest.raises(CacheMismatchError, match="chunk_rows") as info:
        CacheWriter.open_or_create(uri, manifest(chunk_rows=100), SAMPLE_IDS)
    assert info.value.field == "chunk_rows"


def test_manifest_validation():
    with pytest.raises(UserError, match="logits_topk must be in 1..10"):
        manifest(logits_topk=11)
    with pytest.raises(UserError, match="views must be >= 1"):
        manifest(views=0)
    with pytest.raises(UserError, match="dtype"):
        manifest(dtype="int8")
    with pytest.raises(UserError, match="compression"):
        manifest(compression="lzma")


def test_other_format_version_is_refused(tmp_path):
    uri = str(tmp_path / "c")
    build(CacheWriter.create(uri, manifest(), SAMPLE_IDS), compute)
    p = tmp_path / "c" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["attributes"]["kd_cache"]["format_version"] = FORMAT_VERSION + 1
    p.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format version"):
        CacheHandle.open(uri)


def test_not_a_cache(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no kd cache"):
        CacheLoader(str(tmp_path / "empty"))
    with pytest.raises(CacheError, match="does not exist"):
        CacheLoader(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="scheme 'gs'"):
        CacheLoader("gs://bucket/x")


def test_manifest_lists_arrays_with_shapes_and_dtypes():
    d = manifest(logits_topk=3, dtype="bf16").to_dict()
    assert d["arrays"]["layers/block.3"] == {"shape": [600, 4, 3], "dtype": "bf16", "stored_as": "uint16"}
    assert d["arrays"]["logits_topk_idx"]["dtype"] == "int32" and "logits" not in d["arrays"]
    assert d["arrays"]["aug"] == {"shape": [600, 3], "dtype": "float32", "stored_as": "float32"}
    assert d["n_rows"] == 600 and d["n_chunks"] == 10
