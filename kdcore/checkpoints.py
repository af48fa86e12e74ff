"""Training checkpoints: the session (student, heads, optimiser, schedule, epoch, step, history) in one file.

Written atomically (``state.pt.tmp`` then renamed); read with ``weights_only=True``. The student alone comes
back out of one with :func:`student_from_checkpoint` (no heads, no bank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdcore.modeling import build_model
from kdcore.spec.job import JobSpec

if TYPE_CHECKING:
    from kdcore.loop import Session


def checkpoint_state(session: Session) -> dict[str, Any]:
    return {"distiller": session.distiller.state_dict(), "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(), "epoch": session.epoch, "step": session.step,
            "history": json.dumps(session.history)}


def restore_state(session: Session, state: dict[str, Any]) -> None:
    session.distiller.load_state_dict(state["distiller"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    session.epoch = int(state["epoch"])
    session.step = int(state.get("step", 0))
    session.history = json.loads(state["history"])
    # the schedule follows the *current* spec (e.g. more epochs than the interrupted run had)
    sched = session.scheduler
    for group, base, fn in zip(session.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)


def save_checkpoint(session: Session, directory: str | Path) -> Path:
    """Atomically write ``directory/state.pt`` (student, heads, optimiser, schedule, epoch, bank)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.pt.tmp"
    torch.save(checkpoint_state(session), tmp)
    tmp.replace(d / "state.pt")
    return d / "state.pt"


def load_checkpoint_file(session: Session, path: str | Path) -> None:
    restore_state(session, torch.load(path, map_location="cpu", weights_only=True))


def student_from_checkpoint(job: JobSpec, path: str | Path) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The student (no heads, no bank) and the metric history stored in a training checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    student = build_model(job.student.model)
    prefix = "student."
    student.load_state_dict({k[len(prefix):]: v for k, v in state["distiller"].items() if k.startswith(prefix)})
    return student, json.loads(state["history"])
