"""The projector registry: one small named actor per teacher app holding the current projection version.

Why an actor: a Serve handle routes each call to *one* replica, so a trainer cannot reach every replica
through it, and replicas come and go (autoscaling, restarts). The registry is the single source of truth:

* the first replica to start computes the fixed projection (version 0) and stores it with
  ``initialize`` (atomic in the actor: later replicas get the stored one, so every replica projects
  with identical weights even when they run on different hardware);
* ``publish`` stores a trainer's weights as a new, strictly larger version;
* replicas learn about new versions three ways: ``set_projector`` adopts immediately on the replica that
  takes the call, ``services.teacher.app.publish_projector`` then broadcasts ``refresh_projector`` to every
  live replica, and each replica polls ``version()`` in the background (every ``poll_s``) to catch
  replicas that started during a publish. A request may also carry ``min_version`` (read-your-writes).
* if the registry dies (it is detached, ``num_cpus=0``), replicas re-create it and re-publish the version
  they hold, so the newest version any replica still has survives.

Every response of the deployment names the projector version it used.
"""

from __future__ import annotations

import re
from typing import Any

REGISTRY_PREFIX = "kd-projector-"


def registry_name(app_name: str, fp: str) -> str:
    return f"{REGISTRY_PREFIX}{app_name}-{fp}"


class ProjectorRegistry:
    """Holds ``{"version", "kind", "layers"}`` (see ``Projection.to_wire``) of the current projection."""

    def __init__(self) -> None:
        self._current: dict[str, Any] | None = None
        self.publishes = 0

    def version(self) -> int | None:
        return None if self._current is None else int(self._current["version"])

    def get(self) -> dict[str, Any] | None:
        return self._current

    def initialize(self, state: dict[str, Any]) -> dict[str, Any]:
        """Store ``state`` if the registry is empty; return whatever is current."""
        if self._current is None:
            self._current = state
        return self._current

    def publish(self, state: dict[str, Any]) -> dict[str, Any]:
        """Store ``state`` if its version is newer. The same version again is a no-op (a retried publish);
        an older one is refused. Returns ``{"accepted": bool, "version": current}``."""
        v, cur = int(state["version"]), self.version()
        if cur is not None and v < cur:
            return {"accepted": False, "version": cur, "stale": True}
        if cur is not None and v == cur:
            return {"accepted": False, "version": cur, "stale": False}
        self._current = state
        self.publishes += 1
        return {"accepted": True, "version": v, "stale": False}


def get_or_create_registry(name: str, namespace: str):
    """The named registry actor (created detached with ``num_cpus=0`` if it does not exist)."""
    import ray

    cls = ray.remote(ProjectorRegistry)
    return cls.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
                       max_restarts=0).remote()


def kill_registries(app_name: str, namespace: str | None = None) -> int:
    """Kill every registry of ``app_name`` (all fingerprints); returns how many were killed."""
    import ray

    killed = 0
    prefix = f"{REGISTRY_PREFIX}{app_name}-"
    for a in ray.util.list_named_actors(all_namespaces=True):
        rest = a["name"][len(prefix):] if a["name"].startswith(prefix) else ""
        if re.fullmatch(r"[0-9a-f]{12}", rest) and (namespace is None or a["namespace"] == namespace):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
                killed += 1
            except ValueError:  # already gone
                pass
    return killed
