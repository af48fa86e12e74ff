"""Running a sweep in one process and rendering its comparison table (Markdown + CSV)."""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from kdcore.spec.sweep import SweepSpec


def run_sweep_local(sweep: SweepSpec, out_dir: str | Path, progress: bool = False,
                    log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Train every (variant, seed) in this process; one result row each."""
    from kdcore.loop import train_local

    rows = []
    for variant, seed, job in sweep.jobs():
        t0 = time.perf_counter()
        r = train_local(job, out_dir=Path(out_dir) / job.name, progress=progress, log=log)
        rows.append(result_row(variant, seed, job, r, time.perf_counter() - t0))
        if log:
            log(f"[sweep] {variant} seed {seed}: val acc {rows[-1]['val_acc']:.4f} ({rows[-1]['time_s']:.1f} s)")
    return rows


def result_row(variant: str, seed: int, job, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    import json

    meta = json.loads((Path(result["student_dir"]) / "student.json").read_text())
    return {"variant": variant, "seed": seed, "losses": "+".join(job.loss_kinds()),
            "val_acc": float(result["final"].get("val/acc", float("nan"))), "params": int(meta["parameters"]),
            "time_s": seconds, "student_dir": result["student_dir"]}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per variant: mean and spread of accuracy over seeds, size, mean time."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        accs = [r["val_acc"] for r in rs]
        out.append({"variant": variant, "losses": rs[0]["losses"], "seeds": len(rs),
                    "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "params": rs[0]["params"], "time_s": statistics.fmean(r["time_s"] for r in rs)})
    return out


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| student | losses | seeds | val acc (mean ± std) | params | time/run (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['losses']} | {s['seeds']} | {s['acc_mean']:.4f} ± {s['acc_std']:.4f} | "
                     f"{s['params']:,} | {s['time_s']:.1f} |")
    return "\n".join(lines)


def csv_table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["variant", "seed", "losses", "val_acc", "params", "time_s", "student_dir"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(summarize(rows))
    (out / "comparison.md").write_text(md + "\n")
    (out / "comparison.csv").write_text(csv_table(rows))
    return out / "comparison.md", out / "comparison.csv", md
