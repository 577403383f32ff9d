"""``Batch``: a handle on one batch — its status, results, failures and answer."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from . import workloads
from .connection import connect
from .errors import BatchFailedError, InterruptedBatchError, KiabatchError
from .model import FAILED, FailedItem, ItemResult, Progress, Status
from .progress import ProgressBar
from .store import Store


def open_store(client: redis.Redis | str | None = None, *, retry_seconds: float = 0.0) -> Store:
    """A Store on ``client`` (a Redis client, a URL, or None for the default)."""
    if isinstance(client, redis.Redis):
        return Store(client)
    return Store(connect(client, retry_seconds=retry_seconds))


class Batch:
    """One batch, by id. Cheap to create; every method reads Redis afresh."""

    def __init__(self, batch_id: str, redis: redis.Redis | str | None = None, *, home: Path | None = None) -> None:
        self.id = batch_id
        self.home = home
        self.store = open_store(redis)
        self._prepared: Future[Any] | None = None

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    # -- reading ----------------------------------------------------------------------

    def status(self, read_only: bool = False) -> Status:
        """State and progress, merged with backend detail (e.g. the Kubernetes Job).

        ``read_only`` never writes (on Kubernetes, status otherwise settles in
        Redis the indexes the Job gave up on).
        """
        status = self.store.status(self.id)
        backend = _backend_for(status.backend)
        return backend.augment_status(self.store, status, home=self.home, read_only=read_only)

    def progress(self) -> Progress:
        """Item counters: total, done, failed, running (O(1))."""
        return self.store.progress(self.id)

    def results(self) -> list[ItemResult]:
        """Per-item results of the successful items, in index order."""
        return self.store.results(self.id)

    def failed(self) -> list[FailedItem]:
        """The dead-letter set: items that failed for good, with exit code and stderr tail."""
        return self.store.failed(self.id)

    # -- waiting and combining ----------------------------------------------------------

    def start_prepare(self) -> None:
        """Start the workload's ``prepare`` hook in a thread (overlaps the map step)."""
        if self._prepared is not None:
            return
        spec = self.store.spec(self.id)
        workload = workloads.get(spec.workload)
        if isinstance(workload, workloads.Reducible):
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiabatch-prepare")
            self._prepared = executor.submit(workload.prepare, spec.options)
            executor.shutdown(wait=False)

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.25) -> Batch:
        """Block until every item is settled; returns ``self``.

        ``progress`` shows a live bar on a terminal. Raises TimeoutError after
        ``timeout`` seconds and InterruptedBatchError if the batch's runner died.
        """
        self.start_prepare()
        started = time.monotonic()
        status = self.store.status(self.id)
        backend = _backend_for(status.backend)
        if hasattr(backend, "wait") and not status.finished:
            with ProgressBar(status.progress.total, f"{self.id}", enabled=progress) as bar:
                backend.wait(self.store, self.id, on_update=bar.update, timeout=timeout)
            return self
        with ProgressBar(status.progress.total, f"{self.id}", enabled=progress) as bar:
            while True:
                status = backend.augment_status(self.store, self.store.status(self.id), home=self.home)
                bar.update(status.progress)
                if status.finished:
                    return self
                problem = status.detail.get("problem")
                if problem:
                    raise KiabatchError(f"batch {self.id}: {problem}")
                if status.detail.get("runner_alive") is False:
                    raise InterruptedBatchError(
                        f"batch {self.id} is not running (state {status.state}); continue it with: "
                        f"kiabatch resume {self.id}"
                    )
                if timeout is not None and time.monotonic() - started > timeout:
                    raise TimeoutError(f"batch {self.id} did not finish within {timeout:g}s")
                time.sleep(poll)

    def reduce(self) -> str:
        """The workload's combined answer (e.g. π's digits). Needs every item to have succeeded."""
        spec = self.store.spec(self.id)
        workload = workloads.get(spec.workload)
        if not isinstance(workload, workloads.Reducible):
            raise KiabatchError(f"workload {spec.workload!r} has no reduce step; read results() instead")
        status = self.store.status(self.id)
        if status.state == FAILED or status.progress.failed:
            raise BatchFailedError(
                f"batch {self.id} has {status.progress.failed} failed item(s); cannot reduce (see kiabatch results)"
            )
        if not status.finished:
            raise KiabatchError(f"batch {self.id} is {status.state}, not finished; wait() for it first")
        prepared = self._prepared.result() if self._prepared is not None else None
        return workload.reduce(self.results(), spec.options, prepared)

    # -- managing ---------------------------------------------------------------------

    def resume(self, wait: bool = False, on_update: Any = None) -> Batch:
        """Run the batch's unsettled tasks again (after an interruption)."""
        spec = self.store.spec(self.id)
        _backend_for(spec.backend).resume(self.store, spec, wait=wait, home=self.home, on_update=on_update,
                                          on_running=self.start_prepare if wait else None)  # fmt: skip
        return self

    def delete(self, keep_results: bool = False) -> bool:
        """Delete the batch now (and its Kubernetes Job). Returns False if it did not exist."""
        try:
            spec = self.store.spec(self.id)
        except KiabatchError:
            return False
        _backend_for(spec.backend).delete(self.store, spec, home=self.home)
        return self.store.delete(self.id, keep_results=keep_results)

    def logs(self, index: int | None = None) -> list[tuple[int, int, bytes]]:
        """Stored worker stderr tails as (index, attempt, bytes)."""
        return self.store.logs(self.id, index)


def _backend_for(name: str) -> Any:
    from . import backends

    return backends.get(name)
