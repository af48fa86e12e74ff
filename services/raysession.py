"""Connecting to Ray: a private local Ray by default, the job's cluster inside a Ray job, or a named cluster.

``ray.init()`` with no address joins whatever cluster was started on the machine (it reads Ray's
current-cluster file); kd never relies on that. Where a job runs is decided here, in this order:

1. this process already has Ray (a test, a notebook): use it;
2. an address given (``--address``, ``ray.address``, or ``RAY_ADDRESS``): connect to it (``auto`` means
   "the cluster started on this machine");
3. inside a submitted Ray job (``ray job submit -- kd run``): the job's own cluster, with the job's runtime
   env (a driver must not pass its own runtime env or resources there);
4. otherwise a private local Ray (``address="local"``), whatever else runs on the machine.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from kdcore.errors import UserError
from kdcore.spec.job import RaySpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Ray Train's controller collects worker reports when it polls them (every 2 s by default), and each
# ray.train.report waits for that: a small job reporting every epoch would spend 2 s per epoch waiting.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}


def job_env_vars() -> dict[str, str]:
    """Environment variables every kd job carries into its Ray actors and workers."""
    from services.memtune import ENV

    return {**ENV, **TRAIN_ENV}


def inside_ray_job() -> bool:
    """True in the driver of a job submitted with ``ray job submit`` (or a RayJob)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def init_kwargs(spec: RaySpec, address: str | None = None) -> tuple[dict, str]:
    """``ray.init`` keyword arguments for ``spec`` and a line saying where the job runs."""
    target = address or spec.address or None
    kwargs: dict = {"namespace": spec.namespace, "log_to_driver": bool(os.environ.get("KD_RAY_LOGS"))}
    if inside_ray_job():  # the job's runtime env applies (a second one conflicts); Ray Jobs sets RAY_ADDRESS too
        if target is not None:
            kwargs["address"] = target
        return kwargs, "[kd] running inside a Ray job: using the job's cluster"
    target = target or os.environ.get("RAY_ADDRESS") or None
    kwargs["runtime_env"] = {"env_vars": job_env_vars()}
    if target is not None:
        kwargs["address"] = target
        return kwargs, f"[kd] connecting to Ray at {target}"
    # workers import the project like this process does (an uninstalled checkout works too)
    env = kwargs["runtime_env"]["env_vars"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # nothing drains a private node: no preemption-watcher actor per Ray Train run (a process start each)
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs.update(address="local", num_cpus=spec.num_cpus, include_dashboard=False)
    if spec.object_store_mb:
        kwargs["object_store_memory"] = spec.object_store_mb * 2**20
    return kwargs, "[kd] starting a private local Ray"


@contextlib.contextmanager
def ray_session(spec: RaySpec, address: str | None = None, log=print) -> Iterator[bool]:
    """Connect as the module docstring says; shut down only what was connected here.
    Yields whether Ray was initialised here."""
    import ray

    if ray.is_initialized():
        yield False
        return
    kwargs, line = init_kwargs(spec, address)
    if log:
        log(line)
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {kwargs.get('address')!r}: {e}; check --address / "
                        "ray.address / RAY_ADDRESS (a local run needs no address)") from None
    try:
        yield True
    finally:
        ray.shutdown()
