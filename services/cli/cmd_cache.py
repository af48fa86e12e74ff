"""``kd cache ...``: build, inspect, verify, list and remove Zarr feature caches."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="feature caches: build, info, verify, ls, rm",
                       description="Manage Zarr feature caches.")
    csub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    del csub  # subcommands are added as the cache lands
