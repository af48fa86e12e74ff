"""The run report: JSON metrics, Markdown summary and a PNG plot; safe to write from parallel runs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from services.trainer.report import write_report

HISTORY = [{"epoch": e, "loss/total": 2.0 / e, "loss/kd": 1.0 / e, "val/acc": 0.5 + e / 10, "time/epoch_s": 0.1}
           for e in range(1, 5)]


def test_report_files(tmp_path):
    paths = write_report(tmp_path, "job", HISTORY, {"features": "cache"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == HISTORY
    summary = (tmp_path / "summary.md").read_text()
    assert "| 4 | 0.5000 | 0.9000 |" in summary and "features: cache" in summary
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].endswith("plot.png")


def test_reports_written_from_parallel_threads(tmp_path):
    # a sweep writes several reports at once; matplotlib's text layout is not thread-safe on its own
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_report(tmp_path / str(i), f"job{i}", HISTORY, {}), range(8)))
    assert all((tmp_path / str(i) / "plot.png").stat().st_size > 1000 for i in range(8))
