"""Shared fixtures: a real redis-server for the suite, a fresh KIABATCH_HOME per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kiabatch.embedded import redis_server_binary

REPO = Path(__file__).resolve().parent.parent


class RedisProcess:
    """A redis-server on a unix socket (no TCP), started and stopped by tests."""

    def __init__(self, directory: Path, binary: str | None = None, port: int = 0) -> None:
        self.directory = directory
        self.binary = binary or str(redis_server_binary())
        self.socket = str(directory / "redis.sock")
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *extra: str) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            self.socket,
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            *extra,
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis(unix_socket_path=self.socket)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()}")

    def stop(self, sig: int = 15) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket)


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


def kiabatch_cmd(*args: str) -> list[str]:
    """argv running the installed CLI with this interpreter."""
    return [sys.executable, "-m", "kiabatch", *args]


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``kiabatch ARGS`` as a real subprocess."""
    return subprocess.run(
        kiabatch_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        input=input_text,
    )
