"""How glibc's allocator hands memory back in kd's processes: fixed thresholds, not glibc's adaptive ones, so
what a process keeps is the same bound at any dataset size and epoch length.

- Data processes (every Ray worker of a job through its environment, ``ENV``: Ray Data's read and decode tasks
  among them): allocations from 1 MiB up are mapped on their own and go back to the OS when freed. Decoded
  blocks and batches of a few to tens of MB would otherwise come from the heap and fragment it: a long epoch
  held ~100 MB more than it used, and the decode tasks' memory climbed through the epoch (878 -> 1,084 MB in
  ``kd bench scale`` at 4N with 64 MiB) where it stays flat with 1 MiB.
- Processes that run models (the teacher replicas and the Ray Train workers, ``tune_for_models`` at their
  start): allocations up to 64 MiB come from the heap (a 256-row batch of 3x112x112 inputs is 38 MB) and as
  much freed heap is kept, so the activations a forward allocates again reuse the same pages instead of
  faulting fresh ones in. The bench teacher's CPU forward ran 1,140-1,340 rows/s with 1 MiB and 3,240-3,650
  with 64 MiB (2 cores, in one process, alternating); their memory stays flat through an epoch either way.
- The kd process (``tune_malloc`` at start; the whole job in ``kd train --local``, held under a memory bound
  there): 8 MiB. ``kd train --local`` on 12,000 PNG rows (1.27 GB decoded) peaked at 716-728 MB and took 31 s
  (1 MiB: 737 MB, 36 s; 64 MiB: 790-810 MB).

The freed heap kept (the trim threshold) is as much as the threshold: a freed buffer up to it stays for the
next one of its size (with less it is handed back and faulted in again); more would only be held longer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

DATA_MMAP_THRESHOLD = 1 << 20
MODEL_MMAP_THRESHOLD = 64 << 20
LOCAL_MMAP_THRESHOLD = 8 << 20
ENV = {"MALLOC_MMAP_THRESHOLD_": str(DATA_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(DATA_MMAP_THRESHOLD)}
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1


def tune_malloc(threshold: int = LOCAL_MMAP_THRESHOLD) -> bool:
    """Map allocations from ``threshold`` up on their own and keep up to ``threshold`` of freed heap, in this
    process (default: the kd process's setting); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def tune_for_models() -> bool:
    """The setting of a process that runs models (a teacher replica, a Ray Train worker)."""
    return tune_malloc(MODEL_MMAP_THRESHOLD)
