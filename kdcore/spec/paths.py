"""Making a spec's local paths absolute, so they mean the same thing in every Ray worker."""

from __future__ import annotations

import os
from pathlib import Path

from kdcore.spec.job import JobSpec


def _abs(value: str | None, base: Path) -> str | None:
    if not value or "://" in value or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def resolve_paths(job: JobSpec, base: str | Path | None = None) -> JobSpec:
    """A copy of ``job`` whose relative local paths (checkpoints, data files, cache uris, output dir) are
    absolute, resolved from ``base`` (default: the current directory, where the job was launched)."""
    root = Path(base) if base else Path.cwd()
    data = job.model_dump(mode="json")
    for role in ("teacher", "student"):
        if data.get(role):
            data[role]["checkpoint"] = _abs(data[role].get("checkpoint"), root)
    for t in data.get("teachers") or []:
        t["checkpoint"] = _abs(t.get("checkpoint"), root)
        t["cache_uri"] = _abs(t.get("cache_uri"), root)
    src = data["data"]["source"]
    for key in ("path", "root"):
        if key in src:
            src[key] = _abs(src[key], root)
    data["features"]["cache"]["uri"] = _abs(data["features"]["cache"].get("uri"), root)
    data["output"]["dir"] = _abs(data["output"]["dir"], root)
    out = JobSpec.model_validate(data)
    out._view_of = job.view_of  # a per-teacher view stays one (kdcore.spec.job.JobSpec.for_teacher)
    return out
