"""The teacher app for the length of a job stage: started, yielded, deleted whatever happens."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from kdcore.spec.job import JobSpec
from services.teacher.app import app_name_for, delete_teacher_app, run_teacher_app


@contextlib.contextmanager
def teacher_app(job: JobSpec, log: Callable[[str], None] | None = print, name: str | None = None) -> Iterator[str]:
    """Run the job's teacher deployment (as app ``name``, default ``app_name_for(job)``); yield its app name;
    delete it (and its registry) on exit."""
    name = name or app_name_for(job)
    if log:
        s = job.teacher.serve
        log(f"[{job.name}] stage: teacher deployment {name} ({s.replicas if s.autoscaling is None else 'autoscaled'} "
            f"replica(s), {s.num_gpus} GPU each)")
    run_teacher_app(job, name=name)
    try:
        yield name
    finally:
        delete_teacher_app(name, job.ray.namespace)
        if log:
            log(f"[{job.name}] teacher deployment {name} deleted")
