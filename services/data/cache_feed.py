"""The cache build's input pipeline on Ray Data: inputs are read, decoded and augmented by Ray Data tasks,
and each whole chunk goes to the teacher deployment, whose replicas only run the forward and write it.

``feed_dataset(...)`` maps a list of leased chunks to ``{chunk, rows, replica, decoded_here}`` rows, one per
chunk written; ``send_chunk`` is one chunk's call, which the build also makes from its own threads for datasets
the replicas read themselves.
Each task makes one contiguous read of its chunk's training rows (``RowMapper.cache_rows``: decode, normalise,
augment with the seeded parameters; decoded images as uint8 pixels, which the replica converts), sends the
inputs and their augmentation parameters to the replica's ``write_chunk`` and waits for it. The tasks ask for no logical CPU (Ray Train and the replicas hold theirs)
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


def send_chunk(app: str, uri: str, manifest: dict, chunk: int, start: int, stop: int, s3_endpoint: str | None,
               retries: int, mapper=None) -> dict[str, Any]:
    """Has a replica of ``app`` write cache chunk ``chunk`` (training rows ``start:stop``) and waits for it:
    ``{chunk, rows, replica, decoded_here}``. With a ``RowMapper`` the inputs are decoded and augmented here and
    sent along; without one the replica reads them itself (datasets held in memory, which every replica holds).
    A call whose replica died is sent again, up to ``retries`` times."""
    x = aug = None
    if mapper is not None:
        got = mapper.cache_rows(start, stop, pixels=True)  # images as uint8 pixels: a quarter of the bytes
        x, aug = got.x, (got.params if manifest.get("aug_params", 0) > 0 else None)
    for attempt in range(retries + 1):
        try:
            r = _handle(app).write_chunk.remote(uri, manifest, chunk, x, aug, 1 + chunk, s3_endpoint).result()
            break
        except KDError:
            raise
        except Exception as e:  # noqa: BLE001 - the replica died mid-call: send the chunk again
            if attempt == retries:
                first = str(e).splitlines()[0] if str(e) else ""
                raise RuntimeError(f"cache chunk {chunk} failed {retries + 1} times; last error: "
                                   f"{type(e).__name__}: {first}") from None
            time.sleep(min(2.0 ** attempt, 10.0))  # until Serve's router has dropped the dead replica
    return {"chunk": chunk, "rows": stop - start, "replica": r["replica"], "decoded_here": x is not None}


def feed_chunks(batch: dict[str, np.ndarray], job_json: dict[str, Any], app: str, uri: str, manifest: dict,
                s3_endpoint: str | None, retries: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: ``{chunk, start, stop}`` rows -> ``{chunk, rows, replica,
    decoded_here}``, each chunk's inputs decoded in this task and written by a replica."""
    import torch

    torch.set_num_threads(1)  # its pool runs ``tasks`` of them
    mapper = data_context(job_json).mapper
    out = [send_chunk(app, uri, manifest, i, a, b, s3_endpoint, retries, mapper)
           for i, a, b in zip(batch["chunk"].tolist(), batch["start"].tolist(), batch["stop"].tolist())]
    return {"chunk": np.asarray([o["chunk"] for o in out], np.int64),
            "rows": np.asarray([o["rows"] for o in out], np.int64),
            "replica": np.asarray([o["replica"] for o in out], dtype=object),
            "decoded_here": np.asarray([o["decoded_here"] for o in out])}


def feed_dataset(job_json: dict[str, Any], app: str, uri: str, manifest: dict, s3_endpoint: str | None,
                 bounds: list[tuple[int, int, int]], tasks: int, retries: int = 3):
    """The Ray Data pipeline writing chunks ``bounds`` = [(chunk, start_row, stop_row)] with ``tasks`` at once."""
    import ray.data

    items = [{"chunk": i, "start": a, "stop": b} for i, a, b in bounds]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(feed_chunks, batch_size=1, batch_format="numpy", num_cpus=0,
                          compute=ray.data.TaskPoolStrategy(size=max(1, tasks)),
                          fn_kwargs={"job_json": job_json, "app": app, "uri": uri, "manifest": manifest,
                                     "s3_endpoint": s3_endpoint, "retries": retries})
