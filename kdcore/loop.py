"""The plain single-process training loop (``kd train --local``), built from reusable steps.

The Ray trainer calls the same steps (``build_session``, ``train_epoch``, ``evaluate_split``, and
``kdcore.checkpoints``) inside each worker; this module runs them in one process, which is what you want to
debug a spec. Teacher training (``kd train-teacher``) is in ``kdcore.teacher_train``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcore.data.splits import DataSplit, make_split
from kdcore.checkpoints import load_checkpoint_file, save_checkpoint
from kdcore.distiller import Distiller, probe_shapes
from kdcore.errors import TrainingError
from kdcore.export import export_student
from kdcore.modeling import model_from_spec
from kdcore.progress import Progress
from kdcore.feed import Batch, OnlineFeatures
from kdcore.spec.job import JobSpec
from kdcore.spec.train import TrainSpec
from kdcore.teacher import TeacherRunner, TeacherSet


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def make_optimizer(spec: TrainSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    o = spec.optimizer
    params = [p for p in params if p.requires_grad]
    if o.kind == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.kind == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    s, epochs = spec.schedule, spec.epochs

    def factor(epoch: int) -> float:
        if s.warmup_epochs and epoch < s.warmup_epochs:
            return (epoch + 1) / (s.warmup_epochs + 1)
        if s.kind == "cosine":
            t = (epoch - s.warmup_epochs) / max(1, epochs - s.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if s.kind == "step":
            return s.gamma ** sum(epoch >= e for e in s.step_epochs)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Session:
    """Everything one training process holds."""

    job: JobSpec
    split: DataSplit
    student: nn.Module
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: Any
    teacher_shapes: dict[str, tuple[int, ...]]
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed (tags a remote bank's updates; restored with the checkpoint)
    history: list[dict[str, Any]] = field(default_factory=list)


def load_split(job: JobSpec) -> DataSplit:
    """The job's dataset as a split over a row reader (only metadata is loaded)."""
    return make_split(job.data)


def build_teacher(job: JobSpec, device: str | None = None) -> TeacherRunner | TeacherSet:
    """The job's teacher, ready to run. Without a checkpoint its weights are seeded from ``train.seed``.

    A multi-teacher job gets a :class:`TeacherSet` of every teacher, each built as its single-teacher view
    (``job.for_teacher(name)``) is, so online features equal the cached ones."""
    if job.multi_teacher:
        return TeacherSet({name: build_teacher(job.for_teacher(name), device) for name in job.teacher_names()})
    if not job.teacher.checkpoint:
        torch.manual_seed(job.train.seed)
    model = model_from_spec(job.teacher.model, job.teacher.checkpoint)
    return TeacherRunner(model, job.teacher.taps, job.teacher.precision, device=device)


def build_session(job: JobSpec, split: DataSplit, teacher_shapes: dict[str, tuple[int, ...]],
                  bank_factory: Callable | None = None) -> Session:
    """Seeded student, heads, optimiser and schedule for ``job``."""
    seed_everything(job.train.seed)
    student = model_from_spec(job.student.model, job.student.checkpoint)
    sample = torch.from_numpy(split.sample(2))
    student_shapes = probe_shapes(student, job.student.tapped_layers(), sample)
    distiller = Distiller(student, job.student.pairs, job.losses, student_shapes, teacher_shapes,
                          n_data=split.n_train, bank_factory=bank_factory, seed=job.train.seed,
                          teachers=job.teacher_weights() if job.multi_teacher else None)
    optimizer = make_optimizer(job.train, distiller.parameters())
    return Session(job, split, student, distiller, optimizer, make_scheduler(job.train, optimizer), teacher_shapes)


class NonFiniteLoss(TrainingError):
    """The loss became NaN/Inf: training stops before the step is applied, the last checkpoint is kept."""

    def __init__(self, epoch: int, step: int, total=None, parts=None, message: str | None = None) -> None:
        if message is None:
            bad = [k for k, v in (parts or {}).items() if not math.isfinite(float(v))]
            terms = ", ".join(f"{k}={float(parts[k])}" for k in bad) or f"total={float(total)}"
            message = (f"the loss is not finite at epoch {epoch + 1}, step {step} ({terms}); training stopped and "
                       "the last good checkpoint was kept. Check the inputs for NaN/Inf, lower the learning rate "
                       "or the loss weights, or set train.grad_clip")
        super().__init__(message)
        self.epoch, self.step = epoch, step

    def __reduce__(self):
        return (NonFiniteLoss, (self.epoch, self.step, None, None, self.message))


class StepHooks(Protocol):
    """What a distributed trainer adds around each step (e.g. a remote CRD bank: fetch ahead, push after)."""

    def before_step(self, batch: Batch, next_batch: Batch | None) -> dict | None:
        """CRD inputs for this step (``Distiller.forward``'s ``crd_inputs``); may start fetching the next."""

    def after_step(self, distiller: Distiller) -> None:
        """Called after the optimiser step, e.g. to send the step's bank updates."""


class _Timed:
    """Wraps a batch iterator, adding up the time spent waiting for batches (loading, or the teacher online)."""

    def __init__(self, it: Iterable[Batch]) -> None:
        self.it, self.seconds = iter(it), 0.0

    def __iter__(self) -> "_Timed":
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0


def _lookahead(it: Iterator[Batch]) -> Iterator[tuple[Batch, Batch | None]]:
    """(current, next) pairs; next is None at the end."""
    prev = next(it, None)
    for cur in it:
        yield prev, cur
        prev = cur
    if prev is not None:
        yield prev, None


def train_epoch(session: Session, batches: Iterable[Batch], progress: Progress | None = None,
                on_step: Callable[[int], None] | None = None, model: nn.Module | None = None,
                hooks: StepHooks | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean of each loss part and the total, and the epoch's time split
    into waiting for batches (``time/data_s``) and the student's own steps (``time/compute_s``).

    ``model`` is what is called (default the session's distiller; a trainer passes its DDP wrapper); with
    ``hooks`` the CRD bank lives elsewhere: its inputs come from ``hooks.before_step`` and its updates go out
    in ``hooks.after_step`` instead of being applied in place."""
    d, opt, clip = session.distiller, session.optimizer, session.job.train.grad_clip
    d.set_epoch(session.epoch)  # loss warm-ups (DKD, ReviewKD) follow the epoch
    model = model if model is not None else d
    model.train()
    sums: dict[str, float] = {}
    n_seen = 0
    timed = _Timed(batches)
    t_epoch = time.perf_counter()
    for step, (batch, nxt) in enumerate(_lookahead(timed)):
        crd_inputs = hooks.before_step(batch, nxt) if hooks is not None else None
        total, parts, _ = model(batch.x, batch.teacher, batch.y, batch.labeled, batch.idx,
                                crd_inputs=crd_inputs, update_bank=hooks is None)
        if not torch.isfinite(total):
            raise NonFiniteLoss(session.epoch, step, total, parts)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(d.parameters(), clip)
        opt.step()
        if hooks is not None:
            hooks.after_step(d)
        session.step += 1
        n = len(batch)
        n_seen += n
        sums["total"] = sums.get("total", 0.0) + total.item() * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        if progress is not None:
            progress.update(n, postfix=f"loss {total.item():.4f}")
        if on_step is not None:
            on_step(step)
    session.scheduler.step()
    session.epoch += 1
    out = {f"loss/{k}": v / max(n_seen, 1) for k, v in sums.items()}
    out["time/data_s"] = timed.seconds  # waiting for batches: the loader, the stream, or the teacher online
    out["time/compute_s"] = time.perf_counter() - t_epoch - timed.seconds  # the student's own steps
    return out


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches) -> dict[str, float]:
    """Top-1 and top-5 accuracy and cross-entropy of ``model`` over ``(x, y)`` numpy batches."""
    was = model.training
    model.eval()
    top1, top5, loss, n = 0, 0, 0.0, 0
    for xb, yb in batches:
        xb, yb = torch.from_numpy(np.ascontiguousarray(xb)), torch.from_numpy(np.asarray(yb))
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == yb).sum())
        top5 += int((best == yb[:, None]).any(dim=1).sum())
        n += len(yb)
    model.train(was)
    n = max(n, 1)
    return {"val/acc": top1 / n, "val/top5": top5 / n, "val/loss": loss / n}


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """:func:`evaluate_batches` over arrays (x, y)."""
    return evaluate_batches(model, ((x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(y), batch_size)))


def evaluate_split(model: nn.Module, split: DataSplit, batch_size: int = 256) -> dict[str, float]:
    """:func:`evaluate_batches` over the split's evaluation rows (``data.eval`` or the held-out rows), streamed."""
    return evaluate_batches(model, split.val_batches(batch_size))


# -- the local loop ----------------------------------------------------------------------------------
def run_dir(job: JobSpec) -> Path:
    return Path(job.output.dir) / job.name


def train_local(job: JobSpec, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
                source=None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train ``job``'s student in this process; returns the result (history, final metrics, paths)."""
    torch.set_num_threads(job.train.torch_threads or max(1, int(job.train.cpus_per_worker)))
    out = Path(out_dir) if out_dir else run_dir(job)
    split = load_split(job)
    teacher = None
    if source is None:
        teacher = build_teacher(job, device="cpu")
        source = OnlineFeatures(split, job.data, teacher, job.data.batch_size, job.train.seed)
    known = getattr(source, "teacher_shapes", None)  # a cache knows them from its manifest(s): no teacher built
    shapes = known() if teacher is None and known is not None else teacher_shapes_of(job, split, teacher)
    session = build_session(job, split, shapes)
    ckpt = out / "checkpoints" / "state.pt"
    if resume and ckpt.exists():
        load_checkpoint_file(session, ckpt)
        if log:
            log(f"[{job.name}] resumed from {ckpt} at epoch {session.epoch}")
    while session.epoch < job.train.epochs:
        e = session.epoch
        t0 = time.perf_counter()
        with Progress(split.n_train, f"[{job.name}] epoch {e + 1}/{job.train.epochs}", enabled=progress) as bar:
            metrics = train_epoch(session, source.epoch(e), progress=bar)
        metrics["epoch"] = e + 1
        metrics["time/epoch_s"] = time.perf_counter() - t0
        if (e + 1) % job.train.eval_every == 0 or e + 1 == job.train.epochs:
            metrics.update(evaluate_split(session.student, split, job.data.eval_batch_size))
        session.history.append(metrics)
        if (e + 1) % job.train.checkpoint.every_epochs == 0 or e + 1 == job.train.epochs:
            save_checkpoint(session, out / "checkpoints")
    final = session.history[-1] if session.history else {}
    export_dir = export_student(session.student, job.student, out / "student",
                                {"job": job.name, "val_acc": final.get("val/acc"),
                                 "normalize": {"mean": split.mean, "std": split.std}})
    (out / "metrics.json").write_text(json.dumps(session.history, indent=2))
    return {"history": session.history, "final": final, "out_dir": str(out), "student_dir": str(export_dir),
            "teacher_forwards": teacher.forwards if teacher else None}


def teacher_shapes_of(job: JobSpec, split: DataSplit,
                      teacher: TeacherRunner | TeacherSet | None) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the teacher's tapped layers and logits (several teachers: keyed
    ``"<teacher>/<layer>"``, ``"<teacher>/logits"``)."""
    if teacher is None:
        teacher = build_teacher(job, device="cpu")
    return teacher.shapes(torch.from_numpy(split.sample(2)))
