"""Shared fixtures: a real redis-server for the suite, a fresh KIABATCH_HOME per test (helpers: tests/helpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import RedisProcess

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
