"""The job spec: one YAML file describing teacher, student, losses, data, features and training."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdcore.errors import Problem
from kdcore.spec.base import Spec, raise_problems
from kdcore.spec.data import DataSpec
from kdcore.spec.features import FeaturesSpec
from kdcore.losses.registry import get as loss_entry
from kdcore.losses.registry import pair_names
from kdcore.spec.losses import LossSpec
from kdcore.spec.roles import StudentSpec, TeacherSpec
from kdcore.spec.train import TrainSpec

JOB_NAME = r"^[a-z0-9]([a-z0-9\-_]{0,61}[a-z0-9])?$"


class RaySpec(Spec):
    """Which Ray cluster runs the job."""

    address: str | None = Field(
        default=None, description="Ray address (e.g. ray://head:10001 or 'auto'); none starts a local Ray in-process."
    )
    namespace: str = Field(default="kd", description="Ray namespace of the job's actors and Serve apps.")
    num_cpus: int | None = Field(default=None, gt=0, description="Logical CPUs of a local Ray (default: the machine's).")


class OutputSpec(Spec):
    """Where the run writes checkpoints, the exported student and the report."""

    dir: str = Field(default="runs", description="Root directory of runs; the run goes to <dir>/<name>.")


class JobSpec(Spec):
    """A distillation job: the teacher, the student and how the one teaches the other."""

    version: Literal[1] = Field(default=1, description="Spec format version.")
    name: str = Field(description="Job name: lowercase letters, digits, '-' or '_', at most 63 (names the run).")
    teacher: TeacherSpec = Field(description="The teacher model, its tapped layers and its deployment.")
    student: StudentSpec = Field(description="The student model and its layer pairs.")
    losses: list[LossSpec] = Field(min_length=1, description="Loss terms; the total is the weighted sum.")
    data: DataSpec = Field(description="The dataset.")
    features: FeaturesSpec = Field(default_factory=FeaturesSpec, description="Where teacher features come from.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Student training: optimiser, schedule, workers, checkpoints.")
    ray: RaySpec = Field(default_factory=RaySpec, description="The Ray cluster.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Outputs of the run.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(JOB_NAME, v):
            raise ValueError("job names use lowercase letters, digits, '-' and '_' (at most 63), starting and ending "
                             "with a letter or digit")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        raise_problems(cross_field_problems(self))
        return self

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobSpec":
        """Load and validate a YAML job spec; raises ``SpecError`` listing every problem."""
        from kdcore.spec.loading import load_model

        return load_model(cls, path)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "JobSpec":
        """Validate a dict; raises ``SpecError`` listing every problem."""
        from kdcore.spec.loading import validate_model

        return validate_model(cls, data, source=source)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)

    # -- conveniences ------------------------------------------------------------------------
    @property
    def pair_names(self) -> list[str]:
        return [p.name for p in self.student.pairs]

    def pair(self, name: str):
        for p in self.student.pairs:
            if p.name == name:
                return p
        raise KeyError(name)

    def loss_kinds(self) -> list[str]:
        return [loss.kind for loss in self.losses]


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"use one of {options}" if options else "define it first"


def cross_field_problems(job: JobSpec) -> list[Problem]:
    """Every check that spans more than one field, each as a Problem with its path and fix."""
    out: list[Problem] = []
    pairs = job.student.pairs
    names = [p.name for p in pairs]
    taps = list(job.teacher.taps)

    for i, p in enumerate(pairs):
        if names.count(p.name) > 1 and names.index(p.name) != i:
            out.append(Problem(f"student.pairs.{i}.name", "duplicate pair name", p.name, "give every pair its own name"))
        if p.teacher not in taps:
            hint = f"add {p.teacher!r} to teacher.taps"
            close = difflib.get_close_matches(p.teacher, taps, n=1)
            if close:
                hint += f", or did you mean {close[0]!r}?"
            out.append(Problem(f"student.pairs.{i}.teacher", "teacher layer is not tapped", p.teacher, hint))

    if all(loss.weight == 0 for loss in job.losses):
        out.append(Problem("losses", "every loss weight is 0, nothing would be trained", None, "give one term weight > 0"))

    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    projected = job.features.mode == "stream" and job.features.stream.payload == "projected"
    for i, loss in enumerate(job.losses):
        refs = pair_names(loss)
        key = (loss.kind, tuple(refs))
        if key in seen:
            out.append(Problem(f"losses.{i}", f"duplicate {loss.kind} term (same as losses.{seen[key]})", None,
                               "merge them into one term with the summed weight"))
        seen.setdefault(key, i)
        field = "pairs" if getattr(loss, "pairs", None) else "pair"
        for j, pair in enumerate(refs):
            if pair not in names:
                where = f"losses.{i}.pairs.{j}" if field == "pairs" else f"losses.{i}.pair"
                out.append(Problem(where, "no student pair has this name", pair,
                                   _closest(pair, names) if names else "add a pair under student.pairs"))
        if field == "pairs" and len(set(refs)) != len(refs):
            out.append(Problem(f"losses.{i}.pairs", "a pair is named twice", refs, "name each pair once"))
        reason = loss_entry(loss.kind).raw_reason
        if projected and reason:
            out.append(Problem(f"losses.{i}.kind", f"{loss.kind} cannot use projected stream features "
                               f"({reason})", loss.kind,
                               "set features.stream.payload: raw, or use features.mode: cache"))

    n = job.data.source.known_size()
    if n is not None:
        n_train = n - int(round(n * job.data.val_fraction))
        for i, loss in enumerate(job.losses):
            if loss_entry(loss.kind).needs == "bank" and loss.params.nce_k >= n_train:
                out.append(Problem(f"losses.{i}.params.nce_k", f"must be smaller than the {n_train} training rows",
                                   loss.params.nce_k, f"use at most {n_train - 1}"))
        if job.data.labeled_rows is not None:
            bad = [r for r in job.data.labeled_rows if r >= n_train]
            if bad:
                out.append(Problem("data.labeled_rows", f"row indices beyond the {n_train} training rows", bad[:5],
                                   f"use indices in [0, {n_train})"))

    if job.features.mode == "cache" and not job.features.cache.uri:
        out.append(Problem("features.cache.uri", "cache mode needs a cache location", None,
                           "set features.cache.uri to a directory, s3://bucket/prefix or memory://name"))
    if job.data.views > 1 and job.data.augment.kind == "none":
        out.append(Problem("data.views", "several views of an un-augmented sample are identical", job.data.views,
                           "set data.augment.kind, or views: 1"))
    if job.features.mode == "stream" and job.features.stream.payload == "projected":
        for i, p in enumerate(pairs):
            if p.projector.sides == "student" and p.projector.out_dim not in (None, job.features.stream.projected_dim):
                out.append(Problem(f"student.pairs.{i}.projector.out_dim",
                                   "must equal features.stream.projected_dim for projected teacher features",
                                   p.projector.out_dim, f"set it to {job.features.stream.projected_dim} or remove it"))
    return out
