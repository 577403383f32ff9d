"""``Queue``: a named work queue that lives independently of batches.

Producers ``enqueue`` at any time; ``submit`` atomically takes everything queued
at that instant as a new batch. Items enqueued a moment later wait for the next.

Since a batch takes a whole queue, the oldest item in a queue is always the first
one pushed since it was last empty: each push sets ``kiabatch:queue:{Q}:since``
unless it exists, in the same transaction, and taking or purging the queue removes
it. So the oldest item's age costs one GET (:func:`oldest_age`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import redis

from . import items as items_mod
from . import keys, settings
from .batch import Batch, open_store
from .model import Progress, validate_queue_name
from .results_store import DEFAULT_INLINE_LIMIT

if TYPE_CHECKING:
    from .kube.batch_job import KubeOptions

_PIPELINE_ITEMS = 10_000
_PUSH_ARGS = 1000


class Queue:
    """A named queue of JSON items in Redis (``KIABATCH_REDIS_URL`` or the embedded server)."""

    def __init__(self, name: str, redis: redis.Redis | str | None = None, *, home: settings.HomeLike = None) -> None:
        self.name = validate_queue_name(name)
        self.home = settings.as_home(home)
        self.store = open_store(redis, home=self.home)
        self.redis = self.store.redis
        self.key = keys.queue_key(name)
        self.since_key = keys.queue_since_key(name)

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    def __len__(self) -> int:
        return int(self.redis.llen(self.key))

    def enqueue(self, item: Any, pipeline: redis.client.Pipeline | None = None) -> None:
        """Append one item (any JSON value)."""
        encoded = items_mod.encode(item)
        target = pipeline or self.redis.pipeline(transaction=True)
        target.set(self.since_key, time.time(), nx=True)
        target.rpush(self.key, encoded)
        target.sadd(keys.QUEUE_INDEX, self.name)
        if pipeline is None:
            target.execute()

    def enqueue_many(self, values: Iterable[Any], pipeline: redis.client.Pipeline | None = None) -> int:
        """Append many items with pipelined multi-value RPUSH; returns how many.

        Items are encoded as they are consumed, so a generator of millions of
        items never sits in memory at once. A value JSON cannot hold raises
        UsageError; items before it in the same 10,000-item round may be written.
        """
        encoded = items_mod.encode_many(values)
        count = 0
        if pipeline is not None:
            pipeline.set(self.since_key, time.time(), nx=True)
            for batch in _chunks(encoded, _PUSH_ARGS):
                pipeline.rpush(self.key, *batch)
                count += len(batch)
            pipeline.sadd(keys.QUEUE_INDEX, self.name)
            return count
        self.redis.sadd(keys.QUEUE_INDEX, self.name)
        while True:
            round_items = list(islice(encoded, _PIPELINE_ITEMS))
            if not round_items:
                return count
            # A transaction: a snapshot between the pushes and ``since`` would leave a wrong age.
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.since_key, time.time(), nx=True)
                for start in range(0, len(round_items), _PUSH_ARGS):
                    pipe.rpush(self.key, *round_items[start : start + _PUSH_ARGS])
                pipe.execute()
            count += len(round_items)

    def peek(self, limit: int = 20) -> list[Any]:
        """The first ``limit`` items, without removing them."""
        return [items_mod.decode(raw) for raw in self.redis.lrange(self.key, 0, limit - 1)]

    def purge(self, first: int | None = None) -> int:
        """Remove every queued item, or only the ``first`` ones (those counted before asking whether
        to remove them: items enqueued meanwhile stay); returns how many were removed."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(self.key)
            if first is None:
                pipe.delete(self.key, self.since_key)
            else:
                pipe.ltrim(self.key, first, -1)
            count = int(pipe.execute()[0])
        return count if first is None else min(first, count)

    def submit(
        self,
        command: str | Sequence[str],
        *,
        stdin: bool = False,
        env: Mapping[str, str] | None = None,
        image: str | None = None,
        non_retriable_exit_codes: Sequence[int] = (),
        parallel: int = 1,
        tasks: int | None = None,
        chunk: int | None = None,
        retries: int = 3,
        timeout: float | None = None,
        task_timeout: float | None = None,
        ttl: int = settings.DEFAULT_TTL,
        batch_id: str | None = None,
        backend: str = "local",
        results_to: str | None = None,
        s3_endpoint: str | None = None,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        wait: bool = False,
        start: bool = True,
        home: settings.HomeLike = None,
        on_update: Callable[[Progress, str], None] | None = None,
        on_created: Callable[[Batch], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        kube: KubeOptions | None = None,
    ) -> Batch | None:
        """Start a batch with everything queued right now; None if the queue is empty.

        The options are :func:`kiabatch.submit`'s (see :class:`~kiabatch.submission.BatchOptions`);
        ``home`` defaults to the queue's.
        """
        from .submission import submit

        return submit(
            "exec", command=command, from_queue=self.name, stdin=stdin, env=env, image=image,
            non_retriable_exit_codes=non_retriable_exit_codes, parallel=parallel, tasks=tasks, chunk=chunk,
            retries=retries, timeout=timeout, task_timeout=task_timeout, ttl=ttl, batch_id=batch_id, backend=backend,
            results_to=results_to, s3_endpoint=s3_endpoint, inline_limit=inline_limit, redis=self.redis, wait=wait,
            start=start, home=self.home if home is None else home, on_update=on_update, on_created=on_created,
            on_warning=on_warning, kube=kube,
        )  # fmt: skip


def queue_names(client: redis.Redis) -> list[str]:
    """Names of named queues that have been used, sorted."""
    return sorted(name.decode() for name in client.smembers(keys.QUEUE_INDEX))


def oldest_age(client: redis.Redis, name: str, now: float | None = None) -> float | None:
    """Seconds the oldest item of named queue ``name`` has waited; None when it is empty (or its age unknown)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(keys.queue_key(name))
        pipe.get(keys.queue_since_key(name))
        length, since = pipe.execute()
    if not length or since is None:
        return None
    return max(0.0, (time.time() if now is None else now) - float(since))


def _chunks(values: Iterable[str], size: int) -> Iterable[list[str]]:
    iterator = iter(values)
    while chunk := list(islice(iterator, size)):
        yield chunk
