"""The handle API of a teacher replica (numpy in, numpy out), without the HTTP routes.

``serve.get_app_handle(name)`` reaches these methods:

* ``infer(x, mode=None, dtype=None, min_version=None)`` -> response dict (see ``services.teacher.wire``)
* ``features(ids, views=None, mode=None, dtype=None, min_version=None)`` -> response dict (+ ids, views)
* ``stream(batches, mode=None, dtype=None, min_version=None)`` -> async generator (``handle.options(stream=True)``)
  of one response per ``{"step", "ids", "views"}`` in ``batches``, in order
* ``features_for_rows(start, stop, views=None, with_aug=True)`` -> ``{layer, "logits", "aug"}`` fp32 numpy for
  rows of the feature-cache layout (a cache writer's ``compute_fn``)
* ``write_chunk(uri, manifest, chunk, x=None, aug=None, writer=1, s3_endpoint=None)``: forward and write one
  whole cache chunk (inputs decoded elsewhere, or read here)
* ``set_projector(version, weights)``, ``refresh_projector(min_version=None)``, ``projector()``, ``info()``

Inputs holding NaN / inf (also after the cast to float32) are refused with ``RequestError`` (status 400);
outputs that are not finite raise ``NonFiniteOutputError`` (a TeacherError) naming the rows.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import numpy as np
from ray import serve

from kdcore.spec.job import JobSpec
from services.memtune import tune_for_models
from services.teacher.batching import Batcher
from services.teacher.core import RequestError, TeacherCore
from services.teacher.options import ServerOptions, batch_limits
from services.teacher.projector_sync import ProjectorSync, version0
from services.teacher.registry import registry_name

log = logging.getLogger("kd.teacher")


def rss_bytes() -> int:
    """This process's resident set size, read from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TeacherReplica:
    """One teacher replica: a ``TeacherCore``, its batch queue and its projector. The deployment class
    (``services.teacher.server.TeacherServer``) adds the HTTP routes."""

    def __init__(self, job: dict, options: ServerOptions | dict) -> None:
        import torch

        self.job = JobSpec.model_validate(job)
        self.options = options if isinstance(options, ServerOptions) else ServerOptions(**options)
        spec = self.job.teacher.serve
        self.limits = batch_limits(spec)
        threads = spec.torch_threads or max(1, int(spec.num_cpus))
        torch.set_num_threads(threads)
        tune_for_models()  # forwards reuse their activations' heap pages (services/memtune.py)
        device = "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.core = TeacherCore(self.job, device=device)
        self.batcher = Batcher(self.core, self.limits, threads)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        o = self.options
        self.projector_sync = ProjectorSync(registry_name(ctx.app_name, o.fingerprint), o.namespace,
                                            version0(self.core, o.projection, o.projection_seed, o.pca_rows),
                                            poll_s=o.poll_s, dims=self.core.dims,
                                            projected_dim=self.core.projected_dim, replica=self.replica)
        self._writers: dict[tuple, Any] = {}  # cache writers of write_chunk, by (uri, endpoint, manifest)
        self.rss_start = rss_bytes()
        held = self.projector_sync.held
        log.info("teacher replica %s ready: taps %s, projector %s", self.replica, self.core.taps,
                 f"v{held.version}" if held else "v0 made on the first projected request")

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()

    # -- projector versions -----------------------------------------------------------------------------
    async def set_projector(self, version: int, weights: dict) -> dict[str, Any]:
        """Publish trainer weights as ``version`` (> the current one) to the registry and adopt them here.
        Other replicas pick them up by broadcast (``app.publish_projector``), poll or ``min_version``."""
        return await self.projector_sync.publish(version, weights)

    async def refresh_projector(self, min_version: int | None = None) -> int:
        """Adopt the registry's newest version now; returns the version this replica holds."""
        return await self.projector_sync.refresh(min_version)

    def projector(self) -> dict[str, Any]:
        """The projection this replica uses now (version, kind and weights)."""
        return self.projector_sync.current.to_wire()

    # -- compute ----------------------------------------------------------------------------------------
    async def _projection(self, mode: str, min_version: int | None):
        """The projection a request uses: only projected requests need one (raw ones never make version 0)."""
        return await self.projector_sync.for_request(min_version) if mode == "projected" else None

    async def infer(self, x, mode: str | None = None, dtype: str | None = None,
                    min_version: int | None = None) -> dict[str, Any]:
        """Features of inputs ``x`` (batch, *input_shape)."""
        mode, dtype = self.core.check_mode(mode, dtype)
        x = self.core.check_inputs(x)
        projection = await self._projection(mode, min_version)
        return await self.batcher.compute(x=x, mode=mode, dtype=dtype, projection=projection)

    async def features(self, ids, views=None, mode: str | None = None, dtype: str | None = None,
                       min_version: int | None = None) -> dict[str, Any]:
        """Features of training rows ``ids`` (views: one per id, default 0), inputs built on the server."""
        mode, dtype = self.core.check_mode(mode, dtype)
        ids, views = self.core.check_ids(ids, views)
        projection = await self._projection(mode, min_version)
        r = await self.batcher.compute(ids=ids, views=views, mode=mode, dtype=dtype, projection=projection)
        r["ids"], r["views"] = ids, views
        return r

    async def stream(self, batches: list[dict], mode: str | None = None, dtype: str | None = None,
                     min_version: int | None = None, ahead: int = 4) -> AsyncIterator[dict[str, Any]]:
        """Yield one response per ``{"step", "ids", "views"}`` of ``batches``, in order; up to ``ahead``
        batches are computed ahead of the one being sent. Every response names its step and replica."""
        mode, dtype = self.core.check_mode(mode, dtype)
        checked = [(int(b["step"]), *self.core.check_ids(b["ids"], b.get("views"))) for b in batches]
        projection = await self._projection(mode, min_version)
        pending: list[tuple[int, np.ndarray, np.ndarray, asyncio.Future]] = []
        todo = iter(checked)
        try:
            while True:
                while len(pending) < max(1, ahead):
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    step, ids, views = nxt
                    pending.append((step, ids, views, asyncio.ensure_future(self.batcher.compute(
                        ids=ids, views=views, mode=mode, dtype=dtype, projection=projection))))
                if not pending:
                    return
                step, ids, views, fut = pending.pop(0)
                r = await fut
                r.update(step=step, ids=ids, views=views, replica=self.replica)
                yield r
        finally:
            for *_, fut in pending:
                fut.cancel()

    async def features_for_rows(self, start: int, stop: int, views: int | None = None,
                                with_aug: bool = True) -> dict[str, np.ndarray]:
        """fp32 ``{layer, "logits"(, "aug")}`` of feature-cache rows ``[start, stop)`` (row r = training row
        r // views, view r % views): the cache writer's ``compute_fn(start, stop)`` through this deployment.
        Raises ``NonFiniteOutputError`` naming the cache rows whose features are not finite."""
        ids, vs = self.core.rows_to_ids(int(start), int(stop), views)
        if len(ids) == 0:
            return {k: np.zeros((0, *s), np.float32) for k, s in self.core.shapes.items()}
        out = await self.batcher.compute(ids=ids, views=vs, rows_are="cache rows", row0=int(start))
        if with_aug:
            out.update(self.core.aug_for(ids, vs))
        return out

    async def write_chunk(self, uri: str, manifest: dict, chunk: int, x=None, aug=None, writer: int = 1,
                          s3_endpoint: str | None = None) -> dict[str, Any]:
        """Forward one whole cache chunk and write it (arrays, then its done marker). ``x``: the chunk's inputs,
        (rows, *input_shape) float32 or the views' uint8 pixels, as Ray Data tasks decoded and augmented them
        (``services.data.cache_feed``),
        with ``aug`` their augmentation parameters; ``x=None``: this replica reads them from its own split (data
        held in memory). The write runs in a thread, so other calls' forwards go on meanwhile. A chunk whose
        features are not finite raises before anything of it is written."""
        cache = self._cache_writer(uri, manifest, s3_endpoint)
        start, stop = cache.chunk_bounds(int(chunk))
        if x is None:
            got = self.core.mapper.cache_rows(start, stop)
            x, aug = got.x, got.params if manifest["aug_params"] > 0 else None
        if len(x) != stop - start:
            raise RequestError(f"chunk {chunk} has {stop - start} rows, got inputs for {len(x)}")
        x = self.core.mapper.to_model(x)  # pixels -> the normalised float32 inputs
        out = await self.batcher.compute(x=self.core.check_inputs(x), rows_are="cache rows", row0=start)
        if aug is not None:
            out["aug"] = np.asarray(aug, dtype=np.float32)
        await asyncio.to_thread(cache.write_chunk, int(chunk), out, writer=int(writer))
        return {"chunk": int(chunk), "rows": stop - start, "replica": self.replica}

    def _cache_writer(self, uri: str, manifest: dict, s3_endpoint: str | None):
        """The cache at ``uri`` opened for writing, once per (uri, manifest) in this replica."""
        import json

        from kdcore.cache.manifest import Manifest
        from kdcore.cache.writer import CacheWriter

        key = (uri, s3_endpoint, json.dumps(manifest, sort_keys=True))
        if key not in self._writers:
            self._writers.clear()  # one build at a time uses a replica
            self._writers[key] = CacheWriter.open(uri, Manifest.from_dict(manifest), s3_endpoint=s3_endpoint)
        return self._writers[key]

    # -- status -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        p = self.projector_sync.held  # not made here: version 0 is 0 of the job's fixed kind until first used
        return {**self.core.info(), "replica": self.replica, "projector_version": p.version if p else 0,
                "projector_kind": p.kind if p else self.options.projection, "projector_made": p is not None,
                "max_batch_size": self.limits.max_batch_size, **self.batcher.stats,
                "rss_bytes": rss_bytes(), "rss_start_bytes": self.rss_start}

    def check_health(self) -> None:
        if self.batcher.fatal:
            raise RuntimeError(self.batcher.fatal)
        if self.batcher.closed:
            raise RuntimeError("the forward thread pool is shut down")
