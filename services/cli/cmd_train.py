"""``kd train`` (a student), ``kd train-teacher`` and ``kd export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdcore.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the student of a job spec",
                       description="Train the job's student with Ray Train (teacher online or from an existing cache). "
                       "--local runs the plain single-process loop (no Ray): the way to debug a spec on a laptop; in "
                       "cache mode it first builds (or reuses) the cache, one per teacher, in this process.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    p.add_argument("--address", default=None, help="Ray address of an existing cluster (not with --local)")
    p.add_argument("--out", default=None, help="run directory (default: <output.dir>/<name>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=train)

    p = sub.add_parser("train-teacher", help="supervised training of a job's teacher (when you have no checkpoint)",
                       description="Train the job's teacher with cross-entropy on every training row and write its "
                       "weights to teacher.checkpoint (safetensors). A multi-teacher job trains each of its teachers "
                       "(or the one --teacher names), each to its own checkpoint.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: train.epochs)")
    p.add_argument("--out", default=None, help="weights path (default: teacher.checkpoint)")
    p.add_argument("--teacher", default=None, metavar="NAME", help="multi-teacher jobs: train only this teacher "
                   "(teachers[].name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=train_teacher)

    p = sub.add_parser("export", help="export a run's student alone (no projection heads)",
                       description="Write the student of a run's latest checkpoint (or --checkpoint) as safetensors + "
                       "a JSON of its spec. Projection heads and the memory bank are training-only and left out.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file of the run")
    p.add_argument("--checkpoint", default=None, help="a state.pt (default: the run's latest checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=export)


def train(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec

    job = JobSpec.from_yaml(args.spec)
    if not args.local:
        if job.features.mode == "stream":
            raise UserError("features.mode stream needs the teacher deployment: use `kd run JOB.yaml`")
        from services.raysession import ray_session
        from services.trainer.driver import train_student

        with ray_session(job.ray, args.address):
            result = train_student(job, args.out)
        final = {k: v for k, v in result["final"].items() if isinstance(v, (int, float))}
        print(json.dumps({"job": job.name, "final": final, "student": result["student_dir"]}, indent=2))
        return 0
    from kdcore.loop import train_local

    source = None
    if job.features.mode == "cache":  # build or reuse the cache (one per teacher) in this process, then read it
        source = _local_cache_source(job, quiet=args.quiet)
    result = train_local(job, out_dir=args.out, resume=not args.no_resume, progress=not args.quiet, source=source)
    final = {k: v for k, v in result["final"].items() if isinstance(v, (int, float))}
    print(json.dumps({"job": job.name, "final": final, "student": result["student_dir"]}, indent=2))
    return 0


def _local_cache_source(job, quiet: bool = False):
    """``kd train --local`` in cache mode: every cache of the job built (or reused) without Ray, then read back."""
    from kdcore.cache.jobs import CachedFeatures
    from kdcore.loop import build_teacher, load_split
    from kdcore.spec.paths import resolve_paths
    from services.jobs.run import ensure_caches

    job = resolve_paths(job)
    split = load_split(job)
    config: dict = {}
    ensure_caches(job, split, config, log=None if quiet else print, replicas=False,
                  runner=build_teacher(job, device="cpu"))
    return CachedFeatures.open(job, split, config.get("cache_manifests" if job.multi_teacher else "cache_manifest"))


def train_teacher(args: argparse.Namespace) -> int:
    from kdcore.loop import run_dir
    from kdcore.teacher_train import train_teacher_local
    from kdcore.spec import JobSpec

    job = JobSpec.from_yaml(args.spec)
    if args.epochs is not None and args.epochs <= 0:
        raise UserError(f"--epochs must be > 0, got {args.epochs}")
    if not job.multi_teacher:
        if args.teacher not in (None, "teacher"):
            raise UserError(f"--teacher {args.teacher}: the job has one teacher (teacher:), not several")
        train_teacher_local(job, out_path=args.out, epochs=args.epochs, progress=not args.quiet)
        return 0
    names = job.teacher_names()
    if args.teacher is not None and args.teacher not in names:
        raise UserError(f"--teacher {args.teacher}: no teacher of this name; the job's teachers are {names}")
    chosen = [args.teacher] if args.teacher else names
    if args.out and len(chosen) > 1:
        raise UserError("--out names one weights file: pick the teacher with --teacher NAME")
    for name in chosen:
        view = job.for_teacher(name)
        out = args.out or view.teacher.checkpoint or run_dir(job) / f"teacher-{name}.safetensors"
        print(f"[teacher] training teacher {name!r}")
        train_teacher_local(view, out_path=out, epochs=args.epochs, progress=not args.quiet)
    return 0


def latest_checkpoint(run: Path) -> Path | None:
    """The newest state.pt of a run: the local loop's, or the last Ray Train checkpoint's."""
    candidates = [run / "checkpoints" / "state.pt"]
    candidates += sorted((run / "ray-train").glob("*/checkpoint_*/state.pt"))
    existing = [c for c in candidates if c.exists()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None


def export(args: argparse.Namespace) -> int:
    from kdcore.export import export_student
    from kdcore.checkpoints import student_from_checkpoint
    from kdcore.loop import run_dir
    from kdcore.spec import JobSpec

    job = JobSpec.from_yaml(args.spec)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir(job))
    if ckpt is None or not ckpt.exists():
        raise UserError(f"no checkpoint found for job {job.name!r} under {run_dir(job)}; train it first or pass "
                        "--checkpoint")
    student, history = student_from_checkpoint(job, ckpt)
    out = export_student(student, job.student, args.out, {"job": job.name, "checkpoint": str(ckpt),
                                                          "epochs": len(history)})
    print(f"exported the student of {ckpt} to {out}")
    return 0
