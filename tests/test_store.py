"""The batch data model in Redis: claim, report, dead letters, progress, expiry."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from kiabatch import keys
from kiabatch.errors import NotFoundError, UsageError
from kiabatch.model import BatchSpec, FailedItem, WorkerSpec
from kiabatch.store import ItemOutcome, Store


def make_batch(
    store: Store,
    values: list,
    *,
    chunk: int = 1,
    retries: int = 2,
    ttl: int = 3600,
    batch_id: str = "t-abcde",
) -> BatchSpec:
    spec = BatchSpec(
        id=batch_id,
        workload="exec",
        worker=WorkerSpec(command=["echo", "{item}"]),
        tasks=math.ceil(len(values) / chunk),
        parallelism=2,
        chunk=chunk,
        retries=retries,
        total=len(values),
        created_at=time.time(),
        ttl=ttl,
    )
    store.create(spec, [json.dumps(v) for v in values])
    return spec


def ok(result: bytes = b"r") -> ItemOutcome:
    return ItemOutcome(ok=True, exit_code=0, duration=0.1, result=result)


def bad(code: int = 1, stderr: bytes = b"boom") -> ItemOutcome:
    return ItemOutcome(ok=False, exit_code=code, duration=0.1, stderr=stderr, reason=f"exited with status {code}")


@pytest.fixture
def store(client) -> Store:
    return Store(client)


def report(store: Store, batch: str, index: int, outcomes, **kw):
    claim = store.claim(batch, index)
    return claim, store.report(batch, index, claim.attempt, claim.sha1, outcomes, claimed_items=claim.items, **kw)


def test_every_key_of_a_batch_shares_one_hash_tag():
    names = keys.batch_keys("pi-x7k2p").all()
    assert len(set(names)) == len(names) == 16
    assert all(name.startswith("kiabatch:{pi-x7k2p}:") for name in names)


def test_first_claim_pops_the_next_chunk_and_retries_get_the_same_items(store):
    make_batch(store, list(range(7)), chunk=3)
    first = store.claim("t-abcde", 2)
    again = store.claim("t-abcde", 2)
    assert first.items == [0, 1, 2] and again.items == [0, 1, 2]
    assert (first.attempt, again.attempt) == (1, 2)
    assert store.claim("t-abcde", 0).items == [3, 4, 5]
    assert store.claim("t-abcde", 1).items == [6]
    assert store.redis.llen(keys.batch_keys("t-abcde").queue) == 0


def test_concurrent_claims_assign_every_item_to_exactly_one_index(store):
    make_batch(store, list(range(200)), chunk=2)

    def claim(index: int) -> list:
        return Store(store.redis).claim("t-abcde", index).items

    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(claim, list(range(100)) * 2))  # every index claimed twice, concurrently
    first, second = claimed[:100], claimed[100:]
    assert first == second
    assert sorted(v for chunk in first for v in chunk) == list(range(200))


def test_claim_rejects_an_index_outside_the_completions(store):
    make_batch(store, [1, 2])
    with pytest.raises(UsageError, match="must be 0 to 1"):
        store.claim("t-abcde", 2)
    with pytest.raises(NotFoundError):
        store.claim("nosuch-batch", 0)


def test_report_is_idempotent_and_counts_once(store):
    make_batch(store, ["a", "b"])
    claim, result = report(store, "t-abcde", 0, [ok(b"A")])
    assert result.status == "done" and not result.finished
    again = store.report("t-abcde", 0, claim.attempt, claim.sha1, [ok(b"X")], claimed_items=claim.items)
    assert again.status == "duplicate"
    progress = store.progress("t-abcde")
    assert (progress.done, progress.failed, progress.running) == (1, 0, 0)
    assert [r.result for r in store.results("t-abcde")] == [b"A"]


def test_a_settled_index_is_not_claimed_again(store):
    make_batch(store, ["a"])
    report(store, "t-abcde", 0, [ok()])
    assert store.claim("t-abcde", 0).status == "final"


def test_results_are_binary_safe_and_keep_exit_code_duration_attempt(store):
    make_batch(store, ["a"])
    payload = bytes(range(256)) * 10
    report(store, "t-abcde", 0, [ItemOutcome(ok=True, exit_code=0, duration=1.25, result=payload)])
    [result] = store.results("t-abcde")
    assert result.result == payload and result.item == "a"
    assert (result.exit_code, result.duration, result.attempt) == (0, 1.25, 1)


def test_failures_retry_until_the_limit_then_dead_letter_with_the_stderr_tail(store):
    make_batch(store, ["poison", "fine"], retries=2)
    long_stderr = b"x" * 10000 + b"the real error"
    statuses = [report(store, "t-abcde", 0, [bad(7, long_stderr)])[1].status for _ in range(3)]
    assert statuses == ["retry", "retry", "failed"]
    [dead] = store.failed("t-abcde")
    assert dead.item == "poison" and dead.exit_code == 7 and dead.attempts == 3
    assert len(dead.stderr) == 4096 and dead.stderr.endswith("the real error")
    assert store.failure_count("t-abcde", 0) == 3
    assert store.progress("t-abcde").failed == 1


def test_a_non_retriable_failure_dead_letters_at_once(store):
    make_batch(store, ["x"], retries=5)
    _, result = report(store, "t-abcde", 0, [bad(42)], non_retriable=True)
    assert result.status == "failed" and result.finished


def test_in_a_failed_chunk_the_items_that_succeeded_keep_their_results(store):
    make_batch(store, ["good", "bad"], chunk=2, retries=0)
    report(store, "t-abcde", 0, [ok(b"G"), bad()])
    assert [r.item for r in store.results("t-abcde")] == ["good"]
    assert [f.item for f in store.failed("t-abcde")] == ["bad"]
    assert store.status("t-abcde").state == "failed"


def test_a_report_for_items_that_are_not_the_claim_is_refused_as_stale(store):
    make_batch(store, ["a"])
    claim = store.claim("t-abcde", 0)
    result = store.report("t-abcde", 0, claim.attempt, "0" * 40, [ok()], claimed_items=claim.items)
    assert result.status == "stale"
    assert store.progress("t-abcde").done == 0


def test_progress_counts_running_items_once_per_index(store):
    make_batch(store, list(range(6)), chunk=3)
    store.claim("t-abcde", 0)
    store.claim("t-abcde", 0)  # a retry while still marked running
    assert store.progress("t-abcde").running == 3
    store.release("t-abcde", 0)
    assert store.progress("t-abcde").running == 0


def test_finishing_sets_state_and_expires_every_key_after_the_ttl(store):
    make_batch(store, ["a", "b"], ttl=120)
    report(store, "t-abcde", 0, [ok()])
    assert store.redis.ttl(keys.batch_keys("t-abcde").meta) == -1  # not finished: no expiry yet
    _, result = report(store, "t-abcde", 1, [ok()])
    assert result.finished
    status = store.status("t-abcde")
    assert status.state == "succeeded" and status.finished_at >= status.started_at
    for key in keys.batch_keys("t-abcde").all():
        if store.redis.exists(key):
            assert 0 < store.redis.ttl(key) <= 120, key


def test_delete_removes_every_key_and_the_listing(store):
    make_batch(store, ["a"])
    store.claim("t-abcde", 0)
    assert [s.id for s in store.list_batches()] == ["t-abcde"]
    assert store.delete("t-abcde")
    assert store.redis.keys("kiabatch:{t-abcde}*") == []
    assert store.list_batches() == []
    assert not store.delete("t-abcde")


def test_list_prunes_batches_whose_keys_expired(store):
    make_batch(store, ["a"])
    store.redis.delete(keys.batch_keys("t-abcde").meta)
    assert store.list_batches() == []
    assert store.redis.zcard(keys.BATCH_INDEX) == 0


def test_creating_a_batch_twice_is_refused(store):
    make_batch(store, ["a"])
    with pytest.raises(UsageError, match="already exists"):
        make_batch(store, ["b"])
    assert store.redis.llen(keys.batch_keys("t-abcde").queue) == 1


def test_status_reads_counters_in_constant_time(store):
    """Progress is a fixed-size hash, whatever the batch size."""
    make_batch(store, list(range(5000)))
    assert store.redis.hlen(keys.batch_keys("t-abcde").progress) == 4
    assert store.progress("t-abcde").total == 5000


def _settle(store: Store, batch: str, tasks: int, chunk: int, fail_every: int = 0) -> None:
    """Report every task: item values echoed as results, every ``fail_every``-th task dead-lettered."""
    for index in range(tasks):
        claim = store.claim(batch, index)
        failing = fail_every and index % fail_every == 0
        outcomes = [bad() if failing else ok(json.dumps(item).encode()) for item in claim.items]
        store.report(batch, index, claim.attempt, claim.sha1, outcomes, claimed_items=claim.items,
                     non_retriable=bool(failing))  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 3])
def test_reading_ahead_yields_the_same_pages_in_the_same_order(store, chunk):
    values = [{"n": n, "text": "é\t\x1b"} if n % 5 else n for n in range(70)]
    make_batch(store, values, chunk=chunk, retries=0)
    _settle(store, "t-abcde", math.ceil(70 / chunk), chunk, fail_every=4)
    plain = list(store.iter_pages("t-abcde", page=8))
    ahead = list(store.iter_pages("t-abcde", page=8, ahead=True))
    assert ahead == plain and len(plain) > 5
    outcomes = list(store.iter_outcomes("t-abcde", page=8))
    assert [o.item for o in outcomes] == values  # every item once, in order: results and dead letters
    dead = [value for task in range(0, math.ceil(70 / chunk), 4) for value in values[task * chunk : (task + 1) * chunk]]
    assert [o.item for o in outcomes if isinstance(o, FailedItem)] == dead


def test_a_reader_that_stops_early_stops_the_read_ahead_thread(store):
    make_batch(store, list(range(50)))
    _settle(store, "t-abcde", 50, 1)
    before = threading.active_count()
    pages = store.iter_pages("t-abcde", page=2, ahead=True)
    assert next(pages).chosen == [(0, 1), (1, 1)]
    pages.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_an_error_while_reading_ahead_reaches_the_reader_and_the_connection_stays_usable(store, client):
    make_batch(store, list(range(10)))
    _settle(store, "t-abcde", 10, 1)
    client.delete(keys.batch_keys("t-abcde").results)
    client.set(keys.batch_keys("t-abcde").results, "not a hash")  # every HMGET of results now fails
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        list(store.iter_pages("t-abcde", page=3, ahead=True))
    # The failed page's other replies were never read: a reused connection would hand them to the next command.
    for _ in range(5):
        assert store.redis.get(keys.batch_keys("t-abcde").results) == b"not a hash"
        assert store.meta("t-abcde")["id"] == "t-abcde"


def test_a_server_that_forgot_the_scripts_gets_them_again_and_the_report_lands_once(store):
    make_batch(store, ["a", "b"])
    claim = store.claim("t-abcde", 0)
    store.redis.script_flush()  # as after a restart from an AOF file
    big = b"x" * 3_000_000
    result = store.report("t-abcde", 0, claim.attempt, claim.sha1, [ok(big)], claimed_items=claim.items)
    assert result.status == "done"
    assert [r.result for r in store.results("t-abcde")] == [big]


def test_a_refused_report_raises_redis_own_error_without_quoting_the_results(store):
    make_batch(store, ["a", "b"])
    claim = store.claim("t-abcde", 0)
    store.redis.delete(keys.batch_keys("t-abcde").results)
    store.redis.set(keys.batch_keys("t-abcde").results, "not a hash")  # every report now fails WRONGTYPE
    secret = b"item-result-" + b"s" * 1000
    with pytest.raises(redis.ResponseError) as refused:
        store.report("t-abcde", 0, claim.attempt, claim.sha1, [ok(secret)], claimed_items=claim.items)
    # Redis's own message: redis-py's pipeline would prefix the failed command, quoting it
    # through textwrap (seconds of CPU for a report of megabytes) with item data in it.
    assert "WRONGTYPE" in str(refused.value) and not str(refused.value).startswith("Command #")
    assert "item-result" not in str(refused.value)
