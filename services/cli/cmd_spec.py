"""``kd validate``, ``kd schema`` and ``kd layers``: working with job specs without running anything."""

from __future__ import annotations

import argparse
import json
import sys

from kdcore.errors import SpecError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check job specs and print every problem found",
                       description="Validate job specs. Prints every problem with its field path, the value given "
                       "and how to fix it; exit 2 if any spec has a problem.")
    p.add_argument("specs", nargs="+", metavar="JOB.yaml", help="job spec file(s)")
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
    p.add_argument("--side", choices=["teacher", "student"], default="teacher", help="which model (default teacher)")
    p.set_defaults(func=layers)


def validate(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec

    failed = []
    for path in args.specs:
        try:
            JobSpec.from_yaml(path)
            print(f"{path}: ok")
        except SpecError as e:
            failed.append(e)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise SpecError("several specs have problems",
                        [p for e in failed for p in _prefixed(e)])
    return 0


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
    role = spec.teacher if args.side == "teacher" else spec.student
    model = build_model(role.model)
    for name, module in model.named_modules():
        if name:
            print(f"{name}\t{type(module).__name__}")
    if not any(True for _ in model.named_modules()):
        raise UserError("the model has no sub-modules")
    return 0
