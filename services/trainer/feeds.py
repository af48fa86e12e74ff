"""Feature sources inside a training worker, by ``features.mode``: online, cache or stream."""

from __future__ import annotations

from typing import Any

from kdcore.data.splits import DataSplit
from kdcore.loop import build_teacher
from kdcore.feed import OnlineFeatures
from kdcore.spec.job import JobSpec


def make_feed(job: JobSpec, split: DataSplit, config: dict[str, Any]):
    mode = job.features.mode
    if mode == "online":
        return OnlineFeatures(split, job.data, build_teacher(job, device="cpu"), job.data.batch_size, job.train.seed)
    if mode == "cache":
        shard = _train_shard()
        if shard is not None:  # a Ray Train worker: its shard of the job's Ray Data pipeline
            from kdcore.cache.handle import CacheHandle
            from services.data.shard import ShardFeatures

            uri = job.teacher_cache_uri(job.teacher_names()[0])  # several teachers: their caches share the layout
            m = CacheHandle.open(uri, s3_endpoint=job.features.cache.s3_endpoint, read_only=True).manifest
            return ShardFeatures(job, split, shard, m.num_classes or 0)
        from kdcore.cache.jobs import CachedFeatures

        return CachedFeatures.open(job, split, config.get("cache_manifests" if job.multi_teacher else "cache_manifest"))
    if mode == "stream":
        from services.teacher.stream import StreamFeatures, TeacherStreams

        if job.multi_teacher:
            return TeacherStreams(job, split, config["teacher_apps"])
        return StreamFeatures(job, split, config["teacher_app"])
    raise ValueError(f"unknown features.mode {mode!r}")


def _train_shard():
    """This Ray Train worker's shard of the "train" dataset, or None outside a worker / without one."""
    try:
        import ray.train

        return ray.train.get_dataset_shard("train")
    except Exception:  # noqa: BLE001 - not in a Train worker, or no dataset was given
        return None


def teacher_shapes(job: JobSpec, split: DataSplit, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample teacher feature shapes: given by the driver, else probed from an in-process teacher."""
    if config.get("teacher_shapes"):
        return {k: tuple(v) for k, v in config["teacher_shapes"].items()}
    from kdcore.loop import teacher_shapes_of

    return teacher_shapes_of(job, split, None)
