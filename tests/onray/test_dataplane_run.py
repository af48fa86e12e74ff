"""`kd run` on image datasets that are read lazily: Parquet shards on disk and on S3 (moto), an image folder;
cache mode through the Ray Data pipeline, stream mode, a separate evaluation source with top-1/top-5."""

from __future__ import annotations

import json

import pytest

from kdcore.data.synth import write_image_folder, write_parquet_images
from kdcore.spec import JobSpec

pytestmark = pytest.mark.ray
MODEL = {"kind": "factory", "target": "kdcore.zoo:image_cnn"}


def _job(tmp_path, name, source, eval_source=None, classes=10, **features) -> JobSpec:
    data = {"source": source, "batch_size": 32, "views": 2, "mean": [0.5] * 3, "std": [0.25] * 3,
            "augment": {"kind": "random_resized_crop", "size": 16, "flip": True}}
    if eval_source:
        data["eval"] = eval_source
    return JobSpec.from_dict({
        "name": name,
        "teacher": {"model": {**MODEL, "kwargs": {"width": 8, "stem_stride": 2, "num_classes": classes}},
                    "taps": ["embed"]},
        "student": {"model": {**MODEL, "kwargs": {"width": 4, "stem_stride": 2, "num_classes": classes}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"},
                   {"kind": "crd", "pair": "feat", "params": {"nce_k": 64, "negatives": "shared"}}],
        "data": data, "features": features,
        "train": {"epochs": 2, "num_workers": 2, "optimizer": {"kind": "adam", "lr": 0.003}},
        "output": {"dir": str(tmp_path / "runs")},
    })


def _parquet(path, **kw):
    return {"kind": "parquet", "path": str(path), "image_column": "image", "label_column": "label",
            "id_column": "id", "image_size": 20, **kw}


def _check(result, tmp_path, name, events=None, source=None):
    metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(0 <= m["val/acc"] <= m["val/top5"] <= 1 and "loss/crd/feat" in m for m in metrics)
    assert (tmp_path / "runs" / name / "student" / "student.safetensors").exists()
    if events is not None:
        for rank in (0, 1):
            assert f"source {source}" in (events / f"rank{rank}.log").read_text()


@pytest.mark.slow
def test_parquet_on_disk_in_cache_mode_trains_through_ray_data(ray_clean, tmp_path):
    from services.jobs.run import run_job

    write_parquet_images(tmp_path / "train", 600, size=20, shards=3, rows_per_group=64)
    write_parquet_images(tmp_path / "test", 120, size=20, shards=1, seed=1)
    job = _job(tmp_path, "pq-cache", _parquet(tmp_path / "train"), _parquet(tmp_path / "test"),
               mode="cache", cache={"uri": str(tmp_path / "cache"), "chunk_rows": 128})
    events = tmp_path / "events"
    r = run_job(job, log=None, extra_config={"events_dir": str(events)})
    assert r["cache"]["reused"] is False
    # the build's inputs were decoded and augmented by Ray Data tasks; the replica only forwarded and wrote
    n_rows = r["cache"]["manifest"]["n_rows"]
    assert r["cache"]["inputs_decoded_by"] == {"ray_data": n_rows, "replicas": 0}
    assert sum(r["cache"]["chunks_by_replica"].values()) == -(-n_rows // 128)
    _check(r, tmp_path, "pq-cache", events, "ShardFeatures")


@pytest.mark.slow
def test_parquet_on_s3_in_cache_mode_with_the_cache_on_s3(ray_clean, tmp_path, s3_endpoint, s3_bucket):
    import fsspec

    from kdcore.cache.verify import verify
    from services.jobs.run import run_job

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    prefix = f"{s3_bucket}/pqc-{tmp_path.name[-12:]}"
    write_parquet_images(prefix, 400, size=20, shards=2, rows_per_group=64, fs=fs)
    cache = f"s3://{s3_bucket}/cache-{tmp_path.name[-12:]}"
    job = _job(tmp_path, "pq-s3-cache", _parquet(f"s3://{prefix}", s3_endpoint=s3_endpoint), mode="cache",
               cache={"uri": cache, "s3_endpoint": s3_endpoint, "chunk_rows": 128})
    r = run_job(job, log=None)
    n_rows = r["cache"]["manifest"]["n_rows"]
    assert r["cache"]["inputs_decoded_by"] == {"ray_data": n_rows, "replicas": 0}
    v = verify(cache, s3_endpoint=s3_endpoint)
    assert v.ok and v.manifest_complete and v.checked == v.n_chunks
    _check(r, tmp_path, "pq-s3-cache")


@pytest.mark.slow
def test_parquet_on_s3_in_stream_mode(ray_clean, tmp_path, s3_endpoint, s3_bucket):
    import fsspec

    from services.jobs.run import run_job

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    prefix = f"{s3_bucket}/pq-{tmp_path.name[-12:]}"
    write_parquet_images(prefix, 500, size=20, shards=2, rows_per_group=64, fs=fs)
    job = _job(tmp_path, "pq-stream", _parquet(f"s3://{prefix}", s3_endpoint=s3_endpoint), mode="stream")
    r = run_job(job, log=None)
    _check(r, tmp_path, "pq-stream")


def test_image_folder_job_online(ray_clean, tmp_path):
    from services.jobs.run import run_job

    write_image_folder(tmp_path / "imgs", 300, size=20, classes=4)
    job = _job(tmp_path, "folder", {"kind": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": 20},
               classes=4, mode="online")
    r = run_job(job, log=None)
    _check(r, tmp_path, "folder")
