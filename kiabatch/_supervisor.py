"""Supervisor of the embedded redis-server (run as ``python -m kiabatch._supervisor``).

Started by ``kiabatch.embedded`` with the data directory's lock (``server.lock``,
held exclusively) as an inherited descriptor (``--lock-fd``). It keeps the lock
and hands it to redis-server too, so the lock is free only once both are gone. It

* restarts redis-server if it dies, with backoff; after too many crashes in a
  minute it gives up and exits, freeing the lock for a fresh start;
* stops redis-server (flushing the append-only file) once no client has been
  connected for the idle timeout, holding ``join.lock`` exclusively so that no
  client is joining meanwhile;
* stops serving if its data directory or lock file is deleted or replaced;
* records itself in ``server.json`` (and writes it again if it disappears), and
  removes only its own record and its own socket.

Not a public interface.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .client_identity import client_identity

_PR_SET_PDEATHSIG = 1
_MAX_RESTARTS = 10
_RESTART_WINDOW = 60.0
_POLL_INTERVAL = 0.25
_READY_TIMEOUT = 15.0


def log(message: str) -> None:
    """One line in ``server.log`` (our stderr). Fatal problems say ``error:`` (clients look for it)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} kiabatch supervisor: {message}", file=sys.stderr, flush=True)


def _identity(info: os.stat_result) -> list[int]:
    return [info.st_dev, info.st_ino]


class Supervisor:
    """Runs one redis-server for one data directory, for as long as it is wanted."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.directory = Path(args.dir)
        self.socket = args.socket
        self.lock_fd: int = args.lock_fd
        self.binary = args.redis_server
        self.idle_timeout: float = args.idle_timeout
        self.maxmemory: int = args.maxmemory
        self.pidfile = self.directory / "server.json"
        self.lockfile = self.directory / "server.lock"
        self.joinlock = self.directory / "join.lock"
        self.stopping = False
        self.started_at = time.time()
        self.server: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(
            unix_socket_path=self.socket,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            **client_identity(),
        )
        self.lock_id: list[int] = []
        self.dir_id: list[int] = []
        self.parent_pid: int = args.parent_pid
        self.socket_id: list[int] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until idle, told to stop, or no longer the owner; returns the exit status."""
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op if we hold it, as we should
            self.lock_id = _identity(os.fstat(self.lock_fd))
            self.dir_id = _identity(os.stat(self.directory))
        except OSError as exc:
            log(f"error: the lock of {self.directory} is not ours ({exc}); not starting")
            return 1
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        others = self._wait_for_others()
        if self.stopping:
            log("told to stop before we started")
            return 0
        if others is None:
            log(f"{self.lockfile} was deleted or replaced before we started; not starting")
            return 0
        if others:
            pids = ", ".join(map(str, others))
            log(f"error: other processes still serve {self.directory} (pid {pids}); not starting")
            return 1
        try:
            self._remove_stale_sockets()
            self.server = self._start_server()
            ready = self._wait_ready()
            killed = self.server.poll() is not None and self.server.returncode < 0
            if not ready and not killed and not self.stopping and self._socket_in_place():
                # (a signal is a crash: the loop restarts it; a deleted socket: the loop stops)
                log("error: redis-server did not become ready (its messages are above)")
                return 1
            log(f"serving {self.directory} on {self.socket} (redis-server pid {self.server.pid})")
            return self._loop()
        finally:
            self._stop_server()
            if self._still_ours():  # else the record stays until we exit: a new server waits for us
                self._remove_own_pidfile()
            with contextlib.suppress(OSError):
                Path(self.socket).unlink(missing_ok=True)  # ours alone: its name is unique to us
            log("stopped")

    def _request_stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _loop(self) -> int:
        restarts: list[float] = []
        idle_since: float | None = None
        while not self.stopping:
            time.sleep(_POLL_INTERVAL)
            if self.stopping:
                break
            if not self._still_ours():
                log("the data directory or its lock file was deleted or replaced; stopping")
                return 0
            assert self.server is not None
            if self.server.poll() is None and not self._socket_in_place():
                log(f"the socket {self.socket} was deleted or replaced; stopping (clients cannot reach us)")
                return 0
            if self.server.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW] + [now]
                if len(restarts) > _MAX_RESTARTS:
                    log(
                        f"error: redis-server exited {len(restarts)} times within {_RESTART_WINDOW:g}s; giving up "
                        "(the next kiabatch command starts a fresh one)"
                    )
                    return 1
                delay = min(0.05 * 2 ** (len(restarts) - 1), 2.0)
                log(f"redis-server exited ({self.server.returncode}); restarting in {delay:g}s")
                self._sleep(delay)
                if self.stopping:
                    break
                self.server = self._start_server()
                if not self._wait_ready():
                    log("redis-server did not become ready")
                    self._stop_server()
                    if not self._socket_in_place():
                        log(f"the socket {self.socket} was deleted; stopping (clients cannot reach us)")
                        return 0
                idle_since = None
                continue
            if not self.pidfile.exists():
                self._write_pidfile()
            clients = self._connected_clients()
            if clients is None or clients > 1:  # our own connection is one of them
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= self.idle_timeout and self._idle_shutdown():
                return 0
        return 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _idle_shutdown(self) -> bool:
        """Stop the server if still no client is connected, with no client joining meanwhile."""
        try:
            fd = os.open(self.joinlock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a client is joining right now
            if (self._connected_clients() or 2) > 1:
                return False
            log(f"no client for {self.idle_timeout:g}s; stopping")
            self._remove_own_pidfile()
            self._stop_server()
            return True
        finally:
            os.close(fd)

    # -- checks -------------------------------------------------------------------------

    def _still_ours(self) -> bool:
        """True while our data directory and lock file are the ones at their paths."""
        try:
            return (
                _identity(os.stat(self.directory)) == self.dir_id and _identity(os.stat(self.lockfile)) == self.lock_id
            )
        except OSError:
            return False

    def _socket_in_place(self) -> bool:
        """False once the socket of the running, ready server is gone (a cleaned runtime directory)."""
        if self.socket_id is None:
            return True
        try:
            return _identity(os.lstat(self.socket)) == self.socket_id
        except OSError:
            return False

    def _wait_for_others(self, timeout: float = 30.0) -> list[int] | None:
        """Wait until no other supervisor or redis-server serves our directory; returns those left.

        Holding the lock, no other should, unless the lock file was deleted or
        replaced under an earlier server (which then stops within a moment) or one
        was started by something else. None: the lock file is no longer ours.
        """
        from .embedded import serving

        ancestors = {os.getpid(), os.getppid(), self.parent_pid}
        deadline = time.monotonic() + timeout
        while True:
            if not self._still_ours():
                return None
            others = serving(self.directory, exclude=ancestors)
            if not others or self.stopping or time.monotonic() >= deadline:
                return others
            time.sleep(0.05)

    def _connected_clients(self) -> int | None:
        try:
            return int(self.client.info("clients")["connected_clients"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None

    # -- redis-server -------------------------------------------------------------------

    def _start_server(self) -> subprocess.Popen[bytes]:
        command = [
            self.binary,
            "--port", "0",  # no TCP listener: only the unix socket below
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            # Full means refused writes, never evicted data: kiabatch reports "Redis is full" instead.
            "--maxmemory", str(self.maxmemory),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        parent = os.getpid()
        # Our socket path is ours alone: remove what a killed server left, so that the
        # file there once the new server is ready is the new server's.
        Path(self.socket).unlink(missing_ok=True)
        self.socket_id = None

        def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
            """Ask Linux to SIGTERM the server if the supervisor dies, even by SIGKILL."""
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # died before the request took effect
                os._exit(1)

        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            pass_fds=(self.lock_fd,),  # the server holds the lock too, until it has exited
            umask=0o077,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self) -> bool:
        assert self.server is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        while self.server.poll() is None and not self.stopping and time.monotonic() < deadline:
            if self.socket_id is None:  # not bound yet (we removed any old file before starting it)
                with contextlib.suppress(OSError):
                    self.socket_id = _identity(os.lstat(self.socket))
                    # Only now tell clients where it is: we know its socket before any client does.
                    self._write_pidfile()
            elif not self._socket_in_place():
                return False  # deleted under it: clients cannot reach it
            try:
                if self.client.ping():
                    return True
            except redis.BusyLoadingError:
                deadline = time.monotonic() + _READY_TIMEOUT  # loading a large file: progress
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            time.sleep(0.02)
        return False

    def _stop_server(self) -> None:
        """Stop redis-server: SIGTERM makes it flush its append-only file and remove its socket.

        SIGCONT too, so that a stopped (frozen) server wakes up to do it.
        """
        server = self.server
        if server is None or server.poll() is not None:
            return
        with contextlib.suppress(OSError):
            server.send_signal(signal.SIGTERM)
            server.send_signal(signal.SIGCONT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"redis-server (pid {server.pid}) did not stop within 30s; killing it")
            server.kill()
            server.wait()

    # -- files --------------------------------------------------------------------------

    def _write_pidfile(self) -> None:
        if self.server is None or not self._still_ours():
            return
        record = {
            "supervisor_pid": os.getpid(),
            "server_pid": self.server.pid,
            "socket": self.socket,
            "lock": self.lock_id,
            "lock_fd": self.lock_fd,
            "started_at": self.started_at,
            "idle_timeout": self.idle_timeout,
        }
        tmp = self.directory / f".server.json.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(record))
            os.replace(tmp, self.pidfile)
        except OSError as exc:
            log(f"cannot write {self.pidfile}: {exc}")
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _remove_own_pidfile(self) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(self.pidfile.read_text())
            if record["supervisor_pid"] == os.getpid() and record.get("lock") == self.lock_id:
                self.pidfile.unlink()

    def _remove_stale_sockets(self) -> None:
        """Remove sockets of earlier servers of this directory that died without removing them.

        Only sockets nobody listens on (connecting is refused); we hold the lock,
        so no server of this directory is starting meanwhile.
        """
        own = Path(self.socket)
        prefix = own.name[: own.name.rindex("-") + 1]
        candidates = {*own.parent.glob(f"{prefix}*.sock"), *self.directory.glob("redis-*.sock")}
        for path in candidates - {own}:
            with contextlib.suppress(OSError):
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    continue
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(1)
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    path.unlink()
                    log(f"removed the stale socket {path}")
                finally:
                    probe.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and supervise."""
    parser = argparse.ArgumentParser(prog="kiabatch._supervisor")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--redis-server", required=True)
    parser.add_argument("--idle-timeout", type=float, required=True)
    parser.add_argument("--maxmemory", type=int, default=0)
    args = parser.parse_args(argv)
    args.parent_pid = os.getpid()
    # Detach from whoever started us (a CLI run, or a long-lived program using the
    # API): it must not have to reap us, and our exit must not depend on it.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    return Supervisor(args).run()


if __name__ == "__main__":
    sys.exit(main())
