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
``kiabatch_retries_total``                     counter  ``batch, workload``: failed attempts that were retried
``kiabatch_dead_letter_items``                 gauge    ``batch, workload``: items in the dead-letter set
``kiabatch_batch_start_time_seconds``          gauge    ``batch, workload``: when its first task claimed items
``kiabatch_item_duration_seconds``             histo.   ``workload``: run time of every item attempt reported
                                                        while this server ran
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

The duration histogram is a true counter: the REPORT script keeps a histogram per
batch in Redis (``kiabatch:{B}:stats``), and this collector adds up what each batch's
histogram grew by between scrapes, so a batch that expires or is deleted never makes
it go down. It counts what was reported while this server ran (a batch's history
before it started is its baseline), as a process's own counters do.
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
class _Histogram:
    """Bucket counts (not cumulative), sum and count."""

    buckets: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))
    sum: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> _Histogram:
        values = {key.decode(): value for key, value in raw.items()}
        return cls([float(values.get(name, 0)) for name in _FIELDS], float(values.get("d_sum", 0)))

    def add(self, other: _Histogram, sign: float = 1.0) -> None:
        self.buckets = [mine + sign * theirs for mine, theirs in zip(self.buckets, other.buckets, strict=True)]
        self.sum += sign * other.sum

    def grew_from(self, before: _Histogram) -> bool:
        return all(now >= then for now, then in zip(self.buckets, before.buckets, strict=True))


class KiabatchCollector(Collector):
    """Reads Redis on every scrape (a few pipelined rounds; see :class:`~kiabatch.dashboard.data.Dashboard`)."""

    def __init__(self, dashboard: Dashboard, retention: float = DEFAULT_RETENTION) -> None:
        self.dashboard = dashboard
        self.retention = retention
        self._lock = threading.Lock()
        #: Per batch: its histogram as last seen, and whether it has been read since it finished.
        self._seen: dict[str, tuple[_Histogram, bool]] = {}
        self._totals: dict[str, _Histogram] = {}
        self._baseline_taken = False

    def take_baseline(self) -> None:
        """Record every batch's histogram as already counted (call when the server starts)."""
        with self._lock:
            entries = self.dashboard.index(max_age=0)
            stats = self._stats([e.id for e in entries])
            self._seen = {e.id: (stats[e.id], e.state in TERMINAL_STATES) for e in entries}
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

    def _stats(self, ids: list[str]) -> dict[str, _Histogram]:
        found: dict[str, _Histogram] = {}
        client = self.dashboard.redis
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            with client.pipeline(transaction=False) as pipe:
                for batch_id in chunk:
                    pipe.hgetall(keys.batch_keys(batch_id).stats)
                for batch_id, raw in zip(chunk, pipe.execute(), strict=True):
                    found[batch_id] = _Histogram.from_hash(raw)
        return found

    def _families(self) -> list[Metric]:
        now = time.time()
        entries = self.dashboard.index()
        families: list[Metric] = [self._batch_states(entries)]
        shown = [e for e in entries if e.state not in TERMINAL_STATES
                 or (e.finished_at is not None and now - e.finished_at < self.retention)]  # fmt: skip
        families += self._per_batch(shown)
        families.append(self._durations(entries))
        families += self._queues(now)
        families += self._schedules()
        families += self._redis()
        return families

    def _batch_states(self, entries: list[IndexEntry]) -> Metric:
        family = GaugeMetricFamily("kiabatch_batches", "Batches in Redis, by state.", labels=["state"])
        counts = dict.fromkeys((str(s) for s in STATES), 0)
        for entry in entries:
            counts[entry.state] = counts.get(entry.state, 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        return family

    def _per_batch(self, entries: list[IndexEntry]) -> list[Metric]:
        info = GaugeMetricFamily("kiabatch_batch_info", "A batch's workload, backend, state and schedule (always 1).",
                                 labels=["batch", "workload", "backend", "state", "schedule"])  # fmt: skip
        items = GaugeMetricFamily("kiabatch_batch_items", "Items in the batch.", labels=_LABELS)
        settled = CounterMetricFamily("kiabatch_items", "Items settled, by outcome (done or failed).",
                                      labels=[*_LABELS, "state"])  # fmt: skip
        running = GaugeMetricFamily("kiabatch_items_running", "Items being run now.", labels=_LABELS)
        retries = CounterMetricFamily("kiabatch_retries", "Failed task attempts that were retried.", labels=_LABELS)
        dead = GaugeMetricFamily("kiabatch_dead_letter_items", "Items in the batch's dead-letter set.", labels=_LABELS)
        started = GaugeMetricFamily("kiabatch_batch_start_time_seconds", "When the batch's first task claimed items.",
                                    labels=_LABELS)  # fmt: skip
        client = self.dashboard.redis
        for start in range(0, len(entries), 1000):
            chunk = entries[start : start + 1000]
            with client.pipeline(transaction=False) as pipe:
                for entry in chunk:
                    k = keys.batch_keys(entry.id)
                    pipe.hgetall(k.progress)
                    pipe.hget(k.stats, "retries")
                    pipe.hlen(k.failed)
                    pipe.hmget(k.meta, ["backend", "started_at"])
                replies = pipe.execute()
            for number, entry in enumerate(chunk):
                progress, retried, dead_count, (backend, started_at) = replies[4 * number : 4 * number + 4]
                counts = {key.decode(): int(value) for key, value in progress.items()}
                labels = [entry.id, entry.workload]
                info.add_metric([entry.id, entry.workload, (backend or b"local").decode(), entry.state,
                                 entry.schedule], 1)  # fmt: skip
                items.add_metric(labels, counts.get("total", 0))
                settled.add_metric([*labels, "done"], counts.get("done", 0))
                settled.add_metric([*labels, "failed"], counts.get("failed", 0))
                running.add_metric(labels, max(0, counts.get("running", 0)))
                retries.add_metric(labels, int(retried or 0))
                dead.add_metric(labels, int(dead_count))
                if started_at:
                    started.add_metric(labels, float(started_at))
        return [info, items, settled, running, retries, dead, started]

    def _durations(self, entries: list[IndexEntry]) -> Metric:
        """Add what each batch's histogram grew by since the last scrape to the per-workload totals."""
        with self._lock:
            if not self._baseline_taken:
                self._seen = {}
                self._baseline_taken = True
            present = {e.id: e for e in entries}
            for gone in set(self._seen) - set(present):
                del self._seen[gone]
            # Unfinished batches change; a finished one is read once more after it finished, then never.
            wanted = [e for e in entries if e.id not in self._seen or not self._seen[e.id][1]]
            current = self._stats([e.id for e in wanted])
            for entry in wanted:
                now = current[entry.id]
                before = self._seen.get(entry.id, (_Histogram(), False))[0]
                if now.grew_from(before):  # a batch deleted and created again under its id starts over
                    total = self._totals.setdefault(entry.workload, _Histogram())
                    total.add(now)
                    total.add(before, -1.0)
                self._seen[entry.id] = (now, entry.state in TERMINAL_STATES)
            totals = {workload: (list(h.buckets), h.sum) for workload, h in self._totals.items()}
        family = HistogramMetricFamily("kiabatch_item_duration_seconds",
                                       "Run time of each item attempt reported while this server ran.",
                                       labels=["workload"])  # fmt: skip
        bounds = [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
        for workload, (counts, total) in sorted(totals.items()):
            cumulative, running_total = [], 0.0
            for bound, count in zip(bounds, counts, strict=True):
                running_total += count
                cumulative.append((bound, running_total))
            family.add_metric([workload], cumulative, sum_value=total)
        return family

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
