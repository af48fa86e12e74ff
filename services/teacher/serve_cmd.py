"""``kd serve JOB.yaml``: run the teacher with its HTTP ingress until Ctrl-C, then tear everything down."""

from __future__ import annotations

import threading
from typing import Any, Callable

from kdcore.spec.job import JobSpec


def _proxy_answers(host: str, port: int, prefix: str, timeout_s: float = 5.0) -> bool:
    """Whether Serve's HTTP proxy at ``host:port`` routes ``prefix`` (its public ``/-/routes`` endpoint)."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/-/routes", timeout=timeout_s) as r:
            return (prefix or "/") in json.loads(r.read() or b"{}")
    except Exception:  # noqa: BLE001 - not reachable, not Serve
        return False


def serve_forever(job: JobSpec, *, name: str | None = None, route_prefix: str = "/",
                  stop: threading.Event | None = None, on_ready: Callable[[dict[str, Any]], None] | None = None,
                  log: Callable[[str], None] | None = print, **build_kwargs: Any) -> dict[str, Any]:
    """Start Ray (``services.raysession.ray_session``: the running one, else ``job.ray.address``, else a local
    one), run the teacher app with HTTP on ``teacher.serve.http.host:port`` (127.0.0.1 unless configured), print
    the URL and block until Ctrl-C (or until ``stop`` is set), then delete the app and its registry and shut down
    what this call started (Serve and Ray, when it started them).

    ``on_ready`` gets ``{"url", "app", "handle"}`` once the app runs. Returns ``{"url", "app"}``.
    Note: Serve's HTTP host and port are fixed when Serve first starts on a cluster; on a cluster where Serve
    already runs with another address, a warning says so (the spec's address is printed)."""
    from ray import serve

    from services.raysession import ray_session
    from services.teacher.app import app_name_for, delete_teacher_app, run_teacher_app

    http = job.teacher.serve.http
    name = name or app_name_for(job)
    prefix = "/" + route_prefix.strip("/") if route_prefix.strip("/") else ""
    info: dict[str, Any] = {"app": name}
    with ray_session(job.ray, log=log) as started_ray:
        serve_was_running = bool(serve.status().proxies)
        serve.start(http_options={"host": http.host, "port": http.port})
        info["url"] = url = f"http://{http.host}:{http.port}{prefix}"
        try:
            handle = run_teacher_app(job, name=name, route_prefix=route_prefix, **build_kwargs)
            if serve_was_running and not _proxy_answers(http.host, http.port, prefix) and log:
                log(f"[{job.name}] warning: Serve was already running on this cluster and its HTTP proxy does not "
                    f"answer at {http.host}:{http.port} (the address it was started with applies)")
            if log:
                log(f"[{job.name}] teacher serving at {url}  (POST {url}/v1/infer, schema {url}/openapi.json); "
                    "Ctrl-C stops it")
            if on_ready:
                on_ready({**info, "handle": handle})
            waiter = stop or threading.Event()
            try:
                while not waiter.wait(0.5):
                    pass
            except KeyboardInterrupt:
                if log:
                    log(f"[{job.name}] stopping the teacher")
        finally:
            delete_teacher_app(name, job.ray.namespace)
            if started_ray and not serve_was_running:
                serve.shutdown()
    return info
