"""A replica's side of the projector registry: which projection it holds, and keeping it in step.

``ProjectorSync`` polls the registry (``services.teacher.registry``) in the background, adopts newer versions,
re-creates the registry and gives it back the version this replica holds if the registry was lost, and
publishes a trainer's weights. Every replica holds one; the handle API's ``set_projector`` /
``refresh_projector`` / ``projector`` and every request's ``min_version`` go through it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import numpy as np

from services.teacher.core import RequestError
from services.teacher.projection import Projection, check_weights, fixed_projection
from services.teacher.registry import get_or_create_registry

log = logging.getLogger("kd.teacher")


class ProjectorSync:
    """The projection a replica uses now (``current``), kept in step with the registry actor ``name``.

    ``initial`` builds the fixed version-0 projection when the registry is empty (the first replica's is stored;
    every other replica adopts that one, so all project with identical weights)."""

    def __init__(self, name: str, namespace: str, initial: Callable[[], Projection], *, poll_s: float = 1.0,
                 dims: dict[str, int], projected_dim: int, replica: str = "") -> None:
        import ray

        self.name, self.namespace, self.poll_s = name, namespace, float(poll_s)
        self.dims, self.projected_dim, self.replica = dims, projected_dim, replica
        self._registry = get_or_create_registry(name, namespace)
        self._initial = initial
        state = ray.get(self._registry.get.remote())
        self._current: Projection | None = None if state is None else Projection.from_wire(state)
        self._poller: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def current(self) -> Projection:
        """The projection held now. The fixed version 0 is made on first use, not at start-up: a PCA decodes and
        forwards ``pca_rows`` rows, which a replica that only serves raw features (a cache build) never needs."""
        if self._current is None:
            import ray

            state = ray.get(self._registry.get.remote())
            if state is None:
                state = ray.get(self._registry.initialize.remote(self._initial().to_wire()))
            self._current = Projection.from_wire(state)
        return self._current

    @current.setter
    def current(self, value: Projection) -> None:
        self._current = value

    @property
    def held(self) -> Projection | None:
        """The projection held now, or None while version 0 is not made yet (``current`` makes it)."""
        return self._current

    def adopt(self, state: dict[str, Any] | None) -> bool:
        """Hold ``state`` if it is newer than what this replica holds."""
        if state is not None and (self._current is None or int(state["version"]) > self._current.version):
            self.current = Projection.from_wire(state)
            log.info("replica %s adopted projector v%s (%s)", self.replica, self.current.version, self.current.kind)
            return True
        return False

    async def sync(self) -> None:
        """Adopt a newer registry version; re-create / re-publish if the registry lost what we hold."""
        try:
            version = await self._registry.version.remote()
        except Exception:  # noqa: BLE001 - the registry died: re-create it and give it our version back
            self._registry = get_or_create_registry(self.name, self.namespace)
            version = await self._registry.version.remote()
        if version is None or version < self.current.version:
            await self._registry.publish.remote(self.current.to_wire())
        elif version > self.current.version:
            self.adopt(await self._registry.get.remote())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception as e:  # noqa: BLE001 - keep serving with the version we hold
                log.warning("projector registry poll failed: %s", e)

    def start(self) -> None:
        """Start polling (on the replica's event loop: called from the first request)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
            self._lock = asyncio.Lock()

    async def for_request(self, min_version: int | None) -> Projection:
        """The projection for a request that needs at least ``min_version`` (409 if nobody published it)."""
        self.start()
        if min_version is not None and self.current.version < min_version:
            await self.refresh(min_version)
            if self.current.version < min_version:
                raise RequestError(f"projector version {min_version} is not published (newest: "
                                   f"{self.current.version})", status=409)
        return self.current

    async def publish(self, version: int, weights: dict) -> dict[str, Any]:
        """Publish trainer weights as ``version`` (> the current one) to the registry and adopt them here."""
        self.start()
        if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 1:
            raise RequestError(f"projector versions are integers >= 1 (0 is the fixed projection), got {version!r}")
        layers = check_weights(weights, self.dims, self.projected_dim)
        state = Projection(int(version), "published", layers).to_wire()
        result = await self._registry.publish.remote(state)
        if result.get("stale"):
            raise RequestError(f"projector version {version} is older than the published version "
                               f"{result['version']}; publish a larger version", status=409)
        if result["accepted"]:
            self.adopt(state)
        else:  # the same version again: a retried publish; make sure we hold it
            self.adopt(await self._registry.get.remote())
        return {"version": self.current.version, "accepted": bool(result["accepted"]), "replica": self.replica}

    async def refresh(self, min_version: int | None = None) -> int:
        """Adopt the registry's newest version now; returns the version this replica holds."""
        self.start()
        async with self._lock:
            if min_version is None or self.current.version < min_version:
                await self.sync()
        return self.current.version


def version0(core, kind: str, seed: int, pca_rows: int) -> Callable[[], Projection]:
    """The builder of a replica's fixed version-0 projection (a PCA fitted on ``pca_rows`` rows, or random)."""
    def build() -> Projection:
        sample = core.feature_sample(pca_rows, seed) if kind == "pca" else None
        return fixed_projection(kind, core.dims, core.projected_dim, seed, sample)
    return build
