"""Opening dataset files on local disk or S3 (``s3://bucket/key``), through fsspec."""

from __future__ import annotations

import os
from typing import Any

from kdcore.errors import DataError


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """``(fs, path_on_fs)`` for a local path or an s3:// URI (endpoint from the spec, else the environment)."""
    import fsspec

    path = str(path)
    if path.startswith("s3://"):
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        return fsspec.filesystem("s3", **kwargs), path[len("s3://"):]
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        raise DataError(f"unsupported dataset location {path!r}: use a local path or s3://bucket/prefix")
    return fsspec.filesystem("file"), os.path.abspath(path)


def list_files(path: str, suffixes: tuple[str, ...], s3_endpoint: str | None = None) -> tuple[Any, list[str]]:
    """The files under ``path`` (itself if it is one) ending in ``suffixes``, sorted by name."""
    fs, p = filesystem(path, s3_endpoint)
    try:
        if fs.isfile(p):
            return fs, [p]
        if not fs.isdir(p):
            raise DataError(f"data.source.path: {path} does not exist; check the path (and the S3 endpoint/credentials "
                            "for s3://)")
        files = sorted(f for f in fs.find(p) if f.lower().endswith(suffixes))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network / permission errors become one clear line
        raise DataError(f"data.source.path: cannot list {path}: {type(e).__name__}: {e}") from None
    if not files:
        raise DataError(f"data.source.path: no {'/'.join(suffixes)} files under {path}")
    return fs, files
