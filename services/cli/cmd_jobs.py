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
    p = sub.add_parser("sweep", help="train many student variants against one teacher, then compare them",
                       description="Train every variant (x seed) of a sweep spec against one teacher and write a "
                       "comparison table (Markdown + CSV) of accuracy, size and time per student.")
    p.add_argument("spec", metavar="SWEEP.yaml", help="sweep spec file")
    p.add_argument("--local", action="store_true", help="train in this process, one run after another, without Ray")
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
    if not args.local:
        raise UserError("the Ray sweep is not available yet; add --local to train in this process")
    return _run_local(sweep_spec, base, out, quiet=args.quiet)


def _run_local(sweep_spec, base, out: Path, quiet: bool) -> int:
    from kdcore.sweep import run_sweep_local, write_tables

    if base.teacher.checkpoint and not Path(base.teacher.checkpoint).exists():
        raise UserError(f"teacher checkpoint {base.teacher.checkpoint} does not exist; train one with "
                        f"`kd train-teacher` or fix teacher.checkpoint")
    t0 = time.perf_counter()
    rows = run_sweep_local(sweep_spec, out, progress=not quiet)
    md_path, csv_path, md = write_tables(rows, out)
    print(md)
    print(f"\n{len(rows)} student runs in {time.perf_counter() - t0:.0f} s; tables: {md_path}, {csv_path}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from kdcore.loop import train_teacher_local

    sweep_spec, base = _load_sweep(str(demo_sweep_path()))
    ckpt = Path(base.teacher.checkpoint)
    if not ckpt.exists():
        print(f"[demo] training the teacher ({ckpt})")
        train_teacher_local(base, out_path=ckpt, progress=False)
    out = Path(args.out) if args.out else Path(base.output.dir) / f"{base.name}-sweep"
    return _run_local(sweep_spec, base, out, quiet=True)
