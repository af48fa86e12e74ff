"""``s3://bucket/prefix`` through fsspec/s3fs.

The endpoint is, in order: the ``s3_endpoint`` argument (from ``CacheSpec.s3_endpoint``),
``$AWS_ENDPOINT_URL``, else AWS itself; credentials come from the usual AWS environment/config. Listing
caches are disabled so that markers written by other processes are seen at once. Exclusive creates
(leases) are puts with ``If-None-Match: *`` (AWS S3, MinIO and other current S3 servers honour it).
"""

from __future__ import annotations

import asyncio
import os

from zarr.core.sync import sync
from zarr.storage import FsspecStore

from kdcore.cache.stores.base import PROTO, CacheStore, Location, as_bytes


def s3_storage_options(s3_endpoint: str | None = None) -> dict:
    """fsspec/s3fs options for an S3 cache."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    opts: dict = {"use_listings_cache": False}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


class S3CacheStore(CacheStore):
    kind = "s3"

    @classmethod
    def open(cls, location: Location, *, s3_endpoint=None, read_only: bool, create: bool) -> "S3CacheStore":
        zs = FsspecStore.from_url(location.uri, storage_options=s3_storage_options(s3_endpoint), read_only=read_only)
        return cls(location, zs, read_only)

    @classmethod
    def children(cls, location: Location, *, s3_endpoint=None) -> list[str]:
        store = FsspecStore.from_url(location.uri, storage_options=s3_storage_options(s3_endpoint), read_only=True)

        async def collect() -> list[str]:
            return [k async for k in store.list_dir("")]

        names = [n.strip("/") for n in sync(collect())]
        return sorted(f"{location.uri}/{n}" for n in names if n)

    def create(self, key: str, data) -> bool:
        fs = self.zarr_store.fs  # type: ignore[attr-defined]
        try:
            sync(fs._pipe_file(f"{self.location.path}/{key}", as_bytes(data).tobytes(), mode="create"))
            return True
        except FileExistsError:
            return False
        except OSError as err:  # 409 ConditionalRequestConflict: a concurrent create is in progress
            if "Conflict" in str(err) or "409" in str(err):
                return False
            raise

    def set_many(self, items) -> None:
        async def put_all() -> None:
            await asyncio.gather(*(self.zarr_store.set(key, PROTO.buffer.from_array_like(as_bytes(data)))
                                   for key, data in items))

        sync(put_all())

    def size_bytes(self) -> int:
        fs = self.zarr_store.fs  # type: ignore[attr-defined]
        found = sync(fs._find(self.location.path, detail=True, withdirs=False))
        return int(sum(int(info.get("size") or 0) for info in found.values()))
