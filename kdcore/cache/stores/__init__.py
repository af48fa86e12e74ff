"""Where a cache lives: a local directory, ``memory://name`` or ``s3://bucket/prefix``; one class per kind
behind the ``CacheStore`` protocol (``base``). ``open_store`` is the one place that picks the class."""

from __future__ import annotations

import os

from kdcore.cache.stores.base import CacheStore, Kind, Location, join_uri, parse_uri
from kdcore.cache.stores.local import LocalCacheStore
from kdcore.cache.stores.memory import MemoryCacheStore, clear_memory, memory_names
from kdcore.cache.stores.s3 import S3CacheStore, s3_storage_options

KINDS: dict[str, type[CacheStore]] = {"local": LocalCacheStore, "memory": MemoryCacheStore, "s3": S3CacheStore}


def open_store(uri: str | os.PathLike, *, s3_endpoint: str | None = None, read_only: bool = False,
               create: bool = False) -> CacheStore:
    """The store of the cache at ``uri``; ``create``: the location need not exist yet."""
    loc = parse_uri(uri)
    return KINDS[loc.kind].open(loc, s3_endpoint=s3_endpoint, read_only=read_only, create=create)


def list_children(root: str | os.PathLike, *, s3_endpoint: str | None = None) -> list[str]:
    """URIs directly under ``root`` (directories / prefixes / memory names), sorted."""
    loc = parse_uri(root)
    return KINDS[loc.kind].children(loc, s3_endpoint=s3_endpoint)


__all__ = ["KINDS", "CacheStore", "Kind", "LocalCacheStore", "Location", "MemoryCacheStore", "S3CacheStore",
           "clear_memory", "join_uri", "list_children", "memory_names", "open_store", "parse_uri",
           "s3_storage_options"]
