"""The local backend: tasks as subprocesses on this machine (see ``local_runner``).

This module owns what outlives one runner: the per-batch runner lock (so two
runners never run one batch), background launches for ``--no-wait``, and the
backend object that ``submit``, ``status`` and ``delete`` talk to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .. import settings
from ..errors import InterruptedBatchError, UsageError
from ..files import open_private, private_dir
from ..model import Progress, Status
from ..store import Store

_POLL = 0.2
_GRACE = 5.0


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


class LocalBackend:
    """Backend protocol implementation for local subprocesses."""

    name = "local"

    def runtime(self) -> Any:
        """This interpreter and the installed worker programs."""
        from ..workloads import local_runtime

        return local_runtime()

    def launch(
        self,
        store: Store,
        spec: Any,
        *,
        wait: bool,
        home: Path | None = None,
        on_update: Callable[[Progress], None] | None = None,
        on_running: Callable[[], None] | None = None,
    ) -> Status | None:
        """Run the batch in this process (``wait``) or in a background process.

        ``on_update`` gets the progress after every settled task; ``on_running`` is
        called once, when the first worker has started.
        """
        if wait:
            from .local_runner import LocalRunner

            return LocalRunner(store, spec.id, home=home, on_update=on_update, on_running=on_running).run()
        from ..connection import url_of

        launch_detached(spec.id, home, url_of(store.redis))
        return None

    #: Resuming is launching again: the runner only runs what is unsettled.
    resume = launch

    def attach(
        self,
        store: Store,
        spec: Any,
        *,
        wait: bool,
        home: Path | None = None,
        on_update: Callable[[Progress], None] | None = None,
        on_running: Callable[[], None] | None = None,
    ) -> Status | None:
        """Finish an existing, unfinished batch: join its live runner, or run it again."""
        if not runner_alive(spec.id, home):
            return self.launch(store, spec, wait=wait, home=home, on_update=on_update, on_running=on_running)
        if not wait:
            return None
        while runner_alive(spec.id, home):
            status = store.status(spec.id)
            if on_update is not None:
                on_update(status.progress)
            if status.finished:
                return status
            time.sleep(0.2)
        status = store.status(spec.id)
        if not status.finished:
            raise InterruptedBatchError(
                f"the runner of batch {spec.id} stopped; continue with: kiabatch resume {spec.id}"
            )
        return status

    def augment_status(
        self, store: Store, status: Status, *, home: Path | None = None, read_only: bool = False
    ) -> Status:
        """Add whether this machine's runner of the batch is alive."""
        if status.finished:
            return status
        runner = store.meta(status.id).get("runner", "")
        if runner and not runner.endswith(f" on {socket.gethostname()}"):
            return status  # runs on another machine: its lock is not visible here
        from dataclasses import replace

        return replace(status, detail={**status.detail, "runner_alive": runner_alive(status.id, home)})

    def delete(self, store: Store, spec: Any, *, home: Path | None = None) -> None:
        """Stop a local runner of the batch and remove its scratch files."""
        del store
        stop_runner(spec.id, home)
        shutil.rmtree(runs_dir(spec.id, home), ignore_errors=True)
