"""What the dashboard shows, read from Redis and the backends with bounded cost (no web code here).

Every read is sized by what one page shows, never by a batch's size or the number
of batches it does not show:

* the batch list reads four meta fields per batch in pipelined rounds (to filter,
  count states and page; 1,000 batches cost a few milliseconds), then the full
  status of the page's rows only;
* a batch's task grid reads one page of completion indexes (``GRID_PAGE``) with one
  pipelined HMGET/SMISMEMBER per key;
* durations are exact up to ``EXACT_DURATIONS`` successful items, a random sample
  (HRANDFIELD) above, and cached once the batch has finished;
* failed items, inline results and logs are read a page (or an index) at a time;
  the JSON Lines download streams (``Store.iter_outcomes``).

:class:`Dashboard` reads only; :class:`Actions` (``--allow-actions``) changes batches and
schedules through the same calls the CLI makes.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from .. import backends, keys
from ..backends.schedules import open_schedules
from ..batch import Batch
from ..errors import KiabatchError
from ..model import TERMINAL_STATES, BatchSpec, FailedItem, ItemResult, State, Status
from ..queue import oldest_age, queue_names
from ..schedules import Schedule
from ..store import Store

#: Rows of the batch list per page.
PAGE_SIZE = 50
#: Completion indexes per page of a batch's task grid.
GRID_PAGE = 1000
#: Dead-letter fields looked up per grid page to tell failed tasks from retried-then-done ones.
GRID_FAILED_FIELDS = 20_000
#: Failed items shown on a batch's page (all of them are in the download).
FAILED_SHOWN = 100
#: Outcomes shown inline on a batch's page (tasks per results page, and items at most).
RESULTS_TASKS = 50
RESULTS_SHOWN = 100
#: Durations read in full up to this many successful items; a random sample of ``DURATION_SAMPLE`` above.
EXACT_DURATIONS = 20_000
DURATION_SAMPLE = 10_000
#: Bytes of log text shown per index (the end of it).
LOG_BYTES = 256 * 1024
#: Schedule runs shown per schedule.
SCHEDULE_RUNS = 5
#: Meta fields the batch list reads for every batch.
_INDEX_FIELDS = ("state", "schedule", "workload", "finished_at", "backend")
_SCAN_ROUND = 1000
STATES = tuple(State)
#: Grid cell states, in the order the legend shows them.
CELL_STATES = ("pending", "running", "retrying", "done", "failed")


@dataclass(frozen=True)
class IndexEntry:
    """What the batch list knows of every batch: enough to filter, count and page."""

    id: str
    created_at: float
    state: str
    schedule: str
    workload: str
    finished_at: float | None
    backend: str = "local"


@dataclass(frozen=True)
class BatchRow:
    """One row of the batch list."""

    status: Status
    schedule: str
    eta: float | None
    duration: float | None

    @property
    def live(self) -> bool:
        """True while the batch can still change (not succeeded or failed)."""
        return self.status.state not in TERMINAL_STATES


@dataclass(frozen=True)
class BatchPage:
    """A page of the batch list, with the counts its filters show."""

    rows: list[BatchRow]
    page: int
    pages: int
    matching: int
    state_counts: dict[str, int]
    schedules: list[str]
    state: str | None
    schedule: str | None

    @property
    def live(self) -> bool:
        """True if a row on the page may still change."""
        return any(row.live for row in self.rows)


@dataclass(frozen=True)
class Cell:
    """One completion index in a batch's task grid."""

    index: int
    state: str
    attempts: int
    failures: int
    items: int


@dataclass(frozen=True)
class Durations:
    """Run time of a batch's successful items: p50, p95 and max over ``count`` items (``sampled`` or all)."""

    count: int
    p50: float
    p95: float
    max: float
    sampled: bool


@dataclass(frozen=True)
class BatchView:
    """Everything a batch's page shows."""

    status: Status
    spec: BatchSpec
    meta: dict[str, str]
    cells: list[Cell]
    grid_page: int
    grid_pages: int
    failed: list[FailedItem]
    failed_total: int
    results: list[ItemResult | FailedItem]
    results_page: int
    results_pages: int
    durations: Durations | None
    retries: int
    eta: float | None
    detail_error: str = ""

    @property
    def live(self) -> bool:
        """True while the page should keep updating."""
        return self.status.state not in TERMINAL_STATES

    @property
    def cell_counts(self) -> dict[str, int]:
        """How many cells of this grid page are in each state."""
        counts = dict.fromkeys(CELL_STATES, 0)
        for cell in self.cells:
            counts[cell.state] += 1
        return counts


@dataclass(frozen=True)
class QueueRow:
    """A named queue: its length and how long its oldest item has waited."""

    name: str
    length: int
    oldest_age: float | None


@dataclass(frozen=True)
class ScheduleView:
    """A schedule with its next tick and last runs (or why it cannot be read)."""

    name: str
    schedule: Schedule | None
    next_tick: float | None
    last_run: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    last_success: float | None = None
    problem: str = ""


@dataclass(frozen=True)
class RedisView:
    """The server's INFO, as the Redis page and ``/metrics`` use it."""

    version: str
    role: str
    used_memory: int
    maxmemory: int
    aof_enabled: bool
    aof_status: str
    replicas: list[dict[str, Any]]
    master_link: str
    uptime: int
    info: dict[str, Any]

    @property
    def memory_ratio(self) -> float | None:
        """used_memory / maxmemory, or None without a maxmemory."""
        return self.used_memory / self.maxmemory if self.maxmemory else None


def eta_seconds(status: Status, now: float | None = None) -> float | None:
    """Seconds until a running batch ends at its rate so far (None before an item settled, or once done)."""
    progress = status.progress
    if status.state != State.RUNNING or not status.started_at or progress.settled == 0:
        return None  # finished, not started, or interrupted (nothing runs it until resume)
    elapsed = (now or time.time()) - status.started_at
    remaining = progress.total - progress.settled
    return max(0.0, remaining * elapsed / progress.settled) if elapsed > 0 else None


def run_seconds(status: Status, now: float | None = None) -> float | None:
    """How long the batch ran (so far)."""
    if not status.started_at:
        return None
    return max(0.0, (status.finished_at or now or time.time()) - status.started_at)


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def _float(value: bytes | str | None) -> float | None:
    try:
        number = float(value) if value not in (None, b"", "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


class _Cache:
    """A small thread-safe cache with a time limit per entry and a size limit."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Any, value: Any, seconds: float) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + seconds, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class Dashboard:
    """Read-only views over one Redis (and, for their batches and schedules, the backends).

    ``store`` may be a read-only store (``kiabatch/readonly.py``): nothing here writes.
    ``schedules_backend`` says where schedules live (Redis and ``kiabatch scheduler``, or CronJobs).
    """

    def __init__(
        self,
        store: Store,
        *,
        home: Path | None = None,
        redis_url: str | None = None,
        schedules_backend: str = backends.LOCAL,
        namespace: str | None = None,
        context: str | None = None,
    ) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.home = home
        self.redis_url = redis_url
        self.schedules_backend = schedules_backend
        self.namespace = namespace
        self.context = context
        self._index_cache = _Cache(4)
        self._durations = _Cache(256)

    # -- the batch list ---------------------------------------------------------------

    def index(self, max_age: float = 0.5) -> list[IndexEntry]:
        """Every batch newest first, with state, schedule, workload and end time (pipelined rounds).

        Shared by the list and ``/metrics`` for ``max_age`` seconds. Ids whose keys
        expired are skipped (pruning the index is a write).
        """
        cached = self._index_cache.get("index")
        if cached is not None:
            return cached
        pairs = self.redis.zrevrange(keys.BATCH_INDEX, 0, -1, withscores=True)
        entries: list[IndexEntry] = []
        for start in range(0, len(pairs), _SCAN_ROUND):
            chunk = pairs[start : start + _SCAN_ROUND]
            with self.redis.pipeline(transaction=False) as pipe:
                for raw_id, _ in chunk:
                    pipe.hmget(keys.batch_key(raw_id.decode(), "meta"), _INDEX_FIELDS)
                replies = pipe.execute()
            for (raw_id, score), (state, schedule, workload, finished, backend) in zip(chunk, replies, strict=True):
                if state is None:
                    continue  # expired or deleted
                entries.append(IndexEntry(raw_id.decode(), float(score), state.decode(), _text(schedule),
                                          _text(workload), _float(finished), _text(backend) or "local"))  # fmt: skip
        self._index_cache.put("index", entries, max_age)
        return entries

    def batches(self, *, state: str | None = None, schedule: str | None = None, page: int = 0,
                per_page: int = PAGE_SIZE) -> BatchPage:  # fmt: skip
        """A page of the batch list, newest first, filtered by state and schedule."""
        entries = self.index()
        counts = dict.fromkeys((str(s) for s in STATES), 0)
        for entry in entries:
            counts[entry.state] = counts.get(entry.state, 0) + 1
        schedules = sorted({entry.schedule for entry in entries if entry.schedule})
        matching = [e for e in entries if (not state or e.state == state)
                    and (not schedule or e.schedule == schedule)]  # fmt: skip
        pages = max(1, math.ceil(len(matching) / per_page))
        page = min(max(0, page), pages - 1)
        rows = []
        now = time.time()
        for entry in matching[page * per_page : (page + 1) * per_page]:
            try:
                status = self.store.status(entry.id)
            except KiabatchError:
                continue  # expired a moment ago
            if status.state not in TERMINAL_STATES:
                status = self._list_detail(status)
            rows.append(BatchRow(status, entry.schedule, eta_seconds(status, now), run_seconds(status, now)))
        return BatchPage(rows, page, pages, len(matching), counts, schedules, state, schedule)

    def _list_detail(self, status: Status) -> Status:
        """What the backend adds for a list row (a local runner that is gone; the Job's state)."""
        try:
            return backends.get(status.backend, home=self.home).list_detail(self.store, status)
        except (KiabatchError, redis.RedisError):
            return status

    # -- one batch --------------------------------------------------------------------

    def batch(self, batch_id: str, *, grid_page: int = 0, results_page: int = 0) -> BatchView:
        """A batch's page: status with the backend's detail, spec, task grid, failures, results, durations."""
        meta = self.store.meta(batch_id)
        spec = BatchSpec.from_fields({key.encode(): value.encode() for key, value in meta.items()})
        status = self.store.status(batch_id)
        detail_error = ""
        try:
            status = backends.get(status.backend, home=self.home).status_detail(self.store, status, read_only=True)
        except (KiabatchError, redis.RedisError) as exc:
            detail_error = str(exc)
        grid_pages = max(1, math.ceil(spec.tasks / GRID_PAGE))
        grid_page = min(max(0, grid_page), grid_pages - 1)
        results_pages = max(1, math.ceil(spec.tasks / RESULTS_TASKS))
        results_page = min(max(0, results_page), results_pages - 1)
        failed, failed_total = self.failed(batch_id)
        start = results_page * RESULTS_TASKS
        outcomes = list(itertools.islice(self.store.iter_outcomes(batch_id, start=start, stop=start + RESULTS_TASKS,
                                                                  page=RESULTS_SHOWN), RESULTS_SHOWN))  # fmt: skip
        stats = self.redis.hget(keys.batch_keys(batch_id).stats, "retries")
        return BatchView(
            status=status,
            spec=spec,
            meta=meta,
            cells=self.cells(batch_id, spec, grid_page),
            grid_page=grid_page,
            grid_pages=grid_pages,
            failed=failed,
            failed_total=failed_total,
            results=outcomes,
            results_page=results_page,
            results_pages=results_pages,
            durations=self.durations(batch_id, finished=status.state in TERMINAL_STATES),
            retries=int(stats or 0),
            eta=eta_seconds(status),
            detail_error=detail_error,
        )

    def cells(self, batch_id: str, spec: BatchSpec, page: int = 0) -> list[Cell]:
        """The task grid's page ``page``: each index's state and attempts (one pipelined round)."""
        k = keys.batch_keys(batch_id)
        indexes = list(range(page * GRID_PAGE, min(spec.tasks, (page + 1) * GRID_PAGE)))
        if not indexes:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(k.attempts, indexes)
            pipe.hmget(k.failures, indexes)
            pipe.hmget(k.running, indexes)
            pipe.hmget(k.sizes, indexes)
            pipe.smismember(k.final, indexes)
            attempts, failures, running, sizes, final = pipe.execute()
        columns = zip(indexes, attempts, failures, running, sizes, final, strict=True)
        rows = [(i, int(a or 0), int(f or 0), r is not None, int(s or 0), bool(d)) for i, a, f, r, s, d in columns]
        # A settled index that had failed attempts either retried its way to success or
        # dead-lettered items: its dead-letter fields tell which (bounded per page).
        suspects = [(i, s) for i, _, f, _, s, d in rows if d and f]
        fields, owners = [], []
        for index, size in suspects:
            for position in range(size):
                if len(fields) >= GRID_FAILED_FIELDS:
                    break
                fields.append(keys.result_field(index, position))
                owners.append(index)
        dead = {owner for owner, value in zip(owners, self.redis.hmget(k.failed, fields) if fields else [],
                                              strict=True) if value is not None}  # fmt: skip
        cells = []
        for index, tries, fails, is_running, size, settled in rows:
            if settled:
                state = "failed" if index in dead else "done"
            elif fails:
                state = "retrying"
            elif is_running:
                state = "running"
            else:
                state = "pending"
            cells.append(Cell(index, state, tries, fails, size))
        return cells

    def failed(self, batch_id: str, limit: int = FAILED_SHOWN) -> tuple[list[FailedItem], int]:
        """Up to ``limit`` dead-lettered items (the first ones when there are few, a scan's worth when many)."""
        k = keys.batch_keys(batch_id)
        total = int(self.redis.hlen(k.failed))
        if not total:
            return [], 0
        if total <= 10 * limit:
            raw = self.redis.hgetall(k.failed)
        else:
            raw = dict(itertools.islice(self.redis.hscan_iter(k.failed, count=limit), limit))
        entries = []
        for name, value in raw.items():
            index, position = keys.parse_result_field(name)
            entry = json.loads(value)
            entries.append(FailedItem(index=index, position=position, item=entry.get("item"),
                                      exit_code=entry.get("exit_code"), reason=entry.get("reason", ""),
                                      stderr=entry.get("stderr", ""), attempts=entry.get("attempts", 0)))  # fmt: skip
        entries.sort(key=lambda f: (f.index, f.position))
        return entries[:limit], total

    def durations(self, batch_id: str, *, finished: bool) -> Durations | None:
        """p50 / p95 / max run time of the successful items: exact up to EXACT_DURATIONS, sampled above.

        Cached for good once the batch has finished, for a few seconds while it runs.
        """
        cached = self._durations.get(batch_id)
        if cached is not None:
            return cached
        k = keys.batch_keys(batch_id)
        count = int(self.redis.hlen(k.outcomes))
        if not count:
            return None
        sampled = count > EXACT_DURATIONS
        if sampled:
            pairs = self.redis.hrandfield(k.outcomes, DURATION_SAMPLE, withvalues=True)
            values = pairs[1::2]
        else:
            values = self.redis.hvals(k.outcomes)
        seconds = sorted(float(json.loads(v).get("duration") or 0.0) for v in values)
        if not seconds:
            return None
        result = Durations(count, _quantile(seconds, 0.5), _quantile(seconds, 0.95), seconds[-1], sampled)
        self._durations.put(batch_id, result, 3600.0 if finished else 3.0)
        return result

    def logs(self, batch_id: str, index: int, limit: int = LOG_BYTES) -> list[tuple[str, str, bool]]:
        """Index ``index``'s logs as (label, text, truncated): the stored stderr tails locally, the pods'
        containers on Kubernetes (``kiabatch logs --index``); each keeps its last ``limit`` bytes."""
        spec = self.store.spec(batch_id)
        chunks = backends.get(spec.backend, home=self.home).logs(self.store, batch_id, index=index, follow=False)
        merged: dict[str, bytearray] = {}
        for chunk in chunks:
            merged.setdefault(chunk.label, bytearray()).extend(chunk.data)
        return [(label, bytes(data[-limit:]).decode("utf-8", "replace"), len(data) > limit)
                for label, data in merged.items()]  # fmt: skip

    def outcomes(self, batch_id: str) -> Iterator[ItemResult | FailedItem]:
        """Every settled item in order, streamed (the JSON Lines download)."""
        self.store.meta(batch_id)
        return self.store.iter_outcomes(batch_id)

    # -- queues, schedules, Redis -----------------------------------------------------

    def queues(self) -> list[QueueRow]:
        """Every named queue ever used: its length and its oldest item's age."""
        now = time.time()
        rows = []
        for name in queue_names(self.redis):
            length = int(self.redis.llen(keys.queue_key(name)))
            rows.append(QueueRow(name, length, oldest_age(self.redis, name, now) if length else None))
        return rows

    def schedules(self, runs: int = SCHEDULE_RUNS) -> tuple[list[ScheduleView], str]:
        """Every schedule with its next tick and last runs, and a problem reading them all ("" if none)."""
        from datetime import UTC, datetime

        try:
            source = open_schedules(self.schedules_backend, store=lambda: self.store, redis_url=self.redis_url,
                                    home=self.home, namespace=self.namespace, context=self.context)  # fmt: skip
            rows = source.rows()
        except (KiabatchError, redis.RedisError) as exc:
            return [], str(exc)
        views = []
        now = datetime.now(UTC)
        for row in rows:
            if row.schedule is None:
                views.append(ScheduleView(row.name, None, None, row.last_run, problem=row.invalid))
                continue
            try:
                history = source.history(row.name, runs)
                last_success = source.last_success(row.name)
                tick = None if row.schedule.suspend else row.schedule.next_tick(now).timestamp()
            except (KiabatchError, redis.RedisError, ValueError) as exc:
                views.append(ScheduleView(row.name, row.schedule, None, row.last_run, problem=str(exc)))
                continue
            views.append(ScheduleView(row.name, row.schedule, tick, row.last_run, history, last_success))
        return views, ""

    def redis_info(self) -> RedisView:
        """Version, role, memory, persistence and replication, from INFO."""
        info = self.redis.info()
        replicas = []
        for name in sorted(key for key in info if key.startswith("slave") and key[5:].isdigit()):
            entry = info[name]
            if isinstance(entry, dict):
                lag = entry.get("lag")
                offset = int(entry.get("offset", 0))
                replicas.append({"address": f"{entry.get('ip', '?')}:{entry.get('port', '?')}",
                                 "state": entry.get("state", "?"), "offset": offset,
                                 "behind_bytes": max(0, int(info.get("master_repl_offset", 0)) - offset),
                                 "lag_seconds": lag})  # fmt: skip
        aof = bool(info.get("aof_enabled"))
        aof_status = "off"
        if aof:
            aof_status = (
                "rewriting" if info.get("aof_rewrite_in_progress") else str(info.get("aof_last_write_status", "ok"))
            )
        return RedisView(
            version=str(info.get("redis_version", "?")),
            role=str(info.get("role", "?")),
            used_memory=int(info.get("used_memory", 0)),
            maxmemory=int(info.get("maxmemory", 0)),
            aof_enabled=aof,
            aof_status=aof_status,
            replicas=replicas,
            master_link=str(info.get("master_link_status", "")),
            uptime=int(info.get("uptime_in_seconds", 0)),
            info=info,
        )


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (linear interpolation, as numpy's default)."""
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


class Actions:
    """What ``--allow-actions`` lets the dashboard do: the CLI's delete, resume, scale, and schedule suspend."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def _batch(self, batch_id: str) -> Batch:
        batch = Batch(batch_id, self.dashboard.redis, home=self.dashboard.home)
        batch.store.meta(batch_id)  # NotFoundError for an unknown batch
        return batch

    def delete(self, batch_id: str) -> str:
        """Delete the batch (its workers or Job, and its keys)."""
        if not self._batch(batch_id).delete():
            raise KiabatchError(f"no batch {batch_id!r} (it may have expired or been deleted)")
        return f"deleted batch {batch_id}"

    def resume(self, batch_id: str) -> str:
        """Run the batch's unsettled tasks again, in the background."""
        batch = self._batch(batch_id)
        status = batch.status()
        if status.finished:
            return f"batch {batch_id} already {status.state}; nothing to resume"
        batch.resume(wait=False)
        return f"resumed batch {batch_id}"

    def scale(self, batch_id: str, parallel: int) -> str:
        """Change how many of the batch's tasks run at once."""
        self._batch(batch_id).scale(parallel)
        return f"batch {batch_id}: parallelism {parallel}"

    def suspend(self, name: str, suspend: bool) -> str:
        """Suspend (or resume) a schedule."""
        source = open_schedules(self.dashboard.schedules_backend, store=lambda: self.dashboard.store,
                                redis_url=self.dashboard.redis_url, home=self.dashboard.home,
                                namespace=self.dashboard.namespace, context=self.dashboard.context)  # fmt: skip
        source.set_suspend(name, suspend)
        return f"schedule {name} {'suspended' if suspend else 'resumed'}"
