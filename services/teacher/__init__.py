"""The teacher as a Ray Serve deployment: dynamic batching, id streams, projected payloads, an HTTP ingress.

Entry points: ``services.teacher.app`` (build / run / delete the app, publish projector versions),
``services.teacher.stream.StreamFeatures`` (the trainer's feature source), ``services.teacher.serve_cmd``
(``kd serve``), ``services.teacher.core.TeacherCore`` (the replica's work without Serve, e.g. for a cache
writer) and ``services.teacher.wire`` (dtypes and the HTTP body formats).

The deployment (``server.TeacherServer``) is put together from one module per job: ``replica`` (the handle
API), ``batching`` (the batch queue, forward thread and NaN / inf checks), ``projector_sync`` (the replica's side
of the projector ``registry``), ``ingress`` (the HTTP app, auth and body limits), ``tokens`` and ``options``
(typed, frozen replica options; the batch limits in one place).
"""
