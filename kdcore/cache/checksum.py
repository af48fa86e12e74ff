"""Checksums of chunk bytes (the leaf of the cache package: numpy and google-crc32c only)."""

from __future__ import annotations

import hashlib

import numpy as np

try:  # hardware CRC32C, ~10 GB/s, releases the GIL; zarr itself depends on google-crc32c
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover - zarr requires it
    _crc32c = None


def checksum(data: np.ndarray, algorithm: str = "crc32c") -> str:
    """Checksum of an array's C-order bytes (the rows of one chunk, without padding), as hex text."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if algorithm == "crc32c":
        if _crc32c is None:  # pragma: no cover
            raise RuntimeError("google-crc32c is not installed")
        return f"{_crc32c.value(flat):08x}"
    if algorithm == "sha256":
        return hashlib.sha256(flat).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def crc32c_extend(crc: int, data: np.ndarray) -> int:
    """CRC32C of ``data`` (uint8, contiguous) continuing ``crc``."""
    if _crc32c is None:  # pragma: no cover
        raise RuntimeError("google-crc32c is not installed")
    return _crc32c.extend(crc, data)


def default_algorithm() -> str:
    return "crc32c" if _crc32c is not None else "sha256"
