"""The allocator setting of kd's processes: Ray workers reuse heap pages for the tens of MB a step or a block
allocates again and again; the kd process does the same for buffers under its lower threshold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.memtune import ENV, LOCAL_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocates, fills and frees a buffer of `mb` MB 20 times under a setting; prints the page faults of the last 19.
PROBE = """
import json, resource, sys
import numpy as np
from services.memtune import tune_malloc
assert tune_malloc(worker=sys.argv[1] == "worker")
mb = int(sys.argv[2])
np.ones(mb << 18, dtype=np.float32)  # the first one faults in wherever it comes from
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    np.ones(mb << 18, dtype=np.float32)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(setting: str, mb: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, setting, str(mb)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_buffer_allocated_again_reuses_heap_pages_below_the_threshold_and_is_mapped_anew_above():
    pages = 40 * 2**20 // 4096  # a 40 MB buffer: 10,240 pages of 4 KiB (fewer faults with huge pages)
    assert LOCAL_MMAP_THRESHOLD < 40 * 2**20 < WORKER_MMAP_THRESHOLD
    reused, mapped = _faults("worker", 40), _faults("local", 40)
    assert reused < pages  # the same heap pages 19 times: (almost) no faults
    assert mapped > 5 * max(reused, 100)  # a fresh mapping each time: its pages fault in again
    assert _faults("local", 4) < 19 * 1024 // 4  # under the kd process's threshold too: reused


def test_every_ray_process_of_a_job_gets_the_worker_setting(monkeypatch):
    from kdcore.spec.job import RaySpec
    from services.raysession import init_kwargs, job_env_vars

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ENV == {"MALLOC_MMAP_THRESHOLD_": str(WORKER_MMAP_THRESHOLD),
                   "MALLOC_TRIM_THRESHOLD_": str(2 * WORKER_MMAP_THRESHOLD)}
    assert ENV.items() <= job_env_vars().items()
    kwargs, _ = init_kwargs(RaySpec())
    assert ENV.items() <= kwargs["runtime_env"]["env_vars"].items()
