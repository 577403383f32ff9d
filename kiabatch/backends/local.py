"""The local backend: a batch's tasks as subprocesses of this machine (see ``local_runner``).

Runs in this process with ``wait``, else in a detached background runner
(``kiabatch task run-batch``); ``local_state`` keeps what outlives one runner.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from .. import limits, settings
from ..errors import InterruptedBatchError, UsageError
from ..files import private_dir
from ..model import INTERRUPTED, RUNNING, BatchSpec, Status
from ..store import Store
from ..workloads.base import Runtime
from .base import LogChunk, RunHooks
from .local_state import launch_detached, runner_alive, runs_dir, stop_runner, this_host

_POLL = 0.2


class LocalBackend:
    """Tasks as subprocesses of this machine, with Indexed Job semantics."""

    name = "local"

    def __init__(self, home: Path | None = None) -> None:
        self.home = home

    def runtime(self) -> Runtime:
        """This interpreter and the installed worker programs."""
        from ..workloads import local_runtime

        return local_runtime()

    def preflight(self, store: Store) -> None:
        """The state and scratch directories must be usable before a batch is written."""
        del store
        from .local_runner import scratch_root

        root = private_dir(self.home or settings.home(), f"the state directory (${settings.ENV_HOME})")
        runs = root / "runs"  # made by the runner; checked here, so that a bad one refuses before the write
        if (runs.exists() or runs.is_symlink()) and not runs.is_dir():
            raise UsageError(f"the runs directory {str(runs)!r} is not a directory; remove it or choose another home")
        scratch_root(self.home)

    def task_limit(self, parallelism: int) -> int:
        """:data:`kiabatch.limits.MAX_TASKS`, at any parallelism."""
        del parallelism
        return limits.MAX_TASKS

    def check(self, spec: BatchSpec) -> None:
        """Any shape runs locally (the ranges were checked with the options)."""
        del spec

    def launch(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Run the batch in this process (``wait``) or in a detached background runner."""
        if wait:
            from .local_runner import LocalRunner

            return LocalRunner(store, spec.id, home=self.home, hooks=hooks).run()
        from ..connection import url_of

        launch_detached(spec.id, self.home, url_of(store.redis))
        return None

    #: Resuming is launching again: the runner only runs what is unsettled.
    resume = launch

    def attach(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Finish an existing, unfinished batch: join its live runner, or run it again."""
        if not runner_alive(spec.id, self.home):
            return self.launch(store, spec, wait=wait, hooks=hooks)
        return self.wait(store, spec.id, hooks=hooks) if wait else None

    def wait(self, store: Store, batch_id: str, *, hooks: RunHooks, timeout: float | None = None) -> Status:
        """Poll until the batch ends; InterruptedBatchError once its runner is gone, TimeoutError after ``timeout``."""
        started = time.monotonic()
        while True:
            status = self.status_detail(store, store.status(batch_id))
            hooks.update(status.progress)
            if status.finished:
                return status
            if status.state == INTERRUPTED:
                raise InterruptedBatchError(
                    f"batch {batch_id} is not running (its runner stopped); "
                    f"continue it with: kiabatch resume {batch_id}"
                )
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"batch {batch_id} did not finish within {timeout:g}s")
            time.sleep(_POLL)

    def status_detail(self, store: Store, status: Status, *, read_only: bool = False) -> Status:
        """Say whether this machine's runner of the batch is alive; a batch whose runner is gone is
        ``interrupted`` (nothing runs it until ``kiabatch resume``)."""
        del read_only
        if status.finished:
            return status
        runner = status.runner
        if not runner or not this_host(runner):
            return status  # never started here, or runs on another machine whose lock we cannot see
        alive = runner_alive(status.id, self.home)
        detail = {**status.detail, "runner_alive": alive}
        if alive:  # a resumed runner that has not claimed yet still shows the state it found
            state = RUNNING if status.state == INTERRUPTED else status.state
            return replace(status, state=state, detail=detail)
        detail["next_step"] = f"kiabatch resume {status.id}"
        return replace(status, state=INTERRUPTED, progress=replace(status.progress, running=0), detail=detail)

    def list_detail(self, store: Store, status: Status) -> Status:
        """Same as :meth:`status_detail` (it is cheap: one lock probe)."""
        return self.status_detail(store, status)

    def delete(self, store: Store, spec: BatchSpec) -> None:
        """Stop a local runner of the batch and remove its run directory."""
        del store
        stop_runner(spec.id, self.home)
        shutil.rmtree(runs_dir(spec.id, self.home), ignore_errors=True)

    def logs(
        self, store: Store, batch_id: str, *, index: int | None = None, follow: bool = False
    ) -> Iterator[LogChunk]:
        """The stored stderr tail of every attempt, oldest first (``follow`` has nothing more to stream)."""
        del follow
        for task, attempt, data in store.logs(batch_id, index):
            yield LogChunk(label=f"index {task}, attempt {attempt}", data=data, index=task, attempt=attempt)

    def scale(self, store: Store, batch_id: str, parallel: int) -> None:
        """Set the batch's parallelism; its runner starts or retires slots within a moment."""
        limits.check_int("parallel", parallel, 1, limits.MAX_PARALLEL)
        store.set_meta(batch_id, parallelism=parallel)
