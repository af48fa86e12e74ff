"""Optimiser, schedule, checkpointing and resources of student training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdcore.spec.base import Spec


class OptimizerSpec(Spec):
    """The optimiser of the student and its projection heads."""

    kind: Literal["sgd", "adam", "adamw"] = Field(default="sgd", description="Optimiser.")
    lr: float = Field(default=0.05, gt=0, description="Base learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(default=5e-4, ge=0, description="Weight decay.")


class ScheduleSpec(Spec):
    """The learning-rate schedule (stepped per epoch)."""

    kind: Literal["constant", "cosine", "step"] = Field(default="cosine", description="Schedule shape.")
    warmup_epochs: int = Field(default=0, ge=0, description="Linear warm-up epochs.")
    step_epochs: list[int] = Field(default_factory=list, description="Epochs at which a step schedule multiplies lr by gamma.")
    gamma: float = Field(default=0.1, gt=0, description="Step schedule factor.")


class CheckpointSpec(Spec):
    """Checkpointing of the student, heads, optimiser, schedule, epoch and memory bank."""

    every_epochs: int = Field(default=1, ge=1, description="Checkpoint every N epochs.")
    keep: int = Field(default=2, ge=1, description="Checkpoints kept.")


class TrainSpec(Spec):
    """Student training."""

    epochs: int = Field(default=10, gt=0, description="Training epochs.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimiser.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    grad_clip: float | None = Field(default=None, gt=0, description="Clip the gradient norm to this value.")
    seed: int = Field(default=0, description="Seed of initialisation, shuffling and negatives.")
    num_workers: int = Field(default=2, ge=0, description="Ray Train workers (0: run in the driver, for debugging).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs per worker.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker.")
    torch_threads: int | None = Field(default=None, gt=0, description="torch threads per worker (default: cpus_per_worker).")
    max_failures: int = Field(default=0, ge=-1, description="Worker-group restarts before the job fails (-1: unlimited).")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    eval_every: int = Field(default=1, ge=1, description="Evaluate on the held-out split every N epochs.")
