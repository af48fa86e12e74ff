"""The teacher deployment: one Serve replica = ``TeacherReplica`` (the handle API: a ``TeacherCore``, dynamic
batching, projector sync) + ``HTTPRoutes`` (the FastAPI ingress).

Where each job lives:

* ``services.teacher.replica``: the handle API (``infer``, ``features``, ``stream``, ``features_for_rows``,
  ``fill_cache_chunks``, ``set_projector``, ``refresh_projector``, ``projector``, ``info``);
* ``services.teacher.batching``: the ``@serve.batch`` queue, the forward thread, the NaN / inf checks;
* ``services.teacher.projector_sync``: a replica's side of the projector registry (poll / adopt / publish);
* ``services.teacher.ingress``: the HTTP routes, authentication and body limits;
* ``services.teacher.tokens``: bearer tokens; ``services.teacher.options``: the typed, frozen replica options and
  the batch limits (one place).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from services.teacher.ingress import HTTPRoutes
from services.teacher.options import ServerOptions
from services.teacher.replica import TeacherReplica
from services.teacher.tokens import resolve_token_sha256

__all__ = ["DEPLOYMENT_NAME", "TeacherServer", "resolve_token_sha256"]
DEPLOYMENT_NAME = "teacher"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # the app: HTTPRoutes.__serve_build_asgi_app__, built in each replica
class TeacherServer(HTTPRoutes, TeacherReplica):
    """A teacher replica with its HTTP ingress. Built by ``services.teacher.app.build_teacher_app``."""

    def __init__(self, job: dict, options: ServerOptions | dict) -> None:
        TeacherReplica.__init__(self, job, options)
        self.init_http(self.job.teacher.serve.http, self.options.token_sha256)

    def info(self) -> dict[str, Any]:
        return {**TeacherReplica.info(self), "http": self.http_info()}
