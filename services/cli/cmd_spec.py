"""``kd validate``, ``kd schema`` and ``kd layers``: working with job specs without running anything."""

from __future__ import annotations

import argparse
import json
import sys

from kdcore.errors import SpecError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check job specs and print every problem found",
                       description="Validate job (or sweep) specs: the schema, then everything that would make the "
                       "job fail once it runs: factory targets and their kwargs, both models built on the meta device "
                       "and run once on the data's shape (taps, pair shapes, projectors, losses, class counts), "
                       "checkpoints against the model, data files and columns, an existing feature cache. Imports no "
                       "Ray and starts nothing. Prints every problem with its field path, the value given and how to "
                       "fix it; exit 0 when every job would start, 2 otherwise.")
    p.add_argument("specs", nargs="+", metavar="JOB.yaml", help="job or sweep spec file(s)")
    p.add_argument("--offline", action="store_true",
                   help="not on the machine the job runs on: remote storage (s3://) and absolute paths that do not "
                   "exist here (cluster volumes) are skipped with a note")
    p.add_argument("--json", action="store_true", help="print the problems as a JSON list (exit status unchanged)")
    p.add_argument("--schema-only", action="store_true",
                   help="check the schema and cross-field rules only (no models, files or caches)")
    p.set_defaults(func=validate)

    p = sub.add_parser("schema", help="print the JSON Schema of job specs (for editor completion)",
                       description="Print the JSON Schema of the job spec (or the sweep spec).")
    p.add_argument("--kind", choices=["job", "sweep"], default="job", help="which spec's schema (default: job)")
    p.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")
    p.set_defaults(func=schema)

    p = sub.add_parser("layers", help="list the module paths of a spec's teacher or student (tap names)",
                       description="Build the teacher or student of a job spec and list its module paths, the names "
                       "teacher.taps and student pairs refer to.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--side", default="teacher", metavar="SIDE",
                   help="which model: teacher (default; a multi-teacher job's first), student, or a teacher's name "
                   "or teachers.N in a multi-teacher job")
    p.set_defaults(func=layers)


def validate(args: argparse.Namespace) -> int:
    from kdcore.validate import check_spec_file

    failed: list[SpecError] = []
    for path in args.specs:
        try:
            report = check_spec_file(path, offline=args.offline, deep=not args.schema_only)
        except SpecError as e:
            if e.source is None:
                e.source = path
            failed.append(e)
            continue
        for note in report.notes:
            print(f"kd: note: {path}: {note}", file=sys.stderr)
        if report.problems:
            failed.append(SpecError(f"{len(report.problems)} problem(s): the job would not start", report.problems,
                                    source=path))
        elif not args.json:
            print(f"{path}: ok")
    if args.json:
        from kdcore.validate import problem_dict

        json.dump([problem_dict(p, e.source) for e in failed for p in (e.problems or _as_problems(e))], sys.stdout,
                  indent=2, default=repr)
        print()
        return 2 if failed else 0
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise SpecError("several specs have problems",
                        [p for e in failed for p in _prefixed(e)])
    return 0


def _as_problems(e: SpecError):
    from kdcore.errors import Problem

    return [Problem("", e.message)]


def _prefixed(e: SpecError):
    from kdcore.errors import Problem

    for p in e.problems:
        yield Problem(f"{e.source}: {p.path}" if e.source else p.path, p.message, p.value, p.fix)


def schema(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec

    model = JobSpec
    if args.kind == "sweep":
        from kdcore.spec.sweep import SweepSpec

        model = SweepSpec
    json.dump(model.model_json_schema(), sys.stdout, indent=args.indent)
    print()
    return 0


def layers(args: argparse.Namespace) -> int:
    from kdcore.modeling import build_model
    from kdcore.spec import JobSpec

    spec = JobSpec.from_yaml(args.spec)
    role = spec.student if args.side == "student" else _teacher_side(spec, args.side)
    model = build_model(role.model)
    for name, module in model.named_modules():
        if name:
            print(f"{name}\t{type(module).__name__}")
    if not any(True for _ in model.named_modules()):
        raise UserError("the model has no sub-modules")
    return 0


def _teacher_side(spec, side: str):
    """The teacher ``kd layers --side`` names: ``teacher`` (the first of several), a teacher's name, ``teachers.N``."""
    listed = spec.teacher_list()
    names = [n for n, _ in listed]
    if side == "teacher":
        return listed[0][1]
    if side.startswith("teachers.") and side[len("teachers."):].isdigit() and spec.multi_teacher:
        k = int(side[len("teachers."):])
        if k < len(listed):
            return listed[k][1]
    if spec.multi_teacher and side in names:
        return spec.teacher_spec(side)
    others = f", a teacher's name ({', '.join(names)}) or teachers.N" if spec.multi_teacher else ""
    raise UserError(f"--side {side}: not a model of this job; use teacher, student{others}")
