"""Building, running and tearing down the teacher application; publishing projector versions.

* ``build_teacher_app(job)`` -> ``serve.Application`` (validates the teacher, taps, data and token in this
  process first, so a bad checkpoint or layer name is a kdcore error here, not a replica crash loop);
* ``app_from_env(args)``: the Serve application builder KubeRay's serveConfigV2 imports
  (``services.teacher.app:app_from_env``); the job spec path comes from ``KD_JOB_SPEC``;
* ``run_teacher_app(job)`` -> ``DeploymentHandle``: runs it and waits until it is RUNNING; a replica that
  cannot start is reported with the replica's own kdcore error, and no app is left behind;
* ``delete_teacher_app(name)``: the app and its projector registry;
* ``publish_projector(app, version, weights)``: a trainer's projection, on every replica.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig

from kdcore import errors as kd_errors
from kdcore.errors import KDError, TeacherError, UserError
from kdcore.spec.job import JobSpec
from kdcore.spec.paths import resolve_paths
from services.teacher.projection import FIXED_KINDS, fingerprint
from services.teacher.registry import kill_registries
from services.teacher.options import ServerOptions, batch_limits
from services.teacher.server import TeacherServer
from services.teacher.tokens import resolve_token_sha256

log = logging.getLogger("kd.teacher")
JOB_SPEC_ENV = "KD_JOB_SPEC"


def app_name_for(job: JobSpec) -> str:
    """The default Serve application name of a job's teacher."""
    return f"kd-teacher-{job.name}"


def deployment_options(job: JobSpec, health_check_period_s: float = 5.0,
                       constructor_retries: int | None = None) -> dict[str, Any]:
    """Serve deployment options from ``teacher.serve``: replicas or autoscaling, resources, batching limits."""
    s = job.teacher.serve
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": batch_limits(s).max_ongoing_requests,  # the batch limits: options.batch_limits
        "logging_config": LoggingConfig(enable_access_log=False),
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if constructor_retries is not None:
        opts["max_constructor_retry_count"] = int(constructor_retries)
    if s.autoscaling is not None:
        a = s.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(1, a.min_replicas),
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.replicas
    return opts


def _checkpoint_stamp(path: str | None) -> list[Any] | None:
    if not path:
        return None
    p = Path(path)
    return [str(p), p.stat().st_size, int(p.stat().st_mtime)] if p.is_file() else [str(p)]


def build_teacher_app(job: JobSpec, *, validate: bool = True, projection: str = "pca",
                      projection_seed: int | None = None, pca_rows: int = 2048, poll_s: float = 1.0,
                      health_check_period_s: float = 5.0, constructor_retries: int | None = None) -> serve.Application:
    """The teacher as a Serve application (not yet running).

    ``validate`` builds the teacher and loads the split here first (raises ModelLoadError,
    LayerNotFoundError, DataError, UserError for a missing token) so nothing is deployed for a job that
    cannot work. ``projection`` (``pca`` | ``random``, seeded by ``projection_seed``, default
    ``train.seed``) is the fixed version-0 projection of the ``projected`` payload; ``pca`` is fitted on
    ``pca_rows`` training rows. Relative paths of the spec are resolved from the current directory (as for
    training jobs). Replicas poll the projector registry every ``poll_s`` seconds.
    ``constructor_retries`` caps Serve's replica start attempts (its default is 3 per replica, at most 20).
    """
    if projection not in FIXED_KINDS:
        raise UserError(f"unknown projection {projection!r}; use one of {', '.join(FIXED_KINDS)}")
    job = resolve_paths(job)  # replicas run in other directories: relative checkpoint / data paths made absolute
    seed = job.train.seed if projection_seed is None else int(projection_seed)
    token_sha = None
    if validate:
        from services.teacher.core import TeacherCore

        TeacherCore(job, device="cpu")  # model, checkpoint, taps, data: the replica's own errors, raised here
        token_sha = resolve_token_sha256(job.teacher.serve.http)
    fp = fingerprint(job.teacher.model.model_dump(mode="json"), _checkpoint_stamp(job.teacher.checkpoint),
                     job.teacher.taps, job.teacher.precision, job.data.model_dump(mode="json"), job.train.seed,
                     job.features.stream.projected_dim, projection, seed, pca_rows)
    options = ServerOptions(fingerprint=fp, namespace=job.ray.namespace, projection=projection, projection_seed=seed,
                            pca_rows=int(pca_rows), poll_s=float(poll_s), token_sha256=token_sha)
    deployment = TeacherServer.options(**deployment_options(job, health_check_period_s, constructor_retries))
    return deployment.bind(job.model_dump(mode="json"), options)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def app_from_env(args: dict | None = None) -> serve.Application:
    """Serve application builder (``services.teacher.app:app_from_env``): the job spec path is read from the
    ``KD_JOB_SPEC`` environment variable (or ``args["job_spec"]``). Optional args: ``validate``,
    ``projection``, ``projection_seed``, ``pca_rows``, ``poll_s``, ``health_check_period_s``."""
    args = dict(args or {})
    path = os.environ.get(JOB_SPEC_ENV) or args.pop("job_spec", None)
    if not path:
        raise UserError(f"{JOB_SPEC_ENV} is not set: point it at the job spec YAML the teacher serves")
    job = JobSpec.from_yaml(path)
    kw: dict[str, Any] = {}
    if "validate" in args:
        kw["validate"] = _truthy(args["validate"])
    for key, conv in (("projection", str), ("projection_seed", int), ("pca_rows", int), ("poll_s", float),
                      ("health_check_period_s", float), ("constructor_retries", int)):
        if args.get(key) is not None:
            kw[key] = conv(args[key])
    return build_teacher_app(job, **kw)


# -- running -------------------------------------------------------------------------------------------------
_KD_ERROR = re.compile(r"(?:kdcore\.errors\.|services\.teacher\.core\.)?"
                       r"(ModelLoadError|LayerNotFoundError|DataError|SpecError|UserError|RequestError|TeacherError|"
                       r"CacheError|KDError): (.+)")


def replica_error(message: str) -> KDError:
    """The kdcore error named in a failed replica's traceback text (else a TeacherError with the text)."""
    found = _KD_ERROR.findall(message or "")
    if found:
        name, text = found[-1]
        cls = getattr(kd_errors, name, None) or UserError
        return cls(f"teacher replica failed to start: {text.strip()}")
    lines = [ln for ln in (message or "").strip().splitlines() if ln.strip()]
    return TeacherError("teacher replica failed to start: " + (" | ".join(lines[-6:]) or "no message"))


def _status(name: str):
    return serve.status().applications.get(name)


def _failure_text(app_status) -> str:
    parts = [app_status.message or ""]
    for dep in (app_status.deployments or {}).values():
        parts.append(dep.message or "")
    return "\n".join(p for p in parts if p)


def run_teacher_app(job: JobSpec, *, name: str | None = None, route_prefix: str | None = None,
                    timeout_s: float = 600.0, **build_kwargs: Any) -> DeploymentHandle:
    """Build and run the teacher app ``name`` (default ``kd-teacher-<job>``); wait until it is RUNNING.

    Raises the replica's kdcore error (ModelLoadError, LayerNotFoundError, ...) when replicas fail to start,
    or TeacherError when the app is not running after ``timeout_s`` (e.g. no node has the GPUs asked for);
    in both cases the app and its registry are deleted first. Ray must be initialised (``ray.init``)."""
    import ray

    name = name or app_name_for(job)
    app = build_teacher_app(job, **build_kwargs)
    spec = job.teacher.serve
    if spec.num_gpus > 0 and ray.cluster_resources().get("GPU", 0) < spec.num_gpus:
        log.warning("teacher.serve.num_gpus=%s but the cluster has %s GPU(s) now; replicas wait for GPU nodes",
                    spec.num_gpus, ray.cluster_resources().get("GPU", 0))
    try:
        handle = serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)],
                                wait_for_applications_running=False)[0]
        t0 = time.monotonic()
        while True:
            st = _status(name)
            state = str(getattr(st, "status", "")) if st is not None else "MISSING"
            if state.endswith("RUNNING"):
                return handle
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                raise replica_error(_failure_text(st))
            if time.monotonic() - t0 > timeout_s:
                raise TeacherError(
                    f"teacher app {name!r} is not running after {timeout_s:.0f}s (status {state}); replicas may be "
                    f"waiting for resources: each needs num_cpus={spec.num_cpus}, num_gpus={spec.num_gpus} "
                    f"(cluster has {ray.cluster_resources()})")
            time.sleep(0.2)
    except BaseException:
        delete_teacher_app(name, job.ray.namespace)
        raise


def delete_teacher_app(name: str, namespace: str | None = None) -> None:
    """Delete the Serve app ``name`` (if it exists) and kill its projector registries."""
    try:
        if name in serve.status().applications:
            serve.delete(name)
    finally:
        kill_registries(name, namespace)


def get_handle(app: str | DeploymentHandle) -> DeploymentHandle:
    """A handle from an app name; a handle (or anything handle-like) is returned as it is."""
    return serve.get_app_handle(app) if isinstance(app, str) else app


def publish_projector(app: str | DeploymentHandle, version: int, weights: dict, timeout_s: float = 30.0) -> dict:
    """Publish a trainer's projection as ``version`` (an int > the current one; {layer: W (d_p, d_t)} or
    {layer: {"weight", "bias"}}) and make every live replica adopt it before returning.

    The registry takes the weights (via one replica, which validates them); a broadcast then has each replica
    pull them. Replicas that start later read the registry; ones missed by the broadcast catch up by polling.
    Returns ``{"version", "replicas": [version held by each replica] | None}``."""
    h = get_handle(app)
    r = h.set_projector.remote(int(version), weights).result(timeout_s=timeout_s)
    try:
        held = h.broadcast("refresh_projector", int(version)).results(timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - the poll (every poll_s) still brings every replica there
        log.warning("broadcast of projector v%s failed (%s); replicas adopt it within poll_s", version, e)
        held = None
    return {"version": r["version"], "replicas": held}
