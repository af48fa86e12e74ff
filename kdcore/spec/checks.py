"""The job spec's checks that span more than one field (pairs vs taps, losses vs pairs and teachers, the
multi-teacher rules), each reported as a ``Problem`` with its path and a fix; ``JobSpec`` runs them after its
fields validate."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from kdcore.errors import Problem
from kdcore.losses.registry import get as loss_entry
from kdcore.losses.registry import pair_names
from kdcore.spec.roles import MEAN_TEACHER, SINGLE_TEACHER

if TYPE_CHECKING:
    from kdcore.spec.job import JobSpec


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
