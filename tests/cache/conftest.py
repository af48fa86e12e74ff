"""Fixtures of the cache tests: a real S3 API server (moto in server mode) on loopback, and helpers."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

# the helper module cache_fake_teacher.py sits next to the tests (importable in any pytest import mode)
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUCKET = "kd-cache-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint served by moto's server on 127.0.0.1 (a free port) with a test bucket.

    Fake credentials are put in the environment for the session (and restored after)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
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


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh s3:// prefix in the test bucket."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def memory_root():
    """A fresh memory:// prefix; its stores are dropped afterwards."""
    from kdcore.cache import clear_memory, memory_names

    prefix = f"t-{uuid.uuid4().hex[:10]}"
    yield f"memory://{prefix}"
    for name in memory_names():
        if name.startswith(prefix):
            clear_memory(name)

