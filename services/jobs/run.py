"""``kd run``: the whole job on a Ray cluster, torn down on success, failure and Ctrl-C.

Stages: check the whole job (``kdcore.validate.preflight``: both models on the meta device, taps, pairs, losses,
checkpoints, data, an existing cache) in the driver so mistakes surface before any cluster work;
bring up the teacher deployment when the job streams or must build its cache; build or reuse the cache;
train the student with Ray Train; export it and write the run report; delete the Serve app and the bank
actors whatever happened.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kdcore.loop import build_teacher, load_split, run_dir, teacher_shapes_of
from kdcore.spec.job import JobSpec
from kdcore.spec.paths import resolve_paths
from services.raysession import ray_session


def run_job(job: JobSpec, address: str | None = None, out_dir: str | Path | None = None,
            log: Callable[[str], None] | None = print, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``job`` end to end; returns the training result plus the cache/stream details."""
    job = resolve_paths(job)  # relative paths mean the launch directory, in every worker and replica
    out = Path(out_dir) if out_dir else run_dir(job)
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    say(f"[{job.name}] stage: check the job (teacher, student, losses, data, cache) before any cluster work")
    from kdcore.validate import preflight

    for note in preflight(job).notes:  # raises SpecError listing every problem (exit 2)
        say(f"[{job.name}] note: {note}")
    split = load_split(job)
    runner = build_teacher(job, device="cpu")  # fails fast on a bad checkpoint or tap, before any cluster work
    shapes = teacher_shapes_of(job, split, runner)
    config: dict[str, Any] = {"teacher_shapes": {k: list(v) for k, v in shapes.items()}, **(extra_config or {})}
    with ray_session(job.ray, address, log=say):
        extra: dict[str, Any] = {}
        mode = job.features.mode
        if mode == "cache":
            if not job.multi_teacher:
                say(f"[{job.name}] stage: feature cache {job.features.cache.uri}")
            extra["cache"] = ensure_caches(job, split, config, log=say, runner=runner)
            say(f"[{job.name}] stage: train student from the cache" + ("s" if job.multi_teacher else ""))
            result = _train(job, out, config, say)
        elif mode == "stream":
            with _teacher_apps(job, say) as apps:
                if job.multi_teacher:
                    config["teacher_apps"] = apps
                else:
                    config["teacher_app"] = apps[job.teacher_names()[0]]
                if job.features.stream.payload == "projected":
                    from services.teacher.stream import stream_teacher_shapes

                    config["teacher_shapes"] = {k: list(v) for k, v in stream_teacher_shapes(job, split).items()}
                say(f"[{job.name}] stage: train student on the teacher stream" + ("s" if job.multi_teacher else ""))
                result = _train(job, out, config, say)
        else:
            say(f"[{job.name}] stage: train student (teacher online in each worker)")
            result = _train(job, out, config, say)
    result.update(extra)
    result["total_seconds"] = time.perf_counter() - t0
    say(f"[{job.name}] done in {result['total_seconds']:.0f} s: val acc {result['final'].get('val/acc', float('nan')):.4f}; "
        f"report {result['report'].get('summary')}")
    return result


def ensure_caches(job: JobSpec, split, config: dict[str, Any], log: Callable[[str], None] | None = print,
                  replicas: bool = True, runner=None) -> dict[str, Any]:
    """Build or reuse the job's feature cache(s) and note in ``config`` the manifests training must find.

    One teacher: ``ensure_cache`` on the job (``config["cache_manifest"]``). Several: ``ensure_cache`` on each
    teacher's single-teacher view ``job.for_teacher(name)``, its cache at ``job.teacher_cache_uri(name)``,
    one after the other (each with its own deployment on Ray); ``config["cache_manifests"]`` maps teacher ->
    manifest. ``runner``: the job's already loaded teacher (a ``TeacherSet`` for several). Returns what
    ``ensure_cache`` returned (several teachers: by teacher name)."""
    from services.jobs.cache_build import ensure_cache

    say = log or (lambda _msg: None)
    if not job.multi_teacher:
        result = ensure_cache(job, split, log=log, replicas=replicas, runner=runner)
        config["cache_manifest"] = result["manifest"]
        return result
    results: dict[str, Any] = {}
    for name in job.teacher_names():
        say(f"[{job.name}] stage: feature cache of teacher {name!r} {job.teacher_cache_uri(name)}")
        own = runner.runners[name] if runner is not None else None
        results[name] = ensure_cache(job.for_teacher(name), split, log=log, replicas=replicas, runner=own)
    config["cache_manifests"] = {name: r["manifest"] for name, r in results.items()}
    return results


@contextlib.contextmanager
def _teacher_apps(job: JobSpec, say: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """Every teacher's deployment for the length of a stream stage: ``{teacher: app name}`` (several teachers:
    apps ``kd-teacher-<job>-<teacher>``, each serving its single-teacher view); all deleted on exit."""
    from services.teacher.app import app_name_for
    from services.teacher.lifecycle import teacher_app

    with contextlib.ExitStack() as stack:
        if not job.multi_teacher:
            yield {job.teacher_names()[0]: stack.enter_context(teacher_app(job, log=say))}
            return
        yield {name: stack.enter_context(teacher_app(job.for_teacher(name), log=say,
                                                     name=f"{app_name_for(job)}-{name}"))
               for name in job.teacher_names()}


def _train(job: JobSpec, out: Path, config: dict[str, Any], log) -> dict[str, Any]:
    from services.trainer.driver import train_student

    return train_student(job, out, extra_config=config, log=log)
