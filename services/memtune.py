"""How glibc's allocator hands memory back in kd's processes. Ray workers, replicas and data tasks get ``ENV``
through the job's runtime environment; the kd process sets its own at start (``tune_malloc``).

Fixed thresholds, not glibc's adaptive ones, so what a process keeps is the same bound at any dataset size and
epoch length. A heap hands the same pages back to the next allocation without faulting them in again, which is
what a training step, a teacher forward or a decoded block needs: the same tens of MB every time.

- Ray processes (``ENV``): allocations up to 64 MiB come from the heap (a 256-row batch of 3x112x112 inputs is
  38 MB), up to 128 MiB of freed heap top is kept.
- the kd process: an 8 MiB threshold (16 MiB kept). It is the whole job in ``kd train --local``, held under a
  memory bound there (its read buffer is one mapping of its own), and only a driver in Ray jobs.

Measured on the 2-core machine (no GPU), in one process, alternating settings: the bench teacher's CPU forward
(256-row batches) ran 1,140-1,340 rows/s with a 1 MiB threshold (kd's earlier setting: every conv output a
fresh mapping whose pages faulted in again) and 3,240-3,650 with the workers' 64 MiB; the decode + augment
loop moved less (2,900 -> 3,060 rows/s). ``kd train --local`` on 12,000 PNG rows (1.27 GB decoded) peaked at
716-728 MB with the kd process's setting (737 with 1 MiB, 790-810 with 64 MiB) and took 31 s instead of 36."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

WORKER_MMAP_THRESHOLD = 64 << 20
LOCAL_MMAP_THRESHOLD = 8 << 20
# Freed heap top kept: twice the threshold (as glibc's adaptive setting keeps), else a freed buffer near the
# threshold would be handed back and faulted in again by the next allocation of its size.
ENV = {"MALLOC_MMAP_THRESHOLD_": str(WORKER_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(2 * WORKER_MMAP_THRESHOLD)}
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1


def tune_malloc(worker: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds in this process: the kd process's, or with ``worker`` those of the Ray
    processes (``ENV``; a bench measuring their work in-process); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        threshold = WORKER_MMAP_THRESHOLD if worker else LOCAL_MMAP_THRESHOLD
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False
