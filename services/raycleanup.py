"""Tearing down what a job left on a cluster: Serve apps and kd actors (bank actors) in a namespace."""

from __future__ import annotations

import ray


def kd_actors(namespace: str | None = None) -> list[dict]:
    """Live named actors called ``kd-*`` (in ``namespace`` when given). Needs no dashboard."""
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        name, ns = a["name"], a["namespace"]
        if name.startswith("kd-") and (namespace is None or ns == namespace):
            out.append({"name": name, "namespace": ns})
    return out


def cleanup_namespace(namespace: str, serve_apps: bool = True) -> None:
    """Kill kd actors of ``namespace`` and delete every Serve application (best effort, never raises)."""
    for a in kd_actors(namespace):
        try:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
        except Exception:  # noqa: BLE001 - already gone
            pass
    if serve_apps:
        try:
            from ray import serve

            for app in list(serve.status().applications):
                serve.delete(app)
        except Exception:  # noqa: BLE001 - Serve not running
            pass
