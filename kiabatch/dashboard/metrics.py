"""``/metrics``: what kiabatch knows, in the Prometheus text format (through ``prometheus_client``).

Families (every name carries its unit; counters end in ``_total``):

=============================================  =======  ==========================================================
family                                         type     labels, meaning
=============================================  =======  ==========================================================
``kiabatch_up``                                gauge    1 if Redis answered this scrape (0: the rest is missing)
``kiabatch_batches``                           gauge    ``state``: batches in Redis
``kiabatch_batch_info``                        gauge    ``batch, workload, backend, state, schedule``: always 1
``kiabatch_batch_items``                       gauge    ``batch, workload``: items in the batch
``kiabatch_items_total``                       counter  ``batch, workload, state`` (done, failed): items settled
``kiabatch_items_running``                     gauge    ``batch, workload``: items being run now
``kiabatch_item_duration_seconds``             histo.   ``workload``: run time of every item attempt reported
                                                        while this server ran
``kiabatch_retries_total``                     counter  ``workload``: failed task attempts that were retried
                                                        while this server ran
``kiabatch_dead_letter_items_total``           counter  ``workload``: items dead-lettered while this server ran
``kiabatch_queue_items``                       gauge    ``queue``: items waiting in a named queue
``kiabatch_queue_oldest_item_age_seconds``     gauge    ``queue``: how long its oldest item has waited
``kiabatch_schedule_suspended``                gauge    ``schedule``: 1 if suspended
``kiabatch_schedule_next_run_timestamp_seconds`` gauge  ``schedule``: its next tick
``kiabatch_schedule_last_success_timestamp_seconds`` gauge ``schedule``: when a run last succeeded
``kiabatch_redis_used_memory_bytes``           gauge    Redis ``used_memory``
``kiabatch_redis_max_memory_bytes``            gauge    Redis ``maxmemory`` (0: no limit)
``kiabatch_redis_connected_replicas``          gauge    replicas of this server
=============================================  =======  ==========================================================

Label cardinality is bounded: the per-batch families cover unfinished batches and
those that finished less than ``retention`` seconds ago; then they leave.

The per-workload families are true counters: REPORT keeps a histogram and a retry
count per batch in Redis (``kiabatch:{B}:stats``, O(1) to read), and this collector
adds up what each batch's histogram, retries and failed items grew by between
scrapes, so a batch that expires or is deleted never makes them go down. They count
what was reported while this server ran (a batch's history before it started is its
baseline), as a process's own counters do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import keys
from ..errors import KiabatchError
from ..lua import DURATION_BUCKETS, duration_field
from ..model import TERMINAL_STATES
from .data import STATES, Dashboard, IndexEntry

#: Seconds a finished batch keeps its per-batch series (``--metrics-retention``'s default).
DEFAULT_RETENTION = 900.0
_FIELDS = [duration_field(bound) for bound in DURATION_BUCKETS] + ["d:+Inf"]
_LABELS = ["batch", "workload"]


@dataclass
class _Counts:
    """One batch's (or one workload's) counters: duration buckets (not cumulative), their sum, retries, failed items."""

    buckets: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))
    sum: float = 0.0
    retries: float = 0.0
    failed: float = 0.0

    @classmethod
    def read(cls, stats: dict[bytes, bytes], failed: bytes | None) -> _Counts:
        values = {key.decode(): value for key, value in stats.items()}
        return cls([float(values.get(name, 0)) for name in _FIELDS], float(values.get("d_sum", 0)),
                   float(values.get("retries", 0)), float(failed or 0))  # fmt: skip

    def add(self, other: _Counts, sign: float = 1.0) -> None:
        self.buckets = [mine + sign * theirs for mine, theirs in zip(self.buckets, other.buckets, strict=True)]
        self.sum += sign * other.sum
        self.retries += sign * other.retries
        self.failed += sign * other.failed

    def grew_from(self, before: _Counts) -> bool:
        pairs = [*zip(self.buckets, before.buckets, strict=True), (self.retries, before.retries),
                 (self.failed, before.failed)]  # fmt: skip
        return all(now >= then for now, then in pairs)


class KiabatchCollector(Collector):
    """Reads Redis on every scrape (a few pipelined rounds; see :class:`~kiabatch.dashboard.data.Dashboard`)."""

    def __init__(self, dashboard: Dashboard, retention: float = DEFAULT_RETENTION) -> None:
        self.dashboard = dashboard
        self.retention = retention
        self._lock = threading.Lock()
        #: Per batch: its counters as last seen, and whether they were read after it finished (then never again).
        self._seen: dict[str, tuple[_Counts, bool]] = {}
        self._totals: dict[str, _Counts] = {}
        self._baseline_taken = False

    def take_baseline(self) -> None:
        """Count every batch's history so far as already seen (called when the server starts)."""
        with self._lock:
            entries = self.dashboard.index(max_age=0)
            _, counts = self._read([], entries)
            self._seen = {e.id: (counts[e.id], e.state in TERMINAL_STATES) for e in entries}
            self._baseline_taken = True

    def describe(self) -> list[Metric]:
        """Nothing up front: the families are read from Redis on each scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, read now; ``kiabatch_up`` 0 (and nothing else) if Redis does not answer."""
        up = GaugeMetricFamily("kiabatch_up", "1 if kiabatch's Redis answered this scrape.")
        try:
            families = self._families()
        except (redis.RedisError, KiabatchError, OSError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    # -- reading ----------------------------------------------------------------------

    def _read(
        self, shown: list[IndexEntry], counted: list[IndexEntry]
    ) -> tuple[dict[str, dict[bytes, bytes]], dict[str, _Counts]]:
        """Progress of ``shown`` batches and counters of ``counted`` ones, in pipelined rounds of 1000."""
        calls = [(e.id, "progress") for e in shown] + [(e.id, "counts") for e in counted]
        progress: dict[str, dict[bytes, bytes]] = {}
        counts: dict[str, _Counts] = {}
        client = self.dashboard.redis
        for start in range(0, len(calls), 1000):
            chunk = calls[start : start + 1000]
            with client.pipeline(transaction=False) as pipe:
                for batch_id, what in chunk:
                    if what == "progress":
                        pipe.hgetall(keys.batch_key(batch_id, "progress"))
                    else:
                        pipe.hgetall(keys.batch_key(batch_id, "stats"))
                        pipe.hget(keys.batch_key(batch_id, "progress"), "failed")
                replies = iter(pipe.execute())
            for batch_id, what in chunk:
                if what == "progress":
                    progress[batch_id] = next(replies)
                else:
                    counts[batch_id] = _Counts.read(next(replies), next(replies))
        return progress, counts

    def _families(self) -> list[Metric]:
        now = time.time()
        entries = self.dashboard.index()
        shown = [e for e in entries if e.state not in TERMINAL_STATES
                 or (e.finished_at is not None and now - e.finished_at < self.retention)]  # fmt: skip
        with self._lock:
            if not self._baseline_taken:
                self._seen, self._baseline_taken = {}, True
            # Unfinished batches change; a finished one is read once more after it finished, then never.
            counted = [e for e in entries if e.id not in self._seen or not self._seen[e.id][1]]
            progress, counts = self._read(shown, counted)
            totals = self._count(entries, counted, counts)
        families: list[Metric] = [self._batch_states(entries), *self._per_batch(shown, progress)]
        families += self._workload_counters(totals)
        families += self._queues(now)
        families += self._schedules()
        families += self._redis()
        return families

    def _count(self, entries: list[IndexEntry], counted: list[IndexEntry],
               counts: dict[str, _Counts]) -> dict[str, _Counts]:  # fmt: skip
        """Add what each counted batch grew by to its workload's totals; a copy of the totals."""
        present = {e.id for e in entries}
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for entry in counted:
            current = counts[entry.id]
            before = self._seen.get(entry.id, (_Counts(), False))[0]
            if current.grew_from(before):  # a batch deleted and created again under its id starts over
                total = self._totals.setdefault(entry.workload, _Counts())
                total.add(current)
                total.add(before, -1.0)
            self._seen[entry.id] = (current, entry.state in TERMINAL_STATES)
        copies = {}
        for workload, total in self._totals.items():
            copy = _Counts()
            copy.add(total)
            copies[workload] = copy
        return copies

    def _batch_states(self, entries: list[IndexEntry]) -> Metric:
        family = GaugeMetricFamily("kiabatch_batches", "Batches in Redis, by state.", labels=["state"])
        counts = dict.fromkeys((str(s) for s in STATES), 0)
        for entry in entries:
            counts[entry.state] = counts.get(entry.state, 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        return family

    def _per_batch(self, shown: list[IndexEntry], progress: dict[str, dict[bytes, bytes]]) -> list[Metric]:
        info = GaugeMetricFamily("kiabatch_batch_info", "A batch's workload, backend, state and schedule (always 1).",
                                 labels=["batch", "workload", "backend", "state", "schedule"])  # fmt: skip
        items = GaugeMetricFamily("kiabatch_batch_items", "Items in the batch.", labels=_LABELS)
        settled = CounterMetricFamily("kiabatch_items", "Items settled, by outcome (done or failed).",
                                      labels=[*_LABELS, "state"])  # fmt: skip
        running = GaugeMetricFamily("kiabatch_items_running", "Items being run now.", labels=_LABELS)
        for entry in shown:
            if not progress.get(entry.id):
                continue  # deleted since the index was read
            counts = {key.decode(): int(value) for key, value in progress[entry.id].items()}
            labels = [entry.id, entry.workload]
            info.add_metric([entry.id, entry.workload, entry.backend, entry.state, entry.schedule], 1)
            items.add_metric(labels, counts.get("total", 0))
            settled.add_metric([*labels, "done"], counts.get("done", 0))
            settled.add_metric([*labels, "failed"], counts.get("failed", 0))
            running.add_metric(labels, max(0, counts.get("running", 0)))
        return [info, items, settled, running]

    def _workload_counters(self, totals: dict[str, _Counts]) -> list[Metric]:
        durations = HistogramMetricFamily("kiabatch_item_duration_seconds",
                                          "Run time of each item attempt reported while this server ran.",
                                          labels=["workload"])  # fmt: skip
        retries = CounterMetricFamily("kiabatch_retries", "Failed task attempts that were retried, while this "
                                      "server ran.", labels=["workload"])  # fmt: skip
        dead = CounterMetricFamily("kiabatch_dead_letter_items", "Items dead-lettered (failed for good) while this "
                                   "server ran.", labels=["workload"])  # fmt: skip
        bounds = [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
        for workload, total in sorted(totals.items()):
            cumulative, running_total = [], 0.0
            for bound, count in zip(bounds, total.buckets, strict=True):
                running_total += count
                cumulative.append((bound, running_total))
            durations.add_metric([workload], cumulative, sum_value=total.sum)
            retries.add_metric([workload], total.retries)
            dead.add_metric([workload], total.failed)
        return [durations, retries, dead]

    def _queues(self, now: float) -> list[Metric]:
        length = GaugeMetricFamily("kiabatch_queue_items", "Items waiting in a named queue.", labels=["queue"])
        age = GaugeMetricFamily("kiabatch_queue_oldest_item_age_seconds", "How long the queue's oldest item has "
                                "waited (absent when the queue is empty).", labels=["queue"])  # fmt: skip
        for row in self.dashboard.queues():
            length.add_metric([row.name], row.length)
            if row.oldest_age is not None:
                age.add_metric([row.name], row.oldest_age)
        return [length, age]

    def _schedules(self) -> list[Metric]:
        suspended = GaugeMetricFamily("kiabatch_schedule_suspended", "1 if the schedule is suspended.",
                                      labels=["schedule"])  # fmt: skip
        next_run = GaugeMetricFamily("kiabatch_schedule_next_run_timestamp_seconds", "The schedule's next tick.",
                                     labels=["schedule"])  # fmt: skip
        success = GaugeMetricFamily("kiabatch_schedule_last_success_timestamp_seconds",
                                    "When a run of the schedule last succeeded.", labels=["schedule"])  # fmt: skip
        views, _problem = self.dashboard.schedules(runs=1)
        for view in views:
            if view.schedule is None:
                continue
            suspended.add_metric([view.name], int(view.schedule.suspend))
            if view.next_tick is not None:
                next_run.add_metric([view.name], view.next_tick)
            if view.last_success is not None:
                success.add_metric([view.name], view.last_success)
        return [suspended, next_run, success]

    def _redis(self) -> list[Metric]:
        view = self.dashboard.redis_info()
        used = GaugeMetricFamily("kiabatch_redis_used_memory_bytes", "Memory Redis uses (INFO used_memory).")
        used.add_metric([], view.used_memory)
        limit = GaugeMetricFamily("kiabatch_redis_max_memory_bytes", "Redis maxmemory (0: no limit).")
        limit.add_metric([], view.maxmemory)
        replicas = GaugeMetricFamily("kiabatch_redis_connected_replicas", "Replicas connected to this Redis.")
        replicas.add_metric([], len(view.replicas))
        return [used, limit, replicas]


def registry_for(collector: KiabatchCollector) -> Any:
    """A registry holding only ``collector`` (no process or platform metrics of the server itself)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
