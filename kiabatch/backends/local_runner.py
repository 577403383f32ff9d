"""Runs one local batch to completion with Indexed Job semantics.

Each of ``parallelism`` slots (threads) repeatedly takes an unsettled index and
runs the plan a Kubernetes pod runs: **claim** (the same Lua script as the init
container), the **unmodified worker** once per claimed item as a subprocess, with
the task's inputs in a scratch directory (its emptyDir), then **report** (the same
store code as the reporter sidecar). Semantics follow an Indexed Job:

* ``completions``: every index runs until its outcome is settled in Redis;
* ``parallelism``: at most that many tasks at once;
* ``backoffLimitPerIndex``: a failed index runs again until its retries are spent;
* ``activeDeadlineSeconds``: past the batch deadline, running workers are stopped
  and every unsettled item is dead-lettered with reason DeadlineExceeded;
* the pod's ``activeDeadlineSeconds``: a per-attempt time limit.

Ctrl-C / SIGTERM stop the workers (each runs in its own process group) without
counting a failure; their indexes keep their claims and ``kiabatch resume`` finishes
the batch. A runner killed with SIGKILL leaves workers behind: the next runner of
the batch kills them first, so two workers never run one index at once.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from .. import items as items_mod
from .. import settings, templates
from ..errors import InterruptedBatchError, UsageError
from ..files import private_dir
from ..model import FAILED, INTERRUPTED, BatchSpec, Progress, Status
from ..store import LOG_TAIL, Claim, ItemOutcome, Store
from ..task import item_dir, task_env
from .local import make_runs_dir, runner_lock

_GRACE = 5.0
_TICK = 0.1
_MARKER = "KIABATCH_LOCAL_WORKER_OF"


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


class LocalRunner:
    """Runs one batch in this process until every index is settled (or it is stopped)."""

    def __init__(
        self,
        store: Store,
        batch_id: str,
        *,
        home: Path | None = None,
        on_update: Callable[[Progress], None] | None = None,
        on_running: Callable[[], None] | None = None,
        grace: float = _GRACE,
    ) -> None:
        self.store = store
        self.batch_id = batch_id
        self.home = home or settings.home()
        self.on_update = on_update
        self._on_running = on_running
        self.grace = grace
        self.spec: BatchSpec = store.spec(batch_id)
        self.scratch = scratch_dir(batch_id, self.home)
        self._lock = threading.RLock()
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._stop_reason: str | None = None  # "interrupted" or "deadline"
        self._stop_signal: int | None = None
        self._failure: BaseException | None = None
        # Workers carry this marker so a later runner can find them if this one is
        # SIGKILLed (inherited by their children too, unlike a process group id).
        self._env = {**os.environ, _MARKER: batch_id}

    # -- public -------------------------------------------------------------------------

    def run(self) -> Status:
        """Run every unsettled task; returns the final status.

        Raises InterruptedBatchError after Ctrl-C / SIGTERM (the batch stays resumable).
        """
        with runner_lock(self.batch_id, self.home), self._signals(), self._scratch_removed():
            self.store.set_meta(self.batch_id, runner=f"pid {os.getpid()} on {socket.gethostname()}")
            self._kill_orphans()
            self.store.release_all(self.batch_id)
            # Repeat until Redis agrees every index is settled: a Redis that crashed
            # before persisting its last writes may have forgotten some reports.
            while self._stop_reason is None:
                pending = self.store.unsettled_indexes(self.batch_id)
                if not pending:
                    break
                self._run_round(deque(pending))
            if self._stop_reason == "deadline":
                self._abandon_unsettled()
            if self._stop_signal is not None:
                self.store.set_state(self.batch_id, INTERRUPTED)
                raise InterruptedBatchError(
                    f"batch {self.batch_id} interrupted by {signal.Signals(self._stop_signal).name}; "
                    f"continue it with: kiabatch resume {self.batch_id}"
                )
            return self.store.status(self.batch_id)

    # -- slots --------------------------------------------------------------------------

    def _run_round(self, pending: deque[int]) -> None:
        slots = [
            threading.Thread(target=self._slot, args=(pending,), name=f"kiabatch-slot-{n}", daemon=True)
            for n in range(min(self.spec.parallelism, len(pending)))
        ]
        for slot in slots:
            slot.start()
        while any(slot.is_alive() for slot in slots):
            for slot in slots:
                slot.join(_TICK)
            if self._stop_signal is not None:
                self._stop("interrupted")
            elif self._stop_reason is None and self._deadline_passed():
                self._stop("deadline")
        if self._failure is not None:
            self._stop("interrupted")
            raise self._failure

    def _slot(self, pending: deque[int]) -> None:
        try:
            while self._stop_reason is None:
                with self._lock:
                    if not pending:
                        return
                    index = pending.popleft()
                if self._run_task(index):
                    with self._lock:
                        pending.append(index)
        except BaseException as exc:  # Redis lost for good, or a bug: stop the batch
            self._failure = exc
            self._stop("interrupted")

    def _run_task(self, index: int) -> bool:
        """One attempt of task ``index``; returns True if the index must run again."""
        claim = self.store.claim(self.batch_id, index)
        if claim.status != "ok":
            return False  # settled meanwhile
        self._notify()  # the running count changed
        directory = self.scratch / f"task-{index}-{claim.attempt}"
        started = time.monotonic()
        try:
            outcomes = []
            for position, value in enumerate(claim.items):
                outcomes.append(self._run_item(index, position, value, directory, started))
                if self._stop_reason is not None:
                    # Stopped: this attempt does not count; the claim stays for the next run.
                    self.store.release(self.batch_id, index)
                    return False
            return self._report(index, claim, outcomes)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _run_item(self, index: int, position: int, value: object, directory: Path, started: float) -> ItemOutcome:
        where = item_dir(directory, position)
        os.makedirs(where)
        input_path = where / "item.json"
        input_path.write_text(items_mod.encode(value))
        output_path = where / "output"
        try:
            argv = templates.render(self.spec.worker.command, value, input_path=str(input_path),
                                    output_path=str(output_path), index=index)  # fmt: skip
        except UsageError as exc:  # e.g. a missing field: a retry would fail the same way
            reason = str(exc)
            return ItemOutcome(ok=False, exit_code=None, duration=0.0, reason=reason, stderr=reason.encode(),
                               retriable=False)  # fmt: skip
        stdin_path = where / "stdin"
        if self.spec.worker.stdin:
            stdin_path.write_text(items_mod.text(value))
        clock = time.monotonic()
        with open(stdin_path if self.spec.worker.stdin else os.devnull, "rb") as stdin:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=self.spec.cwd or None,
                    env={**self._env, **task_env(self.spec, index, directory)},
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group: stopping it stops its children
                )
            except OSError as exc:
                reason = f"cannot run {argv[0]!r}: {exc.strerror}"
                return ItemOutcome(ok=False, exit_code=127, duration=0.0, reason=reason, stderr=reason.encode())
        self._started(index, process)
        try:
            stdout, err, timed_out = self._communicate(process, started)
        finally:
            self._finished(index)
        duration = time.monotonic() - clock
        if timed_out:
            reason = f"timed out after {self.spec.task_timeout:g}s"
            return ItemOutcome(ok=False, exit_code=None, duration=duration, reason=reason, stderr=err)
        code = exit_status(process.returncode)
        if self._stop_reason is not None or code != 0:
            reason = f"exited with status {code}"
            return ItemOutcome(ok=False, exit_code=code, duration=duration, reason=reason, stderr=err)
        if self.spec.worker.result_from_output_file:
            try:
                stdout = output_path.read_bytes()
            except OSError:
                reason = "the worker exited 0 but did not write its {output} file"
                return ItemOutcome(ok=False, exit_code=0, duration=duration, reason=reason, stderr=err)
        return ItemOutcome(ok=True, exit_code=0, duration=duration, result=stdout, stderr=err)

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

    def _report(self, index: int, claim: Claim, outcomes: list[ItemOutcome]) -> bool:
        codes = self.spec.worker.non_retriable_exit_codes
        non_retriable = any(not o.ok and (not o.retriable or o.exit_code in codes) for o in outcomes)
        logs = [
            (f"--- item {p} ---\n".encode() if len(outcomes) > 1 else b"") + o.stderr for p, o in enumerate(outcomes)
        ]
        result = self.store.report(
            self.batch_id, index, claim.attempt, claim.sha1, outcomes, claimed_items=claim.items,
            non_retriable=non_retriable, stderr_tail=b"".join(logs),
        )  # fmt: skip
        self._notify()
        return result.status in ("retry", "stale")

    # -- stopping -----------------------------------------------------------------------

    def _started(self, index: int, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._workers[index] = process
            stopping = self._stop_reason is not None
            first, self._on_running = self._on_running, None
        if first is not None:
            first()
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
        started = self.store.meta(self.batch_id).get("started_at")
        return bool(started) and time.time() - float(started) > self.spec.deadline

    def _abandon_unsettled(self) -> None:
        """Settle every unsettled index as failed: the batch deadline passed."""
        reason = f"DeadlineExceeded: the batch deadline of {self.spec.deadline:g}s passed before this item finished"
        self.store.abandon(self.batch_id, self.store.unsettled_indexes(self.batch_id), reason)
        self.store.set_meta(self.batch_id, failure_reason="DeadlineExceeded")
        self.store.set_state(self.batch_id, FAILED)
        self._notify()

    # -- bookkeeping --------------------------------------------------------------------

    def _notify(self) -> None:
        if self.on_update is not None:
            progress = self.store.progress(self.batch_id)
            with self._lock:
                self.on_update(progress)

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
