"""Jobs meet the cache: the manifest a job expects, the teacher computation that fills it, and the
feature source that trains a student from it (replaying each view's augmentation exactly).

A multi-teacher job has one cache per teacher, each built for its single-teacher view
(``job.for_teacher(name)``); :class:`CachedFeatures` reads the same chunk of every teacher's cache and
merges their rows into one batch, keyed ``"<teacher>/<layer>"`` and ``"<teacher>/logits"``.
"""

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
from kdcore.errors import CacheMismatchError, UserError
from kdcore.feed import Batch
from kdcore.spec.job import JobSpec
from kdcore.teacher import LOGITS, TeacherRunner, feature_key, prefixed


def job_manifest(job: JobSpec, split: DataSplit, runner: TeacherRunner) -> Manifest:
    """The manifest of the cache ``job`` needs: its teacher, training rows, tapped layers, views, augmentation.
    ``job`` has one teacher: a multi-teacher job's caches are each one teacher's (``job.for_teacher(name)``)."""
    if job.multi_teacher:
        raise ValueError("job_manifest takes one teacher's job: call it with job.for_teacher(name)")
    arch = {"model": job.teacher.model.model_dump(mode="json"), "precision": job.teacher.precision}
    mapper = RowMapper(split, job.data)
    shapes = runner.shapes(torch.from_numpy(mapper.cache_rows(0, min(2, mapper.n_rows)).x))
    layers = {k: v for k, v in shapes.items() if k != LOGITS}
    return make_manifest(
        teacher=teacher_fingerprint(runner.model, arch),
        dataset=split.fingerprint(),
        n_samples=split.n_train, layers=layers, num_classes=int(shapes[LOGITS][0]),
        views=job.data.views, augmentation=mapper.augmentation_record(), aug_seed=job.data.augment.seed,
        aug_params=n_params(job.data.augment), spec=job.features.cache, teacher_name=job.view_of)


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
    """Per-sample teacher shapes, read from the cache's manifest (no teacher needed); several teachers: from
    each one's cache, keyed ``"<teacher>/<layer>"``."""
    if job.multi_teacher:
        out: dict[str, tuple[int, ...]] = {}
        for name in job.teacher_names():
            out.update(prefixed(name, cached_teacher_shapes(job.for_teacher(name))))
        return out
    m = CacheHandle.open(job.features.cache.uri, s3_endpoint=job.features.cache.s3_endpoint).manifest
    return _manifest_shapes(m)


def _manifest_shapes(m: Manifest) -> dict[str, tuple[int, ...]]:
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


# manifest fields every teacher's cache of one job must share, so that chunk i holds the same rows everywhere
SHARED_FIELDS = (("dataset", "dataset fingerprint"), ("n_samples", "number of samples"), ("views", "views per sample"),
                 ("chunk_rows", "rows per chunk"), ("augmentation", "augmentation spec"), ("aug_seed", "augmentation seed"),
                 ("aug_params", "augmentation parameters per row"))


class CachedFeatures:
    """Feature source for ``features.mode: cache``: chunk-aligned shuffled reads, one rank's share per epoch.

    ``expected``: the manifest the cache must match (a single teacher), or ``{teacher: manifest}`` (several).
    With several teachers every teacher's cache is read in step (one loader each, the same epoch plan: the same
    chunks and rows in every batch, checked) and their features merged under ``"<teacher>/<key>"``."""

    def __init__(self, job: JobSpec, split: DataSplit, expected: Manifest | dict[str, Manifest] | None = None) -> None:
        self.job, self.split, self.expected = job, split, expected
        self.spec = job.features.cache
        self.names: list[str | None] = job.teacher_names() if job.multi_teacher else [None]
        self.handles: list[CacheHandle] = []
        for name in self.names:
            uri = job.teacher_cache_uri(name) if name is not None else self.spec.uri
            want = expected.get(name) if isinstance(expected, dict) else expected
            handle = CacheHandle.open(uri, want, s3_endpoint=self.spec.s3_endpoint)
            handle.require_complete()
            m = handle.manifest
            whose = f" (teacher {name!r})" if name is not None else ""
            if m.n_samples != split.n_train:
                raise UserError(f"cache at {uri}{whose} holds {m.n_samples} samples but the job has {split.n_train} "
                                "training rows; rebuild it for this dataset/split")
            self.handles.append(handle)
        self.handle = self.handles[0]
        m = self.manifest = self.handle.manifest
        for name, other in zip(self.names[1:], self.handles[1:]):
            check_shared(self.names[0], self.handle, name, other)
        self._loaders: dict[tuple[int, int], list[CacheLoader]] = {}

    @classmethod
    def open(cls, job: JobSpec, split: DataSplit, expected: dict | None = None) -> "CachedFeatures":
        """``expected``: a manifest dict (one teacher) or ``{teacher: manifest dict}`` (``job.multi_teacher``)."""
        if expected and job.multi_teacher:
            return cls(job, split, {k: Manifest.from_dict(v) for k, v in expected.items()})
        return cls(job, split, Manifest.from_dict(expected) if expected else None)

    def teacher_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample teacher shapes from the manifest(s), keyed as the batches' teacher features are."""
        out: dict[str, tuple[int, ...]] = {}
        for name, handle in zip(self.names, self.handles):
            shapes = _manifest_shapes(handle.manifest)
            out.update(shapes if name is None else prefixed(name, shapes))
        return out

    def _loader(self, rank: int, world: int) -> list[CacheLoader]:
        key = (rank, world)
        if key not in self._loaders:
            self._loaders[key] = [CacheLoader(h, batch_size=self.job.data.batch_size, rank=rank, world_size=world,
                                              seed=self.job.train.seed, shuffle_window=self.spec.shuffle_window,
                                              prefetch=self.spec.prefetch, as_float32=True, drop_last=world > 1)
                                  for h in self.handles]
        return self._loaders[key]

    def steps_per_epoch(self, world: int = 1) -> int:
        return len(self._loader(0, world)[0])

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        loaders = self._loader(rank, world)
        for loader in loaders:
            loader.set_epoch(epoch)
        mapper = RowMapper(self.split, self.job.data)
        for parts in _in_step(loaders, self.names):
            b = parts[0]
            s = np.asarray(b["row"], dtype=np.int64) // self.manifest.views  # training-row index of each row
            x = mapper.inputs(s, params=np.asarray(b["aug"])).x  # replay exactly the view the teacher saw
            teacher: dict[str, torch.Tensor] = {}
            for name, part, handle in zip(self.names, parts, self.handles):
                teacher.update({feature_key(name, k): torch.from_numpy(np.asarray(v)) for k, v in part["features"].items()})
                teacher[feature_key(name, LOGITS)] = _logits(part, handle.manifest.num_classes or 0)
            yield Batch(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(self.split.y_train[s]),
                        labeled=torch.from_numpy(self.split.labeled[s]), idx=torch.from_numpy(s), teacher=teacher)


def _in_step(loaders: list[CacheLoader], names: list[str | None]) -> Iterator[list[dict[str, Any]]]:
    """One batch of every loader at a time; they follow one epoch plan, so each batch holds the same rows."""
    its = [iter(loader) for loader in loaders]
    while True:
        parts = [next(it, None) for it in its]
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts) or any(not np.array_equal(p["row"], parts[0]["row"]) for p in parts[1:]):
            bad = next(n for n, p in zip(names, parts) if p is None or not np.array_equal(p["row"], parts[0]["row"]))
            raise CacheMismatchError(f"the caches of teachers {names[0]!r} and {bad!r} return different rows for one "
                                     "batch; rebuild them for this job (`kd cache build JOB.yaml`)", field="rows")
        yield parts


def check_shared(name_a: str | None, a: CacheHandle, name_b: str | None, b: CacheHandle) -> None:
    """Teacher caches of one job hold the same rows in the same chunks, or the job cannot read them together."""
    ma, mb = a.manifest, b.manifest
    for field, what in SHARED_FIELDS:
        va, vb = getattr(ma, field), getattr(mb, field)
        if va != vb:
            fix = ("rebuild one of them with the job's features.cache.chunk_rows (`kd cache rm URI`, then "
                   "`kd cache build JOB.yaml`)" if field == "chunk_rows" else
                   "rebuild the caches for this job (`kd cache rm URI`, then `kd cache build JOB.yaml`)")
            raise CacheMismatchError(
                f"the caches of teachers {name_a!r} ({a.uri}) and {name_b!r} ({b.uri}) do not hold the same rows: "
                f"{field} ({what}) {_short(va)} vs {_short(vb)}; a multi-teacher job reads the same chunk of every "
                f"teacher's cache. Fix: {fix}", field=field, expected=va, found=vb, uri=b.uri)
    if not np.array_equal(a.sample_ids(), b.sample_ids()):
        raise CacheMismatchError(f"the caches of teachers {name_a!r} ({a.uri}) and {name_b!r} ({b.uri}) hold other "
                                 "samples; rebuild them for this job", field="sample_ids", uri=b.uri)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
