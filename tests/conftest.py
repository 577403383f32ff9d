"""Shared fixtures: a real redis-server for the suite, a fresh KIABATCH_HOME per test (helpers: tests/helpers.py)."""

from __future__ import annotations

import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import RedisProcess, S3Process

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One redis-server for the whole session (tests flush it)."""
    directory = Path(tempfile.mkdtemp(prefix="kbt-"))
    server = RedisProcess(directory).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh KIABATCH_HOME (embedded server idles out fast in tests)."""
    path = tmp_path / "home"
    monkeypatch.setenv("KIABATCH_HOME", str(path))
    monkeypatch.setenv("KIABATCH_EMBEDDED_IDLE_TIMEOUT", "3")
    return path


@pytest.fixture
def redis_url(redis_server: RedisProcess, home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """KIABATCH_REDIS_URL pointing at the session server, flushed for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    monkeypatch.setenv("KIABATCH_REDIS_URL", redis_server.url)
    monkeypatch.setenv("KIABATCH_REDIS_RETRY_SECONDS", "20")
    return redis_server.url


@pytest.fixture
def client(redis_url: str, redis_server: RedisProcess) -> Iterator[redis.Redis]:
    connection = redis_server.client()
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Process]:
    """One SeaweedFS S3 server for the whole session (tests use their own buckets)."""
    directory = Path(tempfile.mkdtemp(prefix="kbs3-"))
    server = S3Process(directory).start()
    yield server
    server.stop(signal.SIGKILL)  # its data goes with it: no need for a graceful (slow) shutdown
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def s3(s3_server: S3Process, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://`` results URL (its own bucket), with the endpoint and credentials in the environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = "kbt-" + uuid.uuid4().hex[:16]
    return f"s3://{bucket}/results"
