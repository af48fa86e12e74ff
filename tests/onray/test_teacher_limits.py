"""The teacher deployment's refusals on a real local Serve: non-finite inputs and outputs (over HTTP, through the
handle, on the cache-fill path), and the HTTP ingress under held connections (a read timeout on bodies, a bound
on bodies in flight, /healthz responsive, replica memory back where it started).

One deployment (one replica, so the per-replica bounds are exact) is shared by the module. Its teacher is the
digits CNN with inf logits for the few training rows whose pixel sum is above ``HOT`` (``replica_models``).
Every socket is on 127.0.0.1; each test opens a bounded number of them and ends by itself.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from kdcore.loop import load_split
from kdcore.spec import JobSpec
from tests.onray.serve_http import open_post, read_response, serve_on_free_port

pytestmark = pytest.mark.ray

APP = "kd-teacher-limits"
PREFIX = "/teacher-limits"
TOKEN = "limits-token"
HOT = 17.0  # training rows 666, 1399 and 1414 of the digits split are above it
TIMEOUT_S = 2.0
MAX_BODIES = 4


def _job(token_file: str, port: int, cache_uri: str) -> JobSpec:
    return JobSpec.from_dict({
        "name": "limits",
        "teacher": {"model": {"kind": "factory", "target": "tests.onray.replica_models:overflow_digits",
                              "kwargs": {"width": 8, "threshold": HOT}},
                    "taps": ["embed", "block3"],
                    "serve": {"replicas": 1, "num_cpus": 1, "max_batch_size": 64, "batch_wait_timeout_s": 0.002,
                              "http": {"token_file": token_file, "port": port, "max_batch": 32, "max_body_mb": 1.0,
                                       "body_read_timeout_s": TIMEOUT_S, "max_inflight_bodies": MAX_BODIES}}},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}],
        "data": {"source": {"kind": "sklearn_digits"}, "batch_size": 100},
        "features": {"mode": "cache", "cache": {"uri": cache_uri, "chunk_rows": 200, "dtype": "fp32"},
                     "stream": {"payload": "raw", "dtype": "fp32"}},
        "train": {"epochs": 1, "num_workers": 0, "seed": 3},
        "ray": {"namespace": "kd-test"},
    })


@pytest.fixture(scope="module")
def limits(ray_cluster, tmp_path_factory):
    from types import SimpleNamespace

    from services.raycleanup import cleanup_namespace
    from services.teacher.app import delete_teacher_app, run_teacher_app

    tmp = tmp_path_factory.mktemp("limits")
    (tmp / "token").write_text(TOKEN)
    port = serve_on_free_port()
    job = _job(str(tmp / "token"), port, str(tmp / "cache"))
    handle = run_teacher_app(job, name=APP, route_prefix=PREFIX, projection="random", timeout_s=300,
                             health_check_period_s=1.0)
    try:
        split = load_split(job)
        hot = np.flatnonzero(split.x_train.reshape(split.n_train, -1).sum(1) > HOT)
        assert 0 < len(hot) <= 5
        yield SimpleNamespace(job=job, handle=handle, split=split, hot=hot, port=port,
                              url=f"http://127.0.0.1:{port}{PREFIX}", tmp=tmp)
    finally:
        delete_teacher_app(APP, "kd-test")
        cleanup_namespace("kd-test")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _post_npy(url: str, x: np.ndarray, **kw) -> requests.Response:
    from services.teacher.wire import encode_npy

    return requests.post(url + "/v1/infer", data=encode_npy(x), timeout=30,
                         headers={"Content-Type": "application/x-npy", **_auth()}, **kw)


def _cold_rows(limits, n: int) -> np.ndarray:
    return np.setdiff1d(np.arange(n + len(limits.hot)), limits.hot)[:n]


# -- non-finite inputs and outputs ----------------------------------------------------------------------
def test_inputs_that_overflow_float32_are_refused_with_400_naming_the_rows(limits):
    x = limits.split.x_train[_cold_rows(limits, 6)].astype(np.float64)
    x[[1, 4], 0, 0, 0] = 1e300  # finite as float64, inf as float32
    r = _post_npy(limits.url, x)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["rows"] == [1, 4] and "input rows [1, 4] hold NaN or inf after the cast to float32" in body["detail"]
    x32 = limits.split.x_train[:3].copy()
    x32[2, 0, 1, 1] = np.nan
    r = _post_npy(limits.url, x32)
    assert r.status_code == 400 and r.json()["rows"] == [2]
    from kdcore.errors import UserError

    with pytest.raises(UserError, match=r"input rows \[1, 4\] hold NaN or inf after the cast"):
        limits.handle.infer.remote(x).result()


def test_outputs_that_overflow_are_an_error_naming_the_rows_never_a_200(limits):
    from kdcore.errors import TeacherError

    cold = limits.split.x_train[_cold_rows(limits, 5)]
    x = cold.copy()
    x[[0, 3]] = 3e38  # finite float32 inputs whose forward overflows
    for dtype in ("fp32", "fp16", "bf16"):
        r = _post_npy(limits.url, x, params={"dtype": dtype})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "non_finite_output" and body["rows"] == [0, 3]
        assert "the teacher produced non-finite values (NaN or inf) for request rows [0, 3]" in body["detail"]
    # finite outputs that overflow fp16 in the cast: refused too, with the fix in the message
    def peak(r: dict) -> float:
        return max(float(np.abs(a).max()) for a in [*r["features"].values(), r["logits"]])

    xs = limits.split.x_train
    neg = xs[np.flatnonzero(xs.reshape(len(xs), -1).sum(1) < 0)[:5]]  # scaled up, their pixel sums stay below HOT
    scale = next(s for s in (10.0**k for k in range(1, 30))
                 if peak(limits.handle.infer.remote(neg * s, dtype="fp32").result()) > 1e5)
    big = neg * scale  # finite fp32 outputs, beyond fp16's 65504
    assert np.isfinite(peak(limits.handle.infer.remote(big, dtype="fp32").result()))
    r = _post_npy(limits.url, big, params={"dtype": "fp16"})
    assert r.status_code == 422 and "cast to fp16" in r.json()["detail"], r.text
    assert _post_npy(limits.url, big, params={"dtype": "fp32"}).status_code == 200
    assert _post_npy(limits.url, big, params={"dtype": "bf16"}).status_code == 200
    # the handle API raises the kdcore error; the training ids are named for id requests
    with pytest.raises(TeacherError, match=r"request rows \[0, 3\]"):
        limits.handle.infer.remote(x).result()
    ids = np.concatenate([_cold_rows(limits, 2), limits.hot[:1]])
    with pytest.raises(TeacherError, match=rf"request rows \[2\] \(training ids \[{limits.hot[0]}\]\)"):
        limits.handle.features.remote(ids).result()
    r = requests.post(limits.url + "/v1/features", json={"ids": ids.tolist()}, headers=_auth(), timeout=30)
    assert r.status_code == 422 and r.json()["rows"] == [2]
    # a request of finite rows in the same batch queue is answered
    assert limits.handle.infer.remote(cold).result()["logits"].shape == (5, 10)


def test_cache_fill_raises_and_writes_no_chunk_with_nan(limits):
    from kdcore.cache.jobs import job_manifest
    from kdcore.cache.writer import CacheWriter
    from kdcore.data.rows import RowMapper
    from kdcore.errors import TeacherError
    from kdcore.loop import build_teacher

    job, split, hot = limits.job, limits.split, limits.hot
    with pytest.raises(TeacherError, match=rf"cache rows \[{hot[0]}\]"):
        limits.handle.features_for_rows.remote(int(hot[0]) - 3, int(hot[0]) + 1).result()
    manifest = job_manifest(job, split, build_teacher(job, device="cpu"))
    uri = job.features.cache.uri
    writer = CacheWriter.open_or_create(uri, manifest, split.ids_train)
    bad_chunk = int(hot[0]) // job.features.cache.chunk_rows
    chunks = [bad_chunk - 1, bad_chunk] if bad_chunk > 0 else [bad_chunk]
    for i in chunks[:-1]:  # a finite chunk is written: inputs read by the replica
        assert limits.handle.write_chunk.remote(uri, manifest.to_dict(), i, None, None, 1).result()["chunk"] == i
    a, b = writer.chunk_bounds(bad_chunk)
    x = RowMapper(split, job.data).cache_rows(a, b).x  # inputs decoded elsewhere, as Ray Data tasks send them
    with pytest.raises(TeacherError, match="non-finite"):
        limits.handle.write_chunk.remote(uri, manifest.to_dict(), bad_chunk, x, None, 1).result()
    done = CacheWriter.open(uri, manifest).done_chunks()
    assert bad_chunk not in done  # never written with NaN; the chunk before it (finite) was
    assert set(chunks[:-1]) <= set(done)
    del writer


# -- HTTP under held connections --------------------------------------------------------------------------
def _info(limits) -> dict:
    return limits.handle.info.remote().result(timeout_s=30)


def _healthz_s(limits) -> float:
    t0 = time.monotonic()
    r = requests.get(limits.url + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["ok"] is True
    return time.monotonic() - t0


def _held(limits, n: int, declared: int = 900_000, sent: int = 2_000) -> list:
    headers = {"Content-Type": "application/x-npy", **_auth()}
    return [open_post(limits.port, PREFIX + "/v1/infer", declared, b"\0" * sent, headers) for _ in range(n)]


def _wait_inflight(limits, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _info(limits)["http"]["bodies_inflight"] != n:
        assert time.monotonic() < deadline, f"bodies in flight stayed at {_info(limits)['http']['bodies_inflight']}"
        time.sleep(0.05)


def test_query_parameters_are_checked_only_after_the_token(limits):
    x = limits.split.x_train[:2]
    from services.teacher.wire import encode_npy

    r = requests.post(limits.url + "/v1/infer?mode=bogus", data=encode_npy(x), timeout=30,
                      headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 401 and "mode" not in r.text
    r = _post_npy(limits.url, x, params={"mode": "bogus"})
    assert r.status_code == 422 and "bad query parameters: mode" in r.json()["detail"]
    assert requests.get(limits.url + "/docs", timeout=30).status_code == 404  # no page that loads a public CDN


def test_a_slow_body_is_cut_off_with_408_after_the_read_timeout(limits):
    t0 = time.monotonic()
    (s,) = _held(limits, 1)
    r = read_response(s, timeout_s=TIMEOUT_S + 30)
    took = time.monotonic() - t0
    assert r["status"] == 408, r
    assert b"did not arrive within 2.0 s" in r["body"] and b"2000 bytes of the 900000 declared" in r["body"]
    assert TIMEOUT_S - 0.2 <= took <= TIMEOUT_S + 10, took
    assert r["closed"], "the connection is closed after the 408"
    print(f"408 after {took:.2f} s (read timeout {TIMEOUT_S} s)")


def test_bodies_in_flight_are_bounded_healthz_answers_and_memory_comes_back(limits):
    x = limits.split.x_train[_cold_rows(limits, 8)]
    for _ in range(20):  # warm: lazy allocations of the request path happen before the baseline
        assert _post_npy(limits.url, x).status_code == 200
    _wait_inflight(limits, 0)
    rss0 = _info(limits)["rss_bytes"]
    before = _info(limits)["http"]
    rounds, extra, worst_health = 6, 12, 0.0
    t0 = time.monotonic()
    for _ in range(rounds):
        held = _held(limits, MAX_BODIES)
        _wait_inflight(limits, MAX_BODIES)
        rejected = _held(limits, extra)  # over the bound: 503 at once, Retry-After, connection closed
        for s in rejected:
            r = read_response(s, timeout_s=20)
            assert r["status"] == 503 and r["headers"].get("retry-after") == "1", r
            assert r["seconds"] < TIMEOUT_S and r["closed"]
        worst_health = max(worst_health, _healthz_s(limits))  # the replica still answers while bodies are held
        assert _post_npy(limits.url, x).status_code == 503  # so does a good request: 503, retry later
        for s in held:
            assert read_response(s, timeout_s=TIMEOUT_S + 30)["status"] == 408
    load_s = time.monotonic() - t0
    _wait_inflight(limits, 0)
    assert _post_npy(limits.url, x).status_code == 200  # slots are free again
    after = _info(limits)
    h = after["http"]
    assert h["bodies_peak"] == MAX_BODIES and h["bodies_inflight"] == 0
    assert h["timeouts_408"] - before["timeouts_408"] == rounds * MAX_BODIES
    assert h["busy_503"] - before["busy_503"] == rounds * (extra + 1)
    time.sleep(1.0)
    rss1 = _info(limits)["rss_bytes"]
    print(f"{rounds * (MAX_BODIES + extra)} held connections in {load_s:.1f} s; /healthz worst {worst_health:.3f} s; "
          f"replica RSS {rss0 / 2**20:.1f} MiB before, {rss1 / 2**20:.1f} MiB after ({(rss1 - rss0) / rss0:+.1%})")
    assert worst_health < 5.0
    assert abs(rss1 - rss0) <= 0.10 * rss0
