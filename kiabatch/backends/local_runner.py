"""Runs one local batch to completion with Indexed Job semantics.

Each of ``parallelism`` slots (threads) repeatedly takes an unsettled index and
runs the plan a Kubernetes pod runs: **claim** (the same Lua script as the pod's
claim step), the **unmodified worker** once per claimed item as a subprocess, and
**report** (the same outcome rules as the pod's reporter, ``kiabatch.task``).
Workers get their output through pipes; a task directory (the pod's emptyDir) is
made only when the command needs files (``{input}``, ``{output}``, ``--stdin``).
Semantics follow an Indexed Job:

* ``completions``: every index runs until its outcome is settled in Redis;
* ``parallelism``: at most that many tasks at once (``kiabatch scale`` changes it
  while the batch runs: slots start or retire within a moment);
* ``backoffLimitPerIndex``: a failed index runs again until its retries are spent;
* ``activeDeadlineSeconds``: past the batch deadline, running workers are stopped
  and every unsettled item is dead-lettered with reason DeadlineExceeded;
* the pod's ``activeDeadlineSeconds``: a per-attempt time limit.

Ctrl-C / SIGTERM stop the workers (each runs in its own process group) without
counting a failure; their indexes keep their claims and ``kiabatch resume`` finishes
the batch. A runner killed with SIGKILL leaves workers behind: the next runner of
the batch kills them first, so two workers never run one index at once. Workers do
not inherit kiabatch's own environment variables (``KIABATCH_*``: a Redis URL may
hold a password); they get the batch's ``--env`` and the task variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import redis

from .. import items as items_mod
from .. import settings, templates
from ..errors import InterruptedBatchError, NotFoundError, UnreachableError, UsageError
from ..files import private_dir, write_private
from ..model import FAILED, INTERRUPTED, BatchSpec, Status
from ..results_store import ResultsPlan
from ..store import LOG_TAIL, Claim, ItemOutcome, RedisFullError, Report, ReportResult, Store
from ..task import item_argv, item_dir, item_outcome, outcome_report, task_env
from .base import RunHooks
from .local_state import make_runs_dir, runner_lock
from .spawn import Worker, same_directory, spawn

_GRACE = 5.0
_TICK = 0.1
#: Seconds between reads of the batch's parallelism (``kiabatch scale``).
_SCALE_POLL = 0.5
#: Least seconds between two progress reads for the hooks (each costs a Redis round trip).
_NOTIFY_EVERY = 0.1
#: Tasks a slot claims in one round trip when the batch has many per slot.
_CLAIM_AHEAD = 4
#: Indexes whose settled state is read from Redis at a time.
_UNSETTLED_PAGE = 1000


def scratch_root(home: Path | None = None) -> Path | None:
    """The directory holding batches' task directories, created if needed; None: use the run directory.

    ``$KIABATCH_SCRATCH`` if set (an unusable one is a UsageError naming it); else a
    memory file system (``/dev/shm/kiabatch-UID``, private), like an emptyDir with
    ``medium: Memory``, as task directories are small and short-lived.
    """
    explicit = os.environ.get(settings.ENV_SCRATCH)
    if explicit:
        return private_dir(Path(explicit), f"${settings.ENV_SCRATCH}")
    shm = Path("/dev/shm")  # noqa: S108 - a private per-user subdirectory, verified below
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = shm / f"kiabatch-{os.getuid()}"
        with contextlib.suppress(OSError):
            root.mkdir(mode=0o700, exist_ok=True)
            info = root.lstat()
            # Someone else's directory, or a symlink planted in the shared /dev/shm: do not use it.
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                if info.st_mode & 0o077:
                    root.chmod(0o700)
                return root
    return None


def runner_identity(batch_id: str, home: Path | None = None) -> str:
    """``BATCH@HOME-HASH``: a batch's runner on this machine. Two state directories (two Redis servers)
    may hold batches of the same id; their scratch directories and workers must never mix."""
    digest = hashlib.sha256(str((home or settings.home()).absolute()).encode()).hexdigest()[:12]
    return f"{batch_id}@{digest}"


def scratch_dir(batch_id: str, home: Path | None = None) -> Path:
    """Where a batch's task directories (the emptyDirs) go: private, created now."""
    root = scratch_root(home)
    if root is None:  # beside the runner lock, never the run directory itself (removed after the run)
        return private_dir(make_runs_dir(batch_id, home) / "scratch", "the batch's scratch directory", tighten=True)
    name = runner_identity(batch_id, home).replace("@", ".")
    return private_dir(root / name, "the batch's scratch directory", tighten=True)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: a worker killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def worker_environment(identity: str) -> dict[str, str]:
    """What every worker of a runner inherits: this environment without kiabatch's own settings."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("KIABATCH_")}
    # Workers carry this marker so a later runner can find them if this one is
    # SIGKILLed (inherited by their children too, unlike a process group id).
    return {**inherited, settings.ENV_LOCAL_WORKER_OF: identity}


class _Feed:
    """The indexes still to run this round: retries first, then the unsettled ones, read lazily."""

    def __init__(self, source: Iterator[int]) -> None:
        self._source = source
        self._retries: deque[int] = deque()
        self._lock = threading.Lock()
        self.taken = 0
        #: Nothing left to hand out (a slot that queues a retry takes it itself).
        self.dry = False

    def take(self, count: int = 1) -> list[int]:
        """Up to ``count`` indexes (empty: the feed is dry for now)."""
        with self._lock:
            taken = []
            while len(taken) < count:
                index = self._retries.popleft() if self._retries else next(self._source, None)
                if index is None:
                    break
                taken.append(index)
            self.taken += len(taken)
            self.dry = not taken
            return taken

    def retry(self, index: int) -> None:
        with self._lock:
            self._retries.append(index)
            self.dry = False


class _Reporter:
    """Sends finished tasks' reports from a thread of its own, many per round trip.

    A slot hands over its report and starts its next task at once; the report is in
    Redis a moment later. If the runner dies in between, ``resume`` runs that task
    again and the idempotent REPORT counts it once, so nothing is lost or doubled.
    """

    #: Most reports sent in one pipeline.
    _BATCH = 500

    def __init__(self, store: Store, on_result: Callable[[Report, ReportResult], None]) -> None:
        self._store = store
        self._on_result = on_result
        self._queue: deque[Report] = deque()
        self._pending = 0
        self._closed = False
        self._changed = threading.Condition()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kiabatch-reporter", daemon=True)
        self._thread.start()

    def put(self, report: Report) -> None:
        with self._changed:
            self._queue.append(report)
            self._pending += 1
            self._changed.notify_all()

    def drain(self) -> None:
        """Wait until every report handed over so far is in Redis (or sending failed)."""
        with self._changed:
            while self._pending and self.failure is None:
                self._changed.wait(0.5)

    def close(self) -> None:
        self.drain()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._BATCH, len(self._queue)))]
            try:
                results = self._store.report_many(batch)
                for report, result in zip(batch, results, strict=True):
                    self._on_result(report, result)
            except BaseException as exc:  # Redis lost for good: the runner stops and says so
                with self._changed:
                    self.failure = exc
                    self._changed.notify_all()
                return
            with self._changed:
                self._pending -= len(batch)
                self._changed.notify_all()


class LocalRunner:
    """Runs one batch in this process until every index is settled (or it is stopped)."""

    def __init__(
        self,
        store: Store,
        batch_id: str,
        *,
        home: Path | None = None,
        hooks: RunHooks | None = None,
        grace: float = _GRACE,
    ) -> None:
        self.store = store
        self.batch_id = batch_id
        self.home = home or settings.home()
        self.hooks = hooks or RunHooks()
        self.grace = grace
        self.spec: BatchSpec = store.spec(batch_id)
        self._results = ResultsPlan.of(self.spec)
        self.scratch = scratch_dir(batch_id, self.home)
        names = templates.placeholders(self.spec.worker.command)
        self._writes_input = "input" in names
        self._output_file = "output" in names
        self._needs_dir = self._writes_input or self._output_file or self.spec.worker.stdin
        # Workers start in the batch's directory: posix_spawn (fast) when it is ours, else Popen.
        self._cwd = None if same_directory(self.spec.cwd or None) else self.spec.cwd
        self._lock = threading.RLock()
        self._workers: dict[int, Worker] = {}
        self._stop_reason: str | None = None  # "interrupted" or "deadline"
        self._stop_signal: int | None = None
        self._failure: BaseException | None = None
        self._parallelism = self.spec.parallelism
        self._active = 0  # slots running
        self._running_reported = False
        self._feed = _Feed(iter(()))
        # Tasks a slot claims per round trip: a few when there are many per slot, else one (fair spread).
        self._claim_ahead = _CLAIM_AHEAD if self.spec.tasks >= 16 * _CLAIM_AHEAD * self.spec.parallelism else 1
        self._started_at: float | None = None
        self._notified = 0.0
        self._identity = runner_identity(batch_id, self.home)
        self._env = worker_environment(self._identity)
        self._reports = 0
        self._next_memory_check = 20
        self._memory_warned = False

    # -- public -------------------------------------------------------------------------

    def run(self) -> Status:
        """Run every unsettled task; returns the final status.

        Raises InterruptedBatchError after Ctrl-C / SIGTERM (the batch stays resumable)
        and UnreachableError when Redis stays away longer than the retry window.
        """
        with runner_lock(self.batch_id, self.home), self._signals(), self._scratch_removed():
            self._reporter = _Reporter(self.store, self._reported)
            try:
                return self._run()
            except RedisFullError:
                self._stop("interrupted")  # nothing of the refused report was written; its claim stays
                with contextlib.suppress(redis.RedisError):
                    self.store.set_state(self.batch_id, INTERRUPTED)
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._stop("interrupted")
                raise UnreachableError(
                    f"cannot reach Redis ({exc}); the workers were stopped and nothing is lost: "
                    f"`kiabatch resume {self.batch_id}` finishes the batch"
                ) from None
            finally:
                self._reporter.close()

    def _run(self) -> Status:
        self.store.set_meta(self.batch_id, runner=f"pid {os.getpid()} on {socket.gethostname()}")
        self._kill_orphans()
        self.store.release_all(self.batch_id)
        # Repeat until Redis agrees every index is settled: a Redis that crashed
        # before persisting its last writes may have forgotten some reports.
        while self._stop_reason is None and self._run_round(_Feed(self._unsettled())):
            pass
        if self._stop_reason == "deadline":
            self._abandon_unsettled()
        if self._stop_signal is not None:
            self.store.set_state(self.batch_id, INTERRUPTED)
            raise InterruptedBatchError(
                f"batch {self.batch_id} interrupted by {signal.Signals(self._stop_signal).name}; "
                f"continue it with: kiabatch resume {self.batch_id}"
            )
        self._notify(force=True)
        return self.store.status(self.batch_id)

    def _unsettled(self) -> Iterator[int]:
        """Unsettled indexes in order, read a page at a time (memory stays bounded for any batch)."""
        for start in range(0, self.spec.tasks, _UNSETTLED_PAGE):
            yield from self.store.unsettled_among(
                self.batch_id, range(start, min(self.spec.tasks, start + _UNSETTLED_PAGE))
            )

    # -- slots --------------------------------------------------------------------------

    def _run_round(self, feed: _Feed) -> bool:
        """Run slots until the feed is empty and every report is in; False if there was nothing to run."""
        self._feed = feed
        slots: list[threading.Thread] = []
        checked = 0.0
        while True:
            if time.monotonic() - checked > _SCALE_POLL:
                checked = time.monotonic()
                self._parallelism = int(self.store.meta(self.batch_id).get("parallelism") or self._parallelism)
            slots = [slot for slot in slots if slot.is_alive()]
            with self._lock:
                wanted = self._stop_reason is None and not feed.dry and self._active < self._parallelism
                self._active += wanted
            if wanted:
                slot = threading.Thread(target=self._slot, args=(feed,), name="kiabatch-slot", daemon=True)
                slots.append(slot)
                slot.start()
                continue
            if not slots and (feed.dry or self._stop_reason is not None):
                self._reporter.drain()  # its results may hand out retries: then the round goes on
                if self._reporter.failure is not None:
                    self._failure = self._failure or self._reporter.failure
                if feed.dry or self._stop_reason is not None or self._failure is not None:
                    break
                continue
            slots[0].join(_TICK) if slots else time.sleep(_TICK)
            self._notify()  # keeps a progress display fresh between claims and reports
            if self._reporter.failure is not None and self._failure is None:
                self._failure = self._reporter.failure
                self._stop("interrupted")
            if self._stop_signal is not None:
                self._stop("interrupted")
            elif self._stop_reason is None and self._deadline_passed():
                self._stop("deadline")
        if self._failure is not None:
            self._stop("interrupted")
            raise self._failure
        return feed.taken > 0

    def _reported(self, report: Report, result: ReportResult) -> None:
        """Called by the reporter thread: a failed attempt with retries left (or a stale claim) runs again."""
        if result.status in ("retry", "stale"):
            self._feed.retry(report.index)
        elif result.status == "missing":  # the batch was deleted under us
            self._failure = self._failure or NotFoundError(f"batch {self.batch_id} was deleted while it ran")
            self._stop("interrupted")
        self._notify()
        self._watch_memory()

    def _slot(self, feed: _Feed) -> None:
        try:
            while self._stop_reason is None and not self._retiring():
                indexes = feed.take(self._claim_ahead)
                if not indexes:
                    return
                # One round trip claims a few tasks; a claimed task counts as running until settled.
                claims = self.store.claim_many(self.batch_id, indexes)
                for position, (index, claim) in enumerate(zip(indexes, claims, strict=True)):
                    if self._stop_reason is not None or (position and self._retiring()):
                        self._release([i for i, c in zip(indexes[position:], claims[position:], strict=True)
                                       if c.status == "ok"], feed)  # fmt: skip
                        break
                    if claim.status == "ok":  # else settled meanwhile
                        self._run_task(index, claim)
        except BaseException as exc:  # Redis lost for good, or a bug: stop the batch
            self._failure = self._failure or exc
            self._stop("interrupted")
        finally:
            with self._lock:
                self._active -= 1

    def _retiring(self) -> bool:
        """True when the batch was scaled down below the slots running: this slot retires between tasks."""
        with self._lock:
            return self._active > self._parallelism

    def _release(self, indexes: list[int], feed: _Feed) -> None:
        """Give back claimed tasks this slot will not run (their claims stay; another slot or run takes them)."""
        for index in indexes:
            self.store.release(self.batch_id, index)
            if self._stop_reason is None:
                feed.retry(index)

    def _run_task(self, index: int, claim: Claim) -> None:
        """One attempt of task ``index``; its report goes to the reporter thread."""
        self._notify()  # the running count changed
        directory = self.scratch / f"task-{index}-{claim.attempt}" if self._needs_dir else None
        env = {**self._env, **task_env(self.spec, index, directory)}
        started = time.monotonic()
        values = claim.items
        try:
            outcomes = []
            for position, value in enumerate(values):
                outcomes.append(self._run_item(index, position, value, directory, env, started))
                if self._stop_reason is not None:
                    # Stopped: this attempt does not count; the claim stays for the next run.
                    self.store.release(self.batch_id, index)
                    return
            self._reporter.put(outcome_report(
                self.batch_id, index, attempt=claim.attempt, claim_sha1=claim.sha1, outcomes=outcomes,
                claimed_items=values, non_retriable_exit_codes=self.spec.worker.non_retriable_exit_codes,
                results=self._results,  # large results are uploaded here, in the slot, before the report
            ))  # fmt: skip
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _run_item(
        self, index: int, position: int, value: Any, directory: Path | None, env: dict[str, str], started: float
    ) -> ItemOutcome:
        where = item_dir(directory, position) if directory is not None else None
        try:
            argv = item_argv(self.spec, value, index, where or self.scratch)
        except UsageError as exc:  # e.g. a missing field: a retry would fail the same way
            return item_outcome(exit_code=None, duration=0.0, stdout=b"", stderr=b"", invalid=str(exc))
        stdin_path = None
        if directory is not None and where is not None:
            for level in (directory, directory / "items", where):  # each one 0700, whatever the umask
                level.mkdir(mode=0o700, exist_ok=True)
            if self._writes_input:
                write_private(where / "item.json", items_mod.encode(value))
            if self.spec.worker.stdin:
                stdin_path = where / "stdin"
                write_private(stdin_path, items_mod.text(value))
        clock = time.monotonic()
        try:
            worker = spawn(argv, env=env, cwd=self._cwd, stdin=stdin_path)
        except (OSError, ValueError) as exc:  # ValueError: e.g. an environment value with a NUL byte
            reason = f"cannot run {argv[0]!r}: {getattr(exc, 'strerror', None) or exc}"
            return ItemOutcome(ok=False, exit_code=127, duration=0.0, reason=reason, stderr=reason.encode())
        self._started(index, worker)
        try:
            stdout, err, timed_out = self._communicate(worker, started)
        finally:
            self._finished(index)
        code = None if timed_out else exit_status(worker.wait())
        return item_outcome(
            exit_code=code,
            duration=time.monotonic() - clock,
            stdout=stdout,
            stderr=err,
            output=where / "output" if self._output_file and where is not None else None,
            killed_reason=f"timed out after {self.spec.task_timeout:g}s" if timed_out else "",
        )

    def _communicate(self, worker: Worker, started: float) -> tuple[bytes, bytes, bool]:
        """Read stdout fully and the last 64 KiB of stderr, within the attempt's time limit.

        Returns (stdout, stderr tail, timed_out). Unlike ``Popen.communicate`` the
        stderr kept in memory is bounded, however much a worker writes.
        """
        limit = self.spec.task_timeout
        deadline = None if not limit else started + limit
        out: list[bytes] = []
        err = bytearray()
        timed_out = False
        open_fds = {worker.stdout, worker.stderr}
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        try:
            while open_fds:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0 and not timed_out:
                    timed_out = True
                    worker.signal_group(signal.SIGTERM)
                    threading.Thread(target=self._kill_after_grace, args=([worker],), daemon=True).start()
                    deadline = None
                    continue
                for fd, _event in poller.poll(None if timeout is None else max(0, timeout) * 1000):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        poller.unregister(fd)
                        open_fds.discard(fd)
                        os.close(fd)
                    elif fd == worker.stdout:
                        out.append(chunk)
                    else:
                        err += chunk
                        del err[:-LOG_TAIL]
        finally:
            for fd in open_fds:
                os.close(fd)
        worker.wait()
        return b"".join(out), bytes(err), timed_out

    def _watch_memory(self) -> None:
        """Now and then (after 20, 200, 2000... reports) project the batch's inline results and warn once."""
        with self._lock:
            self._reports += 1
            due = self._reports == self._next_memory_check
            if due:
                self._next_memory_check *= 10
        if due and not self._memory_warned:
            warning = self.store.check_memory(self.batch_id)
            if warning:
                self._memory_warned = True
                self.hooks.update(self.store.progress(self.batch_id), f"warning: {warning}")

    # -- stopping -----------------------------------------------------------------------

    def _started(self, index: int, worker: Worker) -> None:
        with self._lock:
            self._workers[index] = worker
            stopping = self._stop_reason is not None
            first, self._running_reported = not self._running_reported, True
        if first:
            self.hooks.running()
        if stopping:  # a stop raced with this start
            worker.kill()

    def _finished(self, index: int) -> None:
        with self._lock:
            self._workers.pop(index, None)

    def _stop(self, reason: str) -> None:
        """Stop every worker: SIGTERM to each process group, SIGKILL after the grace period."""
        with self._lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
            workers = list(self._workers.values())
        for worker in workers:
            worker.signal_group(signal.SIGTERM)
        threading.Thread(target=self._kill_after_grace, args=(workers,), daemon=True).start()

    def _kill_after_grace(self, workers: list[Worker]) -> None:
        # Only SIGKILL: reaping is the reading thread's (a second waitpid could take another's pid).
        deadline = time.monotonic() + self.grace
        # pid_exists counts a zombie: its process group may live on.
        while time.monotonic() < deadline and any(psutil.pid_exists(w.pid) for w in workers):
            time.sleep(0.02)
        for worker in workers:
            worker.kill()

    def _deadline_passed(self) -> bool:
        if not self.spec.deadline:
            return False
        if self._started_at is None:
            started = self.store.meta(self.batch_id).get("started_at")
            self._started_at = float(started) if started else None
        return self._started_at is not None and time.time() - self._started_at > self.spec.deadline

    def _abandon_unsettled(self) -> None:
        """Settle every unsettled index as failed: the batch deadline passed."""
        reason = f"DeadlineExceeded: the batch deadline of {self.spec.deadline:g}s passed before this item finished"
        self.store.abandon(self.batch_id, self._unsettled(), reason)
        self.store.set_meta(self.batch_id, failure_reason="DeadlineExceeded")
        self.store.set_state(self.batch_id, FAILED)
        self._notify(force=True)

    # -- bookkeeping --------------------------------------------------------------------

    def _notify(self, *, force: bool = False) -> None:
        """Give the hooks the current progress (at most every 0.1 s unless ``force``)."""
        if self.hooks.on_update is None:
            return
        now = time.monotonic()
        if not force and now - self._notified < _NOTIFY_EVERY:
            return
        self._notified = now
        progress = self.store.progress(self.batch_id)
        with self._lock:
            self.hooks.update(progress)

    def _kill_orphans(self) -> None:
        """Kill workers that a previous runner of this batch, killed with SIGKILL, left running.

        We hold the batch's runner lock, so any live process marked as this batch's
        worker on this machine belongs to a dead runner.
        """
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if process.environ().get(settings.ENV_LOCAL_WORKER_OF) == self._identity:
                    process.kill()
        for stale in self.scratch.glob("task-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def _scratch_removed(self) -> Iterator[None]:
        try:
            yield
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a graceful stop while the runner runs."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: object) -> None:
            self._stop_signal = signum  # acted on by the main loop, never here (locks)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
