"""The trainer's feature source for ``features.mode: stream``: an epoch streamed from the teacher deployment.

``StreamFeatures(job, split, app)`` implements kdcore.feed' FeatureSource protocol with the same rows,
views and student inputs as ``OnlineFeatures`` (``epoch_rows`` / ``epoch_views``, inputs through the row mapper); only
ids and view numbers travel to the server, features travel back.

Flow: an epoch's steps (training batches) are cut into chunks of ``chunk`` steps; each chunk is one streaming
call (``handle.options(stream=True).stream``) that yields one message per step, in order. Chunks are opened
ahead of the training step so that at most ``features.stream.prefetch`` batches are requested but not yet
consumed (the bound on memory and on work done ahead).

Failures: every message names its step and carries its ids. When a chunk's stream errors (a replica killed,
a connection lost) or ends early, the chunk is re-requested for its *missing* steps only; a step that arrives
twice is dropped, and a message whose ids are not the step's ids is an error. So a killed replica loses and
duplicates nothing; after ``max_retries`` failed attempts of one chunk the epoch fails with TeacherError.
User errors from the server (bad ids, wrong version) are raised at once, never retried.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from kdcore.data.rows import RowMapper
from kdcore.data.splits import DataSplit
from kdcore.errors import DataError, TeacherError, UserError
from kdcore.feed import Batch, epoch_rows, epoch_views, read_group
from kdcore.spec.job import JobSpec
from kdcore.teacher import LOGITS, prefixed
from services.teacher.core import NonFiniteOutputError, split_fingerprint
from services.teacher.wire import to_tensor

log = logging.getLogger("kd.teacher")


def stream_teacher_shapes(job: JobSpec, split: DataSplit) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of what a stream delivers: the tapped shapes (raw) or ``(projected_dim,)``
    (projected); logits keep their shape. What a trainer must size its heads for (several teachers: keyed
    ``"<teacher>/<layer>"``)."""
    from kdcore.loop import teacher_shapes_of

    shapes = teacher_shapes_of(job, split, None)
    if job.features.stream.payload == "projected":
        d_p = job.features.stream.projected_dim
        return {k: (v if k.rsplit("/", 1)[-1] == LOGITS else (d_p,)) for k, v in shapes.items()}
    return shapes


class _Chunk:
    """One streaming call for consecutive steps, re-opened for the missing steps when it fails."""

    def __init__(self, owner: "StreamFeatures", steps: list[int], rows: list[np.ndarray], views: np.ndarray):
        self.owner, self.steps, self.rows, self.views = owner, steps, rows, views
        self.received: dict[int, dict[str, Any]] = {}
        self.delivered: set[int] = set()
        self.attempts = 0
        self.gen = None
        self._open(steps)

    def _open(self, steps: list[int]) -> None:
        batches = [{"step": s, "ids": self.rows[s], "views": self.views[self.rows[s]]} for s in steps]
        o = self.owner
        self.gen = o.handle.options(stream=True).stream.remote(batches, mode=o.mode, dtype=o.dtype,
                                                                min_version=o.min_version)
        o.requests += 1

    def cancel(self) -> None:
        if self.gen is not None:
            try:
                self.gen.cancel()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def take(self, step: int) -> dict[str, Any]:
        """The message of ``step``, reading (and if need be re-requesting) until it is here."""
        o = self.owner
        while step not in self.received:
            try:
                msg = next(self.gen)
            except StopIteration:
                failure: BaseException = TeacherError(f"stream ended without steps {self._missing()}")
            except (UserError, NonFiniteOutputError):
                raise  # the request itself is wrong, or the teacher's answer to it is: retrying cannot help
            except Exception as e:  # noqa: BLE001 - replica died / unavailable / connection lost: retry
                failure = e
            else:
                s = int(msg["step"])
                if s not in self.steps or s in self.received or s in self.delivered:
                    o.duplicates += 1
                    continue
                if not np.array_equal(np.asarray(msg["ids"]), self.rows[s]):
                    raise TeacherError(f"step {s}: the server answered for other ids; is it serving another "
                                       "dataset or split?")
                self.received[s] = msg
                continue
            self.attempts += 1
            o.retries += 1
            missing = self._missing()
            if self.attempts > o.max_retries:
                raise TeacherError(f"teacher stream failed {self.attempts} times for steps {missing[:8]}: "
                                   f"{type(failure).__name__}: {str(failure).splitlines()[0][:300]}") from failure
            log.warning("teacher stream failed (%s: %s); re-requesting %d step(s) (attempt %d)",
                        type(failure).__name__, str(failure).splitlines()[0][:200], len(missing), self.attempts)
            self.cancel()
            time.sleep(min(o.retry_wait_s * 2 ** (self.attempts - 1), 5.0))
            self._open(missing)
        self.delivered.add(step)
        return self.received.pop(step)

    def _missing(self) -> list[int]:
        return [s for s in self.steps if s not in self.received and s not in self.delivered]


class StreamFeatures:
    """FeatureSource streaming teacher features for an epoch's ids from the teacher deployment ``app``
    (an app name or a DeploymentHandle). ``chunk`` (steps per streaming call) defaults to half the
    prefetch window. Counters: ``requests``, ``retries``, ``duplicates``, ``batches``, ``replicas`` (ids of the
    replicas that answered), ``last_replica``."""

    def __init__(self, job: JobSpec, split: DataSplit, app: Any, *, chunk: int | None = None,
                 max_retries: int = 8, retry_wait_s: float = 0.2, min_version: int | None = None,
                 check: bool = True, student_inputs: bool = True) -> None:
        from services.teacher.app import get_handle

        self.job, self.split, self.data = job, split, job.data
        self.handle = get_handle(app)
        spec = job.features.stream
        self.mode, self.dtype = spec.payload, spec.dtype
        self.prefetch = spec.prefetch
        self.chunk = max(1, min(chunk or max(1, spec.prefetch // 2), spec.prefetch))
        self.batch_size, self.seed = job.data.batch_size, job.train.seed
        self.max_retries, self.retry_wait_s = max_retries, retry_wait_s
        self.min_version = min_version
        self.requests = self.retries = self.duplicates = self.batches = 0
        self.replicas: set[str] = set()
        self.last_replica: str | None = None
        self.versions: set[Any] = set()
        self._check = check
        self.student_inputs = student_inputs  # False: batches carry no inputs (another stream reads them)
        self._open: list[_Chunk] = []

    def _check_server(self) -> None:
        info = self.handle.info.remote().result(timeout_s=120)
        mine = split_fingerprint(self.split)
        if info["n_train"] != self.split.n_train or info["split_fingerprint"] != mine:
            raise DataError(f"the teacher deployment serves another training split ({info['n_train']} rows, "
                            f"fingerprint {info['split_fingerprint']}) than this job ({self.split.n_train} rows, "
                            f"{mine}); ids would name different samples. Serve this job's spec.")
        if self.mode == "projected" and info["projected_dim"] != self.job.features.stream.projected_dim:
            raise DataError(f"the teacher projects to {info['projected_dim']} dims; the job asks for "
                            f"{self.job.features.stream.projected_dim}")
        self._check = False

    def steps_per_epoch(self, world: int = 1) -> int:
        return -(-(self.split.n_train // world) // self.batch_size)

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        if self._check:
            self._check_server()
        rows = epoch_rows(self.split.n_train, self.seed, epoch, rank, world, self.data.window(), self.data.mix_windows)
        views = epoch_views(self.split.n_train, self.data.views, self.seed, epoch)
        steps = [rows[s:s + self.batch_size].astype(np.int64) for s in range(0, len(rows), self.batch_size)]
        group = read_group(self.split, self.data, self.batch_size)  # student inputs: read a group of windows once
        self._inputs = _GroupInputs(self, rows, views, group)
        chunks = deque(list(range(i, min(i + self.chunk, len(steps)))) for i in range(0, len(steps), self.chunk))
        opened: deque[_Chunk] = deque()
        ahead = 0  # batches requested but not yet handed to the trainer

        def fill() -> None:
            nonlocal ahead
            while chunks and (not opened or ahead + len(chunks[0]) <= self.prefetch):
                c = _Chunk(self, chunks.popleft(), steps, views)
                opened.append(c)
                self._open.append(c)
                ahead += len(c.steps)

        try:
            fill()
            while opened:
                c = opened[0]
                for s in c.steps:
                    msg = c.take(s)
                    ahead -= 1
                    fill()
                    yield self._batch(steps[s], s, msg)
                opened.popleft()
                self._open.remove(c)
        finally:
            for c in opened:
                c.cancel()
                if c in self._open:
                    self._open.remove(c)

    def _batch(self, r: np.ndarray, step: int, msg: dict[str, Any]) -> Batch:
        dtype = msg["dtype"]
        teacher = {k: to_tensor(a, dtype) for k, a in msg["features"].items()}
        teacher[LOGITS] = to_tensor(msg["logits"], dtype)
        self.batches += 1
        self.replicas.add(msg.get("replica"))
        self.last_replica = msg.get("replica")
        self.versions.add(msg.get("projector_version"))
        x = torch.from_numpy(self._inputs.batch(step * self.batch_size, len(r))) if self.student_inputs else None
        return Batch(x=x, y=torch.from_numpy(self.split.y_train[r]), labeled=torch.from_numpy(self.split.labeled[r]),
                     idx=torch.from_numpy(r), teacher=teacher)

    def close(self) -> None:
        for c in list(self._open):
            c.cancel()
        self._open.clear()


class TeacherStreams:
    """FeatureSource of a multi-teacher stream job: every teacher's deployment streams the same epoch (the same
    rows, views and steps: ``epoch_rows`` is seeded by the job), in lockstep; each batch holds their features
    merged under ``"<teacher>/<key>"``. The student inputs are read once, by the first stream."""

    def __init__(self, job: JobSpec, split: DataSplit, apps: dict[str, Any], **kwargs: Any) -> None:
        self.streams = {name: StreamFeatures(job.for_teacher(name), split, apps[name], student_inputs=k == 0, **kwargs)
                        for k, name in enumerate(job.teacher_names())}

    def steps_per_epoch(self, world: int = 1) -> int:
        return next(iter(self.streams.values())).steps_per_epoch(world)

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        names = list(self.streams)
        for batches in zip(*(s.epoch(epoch, rank, world) for s in self.streams.values()), strict=True):
            first = batches[0]
            teacher: dict[str, torch.Tensor] = {}
            for name, b in zip(names, batches):
                if not torch.equal(b.idx, first.idx):
                    raise TeacherError(f"the streams of teachers {names[0]!r} and {name!r} answered for different "
                                       "rows; do both deployments serve this job's split?")
                teacher.update(prefixed(name, b.teacher))
            yield Batch(x=first.x, y=first.y, labeled=first.labeled, idx=first.idx, teacher=teacher)

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


class _GroupInputs:
    """The student inputs of an epoch's rows, read ``group`` rows at a time (one read of a few contiguous
    windows), served to batches in order."""

    def __init__(self, source: "StreamFeatures", rows: np.ndarray, views: np.ndarray, group: int) -> None:
        self.mapper = RowMapper(source.split, source.data)
        self.rows, self.views, self.group = rows, views, group
        self._g, self._x = -1, None

    def batch(self, pos: int, n: int) -> np.ndarray:
        g = pos // self.group
        if g != self._g:
            grp = self.rows[g * self.group:(g + 1) * self.group]
            self._g, self._x = g, self.mapper.inputs(grp, self.views[grp]).x
        lo = pos - g * self.group
        return self._x[lo:lo + n]
