"""The cache build's input pipeline on Ray Data: inputs are read, decoded and augmented by Ray Data tasks,
and each whole chunk goes to the teacher deployment, whose replicas only run the forward and write it.

``feed_dataset(...)`` maps a list of leased chunks to ``{chunk, rows, replica, decoded_here}`` rows, one per
chunk written.
Each task makes one contiguous read of its chunk's training rows (``RowMapper.cache_rows``: decode, normalise,
augment with the seeded parameters), sends the inputs and their augmentation parameters to the replica's
``write_chunk`` and waits for it. The tasks ask for no logical CPU (Ray Train and the replicas hold theirs)
and their pool is bounded, so while one chunk of a replica is forwarded or written the next one is decoded;
where they run is up to Ray, so CPU-only nodes take the decoding and the teacher's GPU node runs models.

A call whose replica died is sent again (Serve routes it to a live replica); a kd error (non-finite teacher
outputs, a corrupted store) stops the build with its own message.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kdcore.errors import KDError
from services.data.context import data_context

_HANDLES: dict[str, Any] = {}


def _handle(app: str):
    from ray import serve

    if app not in _HANDLES:
        _HANDLES[app] = serve.get_app_handle(app)
    return _HANDLES[app]


def feed_chunks(batch: dict[str, np.ndarray], job_json: dict[str, Any] | None, app: str, uri: str, manifest: dict,
                s3_endpoint: str | None, retries: int) -> dict[str, np.ndarray]:
    """``{chunk, start, stop}`` rows -> ``{chunk, rows, replica, decoded_here}``: each chunk's inputs, written by
    a replica.
    ``job_json=None``: the replica reads the inputs itself (datasets held in memory, which every replica holds)."""
    mapper = None
    if job_json is not None:  # a Ray Data task decoding: one thread (its pool runs ``tasks`` of them)
        import torch

        torch.set_num_threads(1)
        mapper = data_context(job_json).mapper
    with_aug = manifest.get("aug_params", 0) > 0
    out: dict[str, list] = {"chunk": [], "rows": [], "replica": [], "decoded_here": []}
    for i, start, stop in zip(batch["chunk"].tolist(), batch["start"].tolist(), batch["stop"].tolist()):
        x = aug = None
        if mapper is not None:
            got = mapper.cache_rows(start, stop)
            x, aug = got.x, (got.params if with_aug else None)
        for attempt in range(retries + 1):
            try:
                r = _handle(app).write_chunk.remote(uri, manifest, i, x, aug, 1 + i, s3_endpoint).result()
                break
            except KDError:
                raise
            except Exception as e:  # noqa: BLE001 - the replica died mid-call: send the chunk again
                if attempt == retries:
                    first = str(e).splitlines()[0] if str(e) else ""
                    raise RuntimeError(f"cache chunk {i} failed {retries + 1} times; last error: "
                                       f"{type(e).__name__}: {first}") from None
                time.sleep(min(2.0 ** attempt, 10.0))  # until Serve's router has dropped the dead replica
        out["chunk"].append(i)
        out["rows"].append(stop - start)
        out["replica"].append(r["replica"])
        out["decoded_here"].append(x is not None)
    return {"chunk": np.asarray(out["chunk"], np.int64), "rows": np.asarray(out["rows"], np.int64),
            "replica": np.asarray(out["replica"], dtype=object), "decoded_here": np.asarray(out["decoded_here"])}


def feed_dataset(job_json: dict[str, Any] | None, app: str, uri: str, manifest: dict, s3_endpoint: str | None,
                 bounds: list[tuple[int, int, int]], tasks: int, retries: int = 3):
    """The Ray Data pipeline writing chunks ``bounds`` = [(chunk, start_row, stop_row)] with ``tasks`` at once
    (``job_json=None``: the replicas read the inputs)."""
    import ray.data

    items = [{"chunk": i, "start": a, "stop": b} for i, a, b in bounds]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(feed_chunks, batch_size=1, batch_format="numpy", num_cpus=0,
                          compute=ray.data.TaskPoolStrategy(size=max(1, tasks)),
                          fn_kwargs={"job_json": job_json, "app": app, "uri": uri, "manifest": manifest,
                                     "s3_endpoint": s3_endpoint, "retries": retries})


def kd_error_in(err: BaseException) -> KDError | None:
    """The kd error a Ray Data failure carries (a task's exception arrives wrapped), if any."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KDError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None
