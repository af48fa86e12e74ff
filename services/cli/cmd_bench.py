"""``kd bench ...``: benchmarks that print ratios against a limit measured in the same run."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from typing import Any, Callable, Iterator

from kdcore.errors import UserError

_JSON_OUT: list[Any] = []  # the real stdout while a --json bench runs (see _json_only)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[Any]:
    """While a ``--json`` bench runs, everything written to stdout goes to stderr instead: Python's prints and, at
    the descriptor, what Ray's processes (started now, inheriting it) and native code write; the yielded stream is
    the real stdout, which then holds the one JSON object alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    old = sys.stdout
    try:
        on_fd1 = old.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a stream in memory (a test's capture): it stays the output
        on_fd1 = False
    real = os.fdopen(saved, "w", closefd=False) if on_fd1 else old
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout.flush()
        real.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = old


def _json_only(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bench command whose ``--json`` output is one parseable JSON object on stdout, whatever else runs."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        if not getattr(args, "json", False):
            return func(args)
        with _stdout_to_stderr() as real:
            _JSON_OUT.append(real)
            try:
                rc = func(args)
                with contextlib.suppress(Exception):  # Ray's teardown output, if any, still goes to stderr
                    import ray

                    if ray.is_initialized():
                        ray.shutdown()
            finally:
                _JSON_OUT.pop()
        return rc
    return run


def _emit(result: dict[str, Any]) -> None:
    """Print a bench's result as one JSON object on the real stdout."""
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    print(json.dumps(result), file=out, flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against a limit measured in the same run)",
                       description="Benchmarks. Each prints its figures and the ratio to a limit measured in the "
                       "same run; --json prints one JSON object.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    b = bsub.add_parser("losses", help="CRD step time (shared vs per-anchor negatives); each loss's "
                        "forward+backward time next to plain KD's",
                        description="Time a CRD training step (nce_k=4096, d=128, batch 64) with shared negatives "
                        "against per-anchor negatives (the limit), and the forward+backward time of every 2021-2024 "
                        "loss (DKD, DIST, NKD, KD with logit standardisation, MGD, SRD, ReviewKD, with their "
                        "training-only modules) next to plain KD's on the same batch (the reference).")
    b.add_argument("--nce-k", type=int, default=4096, help="negatives K (default 4096)")
    b.add_argument("--feat-dim", type=int, default=128, help="embedding size d (default 128)")
    b.add_argument("--batch", type=int, default=64, help="batch size of both benches (default 64)")
    b.add_argument("--classes", type=int, default=100, help="classes of the logit terms (default 100)")
    b.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    b.add_argument("--only", choices=("crd", "terms"), default=None,
                   help="run only the CRD bench or only the per-loss table (default both)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every CPU of this process)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_losses))

    b = bsub.add_parser("cache", help="cache loader vs memmap random batches; cache writes vs np.save",
                        description="On the same data in one run: rows/s of a shuffled cache epoch vs random "
                        "256-row batches from a numpy memmap (the limit), and cache write MB/s vs np.save (the limit). "
                        "Targets: read >= 0.8x, write >= 0.7x.")
    b.add_argument("--rows", type=int, default=65536, help="rows (default 65536)")
    b.add_argument("--dim", type=int, default=2048, help="feature size (default 2048, fp16)")
    b.add_argument("--batch", type=int, default=256, help="batch rows (default 256)")
    b.add_argument("--chunk-rows", type=int, default=4096, help="rows per chunk (default 4096, 16 MiB)")
    b.add_argument("--workdir", default=None, help="where the data is written (default: a temp dir)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_cache))

    b = bsub.add_parser("membank", help="student step with the shared bank actor vs an in-process bank",
                        description="2 Ray Train workers, resnet8x4 student (32x32, batch 64), CRD K=4096 d=128: "
                        "median step time with the shared bank actor vs a local bank (the limit; target <= 1.15x), "
                        "and the actor's update+fetch throughput.")
    b.add_argument("--workers", type=int, default=2, help="train workers (default 2)")
    b.add_argument("--steps", type=int, default=40, help="timed steps per mode (default 40)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_membank))

    b = bsub.add_parser("serve", help="teacher deployment throughput vs the direct forward",
                        description="Samples/s of the teacher forward in-process at batch 256 (the limit), through the "
                        "deployment with concurrent 256-sample requests and with an id stream, and with concurrent "
                        "single-sample requests next to a no-op batched deployment (the per-request ceiling); bytes "
                        "per sample raw vs projected. Targets: batched and stream >= 0.9x direct, single >= 0.8x "
                        "the no-op ceiling.")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_serve))

    b = bsub.add_parser("e2e", help="student epoch time: teacher online vs streamed vs cached",
                        description="Student epoch time for features online, stream and cache on the same teacher "
                        "and student, next to the ideal cache speedup (teacher+student step / student step) "
                        "measured in the same run. Target: measured >= 0.9x ideal.")
    b.add_argument("--epochs", type=int, default=4, help="epochs per mode (default 4; the first is not timed)")
    b.add_argument("--modes", default="online,stream,cache", help="comma-separated modes (default all three)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_e2e))

    b = bsub.add_parser("scale", help="the same cache-mode job on N and 4N image rows: peak memory per process kind "
                        "and throughput",
                        description="Generate N and 4N PNG rows in Parquet (by default 4N = 44,000 rows of 3x128x128, "
                        "8.65 GB decoded), run the same cache-mode job on each as a `kd run` subprocess (teacher "
                        "deployment fills the cache, 2 Ray Train workers, 1 epoch, random resized crops + flips) while "
                        "sampling every process's resident memory, and report the peak per process kind, the largest "
                        "4N/N ratio (target <= 1.15) and the cache build's and the epoch's rows/s 4N vs N (target "
                        ">= 0.9). Takes ~3-4 minutes at the defaults on 2 cores (~8 when it writes the datasets "
                        "first).")
    b.add_argument("--rows", type=int, default=11_000, help="N (default 11000; 4N rows are generated)")
    b.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    b.add_argument("--epochs", type=int, default=1, help="student epochs (default 1; with more, the first is not timed)")
    b.add_argument("--workdir", default=None, help="where datasets, caches, runs and logs go (default: a temp dir); "
                   "datasets already there are reused")
    b.add_argument("--keep", action="store_true", help="keep the caches and runs (and a temp workdir, with the logs)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_scale))

    b = bsub.add_parser("input", help="student input rows/s through Ray Data vs a single-process loop; cache build "
                        "rows/s vs the teacher forward and input limits",
                        description="On generated PNG rows in Parquet: rows/s of the job's Ray Data training pipeline "
                        "(cache chunks joined with their input rows, decode + augment replay in map_batches), iterated "
                        "to the end, vs the same decode + augment in a tight single-process loop scaled to "
                        "min(decode tasks, cores) (target >= 0.8); and the cache build through the teacher "
                        "deployment vs min(teacher forward, input) rows/s measured in-process on the same inputs and "
                        "cores (target >= 0.8).")
    b.add_argument("--rows", type=int, default=4096, help="dataset rows (default 4096; 2 views each)")
    b.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="timed epochs of each side (default 3; medians)")
    b.add_argument("--workdir", default=None, help="where the dataset and cache go (default: a temp dir)")
    b.add_argument("--keep", action="store_true", help="keep the cache (and a temp workdir)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_json_only(bench_input))


def bench_losses(args: argparse.Namespace) -> int:
    from services.bench.losses import run, run_terms, term_lines

    for name in ("nce_k", "feat_dim", "batch", "classes", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    out: dict = {}
    if args.only in (None, "crd"):
        out.update(run(nce_k=args.nce_k, feat_dim=args.feat_dim, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, threads=args.threads, device=args.device))
        if not args.json:
            print(f"CRD step (K={args.nce_k}, d={args.feat_dim}, B={args.batch}), medians:")
            print(f"  shared negatives    {out['crd_shared_step_s'] * 1e3:8.2f} ms")
            print(f"  per-anchor (limit)  {out['crd_per_anchor_step_s'] * 1e3:8.2f} ms")
            print(f"  ratio shared/per-anchor {out['crd_shared_step_s'] / out['crd_per_anchor_step_s']:.3f}")
    if args.only in (None, "terms"):
        terms = run_terms(batch=args.batch, classes=args.classes, steps=args.steps, warmup=args.warmup,
                          threads=args.threads, device=args.device)
        out["loss_terms"] = terms
        if not args.json:
            print("\n".join(term_lines(terms)))
    if args.json:
        _emit(out)
    return 0


def _ratio_line(name: str, value: float, limit_name: str, target: str) -> str:
    return f"  {name:<34} {value:8.3f}x {limit_name} (target {target})"


def bench_cache(args: argparse.Namespace) -> int:
    from services.bench.cache import run

    r = run(rows=args.rows, dim=args.dim, batch=args.batch, chunk_rows=args.chunk_rows, workdir=args.workdir)
    if args.json:
        _emit(r)
        return 0
    print(f"cache bench: {args.rows} rows x {args.dim} fp16, batches of {args.batch}, medians")
    print(f"  shuffled-epoch loader   {r['loader_rows_per_s']:>14,.0f} rows/s")
    print(f"  memmap random batches   {r['memmap_rows_per_s']:>14,.0f} rows/s  (limit)")
    print(f"  cache write             {r['write_mb_per_s']:>14,.1f} MB/s")
    print(f"  np.save                 {r['raw_write_mb_per_s']:>14,.1f} MB/s  (limit)")
    print(_ratio_line("read ratio", r["read_ratio"], "memmap", ">= 0.8"))
    print(_ratio_line("write ratio", r["write_ratio"], "np.save", ">= 0.7"))
    return 0


def bench_membank(args: argparse.Namespace) -> int:
    from services.bench.membank import run

    r = run(workers=args.workers, steps=args.steps, log=None if args.json else print)
    if args.json:
        _emit(r)
        return 0
    print(f"membank bench: {r['workers']} workers, K={r['nce_k']}, d={r['feat_dim']}, batch {r['batch']}, medians")
    print(f"  step with the bank actor   {r['step_s_actor'] * 1e3:9.1f} ms")
    print(f"  step with a local bank     {r['step_s_local'] * 1e3:9.1f} ms  (limit)")
    print(_ratio_line("ratio actor/local", r["ratio"], "", "<= 1.15"))
    print(f"  actor update+fetch        {r['actor_ops_per_s']:9,.0f} ops/s")
    return 0


def bench_e2e(args: argparse.Namespace) -> int:
    from services.bench.e2e import run

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    r = run(epochs=args.epochs, modes=modes, log=None if args.json else print)
    if args.json:
        _emit(r)
        return 0
    print(f"e2e bench (medians): teacher step {r['teacher_step_s'] * 1e3:.1f} ms, student step "
          f"{r['student_step_s'] * 1e3:.1f} ms -> ideal cache speedup {r['speedup_ideal']:.2f}x (in this process)")
    for mode in modes:
        print(f"  epoch, {mode:<7} {r[f'epoch_s_{mode}']:8.3f} s  (student compute {r[f'compute_s_{mode}']:.3f} s, "
              f"waiting for batches {r[f'data_s_{mode}']:.3f} s)")
    if "speedup_ideal_in_worker" in r:
        print(f"  ideal cache speedup in the worker (online epoch / its compute) {r['speedup_ideal_in_worker']:.2f}x")
    if "speedup_cache" in r:
        print(f"  measured cache speedup {r['speedup_cache']:.2f}x = {r['ratio_to_ideal']:.2f}x ideal (target >= 0.9)")
    if "speedup_stream" in r:
        print(f"  measured stream speedup {r['speedup_stream']:.2f}x")
    return 0


def bench_serve(args: argparse.Namespace) -> int:
    from services.bench.serve import run

    r = run(log=None if args.json else print)
    if args.json:
        _emit(r)
        return 0
    print("serve bench (samples/s, medians):")
    print(f"  direct forward, batch 256       {r['direct_sps']:>10,.0f}  (limit)")
    print(f"  deployment, 256-sample requests {r['serve_batched_sps']:>10,.0f}")
    print(f"  deployment, id stream           {r['serve_stream_sps']:>10,.0f}")
    print(f"  single requests, batched        {r['serve_single_sps']:>10,.0f}")
    print(f"  single requests, no-op ceiling  {r['noop_single_sps']:>10,.0f}  (limit)")
    print(_ratio_line("batched / direct", r["ratio_batched"], "", ">= 0.9"))
    print(_ratio_line("stream / direct", r["ratio_stream"], "", ">= 0.9"))
    print(_ratio_line("single / no-op ceiling", r["ratio_single_to_ceiling"], "", ">= 0.8"))
    print(f"  bytes per sample: raw {r['bytes_per_sample_raw']:,}, projected {r['bytes_per_sample_projected']:,}")
    return 0


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def _image_bench(args: argparse.Namespace, module: str, count: str) -> int:
    """``kd bench scale`` / ``kd bench input``: generated PNG rows, ``count`` the option beside rows and size."""
    import importlib

    bench = importlib.import_module(module)
    _positive(args, "rows", "image_size", count)
    if args.image_size < 16:
        raise UserError(f"--image-size must be >= 16 (the models stride by 4, then pool), got {args.image_size}")
    r = bench.run(rows=args.rows, image_size=args.image_size, workdir=args.workdir, keep=args.keep,
                  log=None if args.json else print, **{count: getattr(args, count)})
    if args.json:
        _emit(r)
    else:
        print("\n".join(bench.lines(r)))
    return 0


def bench_scale(args: argparse.Namespace) -> int:
    return _image_bench(args, "services.bench.scale", "epochs")


def bench_input(args: argparse.Namespace) -> int:
    return _image_bench(args, "services.bench.input", "repeats")
