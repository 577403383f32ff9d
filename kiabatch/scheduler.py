"""Schedules kept in Redis, and ``kiabatch scheduler``: the local stand-in for CronJobs.

Every tick starts a *run*: ``kiabatch submit ARGS --no-wait`` with the run's name in
``KIABATCH_RUN`` and the schedule's in ``KIABATCH_SCHEDULE`` — the same command a
CronJob's launcher pod runs, so a run is an ordinary batch that ``list``, ``status``
and ``results`` show. Semantics follow CronJobs:

* ``forbid`` skips a tick while the previous run is still active, ``replace`` stops
  the previous run (its batch is left interrupted and resumable) and starts a new
  one, ``allow`` runs them side by side;
* after downtime, only the latest missed tick runs, and only if it is at most
  ``starting_deadline`` seconds old (``startingDeadlineSeconds``);
* a run's batch id is derived from the run's name, so a scheduler restarted in the
  middle of starting a run attaches to that run's batch instead of draining its
  queue a second time.

The clock is injectable, so tests step through minutes without sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from . import keys, settings
from .backends.local_state import runner_alive, stop_runner
from .errors import NotFoundError, UsageError
from .model import SUCCEEDED, TERMINAL_STATES
from .schedules import Schedule, ScheduleRow, StartedRun, run_batch_id, submit_argv, validate_schedule_name
from .store import Store
from .text import when

if TYPE_CHECKING:
    from .kube.options import KubeOptions

#: Outcomes of a tick recorded in a schedule's history.
LAUNCHED, SKIPPED, EMPTY, REPLACED, FAILED_TO_START = "launched", "skipped", "empty", "replaced", "failed-to-start"


class ScheduleStore:
    """Local schedules and their runs in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def save(self, schedule: Schedule, *, replace: bool = False) -> None:
        """Store ``schedule``; UsageError if it exists and ``replace`` is false."""
        created = self.redis.hsetnx(keys.SCHEDULES, schedule.name, schedule.to_json())
        if not created:
            if not replace:
                raise UsageError(f"schedule {schedule.name!r} already exists; delete it first or pick another name")
            self.redis.hset(keys.SCHEDULES, schedule.name, schedule.to_json())

    def exists(self, name: str) -> bool:
        """True if a schedule called ``name`` is stored (even one that cannot be evaluated)."""
        validate_schedule_name(name)
        return bool(self.redis.hexists(keys.SCHEDULES, name))

    def get(self, name: str) -> Schedule:
        """The schedule called ``name``; NotFoundError if there is none."""
        validate_schedule_name(name)
        raw = self.redis.hget(keys.SCHEDULES, name)
        if raw is None:
            raise NotFoundError(f"no schedule {name!r}")
        return Schedule.from_json(raw)

    def all(self) -> list[Schedule]:
        """Every schedule that can be evaluated, by name (see :meth:`broken` for the others)."""
        return self._load()[0]

    def broken(self) -> dict[str, str]:
        """Stored schedules that cannot be evaluated (made by an older version, edited by hand): name -> why.

        They never stop the others from running; ``schedule list`` shows them and
        ``schedule delete`` removes them.
        """
        return self._load()[1]

    def _load(self) -> tuple[list[Schedule], dict[str, str]]:
        good, bad = [], {}
        for name, raw in self.redis.hgetall(keys.SCHEDULES).items():
            try:
                good.append(Schedule.from_json(raw))
            except (UsageError, ValueError, TypeError, KeyError) as exc:
                bad[name.decode(errors="replace")] = str(exc) or type(exc).__name__
        return sorted(good, key=lambda s: s.name), bad

    def delete(self, name: str) -> bool:
        """Remove a schedule and its state and history."""
        validate_schedule_name(name)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.SCHEDULES, name)
            pipe.delete(*(keys.schedule_key(name, part) for part in ("state", "runs", "history")))
            return bool(pipe.execute()[0])

    def state(self, name: str) -> dict[str, str]:
        """last_tick (epoch seconds), active_run, active_batch."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.schedule_key(name, "state")).items()}

    def set_state(self, name: str, **values: Any) -> None:
        """Update the schedule's state hash."""
        self.redis.hset(keys.schedule_key(name, "state"), mapping={k: str(v) for k, v in values.items()})

    def record(self, name: str, run: str, tick: datetime, outcome: str, batch: str = "", note: str = "") -> None:
        """Add or update a run in the schedule's history."""
        entry = {"run": run, "tick": tick.timestamp(), "outcome": outcome, "batch": batch, "note": note,
                 "recorded_at": time.time()}  # fmt: skip
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.schedule_key(name, "runs"), {run: tick.timestamp()})
            pipe.hset(keys.schedule_key(name, "history"), run, json.dumps(entry))
            pipe.execute()

    def history(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first."""
        validate_schedule_name(name)
        runs = [r.decode() for r in self.redis.zrevrange(keys.schedule_key(name, "runs"), 0, limit - 1)]
        raw = self.redis.hmget(keys.schedule_key(name, "history"), runs) if runs else []
        return [json.loads(r) for r in raw if r]


@dataclass
class RunResult:
    """What one ``kiabatch submit`` of a run did."""

    outcome: str
    batch: str
    note: str = ""


def run_name(schedule: str, tick: datetime) -> str:
    """A run's name: the schedule and its tick in UTC minutes (a valid label value)."""
    return f"{schedule}-{tick.astimezone(UTC):%Y%m%d%H%M}"


def launch_run(schedule: Schedule, run: str, *, redis_url: str | None, home: Path | None) -> RunResult:
    """Start a run as ``kiabatch submit ARGS --no-wait`` with KIABATCH_RUN set (attaches if it exists)."""
    env = dict(os.environ)
    env.update(KIABATCH_RUN=run, KIABATCH_SCHEDULE=schedule.name)
    if redis_url:
        env[settings.ENV_REDIS_URL] = redis_url
    if home is not None:
        env[settings.ENV_HOME] = str(home)
    argv = submit_argv(schedule.submit_args, "--backend", "local", "--no-wait", "--quiet")
    command = [sys.executable, "-m", "kiabatch", *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    batch = run_batch_id(run)
    if done.returncode != 0:
        return RunResult(FAILED_TO_START, batch, (done.stderr.strip().splitlines() or ["?"])[-1])
    if not done.stdout.strip():
        return RunResult(EMPTY, "", "the queue was empty: no batch")
    return RunResult(LAUNCHED, done.stdout.strip().splitlines()[-1])


class LocalScheduler:
    """Starts the runs of every local schedule when they are due."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        redis_url: str | None = None,
        home: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    ) -> None:
        self.schedules = ScheduleStore(client)
        self.store = Store(client)
        self.redis_url = redis_url
        self.home = home
        self.clock = clock
        self.log = log

    def _active(self, state: dict[str, str]) -> str | None:
        """The batch of the schedule's previous run, if it is still running."""
        batch = state.get("active_batch")
        if not batch:
            return None
        try:
            status = self.store.status(batch)
        except NotFoundError:
            return None
        if status.state in TERMINAL_STATES or not runner_alive(batch, self.home):
            return None
        return batch

    def tick(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Start every run due at ``now``; returns (schedule, outcome) for each tick handled."""
        now = now or self.clock()
        handled = []
        for schedule in self.schedules.all():
            if schedule.suspend:
                continue
            try:
                outcome = self._tick_one(schedule, now)
            except (UsageError, ValueError) as exc:  # one schedule that cannot be evaluated stops no other
                self.log(f"{schedule.name}: cannot evaluate this schedule: {exc}; skipped")
                outcome = "invalid"
            if outcome:
                handled.append((schedule.name, outcome))
        for name, reason in self.schedules.broken().items():
            handled.append((name, f"invalid: {reason}"))
        return handled

    def _tick_one(self, schedule: Schedule, now: datetime) -> str | None:
        state = self.schedules.state(schedule.name)
        due = schedule.last_tick(now)
        since = float(state.get("last_tick") or schedule.created_at)
        if due.timestamp() <= since:
            return None
        self.schedules.set_state(schedule.name, last_tick=due.timestamp())
        run = run_name(schedule.name, due)
        late = (now - due).total_seconds()
        if late > schedule.starting_deadline:
            # Missed while we were down, too long ago: like startingDeadlineSeconds, skip it.
            self.schedules.record(schedule.name, run, due, SKIPPED, note=f"missed by {late:.0f}s")
            self.log(f"{schedule.name}: tick {due.isoformat()} missed by {late:.0f}s (> starting deadline); skipped")
            return SKIPPED
        active = self._active(state)
        if active and schedule.concurrency == "forbid":
            self.schedules.record(schedule.name, run, due, SKIPPED, note=f"previous run {active} still active")
            self.log(f"{schedule.name}: {run} skipped: previous run's batch {active} is still running (forbid)")
            return SKIPPED
        if active and schedule.concurrency == "replace":
            stop_runner(active, self.home)
            previous = state.get("active_run", "")
            if previous:
                self.schedules.record(
                    schedule.name,
                    previous,
                    datetime.fromtimestamp(since, UTC),
                    REPLACED,
                    batch=active,
                    note=f"stopped for {run}; resume with kiabatch resume {active}",
                )
            self.log(f"{schedule.name}: stopped {active} (replace); it can be resumed")
        result = launch_run(schedule, run, redis_url=self.redis_url, home=self.home)
        self.schedules.record(schedule.name, run, due, result.outcome, batch=result.batch, note=result.note)
        if result.outcome == LAUNCHED:
            self.schedules.set_state(schedule.name, active_run=run, active_batch=result.batch)
        self.log(
            f"{schedule.name}: {run} {result.outcome}"
            + (f": {result.note}" if result.note else "")
            + (f" (batch {result.batch})" if result.batch else "")
        )
        return result.outcome

    def run_now(self, name: str) -> RunResult:
        """Start a run of ``name`` at once, whatever its schedule (like ``kubectl create job --from``)."""
        schedule = self.schedules.get(name)
        now = self.clock()
        run = f"{name}-manual-{now.astimezone(UTC):%Y%m%d%H%M%S}"
        result = launch_run(schedule, run, redis_url=self.redis_url, home=self.home)
        self.schedules.record(name, run, now, result.outcome, batch=result.batch, note=result.note)
        if result.outcome == LAUNCHED:
            self.schedules.set_state(name, active_run=run, active_batch=result.batch)
        return result

    def serve(self, stop: threading.Event, poll: float = 1.0) -> None:
        """Tick every ``poll`` seconds until ``stop`` is set (SIGTERM/SIGINT set it)."""
        self.log(f"kiabatch scheduler: {len(self.schedules.all())} schedule(s); Ctrl-C or SIGTERM stops it")
        while not stop.is_set():
            self.tick()
            stop.wait(poll)
        self.log("kiabatch scheduler: stopped (runs already started keep running in their own processes)")


class LocalSchedules:
    """Schedules kept in Redis and run by ``kiabatch scheduler`` (the :class:`~kiabatch.schedules.Schedules` of the
    local backend)."""

    def __init__(self, store: Store, *, redis_url: str | None = None, home: Path | None = None) -> None:
        self.store = store
        self.schedules = ScheduleStore(store.redis)
        self.redis_url = redis_url
        self.home = home

    def create(self, schedule: Schedule, kube: KubeOptions) -> str:
        """Store the schedule; the next tick is reported."""
        del kube  # the local backend's runs use the machine, not a cluster
        self.schedules.save(schedule)
        next_tick = schedule.next_tick(datetime.now(UTC))
        return (f"created schedule {schedule.name} ({schedule.cron}); next run {next_tick.isoformat()}; "
                "run `kiabatch scheduler` to start runs")  # fmt: skip

    def rows(self) -> list[ScheduleRow]:
        """Every schedule with its last tick; stored ones that cannot be evaluated say why."""
        rows = []
        for schedule in self.schedules.all():
            last = self.schedules.state(schedule.name).get("last_tick")
            rows.append(ScheduleRow(schedule.name, schedule, when(float(last)) if last else "-"))
        rows += [ScheduleRow(name, None, invalid=reason) for name, reason in self.schedules.broken().items()]
        return sorted(rows, key=lambda row: row.name)

    def get(self, name: str) -> Schedule:
        """The schedule ``name``."""
        return self.schedules.get(name)

    def set_suspend(self, name: str, suspend: bool) -> None:
        """Suspend or resume: stored with the schedule."""
        self.schedules.save(self.schedules.get(name).with_changes(suspend=suspend), replace=True)

    def delete(self, name: str, *, cascade: bool) -> list[str]:
        """Remove the schedule, its state and history (with ``cascade``, its runs' batches)."""
        if not self.schedules.exists(name):
            raise NotFoundError(f"no schedule {name!r}")
        removed = []
        if cascade:
            from .batch import Batch

            for entry in self.schedules.history(name, limit=10_000):
                if entry.get("batch") and Batch(entry["batch"], self.store.redis, home=self.home).delete():
                    removed.append(entry["batch"])
        self.schedules.delete(name)
        return removed

    def run_now(self, name: str) -> StartedRun:
        """Start a run now; its batch id is the ref."""
        result = LocalScheduler(self.store.redis, redis_url=self.redis_url, home=self.home).run_now(name)
        if result.outcome == FAILED_TO_START:
            raise UsageError(f"the run of {name} did not start: {result.note}")
        return StartedRun(result.batch or "-", f"run of {name}: {result.outcome}"
                          + (f" ({result.note})" if result.note else ""))  # fmt: skip

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Recent runs, newest first, joined with their batches' progress."""
        if not self.schedules.exists(name):
            raise NotFoundError(f"no schedule {name!r}")
        rows = []
        for entry in self.schedules.history(name, limit):
            batch = entry.get("batch") or ""
            done = failed = None
            started = finished = None
            state = entry["outcome"]
            if batch and self.store.exists(batch):
                status = self.store.status(batch)
                done, failed = status.progress.done, status.progress.failed
                started, finished = when(status.started_at), when(status.finished_at)
                state = status.state if entry["outcome"] == LAUNCHED else entry["outcome"]
            rows.append({"run": entry["run"], "started": started or when(entry["tick"]), "finished": finished,
                         "state": state + (f" ({entry['note']})" if entry.get("note") else ""),
                         "batches": [batch] if batch else [], "done": done, "failed": failed})  # fmt: skip
        return rows

    def last_success(self, name: str) -> float | None:
        """The end of the newest run that succeeded (an empty queue's run succeeds at once), from the last 50."""
        for entry in self.schedules.history(name, 50):
            if entry["outcome"] == EMPTY:
                return float(entry.get("recorded_at") or entry["tick"])
            batch = entry.get("batch") or ""
            if entry["outcome"] == LAUNCHED and batch and self.store.exists(batch):
                status = self.store.status(batch)
                if status.state == SUCCEEDED and status.finished_at:
                    return status.finished_at
        return None


def serve_until_signalled(scheduler: LocalScheduler, poll: float = 1.0) -> None:
    """Run ``scheduler.serve`` with SIGTERM and SIGINT mapped to a clean stop."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.serve(stop, poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
