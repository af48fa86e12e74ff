"""The teacher's HTTP app (FastAPI): routes, authentication, and the limits that keep a replica serving.

Routes: ``POST /v1/infer`` (``.npy`` body), ``POST /v1/features`` (JSON ids), ``GET /v1/info``, ``GET /healthz``
(no token); responses are Arrow IPC streams (``services.teacher.wire``); the schema is at ``/openapi.json``
(no ``/docs`` page: its assets would come from a public CDN).

Order of checks: the bearer token first (nothing, not even a query-parameter error, is told to an
unauthenticated caller), then the body limits of ``teacher.serve.http``:

* ``max_inflight_bodies``: bodies a replica holds at once (from the first byte read until the response);
  a request above it gets 503 with ``Retry-After`` without its body being read;
* ``body_read_timeout_s``: the whole body must arrive within it, else 408 (a client that declares 900 kB
  and sends 2 kB is cut off, and its slot is free again);
* ``max_body_mb``: 413, from ``Content-Length`` before reading or while reading.

Responses that leave a body unread close the connection (``Connection: close``). Inputs with NaN / inf (after
the cast to float32) get 400 naming the rows; non-finite teacher outputs get 422 naming the rows.

``HTTPRoutes`` is a mixin of the deployment class (``services.teacher.server.TeacherServer``, which calls
``init_http``); Serve builds each replica's app with its ``__serve_build_asgi_app__`` (``@serve.ingress()``
without an app), so the routes are plain closures over the replica: no class-based-view rewriting.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures at runtime

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from kdcore.errors import KDError, UserError
from services.teacher.core import NonFiniteOutputError, RequestError
from services.teacher.tokens import bearer_problem, resolve_token_sha256
from services.teacher.wire import ARROW_TYPE, NPY_TYPES, decode_npy, encode_arrow

log = logging.getLogger("kd.teacher")
RETRY_AFTER_S = 1

_APP = dict(
    title="kd teacher",
    version="1",
    description="Teacher features over HTTP. Request bodies: .npy arrays (POST /v1/infer) or JSON ids "
    "(POST /v1/features); responses: one Arrow IPC stream (columns feature:<layer>, logits, ids, views as "
    "FixedSizeList; shapes, mode, dtype and projector version in the kd.* schema metadata). bf16 features are "
    "uint16 bit patterns. Send `Authorization: Bearer <token>` when the server has a token.",
    docs_url=None, redoc_url=None,
)


class PayloadQuery(BaseModel):
    """What to send back (query parameters of /v1/infer; fields of the /v1/features body)."""

    mode: Literal["raw", "projected"] | None = Field(default=None, description="Payload (default: the job's).")
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(default=None, description="Feature dtype (default: the job's).")
    min_version: int | None = Field(default=None, description="Least projector version to use (projected mode).")


class FeaturesRequest(PayloadQuery):
    """Features of training rows of the job's split, computed by the server from its own copy of the data."""

    ids: list[int] = Field(description="Training-row indices (0 <= id < n_train).")
    views: list[int] | None = Field(default=None, description="Augmented view of each id (default 0).")


_ERRORS = {400: {"description": "inputs hold NaN or inf (rows named)"},
           401: {"description": "missing or wrong bearer token"},
           408: {"description": "the body did not arrive within body_read_timeout_s"},
           413: {"description": "body too large"}, 415: {"description": "unsupported content type"},
           422: {"description": "bad request (shape, dtype, batch size, ids), or the teacher produced NaN / inf"},
           503: {"description": "too many bodies in flight on this replica; retry after Retry-After seconds"}}
_ARROW_OK = {200: {"description": "features as an Arrow IPC stream", "content": {ARROW_TYPE: {}}}}
_QUERY = [{"name": name, "in": "query", "required": False, "schema": schema}
          for name, schema in (("mode", {"enum": ["raw", "projected"]}), ("dtype", {"enum": ["fp32", "fp16", "bf16"]}),
                               ("min_version", {"type": "integer"}))]
_NPY_BODY = {"parameters": _QUERY,
             "requestBody": {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                           for t in NPY_TYPES}}}
_JSON_BODY = {"requestBody": {"required": True,
                              "content": {"application/json": {"schema": FeaturesRequest.model_json_schema()}}}}


def _arrow(r: dict[str, Any]) -> Response:
    return Response(encode_arrow(r), media_type=ARROW_TYPE,
                    headers={"X-KD-Projector-Version": json.dumps(r["projector_version"])})


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])


def _error(e: Exception) -> JSONResponse:
    """Every failure of a request as a status code and a JSON body (``detail``, and ``rows`` when named)."""
    body: dict[str, Any] = {"detail": e.message if isinstance(e, KDError) else None}
    headers: dict[str, str] = {}
    if isinstance(e, NonFiniteOutputError):
        status = e.status
        body.update(error="non_finite_output", rows=e.rows)
    elif isinstance(e, RequestError):
        status = e.status
        if e.details.get("rows") is not None:
            body["rows"] = e.details["rows"]
    elif isinstance(e, UserError):
        status = 422
    else:
        log.exception("teacher request failed")
        text = e.message if isinstance(e, KDError) else f"{type(e).__name__}: {str(e)[:300]}"
        status, body["detail"] = 500, f"internal error: {text}"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status in (408, 413, 415, 503):  # the body was not read (in full): this connection cannot carry another
        headers["Connection"] = "close"
    return JSONResponse(body, status, headers=headers)


class HTTPRoutes:
    """The HTTP limits and checks, and the app hook; mixed into the deployment class next to ``TeacherReplica``."""

    def init_http(self, http, token_sha256: str | None) -> None:
        self.http = http
        self._token_sha = token_sha256 or resolve_token_sha256(http)
        self._max_body = int(http.max_body_mb * 1e6)
        self.http_stats = {"bodies_inflight": 0, "bodies_peak": 0, "timeouts_408": 0, "busy_503": 0}

    def http_info(self) -> dict[str, Any]:
        h = self.http
        return {"max_batch": h.max_batch, "max_body_mb": h.max_body_mb, "token": self._token_sha is not None,
                "body_read_timeout_s": h.body_read_timeout_s, "max_inflight_bodies": h.max_inflight_bodies,
                **self.http_stats}

    def _auth(self, request: Request) -> JSONResponse | None:
        problem = bearer_problem(request.headers.get("authorization", ""), self._token_sha)
        if problem is None:
            return None
        return JSONResponse({"detail": problem}, 401, headers={"WWW-Authenticate": "Bearer"})

    @contextlib.contextmanager
    def _body_slot(self):
        """Hold one of the replica's ``max_inflight_bodies`` body slots for the length of a request (503 if none)."""
        s = self.http_stats
        if s["bodies_inflight"] >= self.http.max_inflight_bodies:
            s["busy_503"] += 1
            raise RequestError(f"this replica holds {s['bodies_inflight']} request bodies already (the limit, "
                               "teacher.serve.http.max_inflight_bodies); retry after "
                               f"{RETRY_AFTER_S} s", status=503)
        s["bodies_inflight"] += 1
        s["bodies_peak"] = max(s["bodies_peak"], s["bodies_inflight"])
        try:
            yield
        finally:
            s["bodies_inflight"] -= 1

    async def _body(self, request: Request) -> bytes:
        limit, http = self._max_body, self.http
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"request body of {int(length)} bytes is over the {http.max_body_mb} MB limit "
                               "(teacher.serve.http.max_body_mb); send smaller batches", status=413)
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body is over the {http.max_body_mb} MB limit "
                                       "(teacher.serve.http.max_body_mb); send smaller batches", status=413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), http.body_read_timeout_s)
        except asyncio.TimeoutError:
            self.http_stats["timeouts_408"] += 1
            chunks.clear()
            declared = f" of the {length} declared" if length is not None else ""
            raise RequestError(f"the request body did not arrive within {http.body_read_timeout_s} s "
                               f"(teacher.serve.http.body_read_timeout_s): {size} bytes{declared} came; send the "
                               "whole body at once", status=408) from None
        return b"".join(chunks)

    def _check_batch(self, n: int) -> None:
        if n > self.http.max_batch:
            raise RequestError(f"batch of {n} is over the limit of {self.http.max_batch} per request "
                               "(teacher.serve.http.max_batch); split it")

    def __serve_build_asgi_app__(self) -> FastAPI:  # noqa: N807 - Serve's hook: the app, built in the replica
        return build_app(self)


def build_app(replica: "HTTPRoutes") -> FastAPI:
    """The FastAPI app of one replica: its routes call ``replica`` (built at replica start by Serve, through the
    deployment class's ``__serve_build_asgi_app__``)."""
    api = FastAPI(**_APP)

    @api.post("/v1/infer", responses={**_ARROW_OK, **_ERRORS}, openapi_extra=_NPY_BODY,
              summary="Teacher features of a batch of inputs (.npy body)")
    async def http_infer(request: Request) -> Response:
        denied = replica._auth(request)
        if denied is not None:
            return denied
        try:
            try:
                q = PayloadQuery.model_validate(dict(request.query_params))
            except ValidationError as e:
                raise RequestError("bad query parameters: " + _problems(e)) from None
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in NPY_TYPES:
                raise RequestError(f"content type {ctype or '(none)'!r} is not accepted; send a .npy body as "
                                   f"{NPY_TYPES[0]}", status=415)
            with replica._body_slot():
                body = await replica._body(request)
                try:
                    x = decode_npy(body)
                except ValueError as e:
                    raise RequestError(str(e)) from None
                del body
                if x.ndim == 0:
                    raise RequestError("the .npy array is a scalar; send shape (batch, ...)")
                replica._check_batch(len(x))
                return _arrow(await replica.infer(x, q.mode, q.dtype, q.min_version))
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code with a message
            return _error(e)

    @api.post("/v1/features", responses={**_ARROW_OK, **_ERRORS}, openapi_extra=_JSON_BODY,
              summary="Teacher features of training rows of the job's split (JSON ids)")
    async def http_features(request: Request) -> Response:
        denied = replica._auth(request)
        if denied is not None:
            return denied
        try:
            with replica._body_slot():
                body = await replica._body(request)
                try:
                    req = FeaturesRequest.model_validate_json(body)
                except ValidationError as e:
                    raise RequestError("bad JSON body: " + _problems(e)) from None
                del body
                replica._check_batch(len(req.ids))
                return _arrow(await replica.features(req.ids, req.views, req.mode, req.dtype, req.min_version))
        except Exception as e:  # noqa: BLE001
            return _error(e)

    @api.get("/v1/info", summary="Shapes, taps, limits and the projector version")
    async def http_info(request: Request) -> Response:
        denied = replica._auth(request)
        if denied is not None:
            return denied
        return JSONResponse(replica.info())

    @api.get("/healthz", summary="Liveness (no token needed)")
    async def http_health() -> dict:
        replica.check_health()
        return {"ok": True, "time": time.time()}

    return api
