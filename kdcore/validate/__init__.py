"""Deep checks of a job spec: what would make the job fail once it runs, found in seconds without a cluster.

After the schema (``JobSpec``) has accepted a spec, these checks go on to everything the schema cannot see,
all at once, each problem a :class:`kdcore.errors.Problem` with its field path, the value and a fix:

* ``models``: factory targets import and their kwargs bind (names, required ones, annotated types);
  torchvision/timm names exist (or what to install); both models are built on the ``meta`` device and run
  once on a meta batch of the data's shape: taps exist (closest names on a typo), logits match the data;
* ``terms``: every loss term set up and run by ``kdcore.distiller.Distiller`` on meta tensors (pair shapes
  against projector kinds and out_dim, the ranks each loss needs);
* ``checkpoints``: files exist, tensor names and shapes match the model (headers only, no weights);
* ``data``: files and columns exist, rows, label range and class count from metadata; CRD's ``nce_k``;
* ``cache``: a cache at ``features.cache.uri`` matches the job (reuse / resume) or which field differs.

Nothing here imports Ray or starts anything. Entry points: :func:`deep_problems`, :func:`check_job`
(problems and notes), :func:`preflight` (raises ``SpecError``; for ``kd run`` before any cluster work) and
:func:`check_spec_file` (a job or sweep YAML, every variant).
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from pathlib import Path

from kdcore.errors import Problem, SpecError
from kdcore.spec.job import JobSpec
from kdcore.validate.report import Report, first_line

__all__ = ["Report", "check_job", "check_spec_file", "deep_problems", "preflight"]


def deep_problems(job: JobSpec, offline: bool = False) -> list[Problem]:
    """Every problem the deep checks find in ``job`` (an already schema-valid spec); [] when it would start."""
    return check_job(job, offline=offline).problems


def preflight(job: JobSpec, *, offline: bool = False) -> Report:
    """Check ``job``'s teacher, student, losses, checkpoints, data and cache before any cluster work.

    Returns the report (its ``notes`` are worth logging) when the job can start; raises ``SpecError`` listing
    every problem (exit status 2 in the CLI) when it cannot."""
    report = check_job(job, offline=offline)
    if report.problems:
        raise SpecError(f"the job cannot start: {len(report.problems)} problem(s)", report.problems)
    return report


@contextlib.contextmanager
def _stage(name: str, report: Report):
    """A check that breaks on something unforeseen is skipped with a note, never taken for the user's mistake."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        report.note(f"{name}: not checked (the check itself failed: {first_line(e, 200)}; KD_DEBUG=1 shows where)")
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()


def _batch(job: JobSpec, n_train: int | None) -> int:
    b = job.data.batch_size
    return max(1, min(b, n_train)) if n_train else b


def _shared(job: JobSpec, offline: bool, memo: dict):
    """Data, teacher and cache results; the same for every variant of a sweep, so computed once there.

    Each teacher of a multi-teacher job is built and probed on its own (problems at ``teachers.N...``), its cache
    checked as its single-teacher view's (``job.for_teacher(name)``); the probe returned holds every teacher's
    features and logits keyed ``"<teacher>/<layer>"``, as training gets them."""
    teachers = job.teacher_list()
    key = json.dumps({"teacher": [t.model_dump(mode="json") for _, t in teachers],
                      "data": job.data.model_dump(mode="json"), "features": job.features.model_dump(mode="json"),
                      "seed": None if all(t.checkpoint for _, t in teachers) else job.train.seed},
                     sort_keys=True, default=str)
    if key in memo:
        return memo[key]
    from kdcore.validate import cache, data

    r = Report()
    info = data.DataInfo()
    with _stage("data.source", r):
        info = data.inspect_data(job, r, offline=offline)
    probes = {}
    for k, (name, t) in enumerate(teachers):
        where = f"teachers.{k}" if job.multi_teacher else "teacher"
        probes[name] = None
        with _stage(where, r):
            probes[name] = _check_teacher(job, t, where, info, r, offline)
        field = f"{where}.cache_uri" if getattr(t, "cache_uri", None) else cache.FIELD
        with _stage(field if job.multi_teacher else "features.cache", r):
            cache.check(job.for_teacher(name), info, probes[name], r, offline=offline, field=field)
    t_probe = probes[teachers[0][0]] if not job.multi_teacher else _merged(probes)
    memo[key] = (r, info, t_probe)
    return memo[key]


def _check_teacher(job: JobSpec, t, where: str, info, r: Report, offline: bool):
    """One teacher at ``where`` (``teacher`` or ``teachers.N``): built, its checkpoint, taps and a meta forward."""
    from kdcore.teacher import LOGITS
    from kdcore.validate import checkpoints, models

    t_probe = None
    t_model = models.build(where, t.model, r)
    checkpoints.check(t.checkpoint, t_model, where, r, offline=offline)
    if t_model is not None:
        named = [(tap, f"{where}.taps.{i}") for i, tap in enumerate(t.taps)]
        taps = models.check_layers(t_model, where, named, r)
        if info.shape is not None:
            paths = {tap: p for tap, p in reversed(named)}
            t_probe = models.probe(t_model, where, [tap for tap in taps if tap != LOGITS], info,
                                   _batch(job, info.n_train(job.data.val_fraction)), False, r, paths)
            models.check_classes(where, t.model, t_probe, info, r)
        else:
            r.note(f"{where}: the data's shape is unknown, so no forward pass was checked")
    return t_probe


def _merged(probes: dict):
    """Every teacher's probe as one, keyed ``"<teacher>/<layer>"`` and ``"<teacher>/logits"``; None when none ran."""
    from kdcore.teacher import LOGITS, feature_key
    from kdcore.validate.models import Probe

    ran = [(n, p) for n, p in probes.items() if p is not None]
    if not ran:
        return None
    feats = {}
    for name, p in ran:
        feats.update({feature_key(name, k): v for k, v in p.features.items()})
        if p.logits is not None:
            feats[feature_key(name, LOGITS)] = p.logits
    return Probe(ran[0][1].x, None, feats)


def check_job(job: JobSpec, *, offline: bool = False, memo: dict | None = None) -> Report:
    """Problems and notes of the deep checks of ``job``. ``memo`` shares the teacher/data/cache results
    between jobs that have the same teacher, data and features (a sweep's variants)."""
    from kdcore.validate import checkpoints, data, models, terms

    report = Report()
    shared, info, t_probe = _shared(job, offline, {} if memo is None else memo)
    report.merge(shared)
    n_train = info.n_train(job.data.val_fraction)
    with _stage("student", report):
        s_model = models.build("student", job.student.model, report)
        checkpoints.check(job.student.checkpoint, s_model, "student", report, offline=offline)
        if s_model is not None:
            named = [(t, f"student.taps.{i}") for i, t in enumerate(job.student.taps)]
            named += [(p.student, f"student.pairs.{j}.student") for j, p in enumerate(job.student.pairs)]
            layers = models.check_layers(s_model, "student", named, report)
            if info.shape is not None:
                paths = {t: p for t, p in reversed(named)}
                s_probe = models.probe(s_model, "student", layers, info, _batch(job, n_train), True, report, paths)
                models.check_classes("student", job.student.model, s_probe, info, report)
                if s_probe is not None and t_probe is not None:
                    with _stage("losses", report):
                        terms.check_terms(job, s_model, s_probe, _as_delivered(job, t_probe), n_train, report)
    with _stage("data", report):
        data.check_fit(job, info, report)
    return report


def _as_delivered(job: JobSpec, t_probe):
    """The teacher features as the student's terms get them: a projected stream delivers ``(projected_dim,)``
    per tapped layer (logits unchanged), as ``services.teacher.stream.stream_teacher_shapes`` says."""
    if job.features.mode != "stream" or job.features.stream.payload != "projected":
        return t_probe
    from kdcore.validate.meta import meta_tensor
    from kdcore.validate.models import Probe

    d_p = job.features.stream.projected_dim
    feats = {k: meta_tensor((int(v.shape[0]), d_p)) for k, v in t_probe.features.items()}
    return Probe(t_probe.x, t_probe.logits, feats)


def _is_sweep(raw) -> bool:
    return isinstance(raw, dict) and "variants" in raw and "teacher" not in raw and "teachers" not in raw


def check_spec_file(path: str | Path, *, offline: bool = False, deep: bool = True) -> Report:
    """Validate a job or sweep YAML: the schema (raises ``SpecError`` as ``JobSpec.from_yaml`` does), then,
    with ``deep``, the deep checks of the job or of every variant of the sweep (its first seed; the paths of
    a variant's own student/losses/train problems start with ``variants.I(NAME): ``)."""
    from kdcore.spec.loading import load_yaml

    raw = load_yaml(path)
    if not _is_sweep(raw):
        job = JobSpec.from_yaml(path)
        return check_job(job, offline=offline) if deep else Report()
    from kdcore.spec.sweep import SweepSpec

    sweep = SweepSpec.from_yaml(path)
    runs = sweep.jobs()
    report = Report()
    if not deep:
        return report
    memo: dict = {}
    first: dict[str, JobSpec] = {}
    for name, _seed, job in runs:
        first.setdefault(name, job)
    for i, v in enumerate(sweep.variants):
        r = check_job(first[v.name], offline=offline, memo=memo)
        own = {key for key in ("student", "losses", "train") if getattr(v, key) is not None}
        for p in r.problems:
            if p.path.split(".", 1)[0] in own:
                report.merge(Report([p]), prefix=f"variants.{i}({v.name}): ")
            else:
                report.merge(Report([p]))
        for n in r.notes:
            report.note(f"variants.{i}({v.name}): {n}" if n.split(".", 1)[0] in own else n)
    return report


def problem_dict(p: Problem, spec: str | None = None) -> dict:
    """A problem as a JSON-ready dict (``kd validate --json``)."""
    value = p.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        value = repr(value)
    out = {"spec": spec, "path": p.path, "message": p.message, "value": value, "fix": p.fix or p.about,
           "text": str(p)}
    return out
