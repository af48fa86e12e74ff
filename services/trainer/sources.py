"""Feature sources inside a training worker, by ``features.mode``: online, cache or stream."""

from __future__ import annotations

from typing import Any

from kdcore.data.splits import DataSplit
from kdcore.loop import build_teacher
from kdcore.sources import OnlineFeatures
from kdcore.spec.job import JobSpec


def make_source(job: JobSpec, split: DataSplit, config: dict[str, Any]):
    mode = job.features.mode
    if mode == "online":
        return OnlineFeatures(split, job.data, build_teacher(job, device="cpu"), job.data.batch_size, job.train.seed)
    if mode == "cache":
        from kdcore.cache.source import CachedFeatures

        return CachedFeatures.open(job, split, config.get("cache_manifest"))
    if mode == "stream":
        from services.teacher.stream import StreamFeatures

        return StreamFeatures(job, split, config["teacher_app"])
    raise ValueError(f"unknown features.mode {mode!r}")


def teacher_shapes(job: JobSpec, split: DataSplit, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample teacher feature shapes: given by the driver, else probed from an in-process teacher."""
    if config.get("teacher_shapes"):
        return {k: tuple(v) for k, v in config["teacher_shapes"].items()}
    from kdcore.loop import teacher_shapes_of

    return teacher_shapes_of(job, split, None)
