"""Connecting to Ray: a local Ray started in-process by default, or an existing cluster."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from kdcore.errors import UserError
from kdcore.spec.job import RaySpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Ray Train's controller collects worker reports when it polls them (every 2 s by default), and each
# ray.train.report waits for that: a small job reporting every epoch would spend 2 s per epoch waiting.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}


def job_env_vars() -> dict[str, str]:
    """Environment variables every kd job carries into its Ray actors and workers."""
    return dict(TRAIN_ENV)


@contextlib.contextmanager
def ray_session(spec: RaySpec, address: str | None = None, log=print) -> Iterator[bool]:
    """Use the running Ray if this process already has one; else connect to ``address`` (or spec.ray.address);
    else start a local Ray in-process. Shuts down only what it started. Yields whether Ray was started here."""
    import ray

    if ray.is_initialized():
        yield False
        return
    target = address or spec.address
    kwargs: dict = {"namespace": spec.namespace, "log_to_driver": bool(os.environ.get("KD_RAY_LOGS"))}
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # inside a submitted job the job's runtime env (which `kd submit` fills) applies; a second one conflicts
        kwargs["runtime_env"] = {"env_vars": job_env_vars()}
    if target is None:
        kwargs.update(num_cpus=spec.num_cpus, include_dashboard=False)
        # workers import the project like this process does (an uninstalled checkout works too)
        kwargs["runtime_env"]["env_vars"]["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        if log:
            log("[kd] starting a local Ray")
    elif log:
        log(f"[kd] connecting to Ray at {target}")
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {target!r}: {e}; check --address / ray.address "
                        "(a local run needs no address)") from None
    try:
        yield True
    finally:
        ray.shutdown()
