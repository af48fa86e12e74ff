"""``kd sweep``: one teacher (one cache; or one per teacher of a multi-teacher base), many students trained on
Ray, one comparison table."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from kdcore.loop import load_split
from kdcore.spec.paths import resolve_paths
from kdcore.spec.sweep import SweepSpec
from kdcore.sweep import result_row, write_tables
from services.raysession import ray_session


def run_sweep(sweep: SweepSpec, out_dir: str | Path, address: str | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build (or reuse) the base job's cache once, train every (variant, seed) with Ray Train, write the tables."""
    from services.trainer.driver import train_student

    say = log or (lambda _m: None)
    out = Path(out_dir)
    base = resolve_paths(sweep.base_job())
    runs = [(v, seed, resolve_paths(job)) for v, seed, job in sweep.jobs()]
    t0 = time.perf_counter()
    with ray_session(base.ray, address, log=say):
        config: dict[str, Any] = {}
        cache = None
        if base.features.mode == "cache":
            from services.jobs.run import ensure_caches

            where = base.features.cache.uri if not base.multi_teacher else \
                ", ".join(str(base.teacher_cache_uri(n)) for n in base.teacher_names())
            say(f"[sweep] stage: feature cache {where} (the teacher runs at most once)")
            cache = ensure_caches(base, load_split(base), config, log=say)
        say(f"[sweep] stage: {len(runs)} student run(s), {sweep.parallel} at a time")

        def one(item):
            variant, seed, job = item
            s0 = time.perf_counter()
            r = train_student(job, out / job.name, extra_config=dict(config), log=None)
            row = result_row(variant, seed, job, r, time.perf_counter() - s0)
            say(f"[sweep] {variant} seed {seed}: val acc {row['val_acc']:.4f} ({row['time_s']:.0f} s)")
            return row

        with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:
            rows = list(pool.map(one, runs))
    md_path, csv_path, md = write_tables(rows, out)
    return {"rows": rows, "markdown": md, "tables": (str(md_path), str(csv_path)), "cache": cache,
            "seconds": time.perf_counter() - t0}
