"""Redis operations on batches: create, claim, report, read. No backend logic here.

Every method that writes accepts an optional ``pipeline`` where it can be
batched with other writes (the Lua scripts run atomically on their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from . import keys, limits, lua
from .errors import NotFoundError, UnreachableError, UsageError
from .model import (
    QUEUED,
    BatchSpec,
    FailedItem,
    ItemResult,
    Progress,
    State,
    Status,
    validate_batch_id,
)
from .results_store import ObjectRef, ResultsStore

#: Redis counts as full for a report when it would be left with less than this share of maxmemory.
_FULL_RESERVE = 0.05
#: Reports carrying fewer result bytes than this skip the memory check (one INFO round trip).
_CHECK_ABOVE = 1024

#: Items per RPUSH, and per pipelined round of RPUSHes, when a batch is written.
_PUSH_CHUNK = 1000
_PUSH_ROUND = 10_000
#: Seconds a half-written batch's staging list outlives a submit that died.
_STAGING_TTL = 3600
#: Last bytes of stderr kept with a dead-lettered item.
DEAD_LETTER_STDERR = 4096
#: Last bytes of stderr kept per attempt for ``kiabatch logs``.
LOG_TAIL = 64 * 1024


@dataclass(frozen=True)
class Claim:
    """What CLAIM returned for one task."""

    status: str  # "ok" or "final"
    attempt: int
    raw: bytes  # the claim's JSON array text, exactly as stored

    @property
    def items(self) -> list[Any]:
        """The claimed items."""
        return json.loads(self.raw)

    @property
    def sha1(self) -> str:
        """Fingerprint a report must present (catches claims lost in a Redis crash)."""
        return hashlib.sha1(self.raw).hexdigest()  # noqa: S324 - an identity check, not security


@dataclass(frozen=True)
class ItemOutcome:
    """How one item of a task attempt ended."""

    ok: bool
    exit_code: int | None
    duration: float
    result: bytes = b""
    stderr: bytes = b""
    reason: str = ""
    #: False when running it again cannot help (e.g. the item lacks a field).
    retriable: bool = True
    #: The result is the worker's ``{output}`` file (which always goes to a results store, when there is one).
    from_file: bool = False
    #: Where the result was stored as an object (then ``result`` is empty).
    ref: ObjectRef | None = None


@dataclass(frozen=True)
class OutcomePage:
    """One page of settled outcomes as Redis holds them (see :meth:`Store.iter_pages`).

    ``results``, ``outcomes`` and ``failed`` hold one entry per item of ``chosen``'s
    tasks, in order (None where an item has none of that kind).
    """

    #: (index, item count) of each task on the page.
    chosen: list[tuple[int, int]]
    #: Each task's claim (a JSON array of its items).
    claims: list[bytes | None]
    results: list[bytes | None]
    #: Exit code, duration and attempt of each result (None: not asked for).
    outcomes: list[bytes | None] | None
    failed: list[bytes | None]


@dataclass(frozen=True)
class Report:
    """One attempt of a task, ready to be recorded by REPORT."""

    batch_id: str
    index: int
    attempt: int
    #: The fingerprint of the claim the worker ran (a claim a crashed Redis forgot is refused).
    claim_sha1: str
    outcomes: tuple[ItemOutcome, ...]
    claimed_items: tuple[Any, ...]
    non_retriable: bool = False
    stderr_tail: bytes = b""


@dataclass(frozen=True)
class ReportResult:
    """What REPORT decided."""

    status: str  # done, failed, retry, duplicate, stale
    finished: bool
    #: Why the results were not recorded, when Redis had no room for them (the attempt failed instead).
    redis_full: str = ""


@dataclass(frozen=True)
class MemoryOutlook:
    """Redis's memory (bytes) and a batch's inline results: what they take now and are projected to take."""

    used: int
    limit: int
    results: int
    projected: int
    #: Items whose results the projection is based on.
    done: int

    def summary(self) -> str:
        """``used 1.2 MiB of 64.0 MiB (2%)``."""
        return f"used {human_bytes(self.used)} of {human_bytes(self.limit)} ({100 * self.used // self.limit}%)"

    def warning(self) -> str:
        """A warning when Redis is, or this batch's inline results are projected to bring it, past half of maxmemory."""
        half = self.limit // 2
        if self.used > half:
            return (f"Redis is over half full ({self.summary()}); large results belong in a results store "
                    "(--results-to)")  # fmt: skip
        if self.done and self.used - self.results + self.projected > half:
            return (
                f"this batch's results are projected to take {human_bytes(self.projected)} of Redis's "
                f"{human_bytes(self.limit)} maxmemory (from its first {self.done} results): use --results-to"
            )
        return ""


class RedisFullError(UnreachableError):
    """Redis refused a write because it reached its ``maxmemory`` (nothing was written)."""


#: How every "Redis is full" reason starts.
REDIS_FULL = "Redis is full"


def redis_full_reason(used: int | None, limit: int | None, needs: int = 0) -> str:
    """The reason an attempt fails when Redis has no room for its results (``needs``: what they would take)."""
    if used is None or not limit:
        return "Redis is full (it refused the write: maxmemory reached): use --results-to"
    room = f", and these results need about {human_bytes(needs)} while they are written" if needs else ""
    return f"Redis is full (used {human_bytes(used)} of {human_bytes(limit)}{room}): use --results-to"


def human_bytes(count: float) -> str:
    """``1.5 MiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _is_oom(exc: redis.RedisError) -> bool:
    return isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)


class Store:
    """Batch state in one Redis database."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(lua.CLAIM)
        self._report = client.register_script(lua.REPORT)
        self._release = client.register_script(lua.RELEASE)
        self._snapshot = client.register_script(lua.SNAPSHOT)
        self._unsnapshot = client.register_script(lua.UNSNAPSHOT)
        self._reopen = client.register_script(lua.REOPEN)

    # -- creating batches -------------------------------------------------------------

    def create(
        self,
        spec: BatchSpec,
        encoded_items: Iterable[bytes | str],
        shape: Callable[[int], tuple[int, int]] | None = None,
    ) -> BatchSpec:
        """Write a new batch, streaming its items; returns its spec with tasks, chunk and total filled in.

        Items go to a staging list in pipelined rounds (memory stays bounded for any
        number of items); the batch appears only when all of them are in, in one
        transaction (RENAME staging -> queue, meta, progress, index). If the items
        raise (a bad one at line 150,000) nothing is left behind; if this process
        dies, the staging list expires. ``shape(total)`` gives (tasks, chunk); without
        it, ``spec``'s own tasks and chunk are kept.
        """
        k = keys.batch_keys(spec.id)
        if self.redis.exists(k.meta):
            raise UsageError(f"batch {spec.id!r} already exists; choose another id or delete it first")
        total = 0
        try:
            self.redis.delete(k.staging)
            for round_items in _rounds(encoded_items, _PUSH_ROUND):
                with self.redis.pipeline(transaction=False) as pipe:
                    for start in range(0, len(round_items), _PUSH_CHUNK):
                        pipe.rpush(k.staging, *round_items[start : start + _PUSH_CHUNK])
                    pipe.expire(k.staging, _STAGING_TTL)
                    pipe.execute()
                total += len(round_items)
            if total == 0:
                raise UsageError("no items to run; give items (--item, --items FILE, --lines FILE) or --from-queue")
            tasks, chunk = shape(total) if shape is not None else (spec.tasks, spec.chunk)
            final = replace(spec, tasks=tasks, chunk=chunk, total=total)
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(k.meta)
                if pipe.exists(k.meta):
                    raise UsageError(f"batch {spec.id!r} already exists; choose another id or delete it first")
                pipe.multi()
                pipe.rename(k.staging, k.queue)
                pipe.persist(k.queue)
                pipe.hset(k.meta, mapping={**final.to_fields(), "state": QUEUED})
                pipe.hset(k.progress, mapping={"total": total, "done": 0, "failed": 0, "running": 0})
                pipe.zadd(keys.BATCH_INDEX, {spec.id: spec.created_at})
                try:
                    pipe.execute()
                except redis.WatchError:  # another submit created the same id a moment ago
                    raise UsageError(
                        f"batch {spec.id!r} already exists; choose another id or delete it first"
                    ) from None
        except BaseException:
            with contextlib.suppress(redis.RedisError):
                self.redis.delete(k.staging)
            raise
        return final

    def create_from_queue(
        self,
        spec: BatchSpec,
        queue_name: str,
        *,
        chunk: int | None,
        tasks: int | None,
        limit: int = limits.MAX_TASKS,
    ) -> int:
        """Start batch ``spec.id`` with a snapshot of named queue ``queue_name``.

        ``spec``'s tasks, chunk and total are placeholders: the script derives them
        from the snapshot (with neither chunk nor tasks given, the smallest chunk that
        makes at most ``limit`` tasks). Returns the number of items taken (0: nothing
        written); UsageError, with nothing written, when ``chunk`` makes too many tasks.
        """
        k = keys.batch_keys(spec.id)
        fields = {**spec.to_fields(), "state": QUEUED}
        for derived in ("tasks", "chunk", "total"):
            fields.pop(derived, None)
        flat: list[str] = [part for pair in fields.items() for part in pair]
        call = lua.snapshot_call(queue_name, k, spec.id, spec.created_at, chunk or 0, tasks or 0, limit, flat)
        try:
            return int(self._snapshot(*call))
        except redis.ResponseError as exc:
            words = str(exc).split()
            if words[:1] != ["TOOMANY"]:
                raise
            total, size, count = (int(float(word)) for word in words[1:4])
            raise UsageError(
                f"{total:,} items at {size:,} per task make {count:,} tasks, more than {limit:,}; "
                f"give --chunk {math.ceil(total / limit)} or more"
            ) from None

    def undo_create(self, batch_id: str) -> None:
        """Remove a batch that never started; items taken from a named queue go back to it.

        A batch whose tasks already claimed items is left alone (``resume`` finishes it).
        """
        spec = self.spec(batch_id)
        if not spec.source.startswith("queue:"):
            self.delete(batch_id)
            return
        k = keys.batch_keys(batch_id)
        queue = spec.source.removeprefix("queue:")
        self._unsnapshot(*lua.unsnapshot_call(k, queue, batch_id))

    # -- the task protocol ------------------------------------------------------------

    def claim(self, batch_id: str, index: int) -> Claim:
        """Claim task ``index``'s items (the same items on every call)."""
        return self.claim_many(batch_id, [index])[0]

    def claim_many(self, batch_id: str, indexes: Sequence[int]) -> list[Claim]:
        """Claim several tasks in one round trip (each its own atomic CLAIM)."""
        k = keys.batch_keys(batch_id)
        now = time.time()
        try:
            replies = self._pipelined(self._claim, [lua.claim_call(k, index, now) for index in indexes])
        except redis.ResponseError as exc:
            if not _is_oom(exc):
                raise
            raise RedisFullError(f"{redis_full_reason(*self.memory())}: cannot claim tasks of {batch_id}; "
                                 "free memory in Redis, or delete finished batches") from None  # fmt: skip
        claims = []
        for index, (status, attempt, raw) in zip(indexes, replies, strict=True):
            status = status.decode()
            if status == "missing":
                raise NotFoundError(f"no batch {batch_id!r} (it may have expired or been deleted)")
            if status == "bad-index":
                tasks = int(self.redis.hget(k.meta, "tasks") or 0)
                raise UsageError(f"bad completion index {index} for batch {batch_id!r}: must be 0 to {tasks - 1}")
            claims.append(Claim(status=status, attempt=int(attempt), raw=raw))
        return claims

    def _pipelined(self, script: Script, calls: Sequence[lua.Call]) -> list[Any]:
        """Run ``script`` once per (KEYS, ARGV) in one pipeline: one round trip.

        EVALSHA directly (redis-py's Script objects in a pipeline cost a SCRIPT EXISTS round
        trip on every execute); a server that forgot the script (a new server, a restart)
        gets it loaded and the calls sent again, which is safe since every script is
        idempotent. Errors are raised here, not by redis-py: it would first quote the
        failed command in the message through textwrap, seconds of CPU for a report
        carrying megabytes of results.
        """
        for attempt in range(2):
            with self.redis.pipeline(transaction=False) as pipe:
                for call_keys, call_args in calls:
                    pipe.evalsha(script.sha, len(call_keys), *call_keys, *call_args)
                replies = pipe.execute(raise_on_error=False)
            error = next((reply for reply in replies if isinstance(reply, redis.ResponseError)), None)
            if error is None:
                return replies
            if not isinstance(error, NoScriptError) or attempt:
                raise error
            self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    def _read_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send read-only ``commands`` in one round trip and return their raw replies.

        A page of results is a few HMGETs of a thousand fields each; redis-py would
        normalise every argument in Python before hiredis packs it, which doubles the
        cost of streaming a million results. Here hiredis packs them directly, on a
        connection of the client's pool, retried (after a reconnect) as the client's
        commands are. Only reads go this way: a read-only client's guard is not needed.
        """
        if not commands:
            return []
        packed = [hiredis.pack_command(command) for command in commands]
        pool = self.redis.connection_pool
        connection = pool.get_connection()

        def send_and_read() -> list[Any]:
            try:
                connection.send_packed_command(packed)
                return [connection.read_response() for _ in packed]
            except BaseException:
                connection.disconnect()  # replies may be left unread: never reuse this connection
                raise

        try:
            return connection.retry.call_with_retry(send_and_read, lambda _error: connection.disconnect())
        finally:
            pool.release(connection)

    def report(
        self,
        batch_id: str,
        index: int,
        attempt: int,
        claim_sha1: str,
        outcomes: Sequence[ItemOutcome],
        *,
        claimed_items: Sequence[Any],
        non_retriable: bool = False,
        stderr_tail: bytes = b"",
    ) -> ReportResult:
        """Record one attempt of task ``index``; safe to call again with the same values (see :meth:`report_many`)."""
        return self.record(Report(batch_id, index, attempt, claim_sha1, tuple(outcomes), tuple(claimed_items),
                                  non_retriable, stderr_tail))  # fmt: skip

    def record(self, report: Report) -> ReportResult:
        """Send one :class:`Report`; NotFoundError if its batch is gone."""
        [result] = self.report_many([report])
        if result.status == "missing":
            raise NotFoundError(f"no batch {report.batch_id!r} (it may have expired or been deleted)")
        return result

    def report_many(self, reports: Sequence[Report]) -> list[ReportResult]:
        """Send several attempts' reports in one round trip (each is its own atomic REPORT).

        A report for a batch that no longer exists comes back with status "missing".
        Results Redis has no room for are not sent (counted four times over, since a
        script's arguments sit in memory too while it runs, they would pass 95% of
        ``maxmemory``):
        that attempt fails instead, with the reason "Redis is full (used X of Y): use
        --results-to", and its index is retried by the usual rules. If Redis itself
        refuses a report as out of memory, RedisFullError is raised (that report wrote
        nothing; its claim stays, so ``resume`` runs the index again).
        """
        reports, full = self._fit_in_memory(reports)
        try:
            replies = self._pipelined(self._report, [_report_call(report) for report in reports])
        except redis.ResponseError as exc:
            if not _is_oom(exc):
                raise
            raise RedisFullError(
                f"{redis_full_reason(*self.memory())}; a report was refused, and no item is lost: "
                f"`kiabatch resume {reports[0].batch_id} --results-to URL` finishes the batch"
            ) from None
        results = [ReportResult(status=status.decode(), finished=bool(finished), redis_full=reason)
                   for (status, finished), reason in zip(replies, full, strict=True)]  # fmt: skip
        for report, reason in zip(reports, full, strict=True):
            if reason:
                with contextlib.suppress(redis.RedisError):
                    self.redis.hset(keys.batch_keys(report.batch_id).meta, "redis_full", reason)
        return results

    def _fit_in_memory(self, reports: Sequence[Report]) -> tuple[list[Report], list[str]]:
        """The reports with the results Redis has no room for turned into failures, and why (or "") for each."""
        payloads = [sum(len(o.result) for o in r.outcomes if o.ok) + len(r.stderr_tail) for r in reports]
        if sum(payloads) < _CHECK_ABOVE:
            return list(reports), [""] * len(reports)
        used, limit = self.memory()
        if used is None or not limit:
            return list(reports), [""] * len(reports)
        fitted, reasons = [], []
        for report, payload in zip(reports, payloads, strict=True):
            # While a script runs, its arguments sit in Redis's memory too (query buffer and argv), besides
            # the values it stores: count them several times over, and keep a reserve.
            if payload >= _CHECK_ABOVE and used + payload * 4 > limit * (1 - _FULL_RESERVE):
                reason = redis_full_reason(used, limit, payload * 4)
                outcomes = tuple(replace(o, ok=False, result=b"", ref=None, reason=reason) if o.ok else o
                                 for o in report.outcomes)  # fmt: skip
                fitted.append(replace(report, outcomes=outcomes))
                reasons.append(reason)
            else:
                used += payload
                fitted.append(report)
                reasons.append("")
        return fitted, reasons

    def memory(self) -> tuple[int | None, int | None]:
        """(used_memory, maxmemory) in bytes; maxmemory 0 means no limit; (None, None) if INFO is refused."""
        try:
            info = self.redis.info("memory")
        except redis.ResponseError:  # INFO not allowed by an ACL
            return None, None
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    def memory_outlook(self, batch_id: str) -> MemoryOutlook | None:
        """Redis's memory and what the batch's inline results take and will take (None: no limit or no INFO).

        The projection scales the memory the results hash uses so far (``MEMORY
        USAGE``, sampled: O(1)) by total items over succeeded items: the estimate of the
        batch's inline result volume once a few items have reported.
        """
        used, limit = self.memory()
        if used is None or not limit:
            return None
        k = keys.batch_keys(batch_id)
        progress = self.progress(batch_id)
        try:
            so_far = int(self.redis.memory_usage(k.results) or 0)
        except redis.ResponseError:
            so_far = 0
        projected = so_far * progress.total // progress.done if progress.done else 0
        return MemoryOutlook(used=used, limit=limit, results=so_far, projected=projected, done=progress.done)

    def check_memory(self, batch_id: str) -> str:
        """A warning (also kept in the batch's meta, for ``status``) when Redis would pass half its maxmemory.

        Half, because Redis needs room to rewrite its append-only file and feed
        replicas; past 95% reports are refused ("Redis is full").
        """
        outlook = self.memory_outlook(batch_id)
        warning = outlook.warning() if outlook is not None else ""
        if warning:
            with contextlib.suppress(redis.RedisError):
                self.redis.hset(keys.batch_keys(batch_id).meta, "memory_warning", warning)
        return warning

    def abandon(self, batch_id: str, indexes: Iterable[int], reason: str) -> int:
        """Settle ``indexes`` as failed without a worker report (a deadline passed, the Job
        failed them). Their items are dead-lettered with ``reason``; settled indexes are
        left alone. Returns how many indexes this settled."""
        settled = 0
        for index in indexes:
            claim = self.claim(batch_id, index)
            if claim.status != "ok":
                continue
            values = claim.items
            outcomes = [ItemOutcome(ok=False, exit_code=None, duration=0.0, reason=reason) for _ in values]
            result = self.report(
                batch_id, index, claim.attempt, claim.sha1, outcomes, claimed_items=values, non_retriable=True
            )
            settled += result.status == "failed"
        return settled

    def reopen_redis_full(self, batch_id: str) -> int:
        """Give every index whose items were dead-lettered because Redis was full another run; returns how many.

        They failed through no fault of the worker: once the batch has a results
        store (or Redis has room), ``resume`` runs them again (same claims).
        """
        k = keys.batch_keys(batch_id)
        indexes = set()
        for field, entry in self.redis.hscan_iter(k.failed, count=1000):
            if json.loads(entry).get("reason", "").startswith(REDIS_FULL):
                indexes.add(keys.parse_result_field(field)[0])
        return sum(int(self._reopen(*lua.reopen_call(k, index))) for index in sorted(indexes))

    def release(self, batch_id: str, index: int, pipeline: redis.client.Pipeline | None = None) -> None:
        """Mark task ``index`` as no longer running (its worker was stopped)."""
        k = keys.batch_keys(batch_id)
        self._release(*lua.release_call(k, index), client=pipeline or self.redis)

    def release_all(self, batch_id: str) -> int:
        """Release every index marked running (after a runner crash). Returns how many."""
        k = keys.batch_keys(batch_id)
        indexes = [int(i) for i in self.redis.hkeys(k.running)]
        for index in indexes:
            self.release(batch_id, index)
        return len(indexes)

    def set_state(
        self, batch_id: str, state: State, pipeline: redis.client.Pipeline | None = None, **extra: Any
    ) -> None:
        """Set the batch state (and any extra meta fields)."""
        fields = {"state": state, **{name: str(value) for name, value in extra.items()}}
        (pipeline or self.redis).hset(keys.batch_keys(batch_id).meta, mapping=fields)

    def set_meta(self, batch_id: str, pipeline: redis.client.Pipeline | None = None, **values: Any) -> None:
        """Set extra meta fields (runner pid, Job name, ...)."""
        (pipeline or self.redis).hset(keys.batch_keys(batch_id).meta, mapping={n: str(v) for n, v in values.items()})

    # -- reading ----------------------------------------------------------------------

    def exists(self, batch_id: str) -> bool:
        """True if the batch exists (not expired or deleted)."""
        return bool(self.redis.exists(keys.batch_keys(batch_id).meta))

    def meta(self, batch_id: str) -> dict[str, str]:
        """The raw meta hash as text; NotFoundError if there is none."""
        validate_batch_id(batch_id)
        raw = self.redis.hgetall(keys.batch_keys(batch_id).meta)
        if not raw:
            raise NotFoundError(f"no batch {batch_id!r} (it may have expired or been deleted)")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def spec(self, batch_id: str) -> BatchSpec:
        """The batch's definition."""
        meta = self.meta(batch_id)
        return BatchSpec.from_fields({key.encode(): value.encode() for key, value in meta.items()})

    def progress(self, batch_id: str) -> Progress:
        """Item counters, read in O(1)."""
        raw = self.redis.hgetall(keys.batch_keys(batch_id).progress)
        values = {key.decode(): int(value) for key, value in raw.items()}
        return Progress(
            total=values.get("total", 0),
            done=values.get("done", 0),
            failed=values.get("failed", 0),
            running=max(0, values.get("running", 0)),
        )

    def status(self, batch_id: str) -> Status:
        """State and progress of one batch: one round trip, whatever the batch's size."""
        validate_batch_id(batch_id)
        [status] = self.statuses([batch_id])
        if status is None:
            raise NotFoundError(f"no batch {batch_id!r} (it may have expired or been deleted)")
        return status

    def statuses(self, batch_ids: Sequence[str]) -> list[Status | None]:
        """Status of each batch (None for one that is gone), all in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                k = keys.batch_keys(batch_id)
                pipe.hgetall(k.meta)
                pipe.hgetall(k.progress)
            replies = pipe.execute()
        return [_status(batch_id, meta, progress)
                for batch_id, meta, progress in zip(batch_ids, replies[::2], replies[1::2], strict=True)]  # fmt: skip

    def unsettled_indexes(self, batch_id: str) -> list[int]:
        """Task indexes whose outcome is not settled yet, in order."""
        k = keys.batch_keys(batch_id)
        tasks = int(self.redis.hget(k.meta, "tasks") or 0)
        settled = {int(i) for i in self.redis.smembers(k.final)}
        return [i for i in range(tasks) if i not in settled]

    def unsettled_among(self, batch_id: str, indexes: Sequence[int]) -> list[int]:
        """Which of ``indexes`` are not settled yet (one round trip, for a page of indexes)."""
        if not indexes:
            return []
        flags = self.redis.smismember(keys.batch_keys(batch_id).final, list(indexes))
        return [index for index, settled in zip(indexes, flags, strict=True) if not settled]

    def failure_count(self, batch_id: str, index: int) -> int:
        """Failed attempts reported for task ``index``."""
        return int(self.redis.hget(keys.batch_keys(batch_id).failures, index) or 0)

    def iter_pages(
        self,
        batch_id: str,
        *,
        results: bool = True,
        failed: bool = True,
        details: bool = True,
        items: bool = True,
        page: int = 1000,
        start: int = 0,
        stop: int | None = None,
        ahead: bool = False,
    ) -> Iterator[OutcomePage]:
        """The raw outcomes of the settled items, a page at a time, in (index, position) order.

        Memory and each Redis reply stay bounded by ``page`` items (plus one task's
        claim), whatever the batch's size: two round trips a page (one when every task
        holds one item). ``start``/``stop`` limit it to the tasks (completion indexes) in
        that range. ``items=False`` leaves out the claims (``claims`` is all None).
        ``ahead=True`` reads the next pages in a thread while the caller handles this one
        (for a reader of the whole batch). See :meth:`iter_outcomes` for the decoded form.
        """
        pages = self._pages(batch_id, results, failed, details, items, page, start, stop)
        return _read_ahead(pages) if ahead else pages

    def _pages(
        self,
        batch_id: str,
        results: bool,
        failed: bool,
        details: bool,
        items: bool,
        page: int,
        start: int,
        stop: int | None,
    ) -> Iterator[OutcomePage]:
        k = keys.batch_keys(batch_id)
        meta = self.meta(batch_id)
        tasks, one_each = int(meta.get("tasks", 0)), meta.get("chunk") == "1"
        # A batch that succeeded has no dead letters (a reopened one is running again): not worth asking.
        failed = failed and meta.get("state") != State.SUCCEEDED
        if stop is not None:
            tasks = min(tasks, stop)
        while start < tasks:
            window = range(start, min(tasks, start + page))
            if one_each:  # the common case: no sizes to read, one field per task
                chosen = [(index, 1) for index in window]
                fields = [f"{index}:0" for index in window]
                start = window.stop
            else:
                chosen, fields, total = [], [], 0
                for index, size in zip(window, self.redis.hmget(k.sizes, list(window)), strict=True):
                    count = int(size or 0)
                    if chosen and total + count > page:
                        break  # at least one task a page, however large its chunk
                    if count:
                        chosen.append((index, count))
                        fields += [f"{index}:{position}" for position in range(count)]
                    total += count
                    start = index + 1
                if not chosen:
                    continue
            reads = [("HMGET", k.claims, *[index for index, _ in chosen])] if items else []
            for key, wanted in ((k.results, results), (k.outcomes, results and details), (k.failed, failed)):
                if wanted:
                    reads.append(("HMGET", key, *fields))
            replies = iter(self._read_many(reads))
            claims = next(replies) if items else [None] * len(chosen)
            none = [None] * len(fields)
            values = next(replies) if results else none
            outcomes = next(replies) if results and details else None
            yield OutcomePage(chosen, claims, values, outcomes, next(replies) if failed else none)

    def iter_outcomes(
        self,
        batch_id: str,
        *,
        results: bool = True,
        failed: bool = True,
        details: bool = True,
        page: int = 1000,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[ItemResult | FailedItem]:
        """Every settled item, in (index, position) order: its result or its dead-letter entry.

        Streams (see :meth:`iter_pages`), so a million results print at once.
        ``details=False`` skips each result's exit code, duration and attempt (left 0:
        cheaper, for output that shows only the item and its result).
        """
        store = _results_store(self.meta(batch_id)) if results else None
        pages = self.iter_pages(batch_id, results=results, failed=failed, details=details, page=page, start=start,
                                stop=stop)  # fmt: skip
        for chunk in pages:
            at = 0
            for (index, count), claim_items in zip(chunk.chosen, page_items(chunk), strict=True):
                for offset in range(count):
                    value = chunk.results[at]
                    if value is not None:
                        raw_info = chunk.outcomes[at] if chunk.outcomes is not None else None
                        info = _decode(raw_info.decode()) if raw_info else _NO_DETAILS
                        ref = ObjectRef.from_dict(info["ref"]) if "ref" in info else None
                        yield ItemResult(index, offset, claim_items[offset], value, info.get("exit_code", 0),
                                         info.get("duration", 0.0), info.get("attempt", 0), ref, store)  # fmt: skip
                    elif chunk.failed[at] is not None:
                        yield failed_item(index, offset, chunk.failed[at])
                    at += 1

    def results(self, batch_id: str) -> list[ItemResult]:
        """Results of the successful items, in (index, position) order (see :meth:`iter_outcomes`)."""
        return [r for r in self.iter_outcomes(batch_id, failed=False) if isinstance(r, ItemResult)]

    def failed(self, batch_id: str) -> list[FailedItem]:
        """The dead-letter set, in (index, position) order."""
        self.meta(batch_id)
        raw = self.redis.hgetall(keys.batch_keys(batch_id).failed)
        entries = [failed_item(*keys.parse_result_field(field), value) for field, value in raw.items()]
        return sorted(entries, key=lambda f: (f.index, f.position))

    def failed_count(self, batch_id: str) -> int:
        """How many items are dead-lettered (O(1))."""
        return int(self.redis.hlen(keys.batch_keys(batch_id).failed))

    def logs(self, batch_id: str, index: int | None = None) -> list[tuple[int, int, bytes]]:
        """Stored stderr tails as (index, attempt, bytes), oldest attempt first.

        With ``index``, only that task's attempts are read (its attempt count says which),
        so one task's logs cost the same in a batch of ten tasks or of a million.
        """
        self.meta(batch_id)
        k = keys.batch_keys(batch_id)
        if index is not None:
            attempts = int(self.redis.hget(k.attempts, index) or 0)
            numbers = list(range(1, attempts + 1))
            values = self.redis.hmget(k.logs, [keys.result_field(index, n) for n in numbers]) if numbers else []
            return [(index, n, value) for n, value in zip(numbers, values, strict=True) if value is not None]
        raw = self.redis.hgetall(k.logs)
        entries = []
        for field, value in raw.items():
            task, attempt = keys.parse_result_field(field)
            if index is None or task == index:
                entries.append((task, attempt, value))
        return sorted(entries)

    def list_batches(self, limit: int = 100, *, prune: bool = True) -> list[Status]:
        """Recent batches, newest first (two round trips); ids whose keys expired are pruned
        unless ``prune`` is false (a read-only client)."""
        ids = [i.decode() for i in self.redis.zrevrange(keys.BATCH_INDEX, 0, limit - 1)]
        found = self.statuses(ids)
        gone = [batch_id for batch_id, status in zip(ids, found, strict=True) if status is None]
        if gone and prune:
            self.redis.zrem(keys.BATCH_INDEX, *gone)
        return [status for status in found if status is not None]

    def result_references(self, batch_id: str) -> tuple[str, set[int], set[str]] | None:
        """For ``kiabatch gc``: (object prefix, settled indexes, referenced keys); None if the batch is gone."""
        from .results_store import batch_prefix

        try:
            spec = self.spec(batch_id)
        except (NotFoundError, UsageError):
            return None
        k = keys.batch_keys(batch_id)
        settled = {int(i) for i in self.redis.smembers(k.final)}
        referenced: set[str] = set()
        for _field, entry in self.redis.hscan_iter(k.outcomes, count=1000):
            data = json.loads(entry)
            if data.get("ref"):
                referenced.add(data["ref"]["key"])
        return batch_prefix(spec.id, spec.created_at), settled, referenced

    # -- removing ---------------------------------------------------------------------

    def delete(self, batch_id: str, *, keep_results: bool = False) -> bool:
        """Delete a batch at once (``keep_results``: keep what ``results`` and ``status`` read)."""
        validate_batch_id(batch_id)
        k = keys.batch_keys(batch_id)
        keep = (
            {k.meta, k.progress, k.results, k.outcomes, k.failed, k.claims, k.sizes, k.logs, k.stats}
            if keep_results
            else set()
        )
        doomed = [key for key in k.all() if key not in keep]
        meta = self.redis.hmget(k.meta, "state", "ttl") if keep_results else [None, None]
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(k.meta)
            pipe.delete(*doomed)
            if not keep_results:
                pipe.zrem(keys.BATCH_INDEX, batch_id)
            elif meta[0] is not None:
                # What stays is a finished batch: stopped unfinished, it is 'failed' (resume has nothing to
                # run), and it expires after its TTL like any finished batch.
                if meta[0].decode() not in (State.SUCCEEDED, State.FAILED):
                    pipe.hset(k.meta, mapping={"state": State.FAILED, "finished_at": time.time()})
                ttl = int(meta[1] or 0)
                for key in keep if ttl > 0 else ():
                    pipe.expire(key, ttl)
            existed = pipe.execute()[0]
        return bool(existed)


def _status(batch_id: str, raw_meta: dict[bytes, bytes], raw_progress: dict[bytes, bytes]) -> Status | None:
    if not raw_meta:
        return None
    meta = {key.decode(): value.decode() for key, value in raw_meta.items()}
    counts = {key.decode(): int(value) for key, value in raw_progress.items()}

    def when(name: str) -> float | None:
        return float(meta[name]) if meta.get(name) else None

    return Status(
        id=batch_id,
        state=State(meta.get("state", QUEUED)),
        progress=Progress(
            total=counts.get("total", 0),
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            running=max(0, counts.get("running", 0)),
        ),
        workload=meta.get("workload", ""),
        backend=meta.get("backend", "local"),
        tasks=int(meta.get("tasks", 0)),
        parallelism=int(meta.get("parallelism", 0)),
        created_at=float(meta.get("created_at", 0)),
        started_at=when("started_at"),
        finished_at=when("finished_at"),
        source=meta.get("source", "items"),
        runner=meta.get("runner", ""),
        schedule=meta.get("schedule", ""),
    )


def _report_call(report: Report) -> lua.Call:
    """REPORT's KEYS and ARGV for ``report``: each item's result, outcome JSON and dead-letter entry."""
    per_item: list[Any] = []
    for position, outcome in enumerate(report.outcomes):
        entry: dict[str, Any] = {"exit_code": outcome.exit_code, "duration": round(outcome.duration, 6),
                                 "attempt": report.attempt}  # fmt: skip
        if outcome.ref is not None:
            entry["ref"] = outcome.ref.to_dict()
        outcome_json = json.dumps(entry)
        dead_letter = ""
        if not outcome.ok:
            dead_letter = json.dumps(
                {
                    "item": report.claimed_items[position],
                    "exit_code": outcome.exit_code,
                    "reason": outcome.reason,
                    "stderr": outcome.stderr[-DEAD_LETTER_STDERR:].decode("utf-8", errors="replace"),
                    "attempts": report.attempt,
                },
                ensure_ascii=False,
            )
        per_item += ["1" if outcome.ok else "0", outcome.result, outcome_json, dead_letter,
                     repr(max(0.0, round(outcome.duration, 6)))]  # fmt: skip
    return lua.report_call(
        keys.batch_keys(report.batch_id), report.index, report.attempt, report.claim_sha1, time.time(),
        all_ok=all(outcome.ok for outcome in report.outcomes), non_retriable=report.non_retriable,
        stderr_tail=report.stderr_tail[-LOG_TAIL:], per_item=per_item,
    )  # fmt: skip


def _results_store(meta: dict[str, str]) -> ResultsStore | None:
    """The results store a batch's meta names (opened lazily), or None."""
    if not meta.get("results_to"):
        return None
    return ResultsStore(meta["results_to"], endpoint=meta.get("s3_endpoint", ""))


_NO_DETAILS: dict[str, Any] = {}


def claimed_items(raw: bytes | None, count: int) -> list[Any]:
    """The items of one stored claim (a JSON array); ``count`` placeholders if it is gone."""
    return _decode(raw.decode()) if raw else [None] * count


def page_items(page: OutcomePage) -> list[list[Any]]:
    """The items of every task on ``page``, in order (placeholders where a claim is gone).

    One JSON decode for the whole page: a million one-item claims decode in a
    fraction of the time a call each takes.
    """
    claims = page.claims
    if all(claims):
        return _decode_bytes(b"[" + b",".join(claims) + b"]")  # type: ignore[arg-type]
    return [claimed_items(raw, count) for (_, count), raw in zip(page.chosen, claims, strict=True)]


#: json.loads without its per-call set-up (it adds up over a million results).
_decode = json.JSONDecoder().decode


def _decode_bytes(raw: bytes) -> Any:
    return _decode(raw.decode())


def _read_ahead(pages: Iterator[OutcomePage], depth: int = 2) -> Iterator[OutcomePage]:
    """``pages``, read by a thread up to ``depth`` pages ahead of the consumer.

    The next pages travel from Redis (answering on another core) while this one is
    formatted. The reader's error is raised here, in order; a consumer that stops
    early (or fails) stops the reader.
    """
    box: queue.Queue[tuple[OutcomePage | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[OutcomePage | None, BaseException | None]) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                box.put(entry, timeout=0.1)
                return True
        return False

    def read() -> None:
        try:
            for one in pages:
                if not put((one, None)):
                    return
        except BaseException as exc:  # handed to the consumer
            put((None, exc))
        else:
            put((None, None))

    threading.Thread(target=read, name="kiabatch-read-ahead", daemon=True).start()
    try:
        while True:
            one, error = box.get()
            if error is not None:
                raise error
            if one is None:
                return
            yield one
    finally:
        stop.set()


def _rounds(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(values)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def failed_item(index: int, position: int, raw: bytes) -> FailedItem:
    """The dead-letter entry stored for item ``position`` of task ``index``."""
    entry = json.loads(raw)
    return FailedItem(
        index=index,
        position=position,
        item=entry["item"],
        exit_code=entry.get("exit_code"),
        reason=entry.get("reason", ""),
        stderr=entry.get("stderr", ""),
        attempts=entry.get("attempts", 0),
    )
