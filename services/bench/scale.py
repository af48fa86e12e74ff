"""``kd bench scale``: the same cache-mode job on N and 4N image rows; memory per process kind and throughput.

Two Parquet datasets of generated PNG images (``kdcore.data.synth.write_parquet_images``): 4N rows written as
four shards of N rows, and N rows as a hard link to the first of them (the same bytes, written once). With the
defaults, 4N = 44,000 rows of 3 x 128 x 128 are 8.65 GB as decoded float32 (2.16 GB for N), so a process that
held a dataset's decoded rows, or any fraction of them, would stand out.

Each size runs the same job as a subprocess, ``kd run SPEC`` (a real ``kd`` driver that starts its own private
Ray, so every Ray process of the run — GCS, raylet, the workers the raylet forks, the teacher replicas, the
Ray Train workers and controller, the Ray Data tasks — is in the driver's process tree): an ``image_cnn``
teacher (width 16) served by its Serve deployment fills a local feature cache (``features.mode: cache``), then
an ``image_cnn`` student (width 4) trains one epoch on 2 Ray Train workers through the Ray Data pipeline (cache
chunks joined with their input rows, decoded and augmented by ``random_resized_crop`` + flip, 2 views).
``services.bench.procmem`` samples the resident memory of every process of that tree twice a second, filed by
process kind (the teacher replicas, Ray Train's workers, controller and helper actors, Ray Data's decode tasks,
split coordinator and system actors, Serve's controller and proxies, spill workers, Ray's daemons and agents;
only the tree's root is ``kd_driver``).

Figures, per size:

- ``rss_peak_mb``: the peak RSS of one process of each kind (the kinds above). ``rss_growth`` is the largest
  4N / N ratio over the kinds seen in both runs whose N peak is at least ``min_mb`` (50 MB: smaller ones are
  short-lived helpers whose ratio is noise; they are listed in ``rss_ignored_kinds``). Target <= 1.15. RSS
  counts the pages of Ray's object store (shared memory) that a process has touched, so the private part
  (``rss_anon_*``: RssAnon) and the shared part (``rss_shmem_peak_mb``) are reported too, with their peaks of
  one process every 10 s of the run (``rss_anon_series_mb``, ``rss_shmem_series_mb``); ``object_spilling``
  says whether Ray spilled objects to disk.
- ``build_rows_per_s``: cache rows per second of the build in steady state, from the modification times of the
  chunks' done markers (``marker_build_rate``: the rows finished between the markers at the first and the third
  quarter of the build, over the time between them; the teacher deployment's start-up is not counted, and
  ``build_rows_per_s_total`` is the rate over the whole build as ``kd run`` logs it, start-up included). With
  fewer than 8 chunks, the whole-build rate is used (``build_basis``).
- ``epoch_rows_per_s``: cache rows of the epoch over its time in the training worker (``time/epoch_s`` in
  ``runs/<name>/metrics.json``, rank 0; the epoch after the first when ``epochs`` > 1, else the only one, whose
  time includes the pipeline's first block — a fixed cost that flatters the larger size slightly).
- ``throughput_ratio``: 4N / N for the build and the epoch; the headline is the smaller. Target >= 0.9.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from services.bench.imagejob import crop_of, decoded_gb, image_job, marker_build_rate, write_scale_datasets
from services.bench.procmem import TreeSampler

RSS_MIN_MB = 50.0
SERIES_KINDS = ("train_worker", "data_decode", "teacher_replica", "kd_driver")  # their private MB every 10 s
TARGETS = {"rss_growth": "<= 1.15", "throughput_ratio": ">= 0.9"}


# -- one `kd run` under the memory sampler -----------------------------------------------------------------
def kd_command() -> list[str]:
    """``kd`` of this environment (the console script next to this Python), else ``python -m services.cli.main``."""
    script = Path(sys.executable).with_name("kd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli.main"]


def child_env() -> dict[str, str]:
    """This environment, minus what would send ``kd run`` to another cluster: it must start its own Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_kd(spec: dict[str, Any], work: Path, log: Callable[[str], None] | None = None,
           timeout_s: float = 3600.0, every_s: float = 0.5) -> dict[str, Any]:
    """``kd run`` of ``spec`` as a subprocess, its process tree sampled; returns peaks, log lines and the run's
    metrics. A fresh run each time: the job's cache and run directory are removed first."""
    name = spec["name"]
    shutil.rmtree(spec["features"]["cache"]["uri"], ignore_errors=True)
    shutil.rmtree(Path(spec["output"]["dir"]) / name, ignore_errors=True)
    (work / "specs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    spec_path = work / "specs" / f"{name}.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_path = work / "logs" / f"{name}.log"
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([*kd_command(), "run", str(spec_path)], cwd=str(work), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        with open(log_path, "w", buffering=1) as f:  # line-buffered: the log can be followed
            for line in proc.stdout:
                t = time.perf_counter() - t0
                lines.append((t, line.rstrip("\n")))
                f.write(f"[{t:7.1f}s] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    sampler = TreeSampler(proc.pid, every_s=every_s)
    try:
        with sampler:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _stop(proc)
                raise RuntimeError(f"kd run {name} did not finish in {timeout_s:.0f} s; log: {log_path}") from None
    except BaseException:
        if proc.poll() is None:
            _stop(proc)
        raise
    reader.join(10)
    wall = time.perf_counter() - t0
    if rc != 0:
        said = [text for _, text in lines if text.startswith("kd: ")]  # kd's own error lines
        tail = "\n".join(text for _, text in lines[-15:])
        raise RuntimeError(f"kd run {name} exited {rc}: {said[-1] if said else 'see the log'} (log {log_path})"
                           f"\n{tail}")
    metrics = json.loads((Path(spec["output"]["dir"]) / name / "metrics.json").read_text())
    return {"peaks": dict(sampler.peaks), "anon_peaks": dict(sampler.anon_peaks),
            "shmem_peaks": dict(sampler.shmem_peaks), "total_peak_mb": sampler.total_peak_mb,
            "counts": dict(sampler.counts), "anon_series": dict(sampler.anon_series),
            "shmem_series": dict(sampler.shmem_series),
            "titles": {k: sorted(v) for k, v in sampler.titles.items()}, "samples": sampler.samples, "lines": lines, "metrics": metrics,
            "wall_s": wall, "log": str(log_path)}


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the ``kd`` we started (it tears its Ray down), then SIGKILL to its process group if it lingers."""
    import signal

    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_COMPLETE = re.compile(r"cache complete: (\d+) rows in ([\d.]+) s")


def run_figures(r: dict[str, Any], spec: dict[str, Any], cache_rows: int) -> dict[str, Any]:
    """Build and epoch rows/s of one ``run_kd`` result."""
    out: dict[str, Any] = {}
    built = [m for _, text in r["lines"] if (m := _COMPLETE.search(text))]
    if not built:
        raise RuntimeError(f"no 'cache complete' line in {r['log']}: the cache was not built by this run")
    rows, seconds = int(built[-1].group(1)), float(built[-1].group(2))
    out["build_s_total"] = seconds
    out["build_rows_per_s_total"] = rows / seconds
    steady = marker_build_rate(spec["features"]["cache"]["uri"], skip=spec["teacher"]["serve"]["replicas"])
    if steady is not None:
        out["build_rows_per_s"], out["build_basis"] = steady[0], "markers"
        out["build_s_steady"] = steady[2]
    else:
        out["build_rows_per_s"], out["build_basis"] = out["build_rows_per_s_total"], "total"
    hist = r["metrics"]
    epoch_s = [h["time/epoch_s"] for h in hist]
    e = statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
    out["epoch_s"] = e
    out["epoch_data_wait_s"] = statistics.median(h.get("time/data_s", float("nan")) for h in (hist[1:] or hist))
    out["epoch_rows_per_s"] = cache_rows / e
    return out


# -- the bench -----------------------------------------------------------------------------------------
def run(rows: int = 11_000, image_size: int = 128, workdir: str | os.PathLike | None = None, keep: bool = False,
        epochs: int = 1, views: int = 2, chunk_rows: int = 512, min_mb: float = RSS_MIN_MB,
        replicas: int | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the job on N = ``rows`` and 4N rows; returns one dict (see the module docstring)."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kd-bench-scale-") if own else workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    sizes = {"n": rows, "4n": 4 * rows}
    out: dict[str, Any] = {
        "rows": sizes, "image_size": image_size, "crop": crop_of(image_size), "views": views, "epochs": epochs,
        "chunk_rows": chunk_rows, "cache_rows": {k: v * views for k, v in sizes.items()},
        "decoded_gb": {k: decoded_gb(v, image_size) for k, v in sizes.items()},
        "workdir": str(work), "targets": dict(TARGETS), "rss_min_mb": min_mb,
    }
    try:
        small, big, ev = write_scale_datasets(work, rows, image_size, log=say)
        runs: dict[str, dict[str, Any]] = {}
        for key, data_dir in (("n", small), ("4n", big)):
            spec = image_job(f"bench-scale-{key}", data_dir, ev, work, image_size, views=views,
                             chunk_rows=chunk_rows, epochs=epochs, replicas=replicas)
            say(f"  kd run on {key.upper()} = {sizes[key]:,} rows ({out['decoded_gb'][key]:.2f} GB decoded) ...")
            r = run_kd(spec, work)
            fig = run_figures(r, spec, out["cache_rows"][key])
            runs[key] = {**fig, "peaks": r["peaks"], "anon_peaks": r["anon_peaks"], "shmem_peaks": r["shmem_peaks"],
                         "total_peak_mb": r["total_peak_mb"], "counts": r["counts"], "anon_series": r["anon_series"],
                         "shmem_series": r["shmem_series"],
                         "titles": r["titles"], "samples": r["samples"], "wall_s": r["wall_s"],
                         "log": r["log"]}
            say(f"    done in {r['wall_s']:.0f} s: build {fig['build_rows_per_s']:,.0f} rows/s, epoch "
                f"{fig['epoch_rows_per_s']:,.0f} rows/s, {r['samples']} memory samples")
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not keep:  # a given workdir keeps its datasets (reused next time); the caches and runs go
            for d in ("cache", "runs"):
                shutil.rmtree(work / d, ignore_errors=True)

    n, n4 = runs["n"], runs["4n"]
    out["rss_peak_mb"] = {k: dict(sorted(v["peaks"].items())) for k, v in runs.items()}
    out["rss_anon_peak_mb"] = {k: dict(sorted(v["anon_peaks"].items())) for k, v in runs.items()}
    out["rss_shmem_peak_mb"] = {k: dict(sorted(v["shmem_peaks"].items())) for k, v in runs.items()}
    out["rss_anon_series_mb"] = {k: {kind: v["anon_series"].get(kind, []) for kind in SERIES_KINDS} for k, v in runs.items()}
    out["rss_shmem_series_mb"] = {k: {kind: v["shmem_series"].get(kind, []) for kind in SERIES_KINDS}
                                  for k, v in runs.items()}
    out["object_spilling"] = {k: "ray_spill_worker" in v["peaks"] for k, v in runs.items()}
    out["rss_total_peak_mb"] = {k: v["total_peak_mb"] for k, v in runs.items()}
    out["processes_per_kind"] = {k: v["counts"] for k, v in runs.items()}
    out["titles"] = {k: sorted(set(n["titles"].get(k, [])) | set(n4["titles"].get(k, [])))[:8]
                     for k in sorted(set(n["titles"]) | set(n4["titles"]))}
    ratios, ignored = {}, {}
    for kind in sorted(set(n["peaks"]) & set(n4["peaks"])):
        if n["peaks"][kind] < min_mb:
            ignored[kind] = f"N peak {n['peaks'][kind]:.0f} MB < {min_mb:.0f} MB"
            continue
        ratios[kind] = n4["peaks"][kind] / n["peaks"][kind]
    for kind in sorted(set(n["peaks"]) ^ set(n4["peaks"])):
        ignored[kind] = "seen in one run only"
    out["rss_ratio"] = ratios
    anon = {kind: n4["anon_peaks"][kind] / n["anon_peaks"][kind] for kind in ratios if n["anon_peaks"].get(kind)}
    out["rss_anon_ratio"] = anon
    out["rss_anon_growth"] = max(anon.values()) if anon else float("nan")
    out["rss_anon_growth_kind"] = max(anon, key=anon.get) if anon else None
    out["rss_ignored_kinds"] = ignored
    worst = max(ratios, key=ratios.get) if ratios else None
    out["rss_growth"] = ratios[worst] if worst else float("nan")
    out["rss_growth_kind"] = worst
    for key in ("build_rows_per_s", "build_rows_per_s_total", "epoch_rows_per_s", "epoch_s", "build_s_total",
                "epoch_data_wait_s", "build_basis", "wall_s", "log"):
        out[key] = {k: v.get(key) for k, v in runs.items()}
    out["throughput_ratio"] = {"build": n4["build_rows_per_s"] / n["build_rows_per_s"],
                               "epoch": n4["epoch_rows_per_s"] / n["epoch_rows_per_s"]}
    out["throughput_ratio_min"] = min(out["throughput_ratio"].values())
    out["memory_samples"] = {k: v["samples"] for k, v in runs.items()}
    return out


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def lines(r: dict[str, Any]) -> list[str]:
    """The human report of ``run``'s result."""
    rows, gb = r["rows"], r["decoded_gb"]
    out = [f"scale bench: N = {rows['n']:,} and 4N = {rows['4n']:,} PNG rows of 3x{r['image_size']}x{r['image_size']} "
           f"(decoded float32: {gb['n']:.2f} GB and {gb['4n']:.2f} GB), {r['views']} views, crops of {r['crop']}, "
           f"{r['epochs']} epoch(s), 2 Ray Train workers",
           "", f"  {'peak of one process (MB)':<24} {'RSS N':>7} {'4N':>7} {'4N/N':>6}   {'private N':>9} {'4N':>7} "
           f"{'4N/N':>6}   {'shared N':>8} {'4N':>7}"]
    peaks, anon, shm = r["rss_peak_mb"], r["rss_anon_peak_mb"], r["rss_shmem_peak_mb"]
    for kind in sorted(set(peaks["n"]) | set(peaks["4n"])):
        ratio, aratio = r["rss_ratio"].get(kind), r["rss_anon_ratio"].get(kind)
        out.append(f"  {kind:<24} {_mb(peaks['n'].get(kind)):>7} {_mb(peaks['4n'].get(kind)):>7} "
                   f"{'-' if ratio is None else f'{ratio:.2f}':>6}   {_mb(anon['n'].get(kind)):>9} "
                   f"{_mb(anon['4n'].get(kind)):>7} {'-' if aratio is None else f'{aratio:.2f}':>6}   "
                   f"{_mb(shm['n'].get(kind)):>8} {_mb(shm['4n'].get(kind)):>7}")
    tot = r["rss_total_peak_mb"]
    out.append(f"  {'(whole tree, sum)':<24} {tot['n']:>7,.0f} {tot['4n']:>7,.0f} {tot['4n'] / tot['n']:>6.2f}")
    if r["rss_ignored_kinds"]:
        out.append("  not compared: " + "; ".join(f"{k} ({why})" for k, why in r["rss_ignored_kinds"].items()))
    spill = [k.upper() for k, v in r["object_spilling"].items() if v]
    if spill:
        out.append(f"  Ray spilled objects to disk in the {' and '.join(spill)} run(s)")
    out.append(f"  rss_growth {r['rss_growth']:.3f} ({r['rss_growth_kind']}) (target {TARGETS['rss_growth']}); "
               f"private memory only: {r['rss_anon_growth']:.3f} ({r['rss_anon_growth_kind']})")
    out.append("")
    b, e, t = r["build_rows_per_s"], r["epoch_rows_per_s"], r["throughput_ratio"]
    out.append(f"  {'rows/s':<32} {'N':>9} {'4N':>9} {'4N/N':>7}")
    out.append(f"  {'cache build (steady)':<32} {b['n']:>9,.0f} {b['4n']:>9,.0f} {t['build']:7.3f}")
    bt = r["build_rows_per_s_total"]
    out.append(f"  {'cache build (with start-up)':<32} {bt['n']:>9,.0f} {bt['4n']:>9,.0f} {bt['4n'] / bt['n']:7.3f}")
    out.append(f"  {'student epoch':<32} {e['n']:>9,.0f} {e['4n']:>9,.0f} {t['epoch']:7.3f}")
    out.append(f"  throughput_ratio {r['throughput_ratio_min']:.3f} (min of build and epoch; target "
               f"{TARGETS['throughput_ratio']})")
    return out


def main() -> None:  # python -m services.bench.scale
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
