"""The local backend: a batch's tasks as subprocesses, with Indexed Job semantics.

It runs the plan a Kubernetes pod runs — claim (in process), ``sh run.sh`` with the
task directory as its emptyDir, report (in process) — with:

* ``completions``: every unsettled index runs until its outcome is settled;
* ``parallelism``: at most that many runners at once;
* ``backoffLimitPerIndex``: a failed index is re-run until its retries are spent;
* ``activeDeadlineSeconds``: past the batch deadline, running tasks are stopped
  and every unsettled item is dead-lettered with reason DeadlineExceeded;
* a per-attempt time limit (the pod's ``activeDeadlineSeconds``).

Ctrl-C / SIGTERM stop the runners (process groups, so the worker dies too) without
counting a failure; their indexes keep their claims, and ``kiabatch resume`` finishes
the batch. A runner killed with SIGKILL leaves orphans behind; the next runner of the
same batch kills them before starting, so two workers never run one index.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from .. import settings
from ..errors import InterruptedBatchError, UsageError
from ..model import FAILED, INTERRUPTED, Progress, Status
from ..store import ItemOutcome, Store
from ..task import RUNNER_NAME, TaskInfo, claim_into, report_from, task_env

_POLL = 0.2
_GRACE = 5.0


def runs_dir(batch_id: str, home: Path | None = None) -> Path:
    """Where the local backend keeps a batch's runner lock, pid records and scratch dirs."""
    return (home or settings.home()) / "runs" / batch_id


@contextlib.contextmanager
def runner_lock(batch_id: str, home: Path | None = None) -> Iterator[IO[str]]:
    """Exclusive right to run ``batch_id`` on this machine; UsageError if taken."""
    directory = runs_dir(batch_id, home)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / "runner.lock", "a+")  # noqa: SIM115 - closed below
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


@dataclass
class _Running:
    index: int
    info: TaskInfo
    directory: Path
    process: subprocess.Popen[bytes]
    started: float
    pidfd: int | None
    stop_reason: str = ""
    stop_sent: float | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


class LocalRunner:
    """Runs one batch to completion (or interruption) in this process."""

    def __init__(
        self,
        store: Store,
        batch_id: str,
        *,
        home: Path | None = None,
        on_update: Callable[[Progress], None] | None = None,
        grace: float = _GRACE,
    ) -> None:
        self.store = store
        self.batch_id = batch_id
        self.home = home or settings.home()
        self.on_update = on_update
        self.grace = grace
        self.spec = store.spec(batch_id)
        self._running: dict[int, _Running] = {}
        self._stop_signal: int | None = None
        self._selector = selectors.DefaultSelector()
        self._attempt_serial = 0
        self._abandoned = False

    # -- public -----------------------------------------------------------------------

    def run(self) -> Status:
        """Run every unsettled task; returns the final status.

        Raises InterruptedBatchError after Ctrl-C / SIGTERM (the batch is resumable).
        """
        with runner_lock(self.batch_id, self.home), self._signals():
            self.store.set_meta(self.batch_id, runner=f"pid {os.getpid()} on {socket.gethostname()}")
            self._kill_orphans()
            self.store.release_all(self.batch_id)
            try:
                # Loop until Redis agrees every index is settled: a Redis that crashed
                # without persisting its last writes can "forget" reports we made.
                while self._stop_signal is None and not self._abandoned:
                    pending = deque(self.store.unsettled_indexes(self.batch_id))
                    if not pending:
                        break
                    self._loop(pending)
            except BaseException:
                # Redis lost for good, or a bug: never leave workers running unattended.
                self._kill_all_quietly()
                raise
            finally:
                self._selector.close()
            if self._stop_signal is not None:
                self.store.set_state(self.batch_id, INTERRUPTED)
                raise InterruptedBatchError(
                    f"batch {self.batch_id} interrupted by {signal.Signals(self._stop_signal).name}; "
                    f"continue it with: kiabatch resume {self.batch_id}"
                )
            self._records_path().unlink(missing_ok=True)
            return self.store.status(self.batch_id)

    # -- the scheduling loop ------------------------------------------------------------

    def _loop(self, pending: deque[int]) -> None:
        self._notify()
        while pending or self._running:
            if self._stop_signal is not None:
                self._stop_all("interrupted", count=False)
                return
            if self._deadline_passed():
                self._stop_all("batch deadline exceeded", count=True)
                self._abandon_unsettled(
                    "DeadlineExceeded: the batch deadline of "
                    f"{self.spec.deadline:g}s passed before this item ran"
                )
                return
            while pending and len(self._running) < self.spec.parallelism and self._stop_signal is None:
                self._start(pending.popleft())
            self._enforce_task_timeout()
            for running in self._wait_for_exits():
                self._finish(running, pending)

    def _start(self, index: int) -> None:
        self._attempt_serial += 1
        directory = runs_dir(self.batch_id, self.home) / f"task-{index}-{os.getpid()}-{self._attempt_serial}"
        shutil.rmtree(directory, ignore_errors=True)
        info = claim_into(self.store, self.batch_id, index, directory, spec=self.spec)
        if info.status != "ok":  # settled meanwhile (e.g. by another backend)
            shutil.rmtree(directory, ignore_errors=True)
            return
        log = open(directory / "runner.log", "wb")  # noqa: SIM115 - closed in _finish
        process = subprocess.Popen(
            ["/bin/sh", str(directory / RUNNER_NAME)],
            cwd=self.spec.cwd or None,
            env={**os.environ, **task_env(self.spec, index, directory)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: stopping it stops the worker too
        )
        pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(process.pid)
            self._selector.register(pidfd, selectors.EVENT_READ, index)
        running = _Running(index, info, directory, process, time.monotonic(), pidfd, log=log)
        self._running[index] = running
        self._record(process)

    def _wait_for_exits(self) -> list[_Running]:
        if self._running and all(r.pidfd is not None for r in self._running.values()):
            self._selector.select(timeout=_POLL)
        else:
            time.sleep(0.005)
        return [r for r in list(self._running.values()) if r.process.poll() is not None]

    def _finish(self, running: _Running, pending: deque[int]) -> None:
        del self._running[running.index]
        if running.pidfd is not None:
            self._selector.unregister(running.pidfd)
            os.close(running.pidfd)
        if running.log:
            running.log.close()
        if running.stop_reason == "interrupted":
            self.store.release(self.batch_id, running.index)
        else:
            result = report_from(self.store, running.directory, killed_reason=running.stop_reason)
            if result is not None and result.status in ("retry", "stale"):
                pending.append(running.index)
        shutil.rmtree(running.directory, ignore_errors=True)
        self._notify()

    # -- stopping -----------------------------------------------------------------------

    def _signal_group(self, running: _Running, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.process.pid, signum)

    def _stop_all(self, reason: str, *, count: bool) -> None:
        """Stop every runner; ``count`` reports the attempts (as failures), else releases them."""
        for running in self._running.values():
            running.stop_reason = reason if count else "interrupted"
            self._signal_group(running, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self._running and time.monotonic() < deadline:
            time.sleep(0.02)
            for running in [r for r in self._running.values() if r.process.poll() is not None]:
                self._finish_stopped(running, count)
        for running in list(self._running.values()):
            self._signal_group(running, signal.SIGKILL)
            running.process.wait()
            self._finish_stopped(running, count)

    def _finish_stopped(self, running: _Running, count: bool) -> None:
        # The runner is gone; make sure no member of its process group lingers.
        self._signal_group(running, signal.SIGKILL)
        self._finish(running, deque())
        if count:
            self._abandon_index(running.index, running.stop_reason)

    def _kill_all_quietly(self) -> None:
        for running in list(self._running.values()):
            self._signal_group(running, signal.SIGKILL)
            running.process.wait()
            with contextlib.suppress(Exception):
                self.store.release(self.batch_id, running.index)
            shutil.rmtree(running.directory, ignore_errors=True)
        self._running.clear()

    def _enforce_task_timeout(self) -> None:
        limit = self.spec.task_timeout
        if not limit:
            return
        now = time.monotonic()
        for running in self._running.values():
            if running.stop_sent is None and now - running.started > limit:
                running.stop_reason = f"timed out after {limit:g}s"
                running.stop_sent = now
                self._signal_group(running, signal.SIGTERM)
            elif running.stop_sent is not None and now - running.stop_sent > self.grace:
                self._signal_group(running, signal.SIGKILL)

    def _deadline_passed(self) -> bool:
        if not self.spec.deadline:
            return False
        started = self.store.meta(self.batch_id).get("started_at")
        return bool(started) and time.time() - float(started) > self.spec.deadline

    def _abandon_index(self, index: int, reason: str) -> None:
        """Settle ``index`` as failed without running it (its items are dead-lettered)."""
        claim = self.store.claim(self.batch_id, index)
        if claim.status != "ok":
            return
        values = claim.items
        outcomes = [ItemOutcome(ok=False, exit_code=None, duration=0.0, reason=reason) for _ in values]
        self.store.report(
            self.batch_id,
            index,
            claim.attempt,
            claim.sha1,
            outcomes,
            claimed_items=values,
            non_retriable=True,
        )

    def _abandon_unsettled(self, reason: str) -> None:
        self._abandoned = True
        for index in self.store.unsettled_indexes(self.batch_id):
            self._abandon_index(index, reason)
        self.store.set_meta(self.batch_id, failure_reason="DeadlineExceeded")
        self.store.set_state(self.batch_id, FAILED)
        self._notify()

    # -- bookkeeping --------------------------------------------------------------------

    def _notify(self) -> None:
        if self.on_update is not None:
            self.on_update(self.store.progress(self.batch_id))

    def _records_path(self) -> Path:
        return runs_dir(self.batch_id, self.home) / "processes.jsonl"

    def _record(self, process: subprocess.Popen[bytes]) -> None:
        """Remember a runner's process group so a later runner can kill orphans."""
        with contextlib.suppress(psutil.Error):
            created = psutil.Process(process.pid).create_time()
            with open(self._records_path(), "a") as handle:
                handle.write(json.dumps({"pgid": process.pid, "created": created}) + "\n")

    def _kill_orphans(self) -> None:
        """Kill what a previous runner of this batch (killed with SIGKILL) left running."""
        path = self._records_path()
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            records = []
        groups = {r["pgid"]: r["created"] for r in records}
        if groups:
            for process in psutil.process_iter(["pid", "create_time"]):
                with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                    pgid = os.getpgid(process.pid)
                    created = groups.get(pgid)
                    # Same group id and not older than the recorded leader: one of ours.
                    if created is not None and process.info["create_time"] >= created - 0.01:
                        process.kill()
        path.unlink(missing_ok=True)
        for stale in runs_dir(self.batch_id, self.home).glob("task-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a graceful stop while the runner runs."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: object) -> None:
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def launch_detached(batch_id: str, home: Path | None = None, redis_url: str | None = None) -> int:
    """Run ``batch_id`` in a background process; returns its pid once it holds the runner lock."""
    directory = runs_dir(batch_id, home)
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if home is not None:
        env[settings.ENV_HOME] = str(home)
    if redis_url:
        env[settings.ENV_REDIS_URL] = redis_url  # the environment, never argv: it may hold a password
    with open(directory / "background.log", "ab") as log:
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
        if process.poll() is not None:
            tail = (directory / "background.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UsageError(f"the background runner of {batch_id} exited at once: {' '.join(tail)}")
        time.sleep(0.02)
    return process.pid


def _stop_runner(batch_id: str, home: Path | None, timeout: float = 10.0) -> None:
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
    ) -> Status | None:
        """Run the batch in this process (``wait``) or in a background process."""
        if wait:
            return LocalRunner(store, spec.id, home=home, on_update=on_update).run()
        from ..connection import url_of

        launch_detached(spec.id, home, url_of(store.redis))
        return None

    def resume(
        self,
        store: Store,
        spec: Any,
        *,
        wait: bool,
        home: Path | None = None,
        on_update: Callable[[Progress], None] | None = None,
    ) -> Status | None:
        """Same as launch: the runner only runs what is unsettled."""
        return self.launch(store, spec, wait=wait, home=home, on_update=on_update)

    def augment_status(self, store: Store, status: Status, *, home: Path | None = None) -> Status:
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
        _stop_runner(spec.id, home)
        shutil.rmtree(runs_dir(spec.id, home), ignore_errors=True)
