"""Jobs meet the cache: the manifest a job expects, the teacher computation that fills it, and the
feature source that trains a student from it (replaying each view's augmentation exactly)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from kdcore.cache.fingerprint import teacher_fingerprint
from kdcore.cache.handle import CacheHandle
from kdcore.cache.manifest import Manifest, make_manifest
from kdcore.cache.reader import CacheLoader
from kdcore.data.augment import n_params
from kdcore.data.rows import RowMapper
from kdcore.data.splits import DataSplit
from kdcore.errors import UserError
from kdcore.feed import Batch
from kdcore.spec.job import JobSpec
from kdcore.teacher import LOGITS, TeacherRunner


def job_manifest(job: JobSpec, split: DataSplit, runner: TeacherRunner) -> Manifest:
    """The manifest of the cache ``job`` needs: its teacher, training rows, tapped layers, views, augmentation."""
    arch = {"model": job.teacher.model.model_dump(mode="json"), "precision": job.teacher.precision}
    mapper = RowMapper(split, job.data)
    shapes = runner.shapes(torch.from_numpy(mapper.cache_rows(0, min(2, mapper.n_rows)).x))
    layers = {k: v for k, v in shapes.items() if k != LOGITS}
    return make_manifest(
        teacher=teacher_fingerprint(runner.model, arch),
        dataset=split.fingerprint(),
        n_samples=split.n_train, layers=layers, num_classes=int(shapes[LOGITS][0]),
        views=job.data.views, augmentation=job.data.augment.model_dump(mode="json"), aug_seed=job.data.augment.seed,
        aug_params=n_params(job.data.augment), spec=job.features.cache)


def compute_rows(job: JobSpec, split: DataSplit, runner: TeacherRunner) -> Callable[[int, int], dict[str, np.ndarray]]:
    """``compute_fn(row_start, row_stop)`` for the cache writer: augment each (sample, view), run the teacher."""
    mapper = RowMapper(split, job.data)

    def compute(row_start: int, row_stop: int) -> dict[str, np.ndarray]:
        got = mapper.cache_rows(row_start, row_stop)  # one contiguous read of the rows' inputs
        out = {k: v.numpy() for k, v in runner(torch.from_numpy(got.x)).items()}
        if got.params.shape[1]:
            out["aug"] = got.params
        return out

    return compute


def cached_teacher_shapes(job: JobSpec) -> dict[str, tuple[int, ...]]:
    """Per-sample teacher shapes, read from the cache's manifest (no teacher needed)."""
    m = CacheHandle.open(job.features.cache.uri, s3_endpoint=job.features.cache.s3_endpoint).manifest
    shapes = {k: tuple(v) for k, v in m.layers.items()}
    if m.num_classes is not None:
        shapes[LOGITS] = (m.num_classes,)
    return shapes


def _logits(batch: dict[str, Any], num_classes: int) -> torch.Tensor:
    if LOGITS in batch:
        return torch.from_numpy(np.asarray(batch[LOGITS], dtype=np.float32))
    # top-k logits: the rest get a very negative value (no probability mass at any temperature used in KD)
    idx = torch.from_numpy(np.asarray(batch["logits_topk_idx"], dtype=np.int64))
    val = torch.from_numpy(np.asarray(batch["logits_topk_val"], dtype=np.float32))
    out = torch.full((len(idx), num_classes), -1e4)
    return out.scatter_(1, idx, val)


class CachedFeatures:
    """Feature source for ``features.mode: cache``: chunk-aligned shuffled reads, one rank's share per epoch."""

    def __init__(self, job: JobSpec, split: DataSplit, expected: Manifest | None = None) -> None:
        self.job, self.split, self.expected = job, split, expected
        self.spec = job.features.cache
        self.handle = CacheHandle.open(self.spec.uri, expected, s3_endpoint=self.spec.s3_endpoint)
        self.handle.require_complete()
        m = self.manifest = self.handle.manifest
        if m.n_samples != split.n_train:
            raise UserError(f"cache at {self.spec.uri} holds {m.n_samples} samples but the job has {split.n_train} "
                            "training rows; rebuild it for this dataset/split")
        self._loaders: dict[tuple[int, int], CacheLoader] = {}

    @classmethod
    def open(cls, job: JobSpec, split: DataSplit, expected: dict | None = None) -> "CachedFeatures":
        return cls(job, split, Manifest.from_dict(expected) if expected else None)

    def _loader(self, rank: int, world: int) -> CacheLoader:
        key = (rank, world)
        if key not in self._loaders:
            self._loaders[key] = CacheLoader(self.handle, batch_size=self.job.data.batch_size, rank=rank,
                                             world_size=world, seed=self.job.train.seed,
                                             shuffle_window=self.spec.shuffle_window, prefetch=self.spec.prefetch,
                                             as_float32=True, drop_last=world > 1)
        return self._loaders[key]

    def steps_per_epoch(self, world: int = 1) -> int:
        return len(self._loader(0, world))

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        loader = self._loader(rank, world)
        loader.set_epoch(epoch)
        mapper = RowMapper(self.split, self.job.data)
        for b in loader:
            s = np.asarray(b["row"], dtype=np.int64) // self.manifest.views  # training-row index of each row
            x = mapper.inputs(s, params=np.asarray(b["aug"])).x  # replay exactly the view the teacher saw
            teacher = {k: torch.from_numpy(np.asarray(v)) for k, v in b["features"].items()}
            teacher[LOGITS] = _logits(b, self.manifest.num_classes or 0)
            yield Batch(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(self.split.y_train[s]),
                        labeled=torch.from_numpy(self.split.labeled[s]), idx=torch.from_numpy(s), teacher=teacher)
