"""``submit``: turn a workload and its options into a batch, and start it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from . import backends, limits, settings, workloads
from . import items as items_mod
from .batch import Batch, open_store
from .connection import url_of
from .errors import UsageError
from .kube.batch_job import KubeOptions
from .model import BatchSpec, Progress, new_batch_id, validate_batch_id, validate_queue_name
from .schedules import run_batch_id


def cut_tasks(total: int, *, tasks: int | None, chunk: int | None) -> tuple[int, int]:
    """(tasks, chunk) for ``total`` items: ``tasks`` wanted, or ``chunk`` items each (default 1)."""
    if tasks is not None and chunk is not None:
        raise UsageError("give either tasks or chunk, not both (chunk = items per task)")
    if tasks is not None:
        chunk = math.ceil(total / tasks)
    chunk = chunk or 1
    return math.ceil(total / chunk), chunk


@dataclass(frozen=True)
class PlannedBatch:
    """A validated batch that has not been written anywhere yet."""

    spec: BatchSpec
    #: Encoded items; None when they come from a named queue at submit time.
    items: list[str] | None
    from_queue: str | None
    plan_chunk: int | None
    plan_tasks: int | None


def plan_batch(
    workload: str = "exec",
    *,
    items: Iterable[Any] | None = None,
    command: str | Sequence[str] | None = None,
    from_queue: str | None = None,
    parallel: int = 1,
    tasks: int | None = None,
    chunk: int | None = None,
    retries: int = 3,
    timeout: float | None = None,
    task_timeout: float | None = None,
    ttl: int = settings.DEFAULT_TTL,
    batch_id: str | None = None,
    backend: str = backends.LOCAL,
    schedule: str | None = None,
    run: str | None = None,
    **options: Any,
) -> PlannedBatch:
    """Validate everything and build the batch's spec; touches neither Redis nor a cluster.

    Raises UsageError naming the first bad value. (``kiabatch render`` stops here.)
    """
    limits.check_int("parallel", parallel, 1, limits.MAX_PARALLEL)
    if tasks is not None:
        limits.check_int("tasks", tasks, 1, limits.MAX_TASKS)
    if chunk is not None:
        limits.check_int("chunk", chunk, 1, limits.MAX_CHUNK)
    limits.check_int("retries", retries, 0, limits.MAX_RETRIES)
    limits.check_int("ttl", ttl, 0, limits.MAX_SECONDS)  # 0: keep forever
    deadline = None if timeout is None else limits.check_seconds("timeout", timeout)
    per_task = None if task_timeout is None else limits.check_seconds("task_timeout", task_timeout)
    backends.validate(backend)
    chosen = workloads.get(workload)
    if batch_id is not None:
        validate_batch_id(batch_id)
    if run is not None:
        if batch_id is not None:
            raise UsageError("give either a batch id or a run (whose batch id is derived from it), not both")
        batch_id = run_batch_id(run)
    if from_queue is not None:
        validate_queue_name(from_queue)
        if workload != "exec" or items is not None:
            raise UsageError("from_queue works with the exec workload and no explicit items")
    workload_options = dict(options)
    if workload == "exec":
        workload_options.update(command=command, items=list(items) if items is not None else None, chunk=chunk)
    elif command is not None or items is not None:
        raise UsageError(f"workload {workload!r} makes its own items and command; drop command/items")
    plan = chosen.plan(backends.get(backend).runtime(), parallel=parallel, tasks=tasks, **workload_options)
    spec = BatchSpec(
        id=batch_id or new_batch_id(workload if from_queue is None else from_queue),
        workload=chosen.name,
        worker=plan.worker,
        tasks=0,
        parallelism=parallel,
        chunk=0,
        retries=retries,
        total=0,
        created_at=time.time(),
        ttl=ttl,
        backend=backend,
        options=plan.options,
        deadline=deadline,
        task_timeout=per_task,
        source="items" if from_queue is None else f"queue:{from_queue}",
        cwd=os.getcwd(),
        schedule=schedule or "",
        run=run or "",
    )
    if from_queue is not None:
        return PlannedBatch(spec, None, from_queue, plan.chunk, plan.tasks)
    if not plan.items:
        raise UsageError("no items to run; give items (--item, --items FILE, --lines FILE) or --from-queue")
    encoded = list(items_mod.encode_many(plan.items))
    count, size = cut_tasks(len(encoded), tasks=plan.tasks, chunk=plan.chunk)
    return PlannedBatch(replace(spec, tasks=count, chunk=size, total=len(encoded)), encoded, None, None, None)


def submit(
    workload: str = "exec",
    *,
    redis: redis.Redis | str | None = None,
    wait: bool = False,
    start: bool = True,
    home: Path | None = None,
    on_update: Callable[[Progress], None] | None = None,
    on_created: Callable[[Batch], None] | None = None,
    kube: KubeOptions | None = None,
    **options: Any,
) -> Batch | None:
    """Create a batch and start it; returns its :class:`Batch` handle.

    ``workload`` is ``"exec"`` (``command`` plus ``items`` or ``from_queue``) or
    a named workload such as ``"pi"`` with its options (``digits=5000``).
    ``parallel`` caps concurrent tasks; ``tasks`` / ``chunk`` cut the items
    (default: one item per task); ``retries`` is the per-task retry limit;
    ``timeout`` the batch deadline and ``task_timeout`` the per-attempt limit,
    in seconds; ``backend`` is ``"local"`` or ``"kubernetes"`` (see
    :func:`plan_batch` for every option). With ``wait`` the batch runs to the end
    before returning (on the local backend, in this process). Returns None when
    ``from_queue`` names an empty queue: nothing is created. With ``start=False``
    the batch is only written to Redis: run its tasks yourself with
    ``kiabatch task claim`` / ``task report``. ``kube`` holds the cluster-side
    settings of the kubernetes backend (namespace, image, resources, ...). Bad
    input raises UsageError (an unusable cluster ClusterError) before anything is
    written.
    """
    planned = plan_batch(workload, **options)
    spec = planned.spec
    target = backends.get(spec.backend)
    # A batch run in this process must ride out a Redis restart; a detached one only writes once.
    store = open_store(redis, retry_seconds=settings.worker_retry_seconds() if wait else 0.0)
    extra: dict[str, Any] = {}
    if spec.backend == backends.KUBERNETES:
        if url_of(store.redis) is None:
            raise UsageError(
                "the kubernetes backend needs a Redis the cluster can reach: give --redis-url "
                "(or KIABATCH_REDIS_URL), and store the URL pods use with: kiabatch secret create"
            )
        if start:
            extra = {"kube": kube, "cluster": target.preflight(kube or KubeOptions())}
    if spec.run and store.exists(spec.id):
        # This run started before (its launcher or scheduler died): finish that batch.
        batch = Batch(spec.id, store.redis, home=home)
        existing = store.spec(spec.id)
        if not store.status(spec.id).finished:
            target.attach(store, existing, wait=wait, home=home, on_update=on_update,
                          on_running=batch.start_prepare if wait else None, **extra)  # fmt: skip
        return batch
    if planned.from_queue is not None:
        taken = store.create_from_queue(spec, planned.from_queue, chunk=planned.plan_chunk, tasks=planned.plan_tasks)
        if taken == 0:
            return None
        spec = store.spec(spec.id)
    else:
        store.create(spec, planned.items or [])
    batch = Batch(spec.id, store.redis, home=home)
    if on_created is not None:
        on_created(batch)
    if not start:
        return batch
    # The workload's prepare step (e.g. π's square root) overlaps the map step; it
    # starts once workers run, as it may hold the GIL for a while.
    target.launch(store, spec, wait=wait, home=home, on_update=on_update,
                  on_running=batch.start_prepare if wait else None, **extra)  # fmt: skip
    return batch
