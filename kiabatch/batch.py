"""``Batch``: a handle on one batch — its status, results, failures and answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from . import backends, limits, settings, workloads
from .backends import Backend, LogChunk, RunHooks
from .connection import connect
from .errors import BatchFailedError, KiabatchError, UsageError
from .model import FAILED, FailedItem, ItemResult, Progress, Status
from .progress import ProgressBar
from .results_store import MAX_INLINE_LIMIT, ResultsStore, batch_prefix, validate_endpoint
from .results_store import validate_url as validate_results_url
from .store import Store, human_bytes


def open_store(
    client: redis.Redis | str | None = None, *, home: settings.HomeLike = None, retry_seconds: float = 0.0
) -> Store:
    """A Store on ``client`` (a Redis client, a URL, or None for the default: the embedded server of ``home``)."""
    if isinstance(client, redis.Redis):
        return Store(client)
    return Store(connect(client, home=home, retry_seconds=retry_seconds))


def runner_home(client: redis.Redis | str | None, home: Path | None) -> Path | None:
    """The state directory for a batch written through ``client``.

    A client of an embedded server brings its home: the local runner (a background
    one too) must find the batch in that server. UsageError if ``home`` names another.
    """
    from .embedded import home_of

    own = home_of(client) if isinstance(client, redis.Redis) else None
    if own is None:
        return home
    if home is not None and home != own:
        raise UsageError(
            f"home {str(home)!r} is not the home of the embedded server the client uses ({str(own)!r}); "
            "give the same home, or none"
        )
    return own


class Batch:
    """One batch, by id. Cheap to create; every method reads Redis afresh."""

    def __init__(
        self, batch_id: str, redis: redis.Redis | str | None = None, *, home: settings.HomeLike = None
    ) -> None:
        self.id = batch_id
        self.home = runner_home(redis, settings.as_home(home))
        self.store = open_store(redis, home=self.home)
        self._prepared: Future[Any] | None = None

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    # -- reading ----------------------------------------------------------------------

    def status(self, read_only: bool = False) -> Status:
        """State and progress, merged with what the backend knows (a runner gone, the Kubernetes Job).

        ``read_only`` never writes (on Kubernetes, status otherwise settles in
        Redis the indexes the Job gave up on).
        """
        status = self.store.status(self.id)
        status = self._backend(status.backend).status_detail(self.store, status, read_only=read_only)
        return replace(status, detail={**status.detail, **self._memory_detail()})

    def _memory_detail(self) -> dict[str, str]:
        """What ``status`` shows about Redis's memory: its use, and warnings (half full, or refused reports)."""
        outlook = self.store.memory_outlook(self.id)
        meta = self.store.meta(self.id)
        detail = {}
        if outlook is not None:
            detail["redis_memory"] = outlook.summary()
            if outlook.projected:
                detail["inline_results"] = (
                    f"{human_bytes(outlook.results)}, ~{human_bytes(outlook.projected)} projected"
                )
        warning = (outlook.warning() if outlook is not None else "") or meta.get("memory_warning", "")
        if warning:
            detail["warning"] = warning
        if meta.get("redis_full"):
            detail["redis_full"] = f"{meta['redis_full']} (`kiabatch resume {self.id} --results-to URL` reruns them)"
        return detail

    def progress(self) -> Progress:
        """Item counters: total, done, failed, running (O(1))."""
        return self.store.progress(self.id)

    def results(self) -> list[ItemResult]:
        """Per-item results of the successful items, in index order (all in memory: see :meth:`iter_results`)."""
        return self.store.results(self.id)

    def iter_results(self) -> Iterator[ItemResult]:
        """The successful items' results in index order, streamed: memory stays small for any batch."""
        for outcome in self.store.iter_outcomes(self.id, failed=False):
            if isinstance(outcome, ItemResult):
                yield outcome

    def iter_outcomes(self) -> Iterator[ItemResult | FailedItem]:
        """Every settled item in index order, streamed: an :class:`ItemResult` or a :class:`FailedItem`."""
        return self.store.iter_outcomes(self.id)

    def download(self, directory: Path | str, *, name_from: str | None = None) -> int:
        """Write every successful item's result to its own file in ``directory``; returns how many.

        Files are named by position: ``INDEX`` (``INDEX-POSITION`` when tasks hold several
        items), or by field ``name_from`` of each (object) item. Names are checked, and
        must be distinct, before anything is written. Stored results are streamed and
        checked against their sha256: a file appears only once its bytes are verified.
        """
        from .download import download_results

        chunked = int(self.store.meta(self.id).get("chunk") or 1) > 1
        return download_results(self.iter_results, Path(directory), name_from=name_from, chunked=chunked)

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

    def wait(self, progress: bool = False, timeout: float | None = None) -> Batch:
        """Block until every item is settled; returns ``self``.

        ``progress`` shows a live line on a terminal. Raises TimeoutError after
        ``timeout`` seconds and InterruptedBatchError if the batch's runner died.
        """
        self.start_prepare()
        status = self.store.status(self.id)
        if status.finished:
            return self
        backend = self._backend(status.backend)
        with ProgressBar(status.progress.total, f"{self.id}", enabled=progress) as bar:
            hooks = RunHooks(on_update=bar.update, on_warning=bar.say if progress else None)
            backend.wait(self.store, self.id, hooks=hooks, timeout=timeout)
        return self

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
        # What prepare made is used once (π's helper process ends with the reduce).
        prepared, self._prepared = (self._prepared.result() if self._prepared is not None else None), None
        try:
            return workload.reduce(self.results(), spec.options, prepared)
        except (ValueError, ArithmeticError) as exc:
            if isinstance(exc, KiabatchError):
                raise
            raise BatchFailedError(f"cannot reduce batch {self.id}: {exc}") from None

    # -- managing ---------------------------------------------------------------------

    def reopen(
        self, *, results_to: str | None = None, s3_endpoint: str | None = None, inline_limit: int | None = None
    ) -> int:
        """Before a resume: optionally point the batch at a results store, and reopen the items that
        failed only because Redis was full (returns how many tasks were reopened).

        ``results_to`` / ``s3_endpoint`` / ``inline_limit`` apply to the reports made
        from now on; results already reported stay where they are.
        """
        fields: dict[str, Any] = {}
        if results_to is not None:
            fields["results_to"] = validate_results_url(results_to) if results_to else ""
        if s3_endpoint is not None:
            fields["s3_endpoint"] = validate_endpoint(s3_endpoint) if s3_endpoint else ""
        if inline_limit is not None:
            fields["inline_limit"] = limits.check_int("inline_limit", inline_limit, 0, MAX_INLINE_LIMIT)
        self.store.meta(self.id)
        if fields:
            self.store.set_meta(self.id, **fields)
        return self.store.reopen_redis_full(self.id)

    def resume(
        self,
        wait: bool = False,
        on_update: Callable[[Progress, str], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> Batch:
        """Run the batch's unsettled tasks again (after an interruption); a Kubernetes Job still live is followed."""
        spec = self.store.spec(self.id)
        hooks = RunHooks(on_update=on_update, on_running=self.start_prepare if wait else None, on_warning=on_warning)
        self._backend(spec.backend).resume(self.store, spec, wait=wait, hooks=hooks)
        return self

    def scale(self, parallel: int) -> None:
        """Change how many of the batch's tasks run at once, while it runs."""
        status = self.store.status(self.id)
        if status.finished:
            raise UsageError(f"batch {self.id} is {status.state}; there is nothing to scale")
        self._backend(status.backend).scale(self.store, self.id, parallel)

    def delete(self, keep_results: bool = False) -> bool:
        """Delete the batch now (and its Kubernetes Job). Returns False if it did not exist."""
        try:
            spec = self.store.spec(self.id)
        except KiabatchError:
            return False
        self._backend(spec.backend).delete(self.store, spec)
        results = ResultsStore.of(spec)
        if results is not None and not keep_results:
            # The objects go first: if the store cannot be reached, Redis still knows them and delete can be repeated.
            prefix = batch_prefix(spec.id, spec.created_at)
            results.delete(entry["path"] for entry in results.list(prefix + "/"))
        return self.store.delete(self.id, keep_results=keep_results)

    def logs(self, index: int | None = None) -> list[tuple[int, int, bytes]]:
        """The stderr tails reports stored, as (index, attempt, bytes), oldest attempt first."""
        return self.store.logs(self.id, index)

    def log_chunks(self, index: int | None = None, *, follow: bool = False) -> Iterator[LogChunk]:
        """The workers' logs as the backend has them (Kubernetes: the pods' containers; local: stored tails).
        UsageError for an index the batch does not have."""
        spec = self.store.spec(self.id)
        if index is not None and not 0 <= index < spec.tasks:
            raise UsageError(
                f"batch {self.id} has {spec.tasks:,} task(s), indexes 0-{spec.tasks - 1:,}; no index {index:,}"
            )
        return self._backend(spec.backend).logs(self.store, self.id, index=index, follow=follow)

    def _backend(self, name: str) -> Backend:
        return backends.get(name, home=self.home)
