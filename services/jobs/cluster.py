"""Moved to :mod:`services.raysession` (kept until every importer has moved)."""

from services.raysession import PROJECT_ROOT, TRAIN_ENV, init_kwargs, inside_ray_job, job_env_vars, ray_session

__all__ = ["PROJECT_ROOT", "TRAIN_ENV", "init_kwargs", "inside_ray_job", "job_env_vars", "ray_session"]
