"""Fixtures of the cache tests (the S3 server, ``s3_endpoint``, is in tests/conftest.py)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

# the helper module cache_fake_teacher.py sits next to the tests (importable in any pytest import mode)
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def s3_root(s3_endpoint, s3_bucket):
    """A fresh s3:// prefix in the test bucket."""
    return f"s3://{s3_bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def memory_root():
    """A fresh memory:// prefix; its stores are dropped afterwards."""
    from kdcore.cache import clear_memory, memory_names

    prefix = f"t-{uuid.uuid4().hex[:10]}"
    yield f"memory://{prefix}"
    for name in memory_names():
        if name.startswith(prefix):
            clear_memory(name)

