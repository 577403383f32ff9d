"""Lua scripts that move a batch between states atomically.

Each script is a named constant whose header documents its KEYS and ARGV.
They run on Redis >= 6.2 (``LPOP key count``) and touch only keys of one batch,
so they also run on Redis Cluster. ``kiabatch.store`` is their only caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .keys import BATCH_INDEX, BatchKeys, queue_key, queue_since_key

#: What a wrapper returns: the script's KEYS and ARGV, in its documented order.
Call = tuple[list[str], list[Any]]

#: Upper bounds (seconds) of the item-duration histogram REPORT keeps in a batch's ``stats``
#: hash (``/metrics`` exposes it as ``kiabatch_item_duration_seconds``).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


def duration_field(bound: float) -> str:
    """The ``stats`` field counting durations in the bucket ending at ``bound`` (``d:+Inf`` for the last)."""
    return f"d:{bound:g}" if bound != float("inf") else "d:+Inf"


# Shared by REPORT: count one item's run in the batch's duration histogram (one bucket, not
# cumulative: the reader adds them up), its sum, count and maximum.
_OBSERVE = (
    "local duration_buckets = {"
    + ", ".join(f"{{{bound!r}, '{duration_field(bound)}'}}" for bound in DURATION_BUCKETS)
    + """}
local function observe(stats, seconds)
  local field = 'd:+Inf'
  for _, bucket in ipairs(duration_buckets) do
    if seconds <= bucket[1] then field = bucket[2]; break end
  end
  redis.call('HINCRBY', stats, field, 1)
  redis.call('HINCRBY', stats, 'd_count', 1)
  redis.call('HINCRBYFLOAT', stats, 'd_sum', seconds)
  local max = tonumber(redis.call('HGET', stats, 'd_max'))
  if not max or seconds > max then redis.call('HSET', stats, 'd_max', seconds) end
end
"""
)

# Shared by REPORT: once every index is settled, mark the batch finished and let
# all of its keys expire together after the batch's TTL.
_FINISH_IF_COMPLETE = """
local function finish_if_complete(meta, final, progress, now, first_expiring_key)
  local tasks = tonumber(redis.call('HGET', meta, 'tasks'))
  if redis.call('SCARD', final) < tasks then return 0 end
  local state = redis.call('HGET', meta, 'state')
  if state ~= 'succeeded' and state ~= 'failed' then
    local failed = tonumber(redis.call('HGET', progress, 'failed') or '0')
    if failed > 0 then state = 'failed' else state = 'succeeded' end
    redis.call('HSET', meta, 'state', state, 'finished_at', now)
  end
  local ttl = tonumber(redis.call('HGET', meta, 'ttl') or '0')
  if ttl > 0 then
    for i = first_expiring_key, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
  end
  return 1
end
"""

#: CLAIM — give task INDEX its items. The first claim of an index pops the next
#: ``chunk`` items off the batch queue and records them; every later claim of the
#: same index (a retry after a crash) returns the same items.
#:
#: KEYS[1] meta, KEYS[2] queue, KEYS[3] claims, KEYS[4] sizes, KEYS[5] attempts,
#: KEYS[6] final, KEYS[7] running, KEYS[8] progress
#: ARGV[1] index, ARGV[2] now (unix seconds)
#: Returns {status, attempt, claim}: status "ok"; "final" when the index is
#: already settled (claim returned, no attempt counted); "missing" (no batch);
#: "bad-index".
CLAIM = """
local tasks = tonumber(redis.call('HGET', KEYS[1], 'tasks'))
if not tasks then return {'missing', 0, ''} end
local index = tonumber(ARGV[1])
if not index or index < 0 or index >= tasks or index % 1 ~= 0 then
  return {'bad-index', 0, ''}
end
local state = redis.call('HGET', KEYS[1], 'state')
local claim = redis.call('HGET', KEYS[3], ARGV[1])
local size
if claim then
  size = tonumber(redis.call('HGET', KEYS[4], ARGV[1]))
else
  local chunk = tonumber(redis.call('HGET', KEYS[1], 'chunk'))
  local items = redis.call('LPOP', KEYS[2], chunk)
  if not items then items = {} end
  claim = '[' .. table.concat(items, ',') .. ']'
  size = #items
  redis.call('HSET', KEYS[3], ARGV[1], claim)
  redis.call('HSET', KEYS[4], ARGV[1], size)
end
if redis.call('SISMEMBER', KEYS[6], ARGV[1]) == 1 then return {'final', 0, claim} end
local attempt = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
if redis.call('HSETNX', KEYS[7], ARGV[1], size) == 1 then
  redis.call('HINCRBY', KEYS[8], 'running', size)
end
if state == 'queued' or state == 'interrupted' then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
end
return {'ok', attempt, claim}
"""


def claim_call(k: BatchKeys, index: int, now: float) -> Call:
    """KEYS and ARGV of :data:`CLAIM`."""
    return [k.meta, k.queue, k.claims, k.sizes, k.attempts, k.final, k.running, k.progress], [index, now]


#: REPORT — record the outcome of one attempt of task INDEX. Idempotent: an
#: attempt is counted once, a settled index never changes again, and a report
#: for items that are not the index's claim (a claim lost in a Redis crash) is
#: refused as "stale".
#:
#: KEYS[1] meta, KEYS[2] claims, KEYS[3] sizes, KEYS[4] failures, KEYS[5] reported,
#: KEYS[6] final, KEYS[7] running, KEYS[8] progress, KEYS[9] results,
#: KEYS[10] outcomes, KEYS[11] failed, KEYS[12] logs, KEYS[13] stats,
#: KEYS[14..] every key of the batch (they expire together when it finishes)
#: ARGV[1] index, ARGV[2] attempt, ARGV[3] SHA-1 of the claim the worker ran,
#: ARGV[4] now, ARGV[5] "1" if every item succeeded, ARGV[6] "1" if the failure
#: must not be retried, ARGV[7] stderr tail (kept per attempt), ARGV[8] n items,
#: then for each item 5 values: ok ("1"/"0"), result bytes, outcome JSON,
#: dead-letter JSON, duration in seconds.
#: Every attempt counted adds its items' durations to the ``stats`` histogram, and
#: each retry to its ``retries`` field (what ``/metrics`` reads, in O(1)).
#: Returns {status, finished}: status "done", "failed" (dead-lettered), "retry",
#: "duplicate", "stale" or "missing"; finished is 1 when this report settled the
#: last index of the batch.
REPORT = (
    _FINISH_IF_COMPLETE
    + _OBSERVE
    + """
local index = ARGV[1]
if not redis.call('HGET', KEYS[1], 'tasks') then return {'missing', 0} end
if redis.call('SISMEMBER', KEYS[6], index) == 1 then return {'duplicate', 0} end
local claim = redis.call('HGET', KEYS[2], index)
if not claim or redis.sha1hex(claim) ~= ARGV[3] then return {'stale', 0} end
local n = tonumber(ARGV[8])
if n ~= tonumber(redis.call('HGET', KEYS[3], index)) then
  return redis.error_reply('report of index ' .. index .. ' has ' .. n .. ' items, its claim has others')
end
if redis.call('SADD', KEYS[5], index .. ':' .. ARGV[2]) == 0 then return {'duplicate', 0} end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[12], index .. ':' .. ARGV[2], ARGV[7]) end

local status = 'done'
if ARGV[5] ~= '1' then
  local failures = redis.call('HINCRBY', KEYS[4], index, 1)
  local retries = tonumber(redis.call('HGET', KEYS[1], 'retries'))
  if ARGV[6] == '1' or failures > retries then status = 'failed' else status = 'retry' end
end
for i = 0, n - 1 do
  local seconds = tonumber(ARGV[8 + i * 5 + 5])
  if seconds then observe(KEYS[13], seconds) end
end
if status == 'retry' then redis.call('HINCRBY', KEYS[13], 'retries', 1) end

local running = redis.call('HGET', KEYS[7], index)
if running then
  redis.call('HDEL', KEYS[7], index)
  redis.call('HINCRBY', KEYS[8], 'running', -tonumber(running))
end
if status == 'retry' then return {'retry', 0} end

local succeeded, failed = 0, 0
for i = 0, n - 1 do
  local base = 8 + i * 5
  local field = index .. ':' .. i
  if ARGV[base + 1] == '1' then
    redis.call('HSET', KEYS[9], field, ARGV[base + 2])
    redis.call('HSET', KEYS[10], field, ARGV[base + 3])
    succeeded = succeeded + 1
  else
    redis.call('HSET', KEYS[11], field, ARGV[base + 4])
    failed = failed + 1
  end
end
redis.call('SADD', KEYS[6], index)
redis.call('HINCRBY', KEYS[8], 'done', succeeded)
redis.call('HINCRBY', KEYS[8], 'failed', failed)
return {status, finish_if_complete(KEYS[1], KEYS[6], KEYS[8], ARGV[4], 14)}
"""
)


def report_call(
    k: BatchKeys,
    index: int,
    attempt: int,
    claim_sha1: str,
    now: float,
    *,
    all_ok: bool,
    non_retriable: bool,
    stderr_tail: bytes,
    per_item: Sequence[Any],
) -> Call:
    """KEYS and ARGV of :data:`REPORT`; ``per_item`` holds 5 values per item (ok, result, outcome, dead letter,
    duration)."""
    keys = [k.meta, k.claims, k.sizes, k.failures, k.reported, k.final, k.running, k.progress, k.results,
            k.outcomes, k.failed, k.logs, k.stats, *k.all()]  # fmt: skip
    args = [index, attempt, claim_sha1, now, "1" if all_ok else "0", "1" if non_retriable else "0", stderr_tail,
            len(per_item) // 5, *per_item]  # fmt: skip
    return keys, args


#: RELEASE — forget that INDEX is running because its worker was stopped
#: (Ctrl-C, a crashed runner). Its claim stays, so the next run gets the same items.
#:
#: KEYS[1] running, KEYS[2] progress
#: ARGV[1] index
#: Returns 1 if the index was marked running, else 0.
RELEASE = """
local n = redis.call('HGET', KEYS[1], ARGV[1])
if not n then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'running', -tonumber(n))
return 1
"""


def release_call(k: BatchKeys, index: int) -> Call:
    """KEYS and ARGV of :data:`RELEASE`."""
    return [k.running, k.progress], [index]


#: SNAPSHOT — start a batch with everything queued in a named queue at this
#: instant. RENAME moves the whole list in O(1): items enqueued a moment later
#: land in a fresh list and wait for the next batch; none is taken twice.
#: (The named queue and the batch live in different hash slots, so on Redis
#: Cluster batches are created from explicit items instead.)
#:
#: KEYS[1] named queue, KEYS[2] batch queue, KEYS[3] batch meta,
#: KEYS[4] batch progress, KEYS[5] batch index (zset), KEYS[6] the named queue's
#: ``since`` key (moved to the meta's ``queue_since``: the queue is empty now)
#: ARGV[1] batch id, ARGV[2] created_at, ARGV[3] chunk (0: derive from tasks),
#: ARGV[4] tasks wanted (0: one per chunk, or more per chunk if that makes more
#: than the limit), ARGV[5] most tasks allowed, ARGV[6..] meta field/value pairs
#: Returns the number of items taken; 0 means the queue was empty and nothing
#: was written. An error ``TOOMANY items chunk tasks`` (nothing written) when the
#: chunk asked for makes more tasks than allowed.
SNAPSHOT = """
local n = redis.call('LLEN', KEYS[1])
if n == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return redis.error_reply('batch ' .. ARGV[1] .. ' already exists')
end
local chunk = tonumber(ARGV[3])
local wanted = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
if chunk == 0 then
  if wanted == 0 then chunk = math.max(1, math.ceil(n / limit)) else chunk = math.ceil(n / wanted) end
end
local tasks = math.ceil(n / chunk)
if tasks > limit then return redis.error_reply('TOOMANY ' .. n .. ' ' .. chunk .. ' ' .. tasks) end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
local since = redis.call('GET', KEYS[6])
if since then
  redis.call('HSET', KEYS[3], 'queue_since', since)
  redis.call('DEL', KEYS[6])
end
redis.call('HSET', KEYS[3], 'chunk', chunk, 'tasks', tasks, 'total', n)
redis.call('HSET', KEYS[4], 'total', n, 'done', 0, 'failed', 0, 'running', 0)
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return n
"""


def snapshot_call(
    queue: str,
    k: BatchKeys,
    batch_id: str,
    created_at: float,
    chunk: int,
    tasks: int,
    limit: int,
    fields: Sequence[str],
) -> Call:
    """KEYS and ARGV of :data:`SNAPSHOT` (``fields``: flat meta field/value pairs; 0 means "derive")."""
    keys = [queue_key(queue), k.queue, k.meta, k.progress, BATCH_INDEX, queue_since_key(queue)]
    return keys, [batch_id, created_at, chunk, tasks, limit, *fields]


#: UNSNAPSHOT — undo SNAPSHOT for a batch that never started (its Job could not be
#: created): its items go back to the head of the named queue, in their order, and
#: the batch is deleted. Refused (-1) once any task has claimed items.
#:
#: KEYS[1] batch queue, KEYS[2] named queue, KEYS[3] batch claims, KEYS[4] batch
#: index (zset), KEYS[5] the named queue's ``since`` key, KEYS[6] batch meta,
#: KEYS[7..] every key of the batch
#: ARGV[1] batch id
#: Returns the number of items returned, or -1. The returned items are the queue's
#: oldest again, so its ``since`` goes back to theirs.
UNSNAPSHOT = """
if redis.call('HLEN', KEYS[3]) > 0 then return -1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do redis.call('LPUSH', KEYS[2], items[i]) end
local since = tonumber(redis.call('HGET', KEYS[6], 'queue_since'))
if since and #items > 0 then
  local current = tonumber(redis.call('GET', KEYS[5]))
  if not current or since < current then redis.call('SET', KEYS[5], since) end
end
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('ZREM', KEYS[4], ARGV[1])
return #items
"""


def unsnapshot_call(k: BatchKeys, queue: str, batch_id: str) -> Call:
    """KEYS and ARGV of :data:`UNSNAPSHOT`."""
    return [k.queue, queue_key(queue), k.claims, BATCH_INDEX, queue_since_key(queue), k.meta, *k.all()], [batch_id]


#: REOPEN — give a settled index another run because its items failed through no fault
#: of theirs (Redis had no room for their results): its dead-letter entries and any
#: results are removed, its failure count reset, the counters corrected, and the
#: batch's keys no longer expire. The claim stays, so the same items run again.
#:
#: KEYS[1] meta, KEYS[2] final, KEYS[3] failures, KEYS[4] progress, KEYS[5] sizes,
#: KEYS[6] failed, KEYS[7] results, KEYS[8] outcomes, KEYS[9..] every key of the batch
#: ARGV[1] index
#: Returns 1 if the index was reopened, 0 if it was not settled.
REOPEN = """
local index = ARGV[1]
if redis.call('SREM', KEYS[2], index) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[5], index) or '0')
local failed, done = 0, 0
for i = 0, n - 1 do
  local field = index .. ':' .. i
  failed = failed + redis.call('HDEL', KEYS[6], field)
  done = done + redis.call('HDEL', KEYS[7], field)
  redis.call('HDEL', KEYS[8], field)
end
redis.call('HDEL', KEYS[3], index)
redis.call('HINCRBY', KEYS[4], 'failed', 0 - failed)  -- never '-0', which is no integer
redis.call('HINCRBY', KEYS[4], 'done', 0 - done)
redis.call('HSET', KEYS[1], 'state', 'interrupted')
redis.call('HDEL', KEYS[1], 'finished_at', 'redis_full')
for i = 9, #KEYS do redis.call('PERSIST', KEYS[i]) end
return 1
"""


def reopen_call(k: BatchKeys, index: int) -> Call:
    """KEYS and ARGV of :data:`REOPEN`."""
    return [k.meta, k.final, k.failures, k.progress, k.sizes, k.failed, k.results, k.outcomes, *k.all()], [index]
