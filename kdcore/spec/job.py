"""The job spec: one YAML file describing teacher, student, losses, data, features and training."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kdcore.errors import Problem
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
    teachers_ok = _teacher_problems(job, out)
    t_names = job.teacher_names() if teachers_ok else []
    where = {n: (f"teachers.{k}" if job.multi_teacher else "teacher") for k, n in enumerate(t_names)}

    for i, p in enumerate(pairs):
        if names.count(p.name) > 1 and names.index(p.name) != i:
            out.append(Problem(f"student.pairs.{i}.name", "duplicate pair name", p.name, "give every pair its own name"))
        if not teachers_ok:
            continue
        if p.teacher_model is not None and p.teacher_model not in t_names:
            if job.multi_teacher:
                out.append(Problem(f"student.pairs.{i}.teacher_model", "no teacher has this name", p.teacher_model,
                                   _closest(p.teacher_model, t_names)))
            else:
                out.append(Problem(f"student.pairs.{i}.teacher_model", "a single-teacher job has one teacher, "
                                   f"called {SINGLE_TEACHER!r}", p.teacher_model,
                                   "remove teacher_model, or list several teachers under teachers:"))
            continue
        owner = job.pair_teacher(p)
        taps = list(job.teacher_spec(owner).taps)
        if p.teacher not in taps:
            hint = f"add {p.teacher!r} to {where[owner]}.taps"
            close = difflib.get_close_matches(p.teacher, taps, n=1)
            if close:
                hint += f", or did you mean {close[0]!r}?"
            what = f"teacher layer is not tapped by teacher {owner!r}" if job.multi_teacher else \
                "teacher layer is not tapped"
            out.append(Problem(f"student.pairs.{i}.teacher", what, p.teacher, hint))

    if all(loss.weight == 0 for loss in job.losses):
        out.append(Problem("losses", "every loss weight is 0, nothing would be trained", None, "give one term weight > 0"))

    seen: dict[tuple[str, tuple[str, ...], str | None], int] = {}
    projected = job.features.mode == "stream" and job.features.stream.payload == "projected"
    weights = job.teacher_weights() if teachers_ok else {}
    for i, loss in enumerate(job.losses):
        refs = pair_names(loss)
        named = getattr(loss, "teacher", None)
        if teachers_ok and named is not None:
            if not job.multi_teacher and named != SINGLE_TEACHER:
                out.append(Problem(f"losses.{i}.teacher", f"a single-teacher job has one teacher, called "
                                   f"{SINGLE_TEACHER!r}", named, "remove teacher, or list several teachers under "
                                   "teachers:"))
            elif job.multi_teacher and named != MEAN_TEACHER and named not in t_names:
                out.append(Problem(f"losses.{i}.teacher", "no teacher has this name", named,
                                   _closest(named, t_names + [MEAN_TEACHER])))
        resolved = job.loss_teacher(loss) if teachers_ok else named
        if job.multi_teacher and resolved == MEAN_TEACHER and weights and not any(weights.values()):
            out.append(Problem(f"losses.{i}.teacher", "the mean of the teachers' logits needs a teacher with "
                               "weight > 0", named or MEAN_TEACHER,
                               "give a teacher weight > 0 (teachers.N.weight), or name one teacher"))
        key = (loss.kind, tuple(refs), resolved)
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

    if job.features.mode == "cache" and not job.multi_teacher and not job.features.cache.uri:
        out.append(Problem("features.cache.uri", "cache mode needs a cache location", None,
                           "set features.cache.uri to a directory, s3://bucket/prefix or memory://name"))
    if job.multi_teacher and teachers_ok:
        out += _multi_teacher_feature_problems(job)
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


def _teacher_problems(job: JobSpec, out: list[Problem]) -> bool:
    """``teacher`` xor ``teachers``, unique names; False when the teachers cannot be told apart (other checks
    of pairs and losses against the teachers are then skipped)."""
    if job.teacher is not None and job.teachers is not None:
        out.append(Problem("teachers", "set either teacher (one model) or teachers (several named models), not both",
                           None, "move the teacher into teachers: with a name, or remove teachers"))
        return False
    if job.teacher is None and job.teachers is None:
        out.append(Problem("teacher", "required field is missing: a job needs teacher (one model) or teachers "
                           "(several named models)", None, "add teacher: {model: ..., taps: [...]}"))
        return False
    if job.teachers is None:
        return True
    ok = True
    names = [t.name for t in job.teachers]
    for k, name in enumerate(names):
        if names.index(name) != k:
            out.append(Problem(f"teachers.{k}.name", "duplicate teacher name", name, "give every teacher its own name"))
            ok = False
        if name == MEAN_TEACHER:
            out.append(Problem(f"teachers.{k}.name", f"{MEAN_TEACHER!r} is reserved: a logit loss's teacher: mean is "
                               "the average of every teacher's logits", name, "call the teacher something else"))
            ok = False
    return ok


def _multi_teacher_feature_problems(job: JobSpec) -> list[Problem]:
    out: list[Problem] = []
    mode = job.features.mode
    if mode != "cache":
        return out
    uris: dict[str, int] = {}
    for k, t in enumerate(job.teachers or []):
        uri = job.teacher_cache_uri(t.name)
        if uri is None:
            out.append(Problem("features.cache.uri", f"cache mode needs a cache location for teacher {t.name!r}",
                               None, "set features.cache.uri (each teacher's cache is <uri>/<name>), or "
                               f"teachers.{k}.cache_uri"))
            continue
        key = uri.rstrip("/")
        if key in uris:
            out.append(Problem(f"teachers.{k}.cache_uri", f"teachers {job.teachers[uris[key]].name!r} and {t.name!r} "
                               "would share one cache", uri, "give each teacher its own cache_uri (or leave it unset: "
                               "<features.cache.uri>/<name>)"))
        uris.setdefault(key, k)
    return out
