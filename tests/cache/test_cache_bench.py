"""The cache benchmark runs and reports what it promises (figures are machine-dependent: not asserted)."""

from __future__ import annotations

import pytest

from services.bench.cache import run


def test_bench_reports_ratios_of_the_measured_figures(tmp_path):
    out = run(rows=4096, dim=256, batch=256, chunk_rows=512, workdir=tmp_path, repeats=1)
    for key in ("loader_rows_per_s", "memmap_rows_per_s", "read_ratio", "write_mb_per_s", "raw_write_mb_per_s",
                "write_ratio"):
        assert out[key] > 0, key
    assert out["read_ratio"] == pytest.approx(out["loader_rows_per_s"] / out["memmap_rows_per_s"])
    assert out["write_ratio"] == pytest.approx(out["write_mb_per_s"] / out["raw_write_mb_per_s"])
    assert out["feature_mb"] == pytest.approx(4096 * 256 * 2 / 1e6)
    assert (tmp_path / "raw.npy").exists() and (tmp_path / "cache" / "zarr.json").exists()
