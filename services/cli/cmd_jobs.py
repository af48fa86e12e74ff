"""``kd sweep`` and ``kd demo``: many students against one teacher, and the packaged demo."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kdcore.errors import UserError

def demo_sweep_path() -> Path:
    """examples/digits_sweep.yaml of the checkout kd runs from (cwd first, then the source tree)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "examples" / "digits_sweep.yaml"
        if path.is_file():
            return path
    raise UserError("examples/digits_sweep.yaml not found; run `kd demo` from the kd repository root")


def register(sub: argparse._SubParsersAction) -> None:
    register_cluster(sub)
    p = sub.add_parser("sweep", help="train many student variants against one teacher, then compare them",
                       description="Train every variant (x seed) of a sweep spec against one teacher and write a "
                       "comparison table (Markdown + CSV) of accuracy, size and time per student.")
    p.add_argument("spec", metavar="SWEEP.yaml", help="sweep spec file")
    p.add_argument("--local", action="store_true", help="train in this process, one run after another, without Ray")
    p.add_argument("--address", default=None, help="Ray address of an existing cluster")
    p.add_argument("--out", default=None, help="output directory (default: <base output.dir>/<base name>-sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=sweep)

    p = sub.add_parser("demo", help="the packaged demo: digits teacher, five students, comparison table",
                       description="Train a digits CNN teacher (if its checkpoint is missing), then sweep five "
                       "students (vanilla, KD, FitNet, CRD, CRD+KD) on a 10%-labeled transfer set and print the "
                       "comparison table.")
    p.add_argument("--out", default=None, help="output directory (default runs/digits-sweep)")
    p.add_argument("--local", action="store_true", help="run without Ray")
    p.set_defaults(func=demo)


def _load_sweep(path: str):
    from kdcore.spec.sweep import SweepSpec

    sweep = SweepSpec.from_yaml(path)
    return sweep, sweep.base_job()


def sweep(args: argparse.Namespace) -> int:
    sweep_spec, base = _load_sweep(args.spec)
    out = Path(args.out) if args.out else Path(base.output.dir) / f"{base.name}-sweep"
    if args.local:
        return _run_local(sweep_spec, base, out, quiet=args.quiet)
    return _run_ray(sweep_spec, out, args.address)


def _run_ray(sweep_spec, out: Path, address: str | None) -> int:
    from services.jobs.sweep import run_sweep

    r = run_sweep(sweep_spec, out, address=address)
    print()
    print(r["markdown"])
    print(f"\n{len(r['rows'])} student runs in {r['seconds']:.0f} s; tables: {r['tables'][0]}, {r['tables'][1]}")
    return 0


def _run_local(sweep_spec, base, out: Path, quiet: bool) -> int:
    from kdcore.sweep import run_sweep_local, write_tables

    for _name, teacher in base.teacher_list():
        if teacher.checkpoint and not Path(teacher.checkpoint).exists():
            raise UserError(f"teacher checkpoint {teacher.checkpoint} does not exist; train one with "
                            f"`kd train-teacher` or fix teacher.checkpoint")
    t0 = time.perf_counter()
    rows = run_sweep_local(sweep_spec, out, progress=not quiet)
    md_path, csv_path, md = write_tables(rows, out)
    print(md)
    print(f"\n{len(rows)} student runs in {time.perf_counter() - t0:.0f} s; tables: {md_path}, {csv_path}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from kdcore.teacher_train import train_teacher_local

    sweep_spec, base = _load_sweep(str(demo_sweep_path()))
    ckpt = Path(base.teacher.checkpoint)
    if not ckpt.exists():
        print(f"[demo] training the teacher ({ckpt})")
        train_teacher_local(base, out_path=ckpt, progress=False)
    out = Path(args.out) if args.out else Path(base.output.dir) / f"{base.name}-sweep"
    if args.local:
        return _run_local(sweep_spec, base, out, quiet=True)
    return _run_ray(sweep_spec, out, None)


def register_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a whole job: teacher, cache or stream, Ray Train student, export, report",
                       description="Run a job end to end on Ray (a local Ray started in-process unless --address "
                       "or ray.address names a cluster). Everything the job started (Serve app, bank actors) is torn "
                       "down at the end, also on failure or Ctrl-C.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--address", default=None, help="Ray address of an existing cluster ('auto' on a cluster node)")
    p.add_argument("--out", default=None, help="run directory (default: <output.dir>/<name>)")
    p.set_defaults(func=run)

    p = sub.add_parser("submit", help="submit a job to a remote Ray cluster (Ray Jobs API)",
                       description="Submit `kd run JOB.yaml` to a Ray cluster through the Ray Jobs API; the spec and "
                       "kd's code travel in the job's runtime environment. Prints the submission id.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--address", required=True, help="Jobs API address, e.g. http://HEAD:8265")
    p.add_argument("--id", default=None, help="submission id to use (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.set_defaults(func=submit)

    p = sub.add_parser("serve", help="run the teacher deployment with its HTTP ingress until Ctrl-C",
                       description="Run the job's teacher as a Ray Serve app with an HTTP ingress (binary bodies: "
                       ".npy in, Arrow IPC out; OpenAPI at /docs), bound to teacher.serve.http.host:port "
                       "(127.0.0.1 unless configured). Ctrl-C tears it down.")
    p.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    p.add_argument("--teacher", default=None, metavar="NAME", help="multi-teacher jobs: the teacher to serve "
                   "(teachers[].name; default the first)")
    p.set_defaults(func=serve_cmd)

    p = sub.add_parser("status", help="status of a submitted job", description="Print a submitted job's status.")
    p.add_argument("submission_id", help="the id `kd submit` printed")
    p.add_argument("--address", required=True, help="Jobs API address, e.g. http://HEAD:8265")
    p.set_defaults(func=status)

    p = sub.add_parser("logs", help="logs of a submitted job", description="Print (or follow) a submitted job's logs.")
    p.add_argument("submission_id", help="the id `kd submit` printed")
    p.add_argument("--address", required=True, help="Jobs API address, e.g. http://HEAD:8265")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=logs)


def run(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec
    from services.jobs.run import run_job

    job = JobSpec.from_yaml(args.spec)
    run_job(job, address=args.address, out_dir=args.out)
    return 0


def submit(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec
    from services.jobs import submit as jobs

    job = JobSpec.from_yaml(args.spec)
    sid = jobs.submit(job, args.spec, args.address, submission_id=args.id)
    print(sid)
    if args.wait:
        final = jobs.wait(args.address, sid)
        print(f"{sid}: {final}")
        if final != "SUCCEEDED":
            import sys

            info = jobs.status(args.address, sid)
            tail = "".join(jobs.logs(args.address, sid)).strip().splitlines()[-15:]
            print(f"kd: failed: job {sid} {final}: {info['message'] or ''}", file=sys.stderr)
            for line in tail:
                print(f"  | {line}", file=sys.stderr)
            return 1
        return 0
    return 0


def status(args: argparse.Namespace) -> int:
    from services.jobs import submit as jobs

    s = jobs.status(args.address, args.submission_id)
    print(f"{s['submission_id']}: {s['status']}" + (f" ({s['message']})" if s["message"] else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    import sys

    from services.jobs import submit as jobs

    for chunk in jobs.logs(args.address, args.submission_id, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def serve_cmd(args: argparse.Namespace) -> int:
    from kdcore.spec import JobSpec
    from kdcore.spec.paths import resolve_paths
    from services.teacher.serve_cmd import serve_forever

    job = JobSpec.from_yaml(args.spec)
    names = job.teacher_names()
    name = getattr(args, "teacher", None) or names[0]
    if name not in names:
        raise UserError(f"--teacher {name}: no teacher of this name; the job's teachers are {names}")
    serve_forever(resolve_paths(job.for_teacher(name)))  # one teacher's deployment (a multi-teacher job: its view)
    return 0
