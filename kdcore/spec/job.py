"""The job spec: one YAML file describing teacher, student, losses, data, features and training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kdcore.spec.base import Spec, raise_problems
from kdcore.spec.data import DataSpec
from kdcore.spec.features import FeaturesSpec
from kdcore.losses.registry import get as loss_entry
from kdcore.losses.registry import pair_names
from kdcore.spec.losses import LossSpec
from kdcore.spec.roles import MEAN_TEACHER, SINGLE_TEACHER, NamedTeacherSpec, StudentSpec, TeacherSpec
from kdcore.spec.train import TrainSpec

JOB_NAME = r"^[a-z0-9]([a-z0-9\-_]{0,61}[a-z0-9])?$"


class RaySpec(Spec):
    """Which Ray cluster runs the job."""

    address: str | None = Field(
        default=None, description="Ray address (e.g. ray://head:10001 or 'auto'); none starts a local Ray in-process."
    )
    namespace: str = Field(default="kd", description="Ray namespace of the job's actors and Serve apps.")
    num_cpus: int | None = Field(default=None, gt=0, description="Logical CPUs of a local Ray (default: the machine's).")
    object_store_mb: int | None = Field(
        default=None, ge=80, description="Object store size of a local Ray in MB (default: Ray's, 30% of RAM). It "
        "bounds the shared memory Ray Data's blocks take; a cluster's nodes set their own (ray start "
        "--object-store-memory).")


class OutputSpec(Spec):
    """Where the run writes checkpoints, the exported student and the report."""

    dir: str = Field(default="runs", description="Root directory of runs; the run goes to <dir>/<name>.")


class JobSpec(Spec):
    """A distillation job: the teacher, the student and how the one teaches the other."""

    # JSON Schema: exactly one of teacher (one model) and teachers (several); the validator says so too
    model_config = ConfigDict(**Spec.model_config,
                              json_schema_extra={"oneOf": [{"required": ["teacher"]}, {"required": ["teachers"]}]})

    version: Literal[1] = Field(default=1, description="Spec format version.")
    name: str = Field(description="Job name: lowercase letters, digits, '-' or '_', at most 63 (names the run).")
    teacher: TeacherSpec | None = Field(
        default=None, description="The teacher model, its tapped layers and its deployment (or `teachers:` for "
        "several).")
    teachers: list[NamedTeacherSpec] | None = Field(
        default=None, min_length=1, description="Several named teachers instead of `teacher:`, each with its own taps, "
        "logit weight and deployment or cache; pairs and logit losses name the teacher they use (see "
        "docs/multi-teacher.md).")
    student: StudentSpec = Field(description="The student model and its layer pairs.")
    losses: list[LossSpec] = Field(min_length=1, description="Loss terms; the total is the weighted sum.")
    data: DataSpec = Field(description="The dataset.")
    features: FeaturesSpec = Field(default_factory=FeaturesSpec, description="Where teacher features come from.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Student training: optimiser, schedule, workers, checkpoints.")
    ray: RaySpec = Field(default_factory=RaySpec, description="The Ray cluster.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Outputs of the run.")

    # set on the single-teacher views of a multi-teacher job (``for_teacher``): the teacher's name
    _view_of: str | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(JOB_NAME, v):
            raise ValueError("job names use lowercase letters, digits, '-' and '_' (at most 63), starting and ending "
                             "with a letter or digit")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        from kdcore.spec.checks import cross_field_problems

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

    # -- teachers: every caller goes through these -------------------------------------------
    @property
    def multi_teacher(self) -> bool:
        """Whether the job lists its teachers under ``teachers:`` (features keyed ``<teacher>/<layer>``)."""
        return self.teachers is not None

    def teacher_list(self) -> list[tuple[str, TeacherSpec]]:
        """``(name, spec)`` of every teacher, in order; a single teacher is called ``"teacher"``."""
        if self.teachers is not None:
            return [(t.name, t) for t in self.teachers]
        return [(SINGLE_TEACHER, self.teacher)] if self.teacher is not None else []

    def teacher_names(self) -> list[str]:
        return [name for name, _ in self.teacher_list()]

    def teacher_spec(self, name: str) -> TeacherSpec:
        for n, t in self.teacher_list():
            if n == name:
                return t
        raise KeyError(f"no teacher named {name!r}; the job's teachers are {self.teacher_names()}")

    def teacher_weights(self) -> dict[str, float]:
        """Each teacher's weight in the averaged logits (``teacher: mean``), by name (1.0 for a single teacher)."""
        return {name: float(getattr(t, "weight", 1.0)) for name, t in self.teacher_list()}

    def teacher_cache_uri(self, name: str) -> str | None:
        """Where teacher ``name``'s cache lives: its ``cache_uri``, else ``<features.cache.uri>/<name>``
        (a single teacher: ``features.cache.uri``)."""
        t = self.teacher_spec(name)
        if not self.multi_teacher:
            return self.features.cache.uri
        if t.cache_uri:
            return t.cache_uri
        root = self.features.cache.uri
        return f"{root.rstrip('/')}/{name}" if root else None

    def pair_teacher(self, pair) -> str:
        """The name of the teacher a pair's ``teacher`` layer belongs to (``teacher_model``, default the first)."""
        if not self.multi_teacher:
            return SINGLE_TEACHER
        return pair.teacher_model or self.teachers[0].name

    def loss_teacher(self, loss) -> str | None:
        """A logit term's teacher: a teacher's name or ``"mean"`` (multi-teacher default); None for other terms."""
        if loss_entry(loss.kind).needs != "logits":
            return None
        if not self.multi_teacher:
            return SINGLE_TEACHER
        return getattr(loss, "teacher", None) or MEAN_TEACHER

    @property
    def view_of(self) -> str | None:
        """The teacher's name when this job is the single-teacher view of a multi-teacher job (``for_teacher``)."""
        return self._view_of

    def for_teacher(self, name: str) -> "JobSpec":
        """A single-teacher job for teacher ``name``: what its cache build, its deployment and its checks need.

        ``teacher`` is that teacher; ``features.cache.uri`` its cache (:meth:`teacher_cache_uri`); the pairs are
        those on its layers and the losses those it feeds (logit terms on it or on the mean, without
        ``teacher``), so the view is a valid job on its own. A single-teacher job is its own view."""
        if not self.multi_teacher:
            if name != SINGLE_TEACHER:
                raise KeyError(f"no teacher named {name!r}; a single-teacher job's teacher is {SINGLE_TEACHER!r}")
            return self
        t = self.teacher_spec(name)
        pairs = [p.model_copy(update={"teacher_model": None}) for p in self.student.pairs
                 if self.pair_teacher(p) == name]
        kept = {p.name for p in pairs}
        losses, seen = [], set()
        for loss in self.losses:
            refs = pair_names(loss)
            needs = loss_entry(loss.kind).needs
            if refs and not all(r in kept for r in refs):
                continue
            if needs == "logits":
                if self.loss_teacher(loss) not in (name, MEAN_TEACHER):
                    continue
                loss = loss.model_copy(update={"teacher": None})
            key = (loss.kind, tuple(refs))
            if key not in seen:
                seen.add(key)
                losses.append(loss)
        if not any(loss.weight > 0 for loss in losses):  # it feeds nothing weighted: a job needs one term
            losses = [{"kind": "ce"}]
        data = self.model_dump(mode="json", exclude={"teacher", "teachers", "losses"})
        data["teacher"] = t.single().model_dump(mode="json")
        data["student"]["pairs"] = [p.model_dump(mode="json") for p in pairs]
        data["losses"] = [x if isinstance(x, dict) else x.model_dump(mode="json") for x in losses]
        data["features"]["cache"]["uri"] = self.teacher_cache_uri(name)
        view = JobSpec.model_validate(data)
        view._view_of = name
        return view
