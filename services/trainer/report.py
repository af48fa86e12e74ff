"""The run report: per-epoch metrics as JSON, a Markdown summary and a PNG plot of loss parts and accuracy."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

# matplotlib's text layout keeps process-wide caches that are not thread-safe, and a sweep writes the
# reports of parallel runs from several threads
_PLOT_LOCK = threading.Lock()


def write_report(run_dir: str | Path, job_name: str, history: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, str]:
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(history, indent=2))
    final = history[-1] if history else {}
    lines = [f"# kd run `{job_name}`", "", "| epoch | total loss | val acc | epoch time (s) |", "|---:|---:|---:|---:|"]
    for h in history:
        acc = h.get("val/acc")
        lines.append(f"| {h.get('epoch')} | {h.get('loss/total', float('nan')):.4f} | "
                     f"{'' if acc is None else f'{acc:.4f}'} | {h.get('time/epoch_s', float('nan')):.2f} |")
    lines += ["", "## Final", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items()]
    lines += [f"- {k}: {v}" for k, v in extra.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    paths = {"metrics": str(out / "metrics.json"), "summary": str(out / "summary.md")}
    if history:
        paths["plot"] = str(_plot(out / "plot.png", job_name, history))
    return paths


def _plot(path: Path, job_name: str, history: list[dict[str, Any]]) -> Path:
    with _PLOT_LOCK:
        return _draw(path, job_name, history)


def _draw(path: Path, job_name: str, history: list[dict[str, Any]]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    for key in sorted({k for h in history for k in h if k.startswith("loss/")}):
        a.plot(epochs, [h.get(key, float("nan")) for h in history], label=key[5:])
    a.set_xlabel("epoch")
    a.set_ylabel("loss (unweighted parts)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    acc = [(h["epoch"], h["val/acc"]) for h in history if "val/acc" in h]
    if acc:
        b.plot([e for e, _ in acc], [v for _, v in acc], marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel("validation accuracy")
    fig.suptitle(f"kd run {job_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
