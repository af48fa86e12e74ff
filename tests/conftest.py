"""Shared fixtures. One session-scoped local Ray, started only by tests that ask for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "kd-cache-test"  # the bucket s3_endpoint creates
# moto accepts any credentials; Ray workers and replicas of the session cluster get these too (S3 sources)
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
os.environ.setdefault("KD_TEST", "1")
if str(ROOT) not in sys.path:  # specs in tests name factories as tests.<dir>.<module> (kd imports them by name)
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray for the whole session: 4 logical CPUs, no dashboard, namespace 'kd-test', auth off."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests may disable token auth; the product keeps it on
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from services.raysession import job_env_vars

    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="kd-test", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), **job_env_vars(),
                                       **FAKE_AWS}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort teardown
        pass
    ray.shutdown()


@pytest.fixture
def ray_clean(ray_cluster):
    """Per-test cleanup on the shared cluster: no Serve app or detached actor outlives the test."""
    yield ray_cluster
    from services.raycleanup import cleanup_namespace

    cleanup_namespace("kd-test")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto in server mode) on 127.0.0.1, a free port, with the bucket ``BUCKET``.

    Fake credentials are put in the environment for the session (and restored after)."""
    from moto.server import ThreadedMotoServer

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(FAKE_AWS)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """The bucket ``s3_endpoint`` creates."""
    return BUCKET


@pytest.fixture
def digits_job():
    """A small valid job dict on digits (teacher width 8, student width 4) for quick tests."""
    return {
        "name": "t",
        "teacher": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 8}},
                    "taps": ["embed", "block3"]},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {"kind": "sklearn_digits"}, "batch_size": 128},
        "train": {"epochs": 1, "num_workers": 0, "optimizer": {"kind": "adam", "lr": 0.003}},
    }


def pytest_report_header(config):
    return [f"kd tests: python {sys.version.split()[0]}, root {ROOT}"]
