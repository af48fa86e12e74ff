"""Supervised training of a job's teacher (``kd train-teacher``), for when there is no checkpoint yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.data.order import buffered_batches
from kdcore.feed import epoch_rows, read_group
from kdcore.loop import evaluate_split, load_split, make_optimizer, make_scheduler, run_dir, seed_everything
from kdcore.modeling import build_model, load_checkpoint, save_weights
from kdcore.progress import Progress
from kdcore.spec.job import JobSpec


def train_teacher_local(job: JobSpec, out_path: str | Path | None = None, epochs: int | None = None,
                        progress: bool = True, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Supervised training of the job's teacher on every labeled training row; saves safetensors weights.
    A multi-teacher job's teachers are trained one at a time on their views (``job.for_teacher(name)``)."""
    if job.multi_teacher:
        raise ValueError("train_teacher_local trains one teacher: pass job.for_teacher(name) (kd train-teacher "
                         "does, for each teacher)")
    split = load_split(job)
    seed_everything(job.train.seed)
    model = build_model(job.teacher.model)
    spec = job.train.model_copy(update={"epochs": epochs or job.train.epochs})
    opt = make_optimizer(spec, model.parameters())
    sched = make_scheduler(spec, opt)
    n, bs, d = split.n_train, job.data.batch_size, job.data
    history = []
    for e in range(spec.epochs):
        model.train()
        rows = epoch_rows(n, job.train.seed, e, 0, 1, d.window(), d.mix_windows)
        with Progress(n, f"[teacher] epoch {e + 1}/{spec.epochs}", enabled=progress) as bar:
            for r, got in buffered_batches(rows, bs, read_group(split, d, bs), lambda g: {"x": split.train_inputs(g)}):
                loss = F.cross_entropy(model(torch.from_numpy(got["x"])), torch.from_numpy(split.y_train[r]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(len(r), postfix=f"loss {loss.item():.4f}")
        sched.step()
        history.append({"epoch": e + 1, **evaluate_split(model, split, d.eval_batch_size)})
    path = Path(out_path or job.teacher.checkpoint or (run_dir(job) / "teacher.safetensors"))
    save_weights(model, path)
    if log:
        log(f"[teacher] val acc {history[-1]['val/acc']:.4f}; weights written to {path}")
    return {"history": history, "final": history[-1], "checkpoint": str(path)}


def reload_teacher(job: JobSpec, path: str | Path) -> nn.Module:
    return load_checkpoint(build_model(job.teacher.model), path)
