"""The allocator settings of kd's processes: a model process reuses heap pages for the tens of MB a forward
allocates again and again; a data process maps such buffers on their own, so they go back to the OS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.memtune import DATA_MMAP_THRESHOLD, ENV, LOCAL_MMAP_THRESHOLD, MODEL_MMAP_THRESHOLD

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocates, fills and frees a buffer of `mb` MB 20 times under a setting; prints the page faults of the last 19.
PROBE = """
import json, resource, sys
import numpy as np
from services.memtune import tune_malloc
assert tune_malloc(int(sys.argv[1]))
mb = int(sys.argv[2])
np.ones(mb << 18, dtype=np.float32)  # the first one faults in wherever it comes from
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    np.ones(mb << 18, dtype=np.float32)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(threshold: int, mb: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold), str(mb)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_a_buffer_allocated_again_reuses_heap_pages_below_the_threshold_and_is_mapped_anew_above():
    pages = 40 * 2**20 // 4096  # a 40 MB buffer: 10,240 pages of 4 KiB (fewer faults with huge pages)
    assert DATA_MMAP_THRESHOLD < LOCAL_MMAP_THRESHOLD < 40 * 2**20 < MODEL_MMAP_THRESHOLD
    reused, mapped = _faults(MODEL_MMAP_THRESHOLD, 40), _faults(LOCAL_MMAP_THRESHOLD, 40)
    assert reused < pages  # the same heap pages 19 times: (almost) no faults
    assert mapped > 5 * max(reused, 100)  # a fresh mapping each time: its pages fault in again
    small = 19 * 4 * 2**20 // 4096  # 19 buffers of 4 MB
    assert _faults(LOCAL_MMAP_THRESHOLD, 4) < small // 5 < small // 2 < _faults(DATA_MMAP_THRESHOLD, 4)


def test_every_ray_process_of_a_job_starts_with_the_data_setting(monkeypatch):
    from kdcore.spec.job import RaySpec
    from services.raysession import init_kwargs, job_env_vars

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ENV == {"MALLOC_MMAP_THRESHOLD_": str(DATA_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(DATA_MMAP_THRESHOLD)}
    assert ENV.items() <= job_env_vars().items()
    kwargs, _ = init_kwargs(RaySpec())
    assert ENV.items() <= kwargs["runtime_env"]["env_vars"].items()
