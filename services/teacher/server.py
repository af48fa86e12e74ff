"""The teacher deployment: one Serve replica = one ``TeacherCore`` + dynamic batching + an HTTP ingress.

Every compute request (inputs, ids, a stream, cache rows) is cut into pieces of at most ``max_batch_size``
rows that go through one ``@serve.batch`` queue whose size counts *rows* (``batch_size_fn``), so small
requests are merged into full forwards and big ones fill them alone. Forwards run on one dedicated thread
(the event loop stays free to receive, batch and send), one at a time (no thread oversubscription); two batches
may be formed at once, so the next one is queued on that thread while one computes and the thread never idles
between batches (measured on CPU: forward-busy 0.90 -> 0.97 of wall time for 256-row requests). Projections and
casts to fp16/bf16 (done by torch: numpy's float16 cast is ~20x slower) run on that thread too.

Handle API (``serve.get_app_handle(name)``; numpy in, numpy out):

* ``infer(x, mode=None, dtype=None, min_version=None)`` -> response dict (see ``services.teacher.wire``)
* ``features(ids, views=None, mode=None, dtype=None, min_version=None)`` -> response dict (+ ids, views)
* ``stream(batches, mode=None, dtype=None, min_version=None)`` -> async generator (``handle.options(stream=True)``)
  of one response per ``{"step", "ids", "views"}`` in ``batches``, in order
* ``features_for_rows(start, stop, views=None, with_aug=True)`` -> ``{layer, "logits", "aug"}`` fp32 numpy for
  rows of the feature-cache layout (a cache writer's ``compute_fn``)
* ``set_projector(version, weights)``, ``refresh_projector(min_version=None)``, ``projector()``, ``info()``

HTTP (FastAPI, schema at ``/openapi.json``, docs at ``/docs``): ``POST /v1/infer`` (``.npy`` body),
``POST /v1/features`` (JSON ids), ``GET /v1/info``, ``GET /healthz``; responses are Arrow IPC streams.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures of this class at runtime

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from kdcore.errors import KDError, UserError
from kdcore.spec.job import JobSpec
from services.teacher.core import RequestError, TeacherCore
from services.teacher.projection import Projection, check_weights, fixed_projection
from services.teacher.registry import get_or_create_registry, registry_name
from services.teacher.wire import ARROW_TYPE, NPY_TYPES, decode_npy, encode_arrow

log = logging.getLogger("kd.teacher")
DEPLOYMENT_NAME = "teacher"


# -- auth ---------------------------------------------------------------------------------------------------
def resolve_token_sha256(http) -> str | None:
    """sha256 (hex) of the bearer token an HTTPSpec asks for, or None when it asks for none.

    Only the hash travels to replicas (never the token). A configured token that cannot be read is an error:
    the server must not start open."""
    if not (http.token_file or http.token_env):
        return None
    token = None
    if http.token_file:
        p = Path(http.token_file)
        if not p.is_file():
            raise UserError(f"teacher.serve.http.token_file: {p} does not exist; write the bearer token there or "
                            "remove token_file")
        token = p.read_text().strip()
    elif http.token_env:
        token = (os.environ.get(http.token_env) or "").strip()
        if not token:
            raise UserError(f"teacher.serve.http.token_env: environment variable {http.token_env} is not set (or "
                            "empty); set it to the bearer token, or remove token_env")
    if not token:
        raise UserError(f"teacher.serve.http.token_file: {http.token_file} is empty")
    return hashlib.sha256(token.encode()).hexdigest()


# -- HTTP schema --------------------------------------------------------------------------------------------
api = FastAPI(
    title="kd teacher",
    version="1",
    description="Teacher features over HTTP. Request bodies: .npy arrays (POST /v1/infer) or JSON ids "
    "(POST /v1/features); responses: one Arrow IPC stream (columns feature:<layer>, logits, ids, views as "
    "FixedSizeList; shapes, mode, dtype and projector version in the kd.* schema metadata). bf16 features are "
    "uint16 bit patterns. Send `Authorization: Bearer <token>` when the server has a token.",
)


class FeaturesRequest(BaseModel):
    """Features of training rows of the job's split, computed by the server from its own copy of the data."""

    ids: list[int] = Field(description="Training-row indices (0 <= id < n_train).")
    views: list[int] | None = Field(default=None, description="Augmented view of each id (default 0).")
    mode: Literal["raw", "projected"] | None = Field(default=None, description="Payload (default: the job's).")
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(default=None, description="Feature dtype (default: the job's).")
    min_version: int | None = Field(default=None, description="Least projector version to use (projected mode).")


_ERRORS = {401: {"description": "missing or wrong bearer token"}, 413: {"description": "body too large"},
           415: {"description": "unsupported content type"},
           422: {"description": "bad request: shape, dtype, batch size, ids"}}
_ARROW_OK = {200: {"description": "features as an Arrow IPC stream", "content": {ARROW_TYPE: {}}}}
_NPY_BODY = {"requestBody": {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                           for t in NPY_TYPES}}}
_JSON_BODY = {"requestBody": {"required": True,
                              "content": {"application/json": {"schema": FeaturesRequest.model_json_schema()}}}}


class _Item:
    """One piece of batched work: inputs, or training rows (+ views), with how to encode the result."""

    __slots__ = ("x", "ids", "views", "mode", "dtype", "projection", "n")

    def __init__(self, x, ids, views, mode, dtype, projection):
        self.x, self.ids, self.views = x, ids, views
        self.mode, self.dtype, self.projection = mode, dtype, projection
        self.n = len(x) if x is not None else len(ids)


def _rows_in(items: list) -> int:
    return sum(item.n for item in items)


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    out = dict(parts[0])
    out["features"] = {k: np.concatenate([p["features"][k] for p in parts]) for k in parts[0]["features"]}
    out["logits"] = np.concatenate([p["logits"] for p in parts])
    return out


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class TeacherServer:
    """A teacher replica. Built by ``services.teacher.app.build_teacher_app``; see the module docstring."""

    def __init__(self, job: dict, options: dict) -> None:
        import torch

        self.job = JobSpec.model_validate(job)
        spec = self.job.teacher.serve
        self.max_batch = spec.max_batch_size
        threads = spec.torch_threads or max(1, int(spec.num_cpus))
        torch.set_num_threads(threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kd-forward", initializer=torch.set_num_threads,
                                        initargs=(threads,))
        device = "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.core = TeacherCore(self.job, device=device)
        self._batch.set_max_batch_size(spec.max_batch_size)
        self._batch.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.http = spec.http
        self._token_sha = options.get("token_sha256") or resolve_token_sha256(self.http)
        self._max_body = int(self.http.max_body_mb * 1e6)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self._opts = options
        self._poll_s = float(options.get("poll_s", 1.0))
        self._registry_name = registry_name(ctx.app_name, options["fingerprint"])
        self._registry_ns = options["namespace"]
        self._registry = get_or_create_registry(self._registry_name, self._registry_ns)
        self._projection = self._initial_projection()
        self._poller: asyncio.Task | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._fatal: str | None = None
        self.stats = {"forward_s": 0.0, "batches": 0, "batch_rows": 0}
        log.info("teacher replica %s ready: taps %s, projector v%s", self.replica, self.core.taps,
                 self._projection.version)

    # -- projection versions ----------------------------------------------------------------------------
    def _initial_projection(self) -> Projection:
        import ray

        state = ray.get(self._registry.get.remote())
        if state is None:
            o = self._opts
            kind, seed = o.get("projection", "pca"), int(o.get("projection_seed", 0))
            sample = self.core.feature_sample(int(o.get("pca_rows", 2048)), seed) if kind == "pca" else None
            fixed = fixed_projection(kind, self.core.dims, self.core.projected_dim, seed, sample)
            state = ray.get(self._registry.initialize.remote(fixed.to_wire()))
        return Projection.from_wire(state)

    def _adopt(self, state: dict[str, Any] | None) -> bool:
        if state is not None and int(state["version"]) > self._projection.version:
            self._projection = Projection.from_wire(state)
            log.info("replica %s adopted projector v%s (%s)", self.replica, self._projection.version,
                     self._projection.kind)
            return True
        return False

    async def _sync_registry(self) -> None:
        """Adopt a newer registry version; re-create / re-publish if the registry lost what we hold."""
        try:
            version = await self._registry.version.remote()
        except Exception:  # noqa: BLE001 - the registry died: re-create it and give it our version back
            self._registry = get_or_create_registry(self._registry_name, self._registry_ns)
            version = await self._registry.version.remote()
        if version is None or version < self._projection.version:
            await self._registry.publish.remote(self._projection.to_wire())
        elif version > self._projection.version:
            self._adopt(await self._registry.get.remote())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._sync_registry()
            except Exception as e:  # noqa: BLE001 - keep serving with the version we hold
                log.warning("projector registry poll failed: %s", e)

    def _start_poller(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
            self._refresh_lock = asyncio.Lock()

    async def _projection_for(self, min_version: int | None) -> Projection:
        self._start_poller()
        if min_version is not None and self._projection.version < min_version:
            await self.refresh_projector(min_version)
            if self._projection.version < min_version:
                raise RequestError(f"projector version {min_version} is not published (newest: "
                                   f"{self._projection.version})", status=409)
        return self._projection

    async def set_projector(self, version: int, weights: dict) -> dict[str, Any]:
        """Publish trainer weights as ``version`` (> the current one) to the registry and adopt them here.
        Other replicas pick them up by broadcast (``app.publish_projector``), poll or ``min_version``."""
        self._start_poller()
        if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 1:
            raise RequestError(f"projector versions are integers >= 1 (0 is the fixed projection), got {version!r}")
        layers = check_weights(weights, self.core.dims, self.core.projected_dim)
        state = Projection(int(version), "published", layers).to_wire()
        result = await self._registry.publish.remote(state)
        if result.get("stale"):
            raise RequestError(f"projector version {version} is older than the published version "
                               f"{result['version']}; publish a larger version", status=409)
        if result["accepted"]:
            self._adopt(state)
        else:  # the same version again: a retried publish; make sure we hold it
            self._adopt(await self._registry.get.remote())
        return {"version": self._projection.version, "accepted": bool(result["accepted"]), "replica": self.replica}

    async def refresh_projector(self, min_version: int | None = None) -> int:
        """Adopt the registry's newest version now; returns the version this replica holds."""
        self._start_poller()
        async with self._refresh_lock:
            if min_version is None or self._projection.version < min_version:
                await self._sync_registry()
        return self._projection.version

    def projector(self) -> dict[str, Any]:
        """The projection this replica uses now (version, kind and weights)."""
        return self._projection.to_wire()

    # -- batched compute --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_rows_in, max_concurrent_batches=2)
    async def _batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run_batch, items)

    def _run_batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        """On the forward thread: gather inputs, one forward, split and encode per item."""
        core = self.core
        xs = [it.x if it.x is not None else core.inputs_for(it.ids, it.views) for it in items]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        t0 = time.perf_counter()
        try:
            out = core.forward(x)
        except RuntimeError as e:
            if "CUDA" in str(e) and "out of memory" not in str(e):
                self._fatal = f"CUDA error in the teacher forward: {str(e)[:200]}"
            raise
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["batches"] += 1
        self.stats["batch_rows"] += len(x)
        results, start = [], 0
        for it in items:
            part = {k: v[start:start + it.n] for k, v in out.items()}
            start += it.n
            if it.mode is None:  # cache rows: fp32 numpy, no encoding
                results.append(part)
            else:
                results.append(core.encode(part, it.mode, it.dtype, it.projection))
        return results

    async def _compute(self, x=None, ids=None, views=None, mode=None, dtype=None, projection=None) -> dict:
        n = len(x) if x is not None else len(ids)
        if n == 0:
            raise RequestError("empty request: send at least one row")
        step = self.max_batch
        pieces = [_Item(None if x is None else x[s:s + step], None if ids is None else ids[s:s + step],
                        None if views is None else views[s:s + step], mode, dtype, projection)
                  for s in range(0, n, step)]
        parts = await asyncio.gather(*(self._batch(p) for p in pieces))
        if mode is None:
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _merge(list(parts))

    async def infer(self, x, mode: str | None = None, dtype: str | None = None,
                    min_version: int | None = None) -> dict[str, Any]:
        """Features of inputs ``x`` (batch, *input_shape)."""
        mode, dtype = self.core.check_mode(mode, dtype)
        x = self.core.check_inputs(x)
        projection = await self._projection_for(min_version)
        return await self._compute(x=x, mode=mode, dtype=dtype, projection=projection)

    async def features(self, ids, views=None, mode: str | None = None, dtype: str | None = None,
                       min_version: int | None = None) -> dict[str, Any]:
        """Features of training rows ``ids`` (views: one per id, default 0), inputs built on the server."""
        mode, dtype = self.core.check_mode(mode, dtype)
        ids, views = self.core.check_ids(ids, views)
        projection = await self._projection_for(min_version)
        r = await self._compute(ids=ids, views=views, mode=mode, dtype=dtype, projection=projection)
        r["ids"], r["views"] = ids, views
        return r

    async def stream(self, batches: list[dict], mode: str | None = None, dtype: str | None = None,
                     min_version: int | None = None, ahead: int = 4) -> AsyncIterator[dict[str, Any]]:
        """Yield one response per ``{"step", "ids", "views"}`` of ``batches``, in order; up to ``ahead``
        batches are computed ahead of the one being sent. Every response names its step and replica."""
        mode, dtype = self.core.check_mode(mode, dtype)
        checked = [(int(b["step"]), *self.core.check_ids(b["ids"], b.get("views"))) for b in batches]
        projection = await self._projection_for(min_version)
        pending: list[tuple[int, np.ndarray, np.ndarray, asyncio.Future]] = []
        todo = iter(checked)
        try:
            while True:
                while len(pending) < max(1, ahead):
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    step, ids, views = nxt
                    pending.append((step, ids, views, asyncio.ensure_future(
                        self._compute(ids=ids, views=views, mode=mode, dtype=dtype, projection=projection))))
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
        r // views, view r % views): the cache writer's ``compute_fn(start, stop)`` through this deployment."""
        ids, vs = self.core.rows_to_ids(int(start), int(stop), views)
        if len(ids) == 0:
            return {k: np.zeros((0, *s), np.float32) for k, s in self.core.shapes.items()}
        out = await self._compute(ids=ids, views=vs)
        if with_aug:
            out.update(self.core.aug_for(ids, vs))
        return out

    async def fill_cache_chunks(self, uri: str, manifest: dict, chunks: list[int], writer: int,
                                s3_endpoint: str | None = None) -> dict[str, Any]:
        """Compute and write whole cache chunks (this replica owns them): each chunk's rows go through the
        batch queue, and a chunk is written (then marked done) while the next one computes."""
        import asyncio

        from kdcore.cache.manifest import Manifest
        from kdcore.cache.writer import CacheWriter

        cache = CacheWriter.open(uri, Manifest.from_dict(manifest), s3_endpoint=s3_endpoint, writer=writer)
        todo = cache.missing_chunks(chunks)
        cache.remove_partials(todo)
        pending = None
        rows = 0
        for i in todo:
            start, stop = cache.chunk_bounds(i)
            out = await self.features_for_rows(start, stop, manifest["views"], with_aug=manifest["aug_params"] > 0)
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(cache.write_chunk, i, out))
            rows += stop - start
        if pending is not None:
            await pending
        return {"chunks": len(todo), "rows": rows, "replica": self.replica}

    # -- status -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {**self.core.info(), "replica": self.replica, "projector_version": self._projection.version,
                "projector_kind": self._projection.kind, "max_batch_size": self.max_batch, **self.stats,
                "http": {"max_batch": self.http.max_batch, "max_body_mb": self.http.max_body_mb,
                         "token": self._token_sha is not None}}

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(self._fatal)
        if self._pool._shutdown:  # noqa: SLF001 - the forward thread is gone
            raise RuntimeError("the forward thread pool is shut down")

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        if self._token_sha is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return JSONResponse({"detail": "missing bearer token: send 'Authorization: Bearer <token>'"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), self._token_sha):
            return JSONResponse({"detail": "wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _body(self, request: Request) -> bytes:
        limit = self._max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"request body of {int(length)} bytes is over the {self.http.max_body_mb} MB limit "
                               "(teacher.serve.http.max_body_mb); send smaller batches", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body is over the {self.http.max_body_mb} MB limit "
                                   "(teacher.serve.http.max_body_mb); send smaller batches", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_batch(self, n: int) -> None:
        if n > self.http.max_batch:
            raise RequestError(f"batch of {n} is over the limit of {self.http.max_batch} per request "
                               "(teacher.serve.http.max_batch); split it")

    @staticmethod
    def _error(e: Exception) -> JSONResponse:
        if isinstance(e, RequestError):
            return JSONResponse({"detail": e.message}, e.status)
        if isinstance(e, UserError):
            return JSONResponse({"detail": e.message}, 422)
        log.exception("teacher request failed")
        text = e.message if isinstance(e, KDError) else f"{type(e).__name__}: {str(e)[:300]}"
        return JSONResponse({"detail": f"internal error: {text}"}, 500)

    @api.post("/v1/infer", responses={**_ARROW_OK, **_ERRORS}, openapi_extra=_NPY_BODY,
              summary="Teacher features of a batch of inputs (.npy body)")
    async def http_infer(self, request: Request, mode: Literal["raw", "projected"] | None = None,
                         dtype: Literal["fp32", "fp16", "bf16"] | None = None,
                         min_version: int | None = None) -> Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in NPY_TYPES:
                raise RequestError(f"content type {ctype or '(none)'!r} is not accepted; send a .npy body as "
                                   f"{NPY_TYPES[0]}", status=415)
            body = await self._body(request)
            try:
                x = decode_npy(body)
            except ValueError as e:
                raise RequestError(str(e)) from None
            if x.ndim == 0:
                raise RequestError("the .npy array is a scalar; send shape (batch, ...)")
            self._check_batch(len(x))
            r = await self.infer(x, mode, dtype, min_version)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code with a message
            return self._error(e)
        return Response(encode_arrow(r), media_type=ARROW_TYPE,
                        headers={"X-KD-Projector-Version": json.dumps(r["projector_version"])})

    @api.post("/v1/features", responses={**_ARROW_OK, **_ERRORS}, openapi_extra=_JSON_BODY,
              summary="Teacher features of training rows of the job's split (JSON ids)")
    async def http_features(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        try:
            body = await self._body(request)
            try:
                req = FeaturesRequest.model_validate_json(body)
            except ValidationError as e:
                raise RequestError("bad JSON body: " + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])) from None
            self._check_batch(len(req.ids))
            r = await self.features(req.ids, req.views, req.mode, req.dtype, req.min_version)
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return Response(encode_arrow(r), media_type=ARROW_TYPE,
                        headers={"X-KD-Projector-Version": json.dumps(r["projector_version"])})

    @api.get("/v1/info", summary="Shapes, taps, limits and the projector version")
    async def http_info(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        return JSONResponse(self.info())

    @api.get("/healthz", summary="Liveness (no token needed)")
    async def http_health(self) -> dict:
        self.check_health()
        return {"ok": True, "time": time.time()}
