"""Supervisor of the embedded redis-server (run as ``python -m kiabatch._supervisor``).

It restarts the server if it dies, and stops it (flushing the append-only file)
once no client has been connected for the idle timeout. Started and found by
``kiabatch.embedded``; not a public interface.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_PR_SET_PDEATHSIG = 1
_MAX_RESTARTS = 5
_RESTART_WINDOW = 60.0
_POLL_INTERVAL = 0.25


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the server if the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_server(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [
        args.redis_server,
        "--port", "0",  # no TCP listener: only the unix socket below
        "--unixsocket", args.socket,
        "--unixsocketperm", "700",
        "--dir", args.dir,
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=preexec)


def _wait_ready(client: redis.Redis, server: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if client.ping():
                return True
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            time.sleep(0.02)
    return False


def _write_pidfile(args: argparse.Namespace, server: subprocess.Popen[bytes]) -> None:
    record = {
        "supervisor_pid": os.getpid(),
        "server_pid": server.pid,
        "socket": args.socket,
        "started_at": time.time(),
        "idle_timeout": args.idle_timeout,
    }
    tmp = Path(args.pidfile + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(args.pidfile)


def _connected_clients(client: redis.Redis) -> int | None:
    try:
        return int(client.info("clients")["connected_clients"])
    except (redis.RedisError, OSError, KeyError):
        return None


def _shutdown(client: redis.Redis, server: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(redis.RedisError, OSError):
        client.shutdown(nosave=False)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _remove_own_pidfile(args: argparse.Namespace) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(Path(args.pidfile).read_text())["supervisor_pid"] == os.getpid():
            Path(args.pidfile).unlink()


def run(args: argparse.Namespace) -> int:
    """Supervise one server until idle or told to stop; returns the exit status."""
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    client = redis.Redis(
        unix_socket_path=args.socket, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    server = _start_server(args)
    if not _wait_ready(client, server):
        print("kiabatch supervisor: redis-server did not become ready", file=sys.stderr)
        server.kill()
        return 1
    _write_pidfile(args, server)
    restarts: list[float] = []
    idle_since: float | None = None
    lock = open(args.lockfile, "a+")  # noqa: SIM115 - held for the supervisor's lifetime
    try:
        while not stopping:
            time.sleep(_POLL_INTERVAL)
            if server.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW] + [now]
                print(
                    f"kiabatch supervisor: redis-server exited ({server.returncode}); restarting",
                    file=sys.stderr,
                )
                if len(restarts) > _MAX_RESTARTS:
                    print("kiabatch supervisor: too many restarts, giving up", file=sys.stderr)
                    _remove_own_pidfile(args)
                    return 1
                server = _start_server(args)
                if _wait_ready(client, server):
                    _write_pidfile(args, server)
                continue
            clients = _connected_clients(client)
            if clients is None or clients > 1:  # our own connection is one of them
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since < args.idle_timeout:
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # someone is joining right now
            try:
                if (_connected_clients(client) or 2) <= 1:
                    _shutdown(client, server)
                    _remove_own_pidfile(args)
                    return 0
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _shutdown(client, server)
        _remove_own_pidfile(args)
        return 0
    finally:
        lock.close()
        with contextlib.suppress(OSError):
            if server.poll() is not None:
                Path(args.socket).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and supervise."""
    parser = argparse.ArgumentParser(prog="kiabatch._supervisor")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--lockfile", required=True)
    parser.add_argument("--redis-server", required=True)
    parser.add_argument("--idle-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    # Detach from whoever started us (a CLI run, or a long-lived program using the
    # API): it must not have to reap us, and our exit must not depend on it.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
