"""A cache build on Ray whose teacher replica is killed mid-build: the build ends complete, every chunk checks,
and the features equal the teacher's computed in-process (no chunk lost, none written from wrong inputs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kdcore.data.synth import write_parquet_images
from kdcore.spec import JobSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _replica_pids(app: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"ServeReplica:{app}" in cmd:
                out.append(int(d.name))
    return out


def test_cache_build_survives_a_killed_replica(ray_clean, tmp_path):
    from kdcore.cache.jobs import compute_rows
    from kdcore.cache.layout import DONE_GROUP
    from kdcore.cache.reader import read_chunk
    from kdcore.cache.verify import verify
    from kdcore.cache.writer import CacheWriter
    from kdcore.loop import build_teacher, load_split
    from services.jobs.cache_build import ensure_cache

    write_parquet_images(tmp_path / "train", 480, size=20, shards=2, rows_per_group=64)
    uri = tmp_path / "cache"
    model = {"kind": "factory", "target": "tests.onray.replica_models:slow_image_cnn", "kwargs": {"width": 8}}
    job = JobSpec.from_dict({
        "name": "build-kill",
        "teacher": {"model": model, "taps": ["embed"], "serve": {"replicas": 2, "max_batch_size": 32}},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:image_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {"kind": "parquet", "path": str(tmp_path / "train"), "image_column": "image",
                            "label_column": "label", "id_column": "id", "image_size": 20},
                 "views": 2, "augment": {"kind": "random_resized_crop", "size": 16, "flip": True}},
        "features": {"mode": "cache", "cache": {"uri": str(uri), "chunk_rows": 32, "dtype": "fp32"}},
        "output": {"dir": str(tmp_path / "runs")},
    })
    split = load_split(job)
    box: dict = {}

    def build() -> None:
        try:
            box["r"] = ensure_cache(job, split, log=None)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            box["error"] = e

    t = threading.Thread(target=build)
    t.start()
    killed = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and t.is_alive():
        done = len(list((uri / DONE_GROUP).glob("*"))) if (uri / DONE_GROUP).exists() else 0
        pids = _replica_pids("kd-teacher-build-kill")
        if done >= 3 and len(pids) == 2:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    t.join(timeout=420)
    assert killed is not None, f"no replica killed: {done} chunks done, replicas {pids}"
    assert not t.is_alive() and "error" not in box, box.get("error")
    r = box["r"]
    n_rows = r["manifest"]["n_rows"]
    n_chunks = -(-n_rows // 32)
    assert r["inputs_decoded_by"] == {"ray_data": n_rows, "replicas": 0}
    v = verify(str(uri))
    assert v.ok and v.manifest_complete and v.checked == n_chunks
    # every chunk holds the features of exactly its rows' views, as the teacher computes them in-process
    compute = compute_rows(job, split, build_teacher(job, device="cpu"))
    cache = CacheWriter.open(str(uri))
    for i in range(n_chunks):
        a, b = cache.chunk_bounds(i)
        want = compute(a, b)
        got = read_chunk(cache, i)
        for key in ("embed", "logits", "aug"):
            path = next(p for p in got if p.endswith(key))
            np.testing.assert_allclose(np.asarray(got[path], np.float32), want[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"chunk {i} {key}")
