"""Two different teachers (a digits CNN and an MLP) on digits: `kd train --local` online and from one cache per
teacher, the caches reused without a teacher forward, `kd validate` per teacher, `kd run` on the session Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mt_jobs import two_teacher_job

from kdcore.spec import JobSpec
from services.cli.main import main


def _write(tmp_path: Path, d: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _metrics(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def test_train_local_online_runs_both_teachers(tmp_path, capsys):
    spec = _write(tmp_path, two_teacher_job(tmp_path))
    assert main(["train", "--local", "--quiet", str(spec)]) == 0
    (m,) = _metrics(tmp_path / "runs" / "mt")
    assert {"loss/kd", "loss/dkd@mlp", "loss/hint/feat", "loss/cosine/hid"} <= set(m)
    assert all(np.isfinite(v) for k, v in m.items() if k.startswith("loss/"))
    keys = json.loads((tmp_path / "runs" / "mt" / "student" / "student.json").read_text())
    assert keys["model"]["target"] == "kdcore.zoo:digits_cnn"  # the student alone
    from safetensors.torch import load_file

    from kdcore.zoo import digits_cnn

    weights = load_file(str(tmp_path / "runs" / "mt" / "student" / "student.safetensors"))
    assert set(weights) == set(digits_cnn(4).state_dict())  # no heads


def test_train_local_cache_mode_writes_one_cache_per_teacher_then_reuses_both(tmp_path, capsys):
    from kdcore.cache import verify
    from kdcore.cache.handle import CacheHandle

    spec = _write(tmp_path, two_teacher_job(tmp_path, mode="cache"))
    assert main(["train", "--local", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.count("building the cache") == 2
    for name, layers in (("cnn", {"embed", "block3"}), ("mlp", {"hidden"})):
        uri = str(tmp_path / "cache" / name)
        assert verify(uri).ok
        m = CacheHandle.open(uri, read_only=True).manifest
        assert m.teacher_name == name and set(m.layers) == layers and m.complete
    first = _metrics(tmp_path / "runs" / "mt")[0]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    # a second run (another student name) reuses both caches: no teacher forward, nothing rewritten
    d = two_teacher_job(tmp_path, mode="cache", name="mt-again")
    assert main(["train", "--local", str(_write(tmp_path, d, "again.yaml"))]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the complete cache") == 2 and "building" not in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == stamps
    again = _metrics(tmp_path / "runs" / "mt-again")[0]
    assert again["loss/kd"] == pytest.approx(first["loss/kd"], rel=1e-5)  # the same features, the same run

    from kdcore.loop import load_split
    from services.jobs.run import ensure_caches

    job = JobSpec.from_dict(d)
    config: dict = {}
    results = ensure_caches(job, load_split(job), config, log=None, replicas=False)
    assert {n: r["teacher_forwards"] for n, r in results.items()} == {"cnn": 0, "mlp": 0}
    assert all(r["reused"] for r in results.values()) and set(config["cache_manifests"]) == {"cnn", "mlp"}


def test_cached_batches_equal_the_online_teachers(tmp_path):
    from kdcore.cache.jobs import CachedFeatures
    from kdcore.loop import build_teacher, load_split
    from services.jobs.run import ensure_caches

    d = two_teacher_job(tmp_path, mode="cache")
    d["features"]["cache"]["dtype"] = "fp32"
    job = JobSpec.from_dict(d)
    split = load_split(job)
    config: dict = {}
    teachers = build_teacher(job, device="cpu")
    ensure_caches(job, split, config, log=None, replicas=False, runner=teachers)
    source = CachedFeatures.open(job, split, config["cache_manifests"])
    assert source.teacher_shapes() == teachers.shapes(torch.from_numpy(split.sample(2)))
    batch = next(iter(source.epoch(0)))
    online = teachers(batch.x)
    assert set(batch.teacher) == set(online) == {"cnn/embed", "cnn/block3", "cnn/logits", "mlp/hidden", "mlp/logits"}
    for key, value in online.items():
        assert torch.allclose(batch.teacher[key], value, atol=1e-5), key


@pytest.mark.parametrize("topk", [None, 3])
def test_a_ray_data_block_joins_every_teachers_chunk(tmp_path, topk):
    """The Ray Data source of a two-teacher job (no cluster needed to read a block): chunk i of each teacher's
    cache, keyed as the distiller reads them, equal to the teachers' outputs on the block's inputs."""
    from ray.data.block import BlockAccessor

    from kdcore.data.rows import RowMapper
    from kdcore.loop import build_teacher, load_split
    from services.data.datasource import CacheRowsDatasource
    from services.jobs.run import ensure_caches

    d = two_teacher_job(tmp_path, mode="cache")
    d["features"]["cache"].update(dtype="fp32", loader="ray_data", logits_topk=topk)
    job = JobSpec.from_dict(d)
    split = load_split(job)
    teachers = build_teacher(job, device="cpu")
    ensure_caches(job, split, {}, log=None, replicas=False, runner=teachers)
    caches = [(t, job.teacher_cache_uri(t)) for t in job.teacher_names()]
    block = BlockAccessor.for_block(CacheRowsDatasource(job.model_dump(mode="json"), caches).read_block(1)).to_numpy()
    assert {k for k in block if k.startswith("f.")} == {"f.cnn/embed", "f.cnn/block3", "f.cnn/logits",
                                                         "f.mlp/hidden", "f.mlp/logits"}
    x = RowMapper(split, job.data).cache_rows(256, 512).x
    for key, value in teachers(torch.from_numpy(x)).items():
        want = value.numpy()
        if topk and key.endswith("/logits"):  # top-k logits are filled in: the k largest, -1e4 elsewhere
            keep = np.argsort(-want, axis=1)[:, :topk]
            want = np.full_like(want, -1e4)
            np.put_along_axis(want, keep, np.take_along_axis(value.numpy(), keep, axis=1), axis=1)
        np.testing.assert_allclose(block["f." + key], want, atol=1e-5, err_msg=key)


def test_teacher_caches_that_do_not_share_rows_are_refused(tmp_path):
    from kdcore.cache.jobs import CachedFeatures
    from kdcore.errors import CacheMismatchError
    from kdcore.loop import load_split
    from services.jobs.run import ensure_caches

    d = two_teacher_job(tmp_path, mode="cache")
    job = JobSpec.from_dict(d)
    split = load_split(job)
    ensure_caches(job, split, {}, log=None, replicas=False)
    # mlp's cache rebuilt elsewhere with another chunk size, then pointed at
    other = two_teacher_job(tmp_path, mode="cache")
    other["features"]["cache"]["chunk_rows"] = 128
    other["teachers"][1]["cache_uri"] = str(tmp_path / "mlp-128")
    ensure_caches(JobSpec.from_dict(other), split, {}, log=None, replicas=False)
    d["teachers"][1]["cache_uri"] = str(tmp_path / "mlp-128")
    with pytest.raises(CacheMismatchError, match="chunk_rows") as e:
        CachedFeatures(JobSpec.from_dict(d), split)
    assert "'cnn'" in e.value.message and "'mlp'" in e.value.message and "Fix:" in e.value.message


def test_kd_train_teacher_trains_each_teacher_to_its_checkpoint(tmp_path, capsys):
    d = two_teacher_job(tmp_path)
    for t in d["teachers"]:
        t["checkpoint"] = str(tmp_path / f"{t['name']}.safetensors")
    spec = _write(tmp_path, d)
    assert main(["train-teacher", "--quiet", "--epochs", "1", str(spec)]) == 0
    assert (tmp_path / "cnn.safetensors").exists() and (tmp_path / "mlp.safetensors").exists()
    assert main(["train-teacher", "--quiet", "--teacher", "nope", str(spec)]) == 2
    assert "cnn" in capsys.readouterr().err
    # the trained teachers load: validate checks each checkpoint against its own model
    assert main(["validate", str(spec)]) == 0
    assert main(["layers", str(spec), "--side", "mlp"]) == 0
    assert "hidden.1\tLinear" in capsys.readouterr().out


def test_kd_validate_checks_each_teacher_and_the_pairs_against_the_right_one(tmp_path, capsys):
    ok = two_teacher_job(tmp_path, mode="cache")
    assert main(["validate", str(_write(tmp_path, ok))]) == 0
    capsys.readouterr()
    bad = two_teacher_job(tmp_path, mode="cache")
    bad["teachers"][1]["taps"] = ["hidden", "hiden.0"]  # a typo in the second teacher's taps
    bad["teachers"][0]["model"]["kwargs"]["bogus"] = 1  # the first teacher's factory rejects its kwargs
    bad["student"]["pairs"][1]["projector"] = {"kind": "conv"}  # a conv head on mlp's (48,) vector
    assert main(["validate", str(_write(tmp_path, bad, "bad.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "teachers.1.taps.1: no layer of this name in the teachers.1" in err and "'hidden.0'" in err
    assert "teachers.0.model.kwargs" in err
    assert "student.pairs.1.projector" in err and "mlp/hidden (48)" in err
    # averaged logits of teachers with different class counts: named at the loss
    mixed = two_teacher_job(tmp_path)
    mixed["teachers"][1]["model"]["kwargs"]["num_classes"] = 12
    assert main(["validate", str(_write(tmp_path, mixed, "mixed.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "losses.1: the kd term cannot be set up" in err and "one class count" in err


@pytest.mark.ray
@pytest.mark.slow
def test_kd_run_two_teachers_from_their_caches_on_ray(ray_clean, tmp_path, capsys):
    d = two_teacher_job(tmp_path, mode="cache")
    d["train"]["num_workers"] = 2
    spec = _write(tmp_path, d)
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "feature cache of teacher 'cnn'" in out and "feature cache of teacher 'mlp'" in out
    assert out.count("building the cache") == 2 and "train student from the caches" in out
    from kdcore.cache.handle import CacheHandle

    for name in ("cnn", "mlp"):
        assert CacheHandle.open(str(tmp_path / "cache" / name), read_only=True).manifest.teacher_name == name
    run = tmp_path / "runs" / "mt"
    (m,) = _metrics(run)
    assert m["epoch"] == 1 and "loss/dkd@mlp" in m and "val/acc" in m
    assert "teachers: cnn (weight 1), mlp (weight 0.5)" in (run / "summary.md").read_text()
    # a second student on the same caches, through the Ray Data pipeline: the teachers do not run
    d["name"] = "mt-2"
    d["features"]["cache"]["loader"] = "ray_data"
    assert main(["run", str(_write(tmp_path, d, "two.yaml"))]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the complete cache") == 2 and "building" not in out
    (m2,) = _metrics(tmp_path / "runs" / "mt-2")
    assert np.isfinite(m2["loss/kd"]) and "loss/dkd@mlp" in m2 and m2["val/acc"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_kd_run_two_teachers_streamed_from_their_deployments(ray_clean, tmp_path, capsys):
    from tests.onray.test_run import _no_kd_leftovers

    d = two_teacher_job(tmp_path, mode="stream")
    d["name"] = "mt-stream"
    assert main(["run", str(_write(tmp_path, d))]) == 0
    out = capsys.readouterr().out
    for name in ("cnn", "mlp"):  # each teacher's own deployment, deleted at the end
        assert f"stage: teacher deployment kd-teacher-mt-stream-{name}" in out
        assert f"teacher deployment kd-teacher-mt-stream-{name} deleted" in out
    (m,) = _metrics(tmp_path / "runs" / "mt-stream")
    assert np.isfinite(m["loss/kd"]) and "loss/dkd@mlp" in m and "loss/cosine/hid" in m and m["val/acc"] > 0
    assert _no_kd_leftovers() == ([], [])


def test_train_local_in_cache_mode_uses_the_cache_for_one_teacher_too(tmp_path, digits_job, capsys):
    from kdcore.cache.handle import CacheHandle

    digits_job["features"] = {"mode": "cache", "cache": {"uri": str(tmp_path / "cache"), "chunk_rows": 256}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    spec = _write(tmp_path, digits_job)
    assert main(["train", "--local", str(spec)]) == 0
    assert "building the cache" in capsys.readouterr().out
    m = CacheHandle.open(str(tmp_path / "cache"), read_only=True).manifest
    assert m.complete and m.teacher_name is None  # a single teacher's cache: no name, as before
    assert main(["train", "--local", "--no-resume", str(spec)]) == 0
    assert "reusing the complete cache" in capsys.readouterr().out
