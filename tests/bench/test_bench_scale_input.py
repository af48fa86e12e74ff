"""`kd bench scale` and `kd bench input` at toy sizes: every key is there, the figures are finite and positive,
and the 4N dataset is 4x the N one."""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SCALE_KEYS = ["rows", "image_size", "crop", "views", "epochs", "chunk_rows", "cache_rows", "decoded_gb", "workdir",
              "targets", "rss_min_mb", "rss_peak_mb", "rss_total_peak_mb", "processes_per_kind", "titles", "rss_ratio",
              "rss_ignored_kinds", "rss_growth", "rss_growth_kind", "rss_anon_peak_mb", "rss_shmem_peak_mb",
              "object_spilling", "rss_anon_ratio", "rss_anon_growth", "rss_anon_growth_kind", "build_rows_per_s", "build_rows_per_s_total",
              "epoch_rows_per_s", "epoch_s", "build_s_total", "epoch_data_wait_s", "build_basis", "wall_s", "log",
              "throughput_ratio", "throughput_ratio_min", "memory_samples", "rss_anon_series_mb", "rss_shmem_series_mb"]
INPUT_KEYS = ["rows", "image_size", "views", "chunk_rows", "cache_rows", "decoded_gb", "repeats", "cores", "targets",
              "replicas", "cpus_per_replica", "decode_tasks", "build_s_total", "build_rows_per_s_total",
              "build_rows_per_s", "build_basis", "chunks", "forward_rows_per_s", "build_input_rows_per_s",
              "pipeline_rows_per_s", "pipeline_first_batch_s", "loadavg_before", "loadavg_after",
              "pipeline_first_epoch_rows_per_s", "pipeline_epoch_s", "pipeline_consumer_cpu_s",
              "pipeline_rows_per_epoch", "input_rows_per_s", "limit_cores",
              "limit_rows_per_s", "limit", "ratio", "ratio_pair_median", "forward_limit_rows_per_s",
              "build_input_limit_rows_per_s", "build_limit_rows_per_s", "build_limit", "build_ratio",
              "build_shared_limit_rows_per_s", "build_ratio_shared", "samples", "pipeline_steady_rows_per_s",
              "ratio_steady", "pipeline_consumer_cpu_ms_per_row", "build_ratio_ceiling_shared_cores"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_scale_small(tmp_path):
    import json

    from services.bench.imagejob import dataset_rows
    from services.bench.scale import lines, run

    r = run(rows=256, image_size=32, workdir=tmp_path, replicas=1, log=None)
    json.dumps(r)  # what --json prints
    assert [k for k in SCALE_KEYS if k not in r] == []
    assert r["rows"] == {"n": 256, "4n": 1024}
    assert dataset_rows(tmp_path / "data-4n") == 4 * dataset_rows(tmp_path / "data-n") == 1024
    assert r["cache_rows"]["4n"] == 4 * r["cache_rows"]["n"]
    assert r["decoded_gb"]["4n"] == pytest.approx(4 * r["decoded_gb"]["n"])
    for size in ("n", "4n"):
        for key in ("build_rows_per_s", "build_rows_per_s_total", "epoch_rows_per_s", "epoch_s", "decoded_gb",
                    "rss_total_peak_mb"):
            assert _positive(r[key][size]), (key, size, r[key][size])
        peaks = r["rss_peak_mb"][size]
        # the driver, its Ray daemons, the teacher replicas and the Train workers are all in the sampled tree
        for kind in ("kd_driver", "ray_daemon", "teacher_replica", "train_worker"):
            assert _positive(peaks.get(kind)), (size, kind, peaks)
        assert r["processes_per_kind"][size]["train_worker"] == 2
    assert r["rss_ratio"] and all(_positive(v) for v in r["rss_ratio"].values())
    assert _positive(r["rss_growth"]) and r["rss_growth_kind"] in r["rss_ratio"]
    assert all(_positive(v) for v in r["throughput_ratio"].values())
    assert r["throughput_ratio_min"] == min(r["throughput_ratio"].values())
    assert "rss_growth" in "\n".join(lines(r))


def test_bench_input_small(ray_clean, tmp_path):
    import json

    from services.bench.input import lines, run

    r = run(rows=256, image_size=32, repeats=1, workdir=tmp_path, replicas=1, log=None)
    json.dumps(r)
    assert [k for k in INPUT_KEYS if k not in r] == []
    assert r["cache_rows"] == 512 and r["pipeline_rows_per_epoch"] == 512
    for key in INPUT_KEYS:
        if key.endswith(("_rows_per_s", "ratio", "_s")) or key in ("ratio_pair_median", "build_ratio_shared",
                                                                              "ratio_steady"):
            assert _positive(r[key]), (key, r[key])
    assert r["limit_rows_per_s"] == pytest.approx(r["input_rows_per_s"] * min(r["decode_tasks"], r["cores"]))
    assert r["build_limit_rows_per_s"] == pytest.approx(min(r["forward_limit_rows_per_s"],
                                                            r["build_input_limit_rows_per_s"]))
    assert r["ratio_steady"] == pytest.approx(r["pipeline_steady_rows_per_s"] / r["limit_rows_per_s"])
    # on shared cores the build's limit is the tighter one: build_ratio = build_ratio_shared x that ceiling
    assert 0 < r["build_ratio_ceiling_shared_cores"] <= 1
    assert r["build_ratio"] == pytest.approx(r["build_ratio_shared"] * r["build_ratio_ceiling_shared_cores"])
    assert "ratio" in "\n".join(lines(r)) and "after the first batch" in "\n".join(lines(r))
