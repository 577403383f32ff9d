"""What outlives one local runner: a batch's run directory, its runner lock, background runners.

The runner lock is an flock on ``runs/<batch>/runner.lock`` held for the runner's
lifetime: two runners never run one batch, and a runner killed with SIGKILL drops
it, so ``status`` can tell a live batch from an interrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .. import settings
from ..errors import UsageError
from ..files import open_private, private_dir


def runs_dir(batch_id: str, home: Path | None = None) -> Path:
    """Where the local backend keeps a batch's runner lock, pid records and scratch dirs."""
    return (home or settings.home()) / "runs" / batch_id


def make_runs_dir(batch_id: str, home: Path | None = None) -> Path:
    """Create :func:`runs_dir` and the state directory above it, all private (0700)."""
    root = private_dir(home or settings.home(), f"the state directory (${settings.ENV_HOME})")
    private_dir(root / "runs", "the runs directory", tighten=True)
    return private_dir(runs_dir(batch_id, root), "the batch's run directory", tighten=True)


@contextlib.contextmanager
def runner_lock(batch_id: str, home: Path | None = None) -> Iterator[IO[str]]:
    """Exclusive right to run ``batch_id`` on this machine; UsageError if taken."""
    directory = make_runs_dir(batch_id, home)
    handle = open_private(directory / "runner.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UsageError(f"batch {batch_id!r} is already being run by {owner}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def runner_alive(batch_id: str, home: Path | None = None) -> bool:
    """True if some process on this machine holds ``batch_id``'s runner lock."""
    path = runs_dir(batch_id, home) / "runner.lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def launch_detached(batch_id: str, home: Path | None = None, redis_url: str | None = None) -> int:
    """Run ``batch_id`` in a background process; returns its pid once it holds the runner lock."""
    directory = make_runs_dir(batch_id, home)
    env = dict(os.environ)
    if home is not None:
        env[settings.ENV_HOME] = str(home)
    if redis_url:
        env[settings.ENV_REDIS_URL] = redis_url  # the environment, never argv: it may hold a password
    with open_private(directory / "background.log") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kiabatch", "task", "run-batch", batch_id],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if runner_alive(batch_id, home):
            return process.pid
        if process.poll() == 0:
            return process.pid  # it already ran the whole batch
        if process.poll() is not None:
            tail = (directory / "background.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UsageError(f"the background runner of {batch_id} exited at once: {' '.join(tail)}")
        time.sleep(0.02)
    return process.pid


def stop_runner(batch_id: str, home: Path | None, timeout: float = 10.0) -> None:
    """SIGTERM the local runner of ``batch_id`` (if any) and wait for it to let go."""
    path = runs_dir(batch_id, home) / "runner.lock"
    if not runner_alive(batch_id, home):
        return
    words = path.read_text().split()
    if len(words) >= 2 and words[0] == "pid" and words[1].isdigit():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(words[1]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while runner_alive(batch_id, home) and time.monotonic() < deadline:
        time.sleep(0.05)


def this_host(runner: str) -> bool:
    """True if a runner record (``pid N on HOST``) names this machine."""
    return runner.endswith(f" on {socket.gethostname()}")
