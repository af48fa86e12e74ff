"""Keeping freed memory returnable to the OS in kd's processes.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which decoded batches
of a few to tens of MB come from the heap and fragment it: a long epoch then holds ~100 MB more than it
uses. A fixed threshold (1 MiB) keeps such blocks mmapped, so they go back to the OS when freed. Applied
to the kd process at start (``mallopt``) and to Ray workers and replicas through their environment."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 1 << 20
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Set glibc's mmap threshold in this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
