"""Named queues: enqueue at any time; a batch takes an atomic snapshot."""

from __future__ import annotations

import threading

import pytest

from kiabatch import Queue, UsageError
from kiabatch.keys import batch_keys
from kiabatch.queue import queue_names


def test_enqueue_and_enqueue_many_keep_order_and_json_values(client):
    q = Queue("thumbs")
    q.enqueue({"url": "https://example.org/a.png"})
    assert q.enqueue_many(iter([1, "two", [3], None])) == 4
    assert len(q) == 5
    assert q.peek() == [{"url": "https://example.org/a.png"}, 1, "two", [3], None]
    assert queue_names(client) == ["thumbs"]


def test_enqueue_accepts_a_caller_pipeline(client):
    q = Queue("p")
    with client.pipeline() as pipe:
        q.enqueue(1, pipeline=pipe)
        q.enqueue_many([2, 3], pipeline=pipe)
        assert len(q) == 0  # nothing is sent before execute
        pipe.execute()
    assert q.peek() == [1, 2, 3]


def test_values_json_cannot_hold_are_refused_with_a_clear_error(client):
    q = Queue("bad")
    with pytest.raises(UsageError, match="not JSON-serialisable"):
        q.enqueue(object())
    with pytest.raises(UsageError, match="not JSON-serialisable"):
        q.enqueue(float("nan"))
    assert len(q) == 0


def test_bad_queue_names_are_refused(client):
    for name in ("", "a{b}", " padded", "x" * 201):
        with pytest.raises(UsageError, match="bad queue name"):
            Queue(name)


def test_purge_removes_everything(client):
    q = Queue("p")
    q.enqueue_many(range(10))
    assert q.purge() == 10 and len(q) == 0


def test_submitting_an_empty_queue_creates_nothing(client):
    assert Queue("empty").submit(command=["true"]) is None
    assert client.keys("kiabatch:{*") == []


def test_a_snapshot_takes_what_is_queued_and_later_items_wait(client, home):
    q = Queue("thumbs")
    q.enqueue_many(["a", "b", "c"])
    batch = q.submit(command=["echo", "{item}"], parallel=2, wait=True, home=home)
    q.enqueue("d")
    # Whichever task claims first takes the head of the queue, so with two at once the order may differ.
    assert sorted((r.item, r.text) for r in batch.results()) == [("a", "a\n"), ("b", "b\n"), ("c", "c\n")]
    assert q.peek() == ["d"]
    assert batch.status().source == "queue:thumbs"


def test_snapshots_under_concurrent_producers_take_every_item_exactly_once(client):
    """Producers enqueue from threads while batches are cut: each item lands in one batch."""
    from kiabatch.store import Store

    q = Queue("busy")
    producers, per_producer = 4, 2500
    done = threading.Event()

    def produce(worker: int) -> None:
        own = Queue("busy", client)
        for start in range(0, per_producer, 50):
            own.enqueue_many(f"{worker}-{i}" for i in range(start, start + 50))

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    for thread in threads:
        thread.start()
    batches: list[str] = []
    store = Store(client)
    from kiabatch.model import BatchSpec, WorkerSpec

    def cut(n: int) -> None:
        spec = BatchSpec(
            id=f"snap-{n:05d}",
            workload="exec",
            worker=WorkerSpec(command=["true"]),
            tasks=0,
            parallelism=1,
            chunk=0,
            retries=0,
            total=0,
            created_at=float(n),
            ttl=0,
        )
        if store.create_from_queue(spec, "busy", chunk=None, tasks=None):
            batches.append(spec.id)

    n = 0
    while any(t.is_alive() for t in threads):
        cut(n)
        n += 1
    for thread in threads:
        thread.join()
    done.set()
    cut(n)  # whatever arrived after the last cut
    seen: list[str] = []
    for batch_id in batches:
        values = [v.decode().strip('"') for v in client.lrange(batch_keys(batch_id).queue, 0, -1)]
        assert int(client.hget(batch_keys(batch_id).meta, "total")) == len(values)
        seen += values
    assert len(batches) > 1
    assert len(seen) == len(set(seen)) == producers * per_producer
    assert len(q) == 0


def test_a_snapshot_that_never_started_gives_its_items_back_in_order(client):
    from kiabatch.store import Store

    q = Queue("undo")
    q.enqueue_many(["a", "b", "c"])
    batch = q.submit(command=["echo", "{item}"], start=False)
    q.enqueue("d")  # arrived after the snapshot
    Store(client).undo_create(batch.id)
    assert q.peek() == ["a", "b", "c", "d"]
    assert client.keys(f"kiabatch:{{{batch.id}}}*") == []


def test_a_snapshot_with_claimed_items_is_not_undone(client):
    from kiabatch.store import Store

    q = Queue("undo2")
    q.enqueue_many(["a", "b"])
    batch = q.submit(command=["echo", "{item}"], start=False)
    Store(client).claim(batch.id, 0)
    Store(client).undo_create(batch.id)
    assert len(q) == 0 and Store(client).exists(batch.id)


def test_purge_of_the_first_items_keeps_those_enqueued_later(client):
    """`queue purge` asks about N items; what arrives while it asks must not go with them."""
    q = Queue("later")
    q.enqueue_many(range(3))
    counted = len(q)
    q.enqueue_many(range(3, 8))  # while the question waits
    assert q.purge(first=counted) == 3
    assert [int(item) for item in q.redis.lrange(q.key, 0, -1)] == [3, 4, 5, 6, 7]
    assert q.purge(first=10) == 5 and len(q) == 0
