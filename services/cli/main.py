"""``kd``: one entry point, one small module per command group.

Exit status: 0 on success, 2 on a user error (bad spec, bad path, bad arguments), 1 on a failure.
Errors print as one line per problem; a traceback only with ``KD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from kdcore.errors import KDError, UserError
from services.cli import cmd_bench, cmd_cache, cmd_jobs, cmd_spec, cmd_train

GROUPS = (cmd_spec, cmd_train, cmd_jobs, cmd_cache, cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd",
        description="kd: distil a large teacher into small students. A Ray Serve teacher, a Zarr feature cache, "
        "Ray Train students.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from services.memtune import tune_malloc

    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        for line in e.lines():
            print(f"kd: error: {line}", file=sys.stderr)
        return e.exit_code
    except KDError as e:
        for line in e.lines():
            print(f"kd: failed: {line}", file=sys.stderr)
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one clear line, traceback on request
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(f"kd: failed: {type(e).__name__}: {first} (set KD_DEBUG=1 for the traceback)", file=sys.stderr)
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
