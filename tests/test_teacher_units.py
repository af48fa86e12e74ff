"""The teacher service's parts without Ray: the stream client's retry / dedup logic against a scripted fake
server, the replica core, the projections, the HTTP body formats, tokens, options and the app builder."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from kdcore.errors import DataError, LayerNotFoundError, ModelLoadError, TeacherError, UserError
from kdcore.loop import build_teacher, load_split
from kdcore.feed import OnlineFeatures, epoch_rows
from kdcore.spec import JobSpec
from services.teacher.core import RequestError, TeacherCore
from services.teacher.projection import Projection, check_weights, fixed_projection, pca, random_orthogonal


def _job(**over) -> JobSpec:
    d = {
        "name": "units",
        "teacher": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "taps": ["embed", "block3"]},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {"kind": "sklearn_digits"}, "batch_size": 128},
        "features": {"mode": "stream", "stream": {"payload": "raw", "dtype": "fp32", "prefetch": 4,
                                                   "projected_dim": 8}},
        "train": {"epochs": 1, "num_workers": 0, "seed": 1},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(d.get(k), dict) else v
    return JobSpec.from_dict(d)


@pytest.fixture(scope="module")
def core():
    job = _job()
    return TeacherCore(job, device="cpu")


# -- a scripted fake deployment for the stream client ---------------------------------------------------------
class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a, **kw):
        return self.fn(*a, **kw)


class _Result:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class FakeServer:
    """Answers ``stream`` calls from a TeacherCore; ``script`` decides, per call, how the stream misbehaves."""

    def __init__(self, core: TeacherCore, script=None):
        self.core, self.script = core, list(script or [])
        self.calls: list[list[int]] = []
        self.in_flight_max = 0
        self.stream = _Call(self._stream)
        self.info = _Call(lambda: _Result(core.info()))

    def options(self, stream=False):
        return self

    def message(self, b, mode, dtype):
        out = self.core.forward(self.core.inputs_for(np.asarray(b["ids"]), np.asarray(b["views"])))
        r = self.core.encode(out, mode, dtype, None)
        r.update(step=b["step"], ids=np.asarray(b["ids"]), views=np.asarray(b["views"]), replica="fake")
        return r

    def _stream(self, batches, mode=None, dtype=None, min_version=None):
        self.calls.append([b["step"] for b in batches])
        how = self.script.pop(0) if self.script else "ok"
        return _Gen(self, batches, mode, dtype, how)


class _Gen:
    def __init__(self, server, batches, mode, dtype, how):
        self.server, self.batches, self.mode, self.dtype, self.how = server, batches, mode, dtype, how
        self.i = 0
        self.cancelled = False

    def __iter__(self):
        return self

    def cancel(self):
        self.cancelled = True

    def __next__(self):
        s, i = self.server, self.i
        if self.how == "user_error":
            raise RequestError("ids are outside the training rows")
        if self.how == "nonfinite":
            from services.teacher.core import nonfinite_output_error

            raise nonfinite_output_error([3], ids=[17])
        if self.how == "die" or (self.how == "die_after_1" and i == 1):
            raise ConnectionError("replica died")
        if self.how == "end_after_1" and i == 1:
            raise StopIteration
        if i >= len(self.batches):
            raise StopIteration
        if self.how == "dup_first" and i == 1:
            self.how = "ok"
            return s.message(self.batches[0], self.mode, self.dtype)  # step 0 again
        if self.how == "foreign_ids":
            b = dict(self.batches[i], ids=np.asarray(self.batches[i]["ids"]) + 1)
            self.i += 1
            return s.message(b, self.mode, self.dtype) | {"step": self.batches[i]["step"]}
        self.i += 1
        return s.message(self.batches[i], self.mode, self.dtype)


def _stream(core, script, **kw):
    from services.teacher.stream import StreamFeatures

    server = FakeServer(core, script)
    src = StreamFeatures(core.job, core.split, server, retry_wait_s=0.0, check=False, **kw)
    return server, src


def _check_epoch(core, batches, epoch=0):
    online = list(OnlineFeatures(core.split, core.job.data, build_teacher(core.job, device="cpu"),
                                 core.job.data.batch_size, core.job.train.seed).epoch(epoch))
    assert len(batches) == len(online)
    for got, want in zip(batches, online):
        assert torch.equal(got.idx, want.idx) and torch.equal(got.x, want.x)
        for k in want.teacher:
            torch.testing.assert_close(got.teacher[k], want.teacher[k], rtol=1e-5, atol=1e-5)
    ids = torch.cat([b.idx for b in batches]).tolist()
    assert sorted(ids) == sorted(epoch_rows(core.split.n_train, core.job.train.seed, epoch, 0, 1).tolist())
    assert len(ids) == len(set(ids))


def test_a_failed_stream_is_re_requested_for_its_missing_steps_only(core):
    server, src = _stream(core, ["ok", "die_after_1", "ok", "ok"])  # chunk 1 dies after its first step
    batches = list(src.epoch(0))
    _check_epoch(core, batches)
    assert src.retries == 1 and src.duplicates == 0
    # chunks of 2 steps: [0,1], [2,3] (dies after step 2), then step 3 alone, then [4,5], ...
    assert server.calls[:4] == [[0, 1], [2, 3], [4, 5], [3]] or server.calls[:4] == [[0, 1], [2, 3], [3], [4, 5]]


def test_a_stream_that_ends_early_or_repeats_a_step_loses_and_duplicates_nothing(core):
    _, src = _stream(core, ["end_after_1", "dup_first"])
    batches = list(src.epoch(1))
    _check_epoch(core, batches, epoch=1)
    assert src.retries == 1 and src.duplicates == 1


def test_user_errors_are_raised_not_retried_and_retries_are_bounded(core):
    _, src = _stream(core, ["user_error"])
    with pytest.raises(RequestError, match="outside the training rows"):
        list(src.epoch(0))
    assert src.retries == 0
    _, src = _stream(core, ["nonfinite"])  # the teacher's answer is NaN: deterministic, so never retried
    with pytest.raises(TeacherError, match=r"non-finite values .* request rows \[3\] \(training ids \[17\]\)"):
        list(src.epoch(0))
    assert src.retries == 0
    _, src = _stream(core, ["die"] * 10, max_retries=3)
    with pytest.raises(TeacherError, match=r"failed 4 times for steps \[0, 1\].*ConnectionError: replica died"):
        list(src.epoch(0))
    _, src = _stream(core, ["foreign_ids"])
    with pytest.raises(TeacherError, match="answered for other ids"):
        list(src.epoch(0))


def test_requests_stay_within_the_prefetch_window(core):
    server, src = _stream(core, [])
    requested_ahead = []
    for i, _ in enumerate(src.epoch(0)):
        asked = sum(len(c) for c in server.calls)
        requested_ahead.append(asked - (i + 1))
    assert max(requested_ahead) <= core.job.features.stream.prefetch
    assert max(requested_ahead) >= 2  # and it really does fetch ahead of the step


def test_stream_refuses_a_server_with_another_split(core):
    from services.teacher.stream import StreamFeatures

    other = _job(data={"split_seed": 9})
    with pytest.raises(DataError, match="another training split"):
        next(StreamFeatures(other, load_split(other), FakeServer(core)).epoch(0))


# -- the replica core ------------------------------------------------------------------------------------------
def test_core_checks_requests(core):
    with pytest.raises(RequestError, match=r"expected \(batch, 1, 8, 8\)"):
        core.check_inputs(np.zeros((2, 64), np.float32))
    with pytest.raises(RequestError, match="dtype int64"):
        core.check_inputs(np.zeros((2, 1, 8, 8), np.int64))
    assert core.check_inputs(np.zeros((2, 1, 8, 8), np.float64)).dtype == np.float32
    x = np.zeros((5, 1, 8, 8), np.float64)
    x[[1, 3], 0, 2, 2] = 1e300  # finite as float64: inf after the cast, so refused after it, naming the rows
    with pytest.raises(RequestError, match=r"input rows \[1, 3\] hold NaN or inf after the cast to float32") as e:
        core.check_inputs(x)
    assert e.value.status == 400 and e.value.details["rows"] == [1, 3]
    x[1, 0, 2, 2], x[3, 0, 2, 2] = 0.0, np.nan
    with pytest.raises(RequestError, match=r"input rows \[3\] hold NaN or inf; send finite"):
        core.check_inputs(x)
    with pytest.raises(RequestError, match=r"outside the 1438 training rows"):
        core.check_ids([0, 1438])
    with pytest.raises(RequestError, match=r"views must be in \[0, 1\)"):
        core.check_ids([0, 1], [0, 1])
    with pytest.raises(RequestError, match="unknown mode"):
        core.check_mode("zipped", None)
    assert core.check_mode(None, None) == ("raw", "fp32")


def test_features_for_rows_follows_the_cache_layout():
    job = _job(data={"views": 2, "augment": {"kind": "shift_noise", "max_shift": 1, "noise_std": 0.1}})
    c = TeacherCore(job, device="cpu")
    out = c.features_for_rows(6, 14)  # rows 6..13 = samples 3..6, views 0/1
    assert set(out) == {"embed", "block3", "logits", "aug"}
    ids, views = np.arange(6, 14) // 2, np.arange(6, 14) % 2
    want = c.forward(c.inputs_for(ids, views))
    for k in want:
        np.testing.assert_allclose(out[k], want[k], rtol=1e-6, atol=1e-6)
    assert out["aug"].shape == (8, 3) and not out["aug"][0::2].any() and out["aug"][1::2].any()  # view 0 = clean
    with pytest.raises(RequestError, match="outside the 2876 cache rows"):
        c.features_for_rows(2870, 2880)


def test_core_cache_rows_with_non_finite_features_raise_naming_the_rows(monkeypatch):
    import pickle

    from services.teacher.core import NonFiniteOutputError

    c = TeacherCore(_job(), device="cpu")
    forward = c.forward

    def overflowing(x):
        out = forward(x)
        out["logits"][x.reshape(len(x), -1).sum(1) > 17.0] = np.inf
        return out

    monkeypatch.setattr(c, "forward", overflowing)
    hot = np.flatnonzero(c.split.x_train.reshape(c.n_train, -1).sum(1) > 17.0)
    lo = int(hot[0]) - 2
    with pytest.raises(NonFiniteOutputError, match=rf"cache rows \[{hot[0]}\]") as e:
        c.features_for_rows(lo, lo + 3)
    assert isinstance(e.value, TeacherError) and e.value.rows == [int(hot[0])]
    back = pickle.loads(pickle.dumps(e.value))  # crosses Ray unchanged
    assert type(back) is NonFiniteOutputError and back.rows == e.value.rows and back.status == 422


# -- projections -----------------------------------------------------------------------------------------------
def test_projections_are_seeded_orthonormal_and_validated():
    w = random_orthogonal(64, 8, 3)
    np.testing.assert_allclose(w @ w.T, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(w, random_orthogonal(64, 8, 3))
    assert not np.allclose(w, random_orthogonal(64, 8, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) @ np.diag([5.0, 3.0, 1.0, 0.1, 0.01]) + 2.0
    wp, b = pca(x, 2)
    z = x @ wp.T + b
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)  # centred
    assert abs(abs(wp[0, 0]) - 1) < 0.05 and abs(abs(wp[1, 1]) - 1) < 0.05  # the two largest-variance axes
    wide, _ = pca(rng.standard_normal((4, 10)), 6)  # 4 samples have 3 directions of variance: the rest is zero
    assert np.abs(wide[3:]).max() == 0 and np.allclose(wide[:3] @ wide[:3].T, np.eye(3), atol=1e-5)
    p = fixed_projection("random", {"a": 64}, 8, 0)
    assert p.version == 0 and p.apply("a", np.ones((2, 4, 4, 4))).shape == (2, 8)
    assert Projection.from_wire(p.to_wire()).layers["a"][0].tobytes() == p.layers["a"][0].tobytes()
    with pytest.raises(UserError, match=r"missing \['b'\]"):
        check_weights({"a": np.zeros((8, 64))}, {"a": 64, "b": 4}, 8)
    with pytest.raises(UserError, match="NaN"):
        check_weights({"a": np.full((8, 64), np.nan)}, {"a": 64}, 8)
    with pytest.raises(UserError, match="unknown projection kind"):
        fixed_projection("svd", {"a": 64}, 8, 0)


# -- the wire -------------------------------------------------------------------------------------------------
def test_arrow_round_trip_and_safe_npy():
    from services.teacher.wire import cast, decode_arrow, decode_npy, encode_arrow, encode_npy, to_float32

    rng = np.random.default_rng(1)
    feats = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    for dtype in ("fp32", "fp16", "bf16"):
        r = {"features": {"m": cast(feats, dtype)}, "logits": cast(feats[:, 0, 0], dtype), "mode": "raw",
             "dtype": dtype, "projector_version": None, "ids": np.arange(5), "views": np.zeros(5, np.int64)}
        back = decode_arrow(encode_arrow(r))
        assert back["dtype"] == dtype and back["projector_version"] is None
        np.testing.assert_array_equal(back["features"]["m"], r["features"]["m"])
        assert back["features"]["m"].shape == (5, 3, 2, 2) and back["ids"].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_allclose(to_float32(back["features"]["m"], dtype), feats, rtol=1e-2)
    np.testing.assert_array_equal(decode_npy(encode_npy(feats)), feats)
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        decode_npy(buf.getvalue())
    with pytest.raises(ValueError, match="not a valid .npy"):
        decode_npy(b"\x93NUMPY garbage")


# -- tokens, options, the builder -------------------------------------------------------------------------
def test_token_is_resolved_to_a_hash_and_missing_tokens_refuse_to_start(tmp_path, monkeypatch):
    from kdcore.spec import HTTPSpec
    from services.teacher.tokens import bearer_problem, resolve_token_sha256

    assert resolve_token_sha256(HTTPSpec()) is None
    f = tmp_path / "tok"
    f.write_text("abc\n")
    assert resolve_token_sha256(HTTPSpec(token_file=str(f))) == hashlib.sha256(b"abc").hexdigest()
    monkeypatch.setenv("KD_T", "xyz")
    assert resolve_token_sha256(HTTPSpec(token_env="KD_T")) == hashlib.sha256(b"xyz").hexdigest()
    monkeypatch.delenv("KD_T")
    with pytest.raises(UserError, match="KD_T is not set"):
        resolve_token_sha256(HTTPSpec(token_env="KD_T"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_token_sha256(HTTPSpec(token_file=str(tmp_path / "none")))
    sha = hashlib.sha256(b"abc").hexdigest()
    assert bearer_problem("Bearer abc", sha) is None and bearer_problem("", None) is None
    assert "missing bearer token" in bearer_problem("", sha) and "missing" in bearer_problem("Basic abc", sha)
    assert bearer_problem("Bearer abd", sha) == "wrong bearer token"


def test_options_are_typed_frozen_and_batch_limits_come_from_one_place():
    import dataclasses

    from services.teacher.options import MAX_CONCURRENT_BATCHES, ServerOptions, batch_limits

    o = ServerOptions(fingerprint="f" * 12, namespace="ns", projection="random", poll_s=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.poll_s = 2.0
    assert ServerOptions(**o.to_dict()) == o
    with pytest.raises(ValueError, match="unknown projection"):
        ServerOptions(fingerprint="f", namespace="ns", projection="svd")
    lim = batch_limits(_job(teacher={"serve": {"max_batch_size": 96, "batch_wait_timeout_s": 0.01}}).teacher.serve)
    assert (lim.max_batch_size, lim.batch_wait_timeout_s, lim.max_ongoing_requests) == (96, 0.01, 192)
    assert lim.max_concurrent_batches == MAX_CONCURRENT_BATCHES
    assert batch_limits(_job(teacher={"serve": {"max_ongoing_requests": 300}}).teacher.serve).max_ongoing_requests == 300


def test_non_finite_rows_are_found_in_every_travel_dtype():
    from services.teacher.wire import cast, nonfinite_rows

    a = np.ones((6, 3, 2), np.float32)
    assert nonfinite_rows([a]).tolist() == []
    a[1, 0, 0], a[4, 2, 1] = np.inf, np.nan
    b = np.ones((6, 4), np.float32)
    b[5, 3] = -np.inf
    assert nonfinite_rows([a, b]).tolist() == [1, 4, 5]
    big = np.ones((3, 2), np.float32)
    big[2, 1] = 1e6  # finite in fp32 and bf16, inf in fp16
    assert nonfinite_rows([cast(big, "fp16")], "fp16").tolist() == [2]
    assert nonfinite_rows([cast(big, "bf16")], "bf16").tolist() == []
    assert nonfinite_rows([cast(a, "bf16")], "bf16").tolist() == [1, 4]
    ro = cast(a, "fp16")
    ro.flags.writeable = False  # arrays from Ray are read-only
    assert nonfinite_rows([ro], "fp16").tolist() == [1, 4]


def test_deployment_options_follow_the_serve_spec():
    from services.teacher.app import deployment_options

    o = deployment_options(_job(teacher={"serve": {"replicas": 3, "num_gpus": 1, "num_cpus": 2,
                                                   "max_batch_size": 128}}))
    assert o["num_replicas"] == 3 and o["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert o["max_ongoing_requests"] == 256 and o["logging_config"].enable_access_log is False
    o = deployment_options(_job(teacher={"serve": {"autoscaling": {"min_replicas": 0, "max_replicas": 4},
                                                   "max_ongoing_requests": 300}}), constructor_retries=2)
    assert "num_replicas" not in o and o["max_ongoing_requests"] == 300 and o["max_constructor_retry_count"] == 2
    assert o["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                       "target_ongoing_requests": 2.0}
    # Serve itself accepts them (it validates deployment options when the app is built)
    from ray import serve

    from services.teacher.app import build_teacher_app

    job = _job(teacher={"serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "num_gpus": 0.5}})
    app = build_teacher_app(job, validate=False, constructor_retries=2)
    assert isinstance(app, serve.Application)


def test_app_from_env_reads_the_job_spec_path(tmp_path, monkeypatch):
    from ray import serve

    from services.teacher.app import app_from_env

    monkeypatch.delenv("KD_JOB_SPEC", raising=False)
    with pytest.raises(UserError, match="KD_JOB_SPEC is not set"):
        app_from_env({})
    path = tmp_path / "job.yaml"
    path.write_text(_job().to_yaml())
    monkeypatch.setenv("KD_JOB_SPEC", str(path))
    assert isinstance(app_from_env({"validate": "false", "projection": "random"}), serve.Application)
    bad = _job(teacher={"checkpoint": str(tmp_path / "missing.pt")})
    path.write_text(bad.to_yaml())
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        app_from_env({})
    with pytest.raises(UserError, match="unknown projection"):
        app_from_env({"validate": False, "projection": "svd"})


def test_replica_failure_text_maps_back_to_the_kdcore_error():
    from services.teacher.app import replica_error

    text = ("Traceback (most recent call last):\n  File ...\nray.exceptions.RayActorError: ...\n"
            "kdcore.errors.ModelLoadError: checkpoint not found: /x.safetensors; check the path")
    e = replica_error(text)
    assert isinstance(e, ModelLoadError) and "checkpoint not found: /x.safetensors" in e.message
    e = replica_error("LayerNotFoundError: layer 'blok3' not found; did you mean 'block3'?")
    assert isinstance(e, LayerNotFoundError) and "blok3" in e.message
    e = replica_error("RuntimeError: CUDA out of memory\n")
    assert isinstance(e, TeacherError) and "CUDA out of memory" in e.message


@pytest.mark.parametrize("n_train,rows,seed", [(44000, 2048, 0), (44000, 2048, 1), (1000, 999, 3), (100, 512, 0),
                                               (10, 3, 2), (1001, 17, 5)])
def test_pca_sample_is_a_few_contiguous_windows_of_distinct_rows(n_train, rows, seed):
    from services.teacher.core import sample_windows

    idx = sample_windows(n_train, rows, seed)
    assert len(idx) == min(rows, n_train) and len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < n_train and np.all(np.diff(idx) > 0)
    assert int(np.sum(np.diff(idx) > 1)) < 8  # at most 8 runs: the source is read in order
    assert np.array_equal(idx, sample_windows(n_train, rows, seed))  # seeded
    if n_train > 4 * rows:
        assert idx.max() - idx.min() > n_train // 2  # spread over the dataset, not its head
