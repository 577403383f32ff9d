"""What the dashboard reads: the REPORT histogram and retries, queue ages, the task grid, failures, durations,
paging and filters, all through the read-only client (which refuses any write before sending it)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest

from kiabatch import Queue, keys
from kiabatch.dashboard import data
from kiabatch.dashboard.data import Dashboard
from kiabatch.lua import DURATION_BUCKETS, duration_field
from kiabatch.model import BatchSpec, WorkerSpec
from kiabatch.readonly import ReadOnlyStore, read_only_client
from kiabatch.store import ItemOutcome, Store
from kiabatch.submission import submit


def make_batch(store: Store, values: list, *, chunk: int = 1, retries: int = 1, batch_id: str = "d-abcde",
               created_at: float | None = None, schedule: str = "") -> BatchSpec:  # fmt: skip
    spec = BatchSpec(id=batch_id, workload="exec", worker=WorkerSpec(command=["echo", "{item}"]),
                     tasks=math.ceil(len(values) / chunk), parallelism=2, chunk=chunk, retries=retries,
                     total=len(values), created_at=created_at or time.time(), ttl=3600, schedule=schedule)  # fmt: skip
    store.create(spec, [json.dumps(v) for v in values])
    return spec


def run(store: Store, batch: str, index: int, *outcomes: ItemOutcome, stderr: bytes = b""):
    claim = store.claim(batch, index)
    return store.report(batch, index, claim.attempt, claim.sha1, list(outcomes), claimed_items=claim.items,
                        stderr_tail=stderr)  # fmt: skip


def ok(seconds: float = 0.1, result: bytes = b"r") -> ItemOutcome:
    return ItemOutcome(ok=True, exit_code=0, duration=seconds, result=result)


def bad(seconds: float = 0.1, code: int = 3, stderr: bytes = b"boom") -> ItemOutcome:
    return ItemOutcome(ok=False, exit_code=code, duration=seconds, stderr=stderr, reason=f"exited with status {code}")


@pytest.fixture
def store(client) -> Store:
    return Store(client)


@pytest.fixture
def reader(redis_url) -> Dashboard:
    """The dashboard as it runs by default: through the read-only client."""
    return Dashboard(ReadOnlyStore(read_only_client(redis_url)))


def test_report_keeps_a_duration_histogram_and_the_retries_of_each_batch(store, client):
    make_batch(store, ["a", "b", "c"], chunk=1, retries=2)
    run(store, "d-abcde", 0, ok(0.004))
    assert run(store, "d-abcde", 1, bad(0.3)).status == "retry"
    run(store, "d-abcde", 1, ok(7.0))
    run(store, "d-abcde", 2, ok(99999.0))
    run(store, "d-abcde", 2, ok(1.0))  # a duplicate report counts nothing
    stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.batch_keys("d-abcde").stats).items()}
    assert stats[duration_field(0.01)] == "1"
    assert stats[duration_field(0.5)] == "1"  # the failed attempt's run counts too
    assert stats[duration_field(10)] == "1"
    assert stats["d:+Inf"] == "1"
    assert stats["d_count"] == "4" and float(stats["d_sum"]) == pytest.approx(0.004 + 0.3 + 7.0 + 99999.0)
    assert float(stats["d_max"]) == 99999.0 and stats["retries"] == "1"
    assert sum(int(stats.get(duration_field(b), 0)) for b in DURATION_BUCKETS) + 1 == 4
    assert client.ttl(keys.batch_keys("d-abcde").stats) > 0  # expires with the rest of the finished batch


def test_a_queue_knows_its_oldest_items_age_through_snapshots_undo_and_purge(redis_url, client):
    queue = Queue("ages")
    assert client.get(keys.queue_since_key("ages")) is None
    before = time.time()
    queue.enqueue({"n": 1})
    first = float(client.get(keys.queue_since_key("ages")))
    assert before <= first <= time.time()
    time.sleep(0.05)
    queue.enqueue_many([{"n": 2}, {"n": 3}])
    assert float(client.get(keys.queue_since_key("ages"))) == first  # still the oldest item's time
    batch = queue.submit(["true"], start=False)
    assert client.get(keys.queue_since_key("ages")) is None  # the batch took every item
    assert float(client.hget(keys.batch_keys(batch.id).meta, "queue_since")) == first
    queue.enqueue("newer")
    batch.store.undo_create(batch.id)  # the items go back to the head: the queue's age is theirs again
    assert len(queue) == 4 and float(client.get(keys.queue_since_key("ages"))) == first
    [row] = Dashboard(Store(client)).queues()
    assert row.name == "ages" and row.length == 4 and row.oldest_age >= 0.05
    queue.purge()
    assert client.get(keys.queue_since_key("ages")) is None
    assert Dashboard(Store(client)).queues()[0].oldest_age is None


def test_the_task_grid_tells_pending_running_retrying_done_and_failed(store, reader):
    make_batch(store, list(range(12)), chunk=2, retries=1)  # 6 tasks of 2 items
    run(store, "d-abcde", 0, ok(), ok())  # done
    run(store, "d-abcde", 1, ok(), bad())  # failed attempt, retried...
    run(store, "d-abcde", 1, ok(), ok())  # ... then done
    run(store, "d-abcde", 2, ok(), bad())
    run(store, "d-abcde", 2, bad(), ok())  # failed for good: its second item is in the dead-letter set
    store.claim("d-abcde", 3)  # running
    run(store, "d-abcde", 4, bad(), bad())  # retrying (waiting for its next attempt)
    cells = {cell.index: cell for cell in reader.cells("d-abcde", store.spec("d-abcde"))}
    assert [cells[i].state for i in range(6)] == ["done", "done", "failed", "running", "retrying", "pending"]
    assert [cells[i].attempts for i in range(6)] == [1, 2, 2, 1, 1, 0]
    assert cells[2].failures == 2 and cells[5].items == 0


def test_a_grid_page_covers_only_its_indexes(store, reader, monkeypatch):
    monkeypatch.setattr(data, "GRID_PAGE", 4)
    make_batch(store, list(range(10)))
    view = reader.batch("d-abcde", grid_page=2)
    assert [cell.index for cell in view.cells] == [8, 9] and view.grid_pages == 3
    assert reader.batch("d-abcde", grid_page=99).grid_page == 2  # past the end: the last page


def test_the_batch_page_shows_failures_results_logs_and_durations(store, reader):
    make_batch(store, ["x", "<script>", "z"], retries=0)
    run(store, "d-abcde", 0, ok(0.1, b"one"), stderr=b"\x1b[31mred\x1b[0m\n")
    run(store, "d-abcde", 1, bad(0.2, 7, b"traceback...\nValueError: no"), stderr=b"ValueError: no\n")
    run(store, "d-abcde", 2, ok(0.3, b"three"))
    view = reader.batch("d-abcde")
    assert view.status.state == "failed" and not view.live
    [failed] = view.failed
    assert (failed.index, failed.item, failed.exit_code, view.failed_total) == (1, "<script>", 7, 1)
    assert failed.stderr.endswith("ValueError: no")
    assert [getattr(o, "result", None) for o in view.results] == [b"one", None, b"three"]
    assert view.durations == data.Durations(count=2, p50=pytest.approx(0.2), p95=pytest.approx(0.29), max=0.3,
                                            sampled=False)  # fmt: skip
    assert reader.logs("d-abcde", 0) == [("index 0, attempt 1", "\x1b[31mred\x1b[0m\n", False)]
    assert reader.logs("d-abcde", 2) == []


def test_durations_of_a_huge_batch_are_a_sample_and_are_cached_once_it_finished(store, reader, monkeypatch):
    monkeypatch.setattr(data, "EXACT_DURATIONS", 10)
    monkeypatch.setattr(data, "DURATION_SAMPLE", 5)
    make_batch(store, list(range(30)))
    for index in range(30):
        run(store, "d-abcde", index, ok(float(index)))
    durations = reader.durations("d-abcde", finished=True)
    assert durations.sampled and durations.count == 30
    assert 0 <= durations.p50 <= durations.p95 <= durations.max <= 29
    store.redis.delete(keys.batch_keys("d-abcde").outcomes)
    assert reader.durations("d-abcde", finished=True) == durations  # cached: a finished batch never changes


def test_many_failures_show_a_bounded_page_and_their_total(store, reader, monkeypatch):
    monkeypatch.setattr(data, "FAILED_SHOWN", 3)
    make_batch(store, list(range(40)), retries=0)
    for index in range(40):
        run(store, "d-abcde", index, bad())
    shown, total = reader.failed("d-abcde", limit=3)
    assert total == 40 and len(shown) == 3
    assert shown == sorted(shown, key=lambda f: f.index)


def test_the_list_filters_by_state_and_schedule_pages_newest_first_and_counts(store, reader, client):
    now = time.time()
    for number in range(7):
        make_batch(store, ["a"], batch_id=f"b-{number}", created_at=now + number,
                   schedule="nightly" if number % 2 else "")  # fmt: skip
    run(store, "b-6", 0, ok())
    client.zadd(keys.BATCH_INDEX, {"gone-1": now + 100})  # an id whose keys expired: skipped, not pruned
    page = reader.batches(per_page=3)
    assert [row.status.id for row in page.rows] == ["b-6", "b-5", "b-4"] and page.pages == 3
    assert page.state_counts["queued"] == 6 and page.state_counts["succeeded"] == 1
    assert page.schedules == ["nightly"] and page.live
    last = reader.batches(per_page=3, page=2)
    assert [row.status.id for row in last.rows] == ["b-0"]
    assert [r.status.id for r in reader.batches(state="succeeded").rows] == ["b-6"]
    assert [r.status.id for r in reader.batches(schedule="nightly").rows] == ["b-5", "b-3", "b-1"]
    assert not reader.batches(state="succeeded").live
    assert client.zscore(keys.BATCH_INDEX, "gone-1") is not None


def test_every_view_works_through_the_read_only_client(redis_url, home, reader):
    batch = submit(items=["a", "b"], command=["sh", "-c", "echo {item}; echo warn >&2"], wait=True, home=home)
    Queue("q1").enqueue(1)
    view = reader.batch(batch.id)
    assert view.status.state == "succeeded" and view.detail_error == ""
    assert reader.logs(batch.id, 1)[0][1] == "warn\n"
    assert [q.name for q in reader.queues()] == ["q1"]
    assert reader.schedules() == ([], "")
    info = reader.redis_info()
    assert info.version and info.used_memory > 0 and info.role == "master"
    assert [json.loads(json.dumps(o.item)) for o in reader.outcomes(batch.id)] == ["a", "b"]


def test_eta_comes_from_the_rate_so_far():
    from kiabatch.model import Progress, Status

    started = time.time() - 10
    status = Status(id="x", state="running", progress=Progress(total=100, done=20, failed=5, running=2),
                    workload="exec", backend="local", tasks=100, parallelism=2, created_at=started,
                    started_at=started, finished_at=None)  # fmt: skip
    assert data.eta_seconds(status, now=started + 10) == pytest.approx(30.0)
    assert data.eta_seconds(replace(status, state="succeeded")) is None
    assert data.eta_seconds(replace(status, state="interrupted")) is None
    assert data.eta_seconds(replace(status, progress=Progress(100, 0, 0, 2))) is None
