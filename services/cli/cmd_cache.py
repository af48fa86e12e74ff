"""``kd cache ...``: build, inspect, verify, list and remove Zarr feature caches."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="feature caches: build, info, verify, ls, rm",
                       description="Manage Zarr feature caches of teacher features.")
    csub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)

    b = csub.add_parser("build", help="build (or resume, or reuse) a job's cache",
                        description="Build the job's feature cache at features.cache.uri (a multi-teacher job: one "
                        "cache per teacher, at <features.cache.uri>/<name> or its cache_uri): the teacher deployment's "
                        "replicas fill disjoint chunks (--local: the teacher runs in this process). A killed build "
                        "resumes where it stopped; a complete matching cache is reused.")
    b.add_argument("spec", metavar="JOB.yaml", help="job spec file")
    b.add_argument("--local", action="store_true", help="run the teacher in this process, without Ray")
    b.add_argument("--address", default=None, help="Ray address of an existing cluster")
    b.set_defaults(func=build)

    i = csub.add_parser("info", help="manifest, size and completeness of a cache",
                        description="Print a cache's manifest, size and completeness.")
    i.add_argument("uri", help="cache location (directory, s3://bucket/prefix, memory://name)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    i.set_defaults(func=info)

    v = csub.add_parser("verify", help="re-read every chunk against its checksum",
                        description="Re-read every chunk against the checksums kept at write time and report missing "
                        "or corrupted chunks (exit 1 if any).")
    v.add_argument("uri", help="cache location")
    v.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.add_argument("--repair", action="store_true", help="mark corrupted chunks missing so `kd cache build` rewrites "
                   "them (the cache is no longer complete until it does)")
    v.set_defaults(func=verify)

    ls_ = csub.add_parser("ls", help="list caches under a root", description="List caches under a root with their "
                          "teacher and dataset fingerprints.")
    ls_.add_argument("root", help="directory or s3://bucket/prefix")
    ls_.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    ls_.add_argument("--json", action="store_true", help="print JSON")
    ls_.set_defaults(func=ls)

    r = csub.add_parser("rm", help="remove a cache", description="Remove a cache (its whole Zarr group).")
    r.add_argument("uri", help="cache location")
    r.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    r.add_argument("--yes", action="store_true", help="do not ask")
    r.set_defaults(func=rm)


def build(args: argparse.Namespace) -> int:
    from kdcore.loop import load_split
    from kdcore.spec import JobSpec
    from services.jobs.run import ensure_caches

    job = JobSpec.from_yaml(args.spec)
    split = load_split(job)
    if args.local:
        result = ensure_caches(job, split, {}, replicas=False)
    else:
        from services.raysession import ray_session

        with ray_session(job.ray, args.address):
            result = ensure_caches(job, split, {})
    if job.multi_teacher:  # one cache per teacher
        print(json.dumps({name: {k: v for k, v in r.items() if k != "manifest"} for name, r in result.items()}))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "manifest"}))
    return 0


def _dump(obj) -> str:
    import dataclasses

    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    elif isinstance(obj, list):
        obj = [o.to_dict() if hasattr(o, "to_dict") else dataclasses.asdict(o) for o in obj]
    elif dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, indent=2, default=str)


def info(args: argparse.Namespace) -> int:
    from kdcore.cache import format_info, info as cache_info

    result = cache_info(args.uri, s3_endpoint=args.s3_endpoint)
    print(_dump(result) if args.json else format_info(result))
    return 0


def verify(args: argparse.Namespace) -> int:
    from kdcore.cache import format_verify, verify as cache_verify

    report = cache_verify(args.uri, s3_endpoint=args.s3_endpoint)
    print(_dump(report) if args.json else format_verify(report))
    if args.repair and report.corrupted:
        from kdcore.cache import invalidate_chunks

        n = invalidate_chunks(args.uri, list(report.corrupted), s3_endpoint=args.s3_endpoint)
        print(f"marked {n} corrupted chunk(s) missing; run `kd cache build JOB.yaml` to rewrite them")
    return 0 if report.ok else 1


def ls(args: argparse.Namespace) -> int:
    from kdcore.cache import format_ls, ls as cache_ls

    entries = cache_ls(args.root, s3_endpoint=args.s3_endpoint)
    print(_dump(entries) if args.json else format_ls(entries))
    return 0


def rm(args: argparse.Namespace) -> int:
    import sys

    from kdcore.cache import rm as cache_rm
    from kdcore.errors import UserError

    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to remove {args.uri} without --yes (no terminal to ask)")
        if input(f"remove the cache at {args.uri}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("kept")
            return 0
    cache_rm(args.uri, s3_endpoint=args.s3_endpoint)
    print(f"removed {args.uri}")
    return 0
