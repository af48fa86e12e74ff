"""``kd bench ...``: benchmarks that print ratios against a limit measured in the same run."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against a limit measured in the same run)",
                       description="Benchmarks. Each prints its figures and the ratio to a limit measured in the "
                       "same run; --json prints one JSON object.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    b = bsub.add_parser("losses", help="CRD step time: shared negatives vs per-anchor negatives",
                        description="Time a CRD training step (nce_k=4096, d=128, batch 64) with shared negatives "
                        "against per-anchor negatives.")
    b.add_argument("--nce-k", type=int, default=4096, help="negatives K (default 4096)")
    b.add_argument("--feat-dim", type=int, default=128, help="embedding size d (default 128)")
    b.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    b.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=bench_losses)


def bench_losses(args: argparse.Namespace) -> int:
    from services.bench.losses import run

    r = run(nce_k=args.nce_k, feat_dim=args.feat_dim, batch=args.batch, steps=args.steps)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"CRD step (K={args.nce_k}, d={args.feat_dim}, B={args.batch}), medians:")
        print(f"  shared negatives    {r['crd_shared_step_s'] * 1e3:8.2f} ms")
        print(f"  per-anchor (limit)  {r['crd_per_anchor_step_s'] * 1e3:8.2f} ms")
        print(f"  ratio shared/per-anchor {r['crd_shared_step_s'] / r['crd_per_anchor_step_s']:.3f}")
    return 0
