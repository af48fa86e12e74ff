"""Benchmark of the teacher deployment against limits measured in the same run (``kd bench serve``).

* ``direct_sps``: the same teacher forward (``TeacherRunner``) in this process at ``batch`` rows, with the
  replica's torch thread count: the limit of every served path.
* ``serve_batched_sps``: concurrent ``batch``-row input requests (``handle.infer``, ``inflight`` at a time).
* ``serve_stream_sps``: an epoch of ids through ``StreamFeatures`` (the trainer's path: ids out, features back,
  fp32 tensors and student inputs built on the client).
* ``serve_single_sps``: ``single_requests`` concurrent one-row requests under dynamic batching, next to
  ``noop_single_sps``: the same requests against a no-op batched deployment that answers with zero arrays of the
  same shapes and dtype (the per-request overhead ceiling: on a small machine a request costs ~1.5 ms of CPU
  between caller, router and replica, so one-row requests cannot approach the direct rate).
* ``bytes_per_sample_raw`` (fp32, as the teacher computes them), ``bytes_per_sample_raw_fp16`` and
  ``bytes_per_sample_projected`` (d_p, fp16): feature + logit bytes per sample of a response.

Direct, batched and stream are measured in interleaved rounds (rotating order) and each ratio is the median of
the per-round ratios; singles alternate teacher / no-op the same way. Also reported: how busy the replica kept the
teacher (``replica_busy_*``: forward seconds / wall seconds) and the forward's own rate inside the replica
(``replica_forward_sps``), which separate the deployment's overhead from CPU contention on a small machine.
The teacher is ``kdcore.zoo:digits_cnn`` of ``width`` (default 48: ~11 MFLOP per sample, a 256-row forward takes
~70 ms on one core, so the forward dominates a 256-row request) on generated 1x8x8 inputs; one replica with
``threads`` torch threads, the stream consumer with a training worker's thread count.
Targets: batched and stream >= 0.9x direct; single >= 0.8x the no-op ceiling.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

NOOP_APP = "kd-bench-noop"
TEACHER_APP = "kd-bench-teacher"


def bench_inputs(n: int = 4096, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A generated dataset (x: (n, 1, 8, 8) float32, y: (n,) int64) for the bench job's factory data source."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, num_classes, size=n)


def bench_job(rows: int, batch: int, width: int, threads: int, projected_dim: int, namespace: str):
    from kdcore.spec.job import JobSpec

    model = {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": width}}
    n_total = int(round(rows / 0.8))
    return JobSpec.from_dict({
        "name": "bench-serve",
        "teacher": {"model": model, "taps": ["embed", "block3"],
                    "serve": {"replicas": 1, "num_cpus": threads, "torch_threads": threads, "max_batch_size": batch,
                              "batch_wait_timeout_s": 0.005}},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed", "projector": {"kind": "linear"}}]},
        "losses": [{"kind": "kd"}],
        "data": {"source": {"kind": "factory", "target": "services.bench.serve:bench_inputs",
                            "kwargs": {"n": n_total}}, "val_fraction": 0.2, "batch_size": batch, "normalize": False},
        "features": {"mode": "stream", "stream": {"payload": "raw", "dtype": "fp16", "prefetch": 4,
                                                   "projected_dim": projected_dim}},
        "ray": {"namespace": namespace},
    })


def _rows_in(items: list) -> int:
    return sum(len(x) for x in items)


def _noop_deployment():
    from ray import serve

    @serve.deployment(name="noop")
    class NoopBatched:
        """Dynamic batching with no model: answers each request with zero arrays of the teacher's shapes."""

        def __init__(self, shapes: dict[str, list[int]], limits) -> None:
            self.shapes = {k: tuple(v) for k, v in shapes.items()}
            self._batch.set_max_batch_size(limits.max_batch_size)  # the teacher's limits (options.batch_limits)
            self._batch.set_batch_wait_timeout_s(limits.batch_wait_timeout_s)

        @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_rows_in)
        async def _batch(self, items: list[np.ndarray]) -> list[dict[str, Any]]:
            return [{"features": {k: np.zeros((len(x), *s), np.float16) for k, s in self.shapes.items()
                                  if k != "logits"},
                     "logits": np.zeros((len(x), *self.shapes["logits"]), np.float16), "mode": "raw",
                     "dtype": "fp16", "projector_version": None} for x in items]

        async def infer(self, x: np.ndarray, mode: str | None = None, dtype: str | None = None) -> dict[str, Any]:
            return await self._batch(np.ascontiguousarray(x, dtype=np.float32))

    return NoopBatched


def run(rows: int = 4096, batch: int = 256, width: int = 48, threads: int = 1, single_requests: int = 1024,
        inflight: int = 4, repeats: int = 5, single_repeats: int = 3, projected_dim: int = 128,
        log: Callable[[str], None] | None = print, namespace: str = "kd-bench") -> dict[str, Any]:
    """Run every measurement (see the module docstring); returns one dict of medians and ratios.

    The direct forward, the batched requests and the id stream are measured in interleaved rounds over the same
    ``rows`` rows (``repeats`` rounds, the order rotating), and each ratio is the median of the per-round ratios, so
    a change in the machine's load hits both sides of a ratio alike. Single-row requests alternate teacher / no-op the same way."""
    import ray
    import torch
    from ray import serve

    from kdcore.loop import build_teacher, load_split
    from services.teacher.app import delete_teacher_app, deployment_options, run_teacher_app
    from services.teacher.options import batch_limits
    from services.teacher.stream import StreamFeatures
    from services.teacher.wire import payload_nbytes

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    say = log or (lambda s: None)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=max(4, 2 * threads + 1), include_dashboard=False, namespace=namespace, log_to_driver=False)
    job = bench_job(rows, batch, width, threads, projected_dim, namespace)
    split = load_split(job)
    n_steps = split.n_train // batch
    inputs = [split.x_train[i * batch:(i + 1) * batch] for i in range(n_steps)]

    runner = build_teacher(job, device="cpu")  # the limit: the same forward, in this process
    shapes = {k: list(v.shape[1:]) for k, v in runner(torch.from_numpy(inputs[0][:2])).items()}
    noop_opts = deployment_options(job)
    try:
        noop = _noop_deployment().options(**noop_opts).bind(shapes, batch_limits(job.teacher.serve))
        serve.run_many([serve.RunTarget(noop, name=NOOP_APP, route_prefix=None)], wait_for_applications_running=False)
        handle = run_teacher_app(job, name=TEACHER_APP, route_prefix=None, projection="random", validate=False)
        t_wait = time.perf_counter()
        while serve.status().applications[NOOP_APP].status != "RUNNING":
            if time.perf_counter() - t_wait > 300:
                raise RuntimeError("the no-op deployment did not start")
            time.sleep(0.2)
        noop_handle = serve.get_app_handle(NOOP_APP)
        source = StreamFeatures(job, split, handle)
        epochs = iter(range(10**6))

        def direct() -> float:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)  # as many threads as the replica
            try:
                t0 = time.perf_counter()
                for x in inputs:
                    runner(torch.from_numpy(x))
                return n_steps * batch / (time.perf_counter() - t0)
            finally:
                torch.set_num_threads(prev)

        def batched() -> float:
            t0 = time.perf_counter()
            pending = []
            for x in inputs:
                pending.append(handle.infer.remote(x, mode="raw", dtype="fp16"))
                if len(pending) >= inflight:
                    pending.pop(0).result()
            for p in pending:
                p.result()
            return n_steps * batch / (time.perf_counter() - t0)

        def stream() -> float:
            prev = torch.get_num_threads()
            # the consumer runs with a training worker's torch threads (train.torch_threads or cpus_per_worker)
            torch.set_num_threads(job.train.torch_threads or max(1, int(job.train.cpus_per_worker)))
            try:
                t0 = time.perf_counter()
                n = sum(len(b) for b in source.epoch(next(epochs)))
                return n / (time.perf_counter() - t0)
            finally:
                torch.set_num_threads(prev)

        replica_fwd: list[float] = []

        def busy(fn: Callable[[], float], out: list[float]) -> float:
            """Run ``fn``; append the fraction of its wall time the replica spent in teacher forwards (and the
            replica's own forward rate to ``replica_fwd``)."""
            i0 = handle.info.remote().result()
            t0 = time.perf_counter()
            rate = fn()
            dt = time.perf_counter() - t0
            i1 = handle.info.remote().result()
            out.append((i1["forward_s"] - i0["forward_s"]) / dt)
            replica_fwd.append((i1["batch_rows"] - i0["batch_rows"]) / (i1["forward_s"] - i0["forward_s"]))
            return rate

        direct(), batched(), stream()  # warm every path (and the stream client's server check)
        rates: dict[str, list[float]] = {"direct": [], "batched": [], "stream": []}
        busy_b: list[float] = []
        busy_s: list[float] = []
        sides = [("direct", direct), ("batched", lambda: busy(batched, busy_b)), ("stream", lambda: busy(stream, busy_s))]
        for r in range(repeats):  # the order rotates each round, so no side always runs first or last
            for name, fn in sides[r % 3:] + sides[:r % 3]:
                rates[name].append(fn())
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratio_b = statistics.median(b / d for b, d in zip(rates["batched"], rates["direct"]))
        ratio_s = statistics.median(s_ / d for s_, d in zip(rates["stream"], rates["direct"]))
        say(f"direct forward, batch {batch}, {threads} thread(s):  {med['direct']:8.0f} samples/s  (the same forward "
            f"inside the replica meanwhile: {statistics.median(replica_fwd):.0f} samples/s)")
        say(f"served, {batch}-row requests x{inflight} in flight: {med['batched']:8.0f} samples/s  ({ratio_b:.2f}x "
            f"direct; replica forward-busy {statistics.median(busy_b):.2f})")
        say(f"served, id stream (StreamFeatures, prefetch {job.features.stream.prefetch}):  {med['stream']:8.0f} "
            f"samples/s  ({ratio_s:.2f}x direct; replica forward-busy {statistics.median(busy_s):.2f})")

        # -- single-row requests: teacher vs no-op ----------------------------------------------------------------
        singles = [split.x_train[i:i + 1] for i in range(single_requests)]

        def singles_against(h) -> float:
            t0 = time.perf_counter()
            pending = [h.infer.remote(x, mode="raw", dtype="fp16") for x in singles]
            for p in pending:
                p.result()
            return len(singles) / (time.perf_counter() - t0)

        singles_against(noop_handle), singles_against(handle)  # warm
        single_all, noop_all = [], []
        for _ in range(single_repeats):
            single_all.append(singles_against(handle))
            noop_all.append(singles_against(noop_handle))
        single_sps, noop_sps = statistics.median(single_all), statistics.median(noop_all)
        ratio_1 = statistics.median(a / b for a, b in zip(single_all, noop_all))
        say(f"served, {single_requests} concurrent 1-row requests:  {single_sps:8.0f} samples/s; no-op ceiling "
            f"{noop_sps:8.0f} samples/s  ({ratio_1:.2f}x)")

        # -- bytes per sample -----------------------------------------------------------------------------------
        ids = np.arange(batch)
        raw32 = handle.features.remote(ids, mode="raw", dtype="fp32").result()
        raw16 = handle.features.remote(ids, mode="raw", dtype="fp16").result()
        proj = handle.features.remote(ids, mode="projected", dtype="fp16").result()
        bps_raw, bps_raw16, bps_proj = (payload_nbytes(r) / batch for r in (raw32, raw16, proj))
        say(f"bytes/sample: raw fp32 {bps_raw:.0f}, raw fp16 {bps_raw16:.0f}, projected (d_p={projected_dim}, "
            f"fp16) {bps_proj:.0f}  ({bps_raw / bps_proj:.1f}x less than raw fp32)")
    finally:
        for name in (TEACHER_APP, NOOP_APP):
            try:
                delete_teacher_app(name, namespace)
            except Exception:  # noqa: BLE001 - best effort teardown
                pass
        if own_ray:
            serve.shutdown()
            ray.shutdown()

    result = {
        "direct_sps": med["direct"],
        "serve_batched_sps": med["batched"],
        "serve_stream_sps": med["stream"],
        "serve_single_sps": single_sps,
        "noop_single_sps": noop_sps,
        "ratio_batched": ratio_b,
        "ratio_stream": ratio_s,
        "ratio_single_to_ceiling": ratio_1,
        "bytes_per_sample_raw": bps_raw,
        "bytes_per_sample_raw_fp16": bps_raw16,
        "bytes_per_sample_projected": bps_proj,
        # fraction of the wall time the replica spent in teacher forwards (1.0: the forward is the bottleneck)
        "replica_busy_batched": statistics.median(busy_b),
        "replica_busy_stream": statistics.median(busy_s),
        # the teacher forward's own rate inside the replica during the served rounds (vs direct_sps: contention)
        "replica_forward_sps": statistics.median(replica_fwd),
        "teacher": f"kdcore.zoo:digits_cnn(width={width}) on generated 1x8x8 inputs",
        "batch": batch, "threads": threads, "rows": n_steps * batch, "single_requests": single_requests,
        "inflight": inflight, "repeats": repeats, "single_repeats": single_repeats, "projected_dim": projected_dim,
        "samples": {**rates, "single": single_all, "noop": noop_all},
        "seconds": time.perf_counter() - t_start,
        "load_average": {"start": load_start, "end": os.getloadavg()},  # other work on the machine skews ratios
    }
    say(f"ratios: batched {ratio_b:.2f}x direct, stream {ratio_s:.2f}x direct, single {ratio_1:.2f}x the no-op "
        f"ceiling  ({result['seconds']:.0f} s)")
    return result


def main() -> None:  # python -m services.bench.serve
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
