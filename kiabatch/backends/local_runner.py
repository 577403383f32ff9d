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
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import redis

from .. import items as items_mod
from .. import settings, templates
from ..errors import InterruptedBatchError, UnreachableError, UsageError
from ..files import private_dir, write_private
from ..model import FAILED, INTERRUPTED, BatchSpec, Status
from ..results_store import ResultsPlan
from ..store import LOG_TAIL, Claim, ItemOutcome, RedisFullError, Store
from ..task import item_argv, item_dir, item_outcome, report_outcomes, task_env
from .base import RunHooks
from .local_state import make_runs_dir, runner_lock

_GRACE = 5.0
_TICK = 0.1
#: Seconds between reads of the batch's parallelism (``kiabatch scale``).
_SCALE_POLL = 0.5
#: Least seconds between two progress reads for the hooks (each costs a Redis round trip).
_NOTIFY_EVERY = 0.1
_MARKER = "KIABATCH_LOCAL_WORKER_OF"
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


def scratch_dir(batch_id: str, home: Path | None = None) -> Path:
    """Where a batch's task directories (the emptyDirs) go: private, created now."""
    root = scratch_root(home)
    if root is None:  # beside the runner lock, never the run directory itself (removed after the run)
        return private_dir(make_runs_dir(batch_id, home) / "scratch", "the batch's scratch directory", tighten=True)
    return private_dir(root / batch_id, "the batch's scratch directory", tighten=True)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: a worker killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def worker_environment(batch_id: str) -> dict[str, str]:
    """What every worker of the batch inherits: this environment without kiabatch's own settings."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("KIABATCH_")}
    # Workers carry this marker so a later runner can find them if this one is
    # SIGKILLed (inherited by their children too, unlike a process group id).
    return {**inherited, _MARKER: batch_id}


class _Feed:
    """The indexes still to run this round: retries first, then the unsettled ones, read lazily."""

    def __init__(self, source: Iterator[int]) -> None:
        self._source = source
        self._retries: deque[int] = deque()
        self._lock = threading.Lock()
        self.taken = 0
        #: Nothing left to hand out (a slot that queues a retry takes it itself).
        self.dry = False

    def take(self) -> int | None:
        with self._lock:
            index = self._retries.popleft() if self._retries else next(self._source, None)
            self.taken += index is not None
            self.dry = index is None
            return index

    def retry(self, index: int) -> None:
        with self._lock:
            self._retries.append(index)


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
        self._needs_dir = self._writes_input or "output" in names or self.spec.worker.stdin
        self._lock = threading.RLock()
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._stop_reason: str | None = None  # "interrupted" or "deadline"
        self._stop_signal: int | None = None
        self._failure: BaseException | None = None
        self._parallelism = self.spec.parallelism
        self._active = 0  # slots running
        self._running_reported = False
        self._started_at: float | None = None
        self._notified = 0.0
        self._env = worker_environment(batch_id)
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
        """Run slots until the feed is empty; False if there was nothing to run."""
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
                break
            slots[0].join(_TICK) if slots else time.sleep(_TICK)
            self._notify()  # keeps a progress display fresh between claims and reports
            if self._stop_signal is not None:
                self._stop("interrupted")
            elif self._stop_reason is None and self._deadline_passed():
                self._stop("deadline")
        if self._failure is not None:
            self._stop("interrupted")
            raise self._failure
        return feed.taken > 0

    def _slot(self, feed: _Feed) -> None:
        try:
            while self._stop_reason is None:
                with self._lock:
                    if self._active > self._parallelism:  # scaled down: retire between tasks
                        return
                index = feed.take()
                if index is None:
                    return
                if self._run_task(index):
                    feed.retry(index)
        except BaseException as exc:  # Redis lost for good, or a bug: stop the batch
            self._failure = exc
            self._stop("interrupted")
        finally:
            with self._lock:
                self._active -= 1

    def _run_task(self, index: int) -> bool:
        """One attempt of task ``index``; returns True if the index must run again."""
        claim = self.store.claim(self.batch_id, index)
        if claim.status != "ok":
            return False  # settled meanwhile
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
                    return False
            return self._report(index, claim, outcomes, values)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _run_item(
        self, index: int, position: int, value: Any, directory: Path | None, env: dict[str, str], started: float
    ) -> ItemOutcome:
        where = item_dir(directory, position) if directory is not None else self.scratch
        try:
            argv = item_argv(self.spec, value, index, where)
        except UsageError as exc:  # e.g. a missing field: a retry would fail the same way
            return item_outcome(exit_code=None, duration=0.0, stdout=b"", stderr=b"", invalid=str(exc))
        stdin_path = where / "stdin"
        if directory is not None:
            for level in (directory, directory / "items", where):  # each one 0700, whatever the umask
                level.mkdir(mode=0o700, exist_ok=True)
            if self._writes_input:
                write_private(where / "item.json", items_mod.encode(value))
            if self.spec.worker.stdin:
                write_private(stdin_path, items_mod.text(value))
        clock = time.monotonic()
        with open(stdin_path if self.spec.worker.stdin else os.devnull, "rb") as stdin:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=self.spec.cwd or None,
                    env=env,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group: stopping it stops its children
                )
            except (OSError, ValueError) as exc:  # ValueError: e.g. an environment value with a NUL byte
                reason = f"cannot run {argv[0]!r}: {getattr(exc, 'strerror', None) or exc}"
                return ItemOutcome(ok=False, exit_code=127, duration=0.0, reason=reason, stderr=reason.encode())
        self._started(index, process)
        try:
            stdout, err, timed_out = self._communicate(process, started)
        finally:
            self._finished(index)
        code = None if timed_out else exit_status(process.returncode)
        return item_outcome(
            exit_code=code,
            duration=time.monotonic() - clock,
            stdout=stdout,
            stderr=err,
            output=where / "output" if self.spec.worker.result_from_output_file else None,
            killed_reason=f"timed out after {self.spec.task_timeout:g}s" if timed_out else "",
        )

    def _communicate(self, process: subprocess.Popen[bytes], started: float) -> tuple[bytes, bytes, bool]:
        """Read stdout fully and the last 64 KiB of stderr, within the attempt's time limit.

        Returns (stdout, stderr tail, timed_out). Unlike ``Popen.communicate`` the
        stderr kept in memory is bounded, however much a worker writes.
        """
        assert process.stdout is not None and process.stderr is not None
        limit = self.spec.task_timeout
        deadline = None if not limit else started + limit
        out: list[bytes] = []
        err = bytearray()
        timed_out = False
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, out)
            selector.register(process.stderr, selectors.EVENT_READ, err)
            while selector.get_map():
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0 and not timed_out:
                    timed_out = True
                    self._signal_group(process, signal.SIGTERM)
                    threading.Thread(target=self._kill_after_grace, args=([process],), daemon=True).start()
                    deadline = None
                    continue
                for key, _ in selector.select(timeout):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                    elif key.data is out:
                        out.append(chunk)
                    else:
                        err += chunk
                        del err[:-LOG_TAIL]
        process.wait()
        return b"".join(out), bytes(err), timed_out

    def _report(self, index: int, claim: Claim, outcomes: list[ItemOutcome], values: list[Any]) -> bool:
        result = report_outcomes(
            self.store, self.batch_id, index, attempt=claim.attempt, claim_sha1=claim.sha1, outcomes=outcomes,
            claimed_items=values, non_retriable_exit_codes=self.spec.worker.non_retriable_exit_codes,
            results=self._results,
        )  # fmt: skip
        self._notify()
        self._watch_memory()
        return result.status in ("retry", "stale")

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

    def _started(self, index: int, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._workers[index] = process
            stopping = self._stop_reason is not None
            first, self._running_reported = not self._running_reported, True
        if first:
            self.hooks.running()
        if stopping:  # a stop raced with this start
            self._signal_group(process, signal.SIGKILL)

    def _finished(self, index: int) -> None:
        with self._lock:
            self._workers.pop(index, None)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    def _stop(self, reason: str) -> None:
        """Stop every worker: SIGTERM to each process group, SIGKILL after the grace period."""
        with self._lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
            workers = list(self._workers.values())
        for process in workers:
            self._signal_group(process, signal.SIGTERM)
        threading.Thread(target=self._kill_after_grace, args=(workers,), daemon=True).start()

    def _kill_after_grace(self, workers: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in workers):
            time.sleep(0.02)
        for process in workers:
            self._signal_group(process, signal.SIGKILL)

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
                if process.environ().get(_MARKER) == self.batch_id:
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
