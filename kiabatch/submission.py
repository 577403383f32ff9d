"""``submit``: turn a workload and its options into a batch, and start it.

:class:`BatchOptions` is the one definition of a batch's options (with their
defaults and ranges); :func:`submit` spells every one of them out as a keyword,
so ``help(kiabatch.submit)`` and an IDE show them, and a misspelt one is a
``TypeError`` naming it before anything happens.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import redis

from . import backends, limits, settings, workloads
from . import items as items_mod
from .backends import RunHooks
from .batch import Batch, open_store, runner_home
from .errors import UsageError
from .model import BatchSpec, Progress, new_batch_id, validate_batch_id, validate_queue_name
from .results_store import DEFAULT_INLINE_LIMIT, MAX_INLINE_LIMIT, validate_endpoint
from .results_store import validate_url as validate_results_url
from .schedules import run_batch_id, validate_run_name, validate_schedule_name

if TYPE_CHECKING:
    from .kube.batch_job import KubeOptions


@dataclass(frozen=True)
class BatchOptions:
    """Everything that shapes a batch besides its workload's own options (``digits`` for π).

    Ranges are checked when it is made (UsageError naming the option and its range).
    """

    #: The items (any JSON values; a generator is consumed lazily, as the batch is written).
    items: Iterable[Any] | None = None
    #: The worker's command template (exec): an argv list, or a string split like a shell would.
    command: str | Sequence[str] | None = None
    #: Take every item queued in this named queue at submit time instead of ``items``.
    from_queue: str | None = None
    #: Feed each item's text to the worker's standard input.
    stdin: bool = False
    #: Environment variables for the worker.
    env: Mapping[str, str] | None = None
    #: The worker's container image (kubernetes; default: the kiabatch image).
    image: str | None = None
    #: Exit codes that fail an item at once, without retries.
    non_retriable_exit_codes: Sequence[int] = ()
    #: Tasks running at once (Job ``parallelism``).
    parallel: int = 1
    #: Number of tasks (Job ``completions``); default one per chunk of items.
    tasks: int | None = None
    #: Items per task (default 1, or as many as ``tasks`` needs).
    chunk: int | None = None
    #: Retries per task before its items are dead-lettered (``backoffLimitPerIndex``).
    retries: int = 3
    #: Batch deadline in seconds (``activeDeadlineSeconds``).
    timeout: float | None = None
    #: Time limit of one task attempt, in seconds.
    task_timeout: float | None = None
    #: Seconds a finished batch's results are kept (0: forever).
    ttl: int = settings.DEFAULT_TTL
    #: The batch's id (a DNS label of at most 52 characters); default WORKLOAD-xxxxx.
    batch_id: str | None = None
    #: "local" or "kubernetes".
    backend: str = backends.LOCAL
    #: The schedule and run that start this batch (set by launchers; the run fixes the batch id).
    schedule: str | None = None
    run: str | None = None
    #: Where results that leave Redis go: ``s3://bucket/prefix`` or ``file:///path`` (None: $KIABATCH_RESULTS_URL,
    #: "" or unset: every result stays in Redis).
    results_to: str | None = None
    #: Endpoint of an S3-compatible store other than AWS (None: $KIABATCH_S3_ENDPOINT_URL).
    s3_endpoint: str | None = None
    #: With a results store, results larger than this many bytes (and every {output} file) are stored there.
    inline_limit: int = DEFAULT_INLINE_LIMIT
    #: Options of the workload itself (e.g. ``{"digits": 5000}``).
    workload_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits.check_int("parallel", self.parallel, 1, limits.MAX_PARALLEL)
        if self.tasks is not None:
            limits.check_int("tasks", self.tasks, 1, limits.MAX_TASKS)
        if self.chunk is not None:
            limits.check_int("chunk", self.chunk, 1, limits.MAX_CHUNK)
        if self.tasks is not None and self.chunk is not None:
            raise UsageError("give either tasks or chunk, not both (chunk = items per task)")
        limits.check_int("retries", self.retries, 0, limits.MAX_RETRIES)
        limits.check_int("ttl", self.ttl, 0, limits.MAX_SECONDS)
        if self.timeout is not None:
            limits.check_seconds("timeout", self.timeout)
        if self.task_timeout is not None:
            limits.check_seconds("task_timeout", self.task_timeout)
        backends.validate(self.backend)
        if self.batch_id is not None:
            validate_batch_id(self.batch_id)
        if self.schedule is not None:
            validate_schedule_name(self.schedule)
        if self.run is not None:
            validate_run_name(self.run)
        if self.run is not None and self.batch_id is not None:
            raise UsageError("give either a batch id or a run (whose batch id is derived from it), not both")
        if self.from_queue is not None:
            validate_queue_name(self.from_queue)
            if self.items is not None:
                raise UsageError("from_queue takes its items from the queue; give no items")
        limits.check_int("inline_limit", self.inline_limit, 0, MAX_INLINE_LIMIT)
        if self.results_to:
            validate_results_url(self.results_to)
        if self.s3_endpoint:
            validate_endpoint(self.s3_endpoint)

    def results_location(self) -> tuple[str, str]:
        """(results URL, S3 endpoint) with the environment's defaults applied, validated; "" for none."""
        url = self.results_to if self.results_to is not None else os.environ.get(settings.ENV_RESULTS_URL, "")
        endpoint = self.s3_endpoint if self.s3_endpoint is not None else os.environ.get(settings.ENV_S3_ENDPOINT, "")
        url = validate_results_url(url, settings.ENV_RESULTS_URL if self.results_to is None else "results_to") \
            if url else ""  # fmt: skip
        endpoint = validate_endpoint(endpoint) if endpoint else ""
        return url, endpoint


def cut_tasks(total: int, *, tasks: int | None, chunk: int | None, limit: int = limits.MAX_TASKS) -> tuple[int, int]:
    """(tasks, chunk) for ``total`` items: ``tasks`` wanted, or ``chunk`` items each.

    With neither, one item per task — or, when that makes more than ``limit`` tasks
    (the backend's limit), the smallest chunk that fits (see :func:`chunk_notice`).
    An explicit chunk or task count that does not fit is refused.
    """
    if tasks is not None and chunk is not None:
        raise UsageError("give either tasks or chunk, not both (chunk = items per task)")
    if tasks is not None:
        chunk = math.ceil(total / tasks)
    if chunk is None:
        chunk = max(1, math.ceil(total / limit))
    count = math.ceil(total / chunk)
    if count > limit:
        # Tasks asked for by number (π's only way to choose) are lowered by number.
        fewer = (
            f"give --tasks {limit} or fewer"
            if tasks is not None
            else f"give --chunk {math.ceil(total / limit)} or more"
        )
        raise UsageError(f"{total:,} items at {chunk:,} per task make {count:,} tasks, more than {limit:,}; {fewer}")
    return count, chunk


def chunk_notice(options: BatchOptions, spec: BatchSpec) -> str | None:
    """What to tell the user when the chunk size was chosen for them (more items than tasks allowed)."""
    if options.chunk is not None or options.tasks is not None or spec.chunk <= 1:
        return None
    limit = backends.get(spec.backend).task_limit(spec.parallelism)
    return (
        f"{spec.total:,} items are more than the {limit:,} tasks a batch may have here: running {spec.chunk:,} "
        f"items per task (as --chunk {spec.chunk}); give --chunk or --tasks to choose"
    )


@dataclass(frozen=True)
class PlannedBatch:
    """A validated batch that has not been written anywhere yet."""

    #: The batch's spec; tasks, chunk and total are 0 until its items are counted.
    spec: BatchSpec
    #: Encoded items, produced (and checked) lazily; None when they come from a named queue.
    items: Iterator[bytes] | None
    from_queue: str | None
    #: What the workload asked for: items per task and number of tasks (None: derive).
    chunk: int | None
    tasks: int | None
    #: Most tasks the backend runs in one batch at this parallelism.
    task_limit: int = limits.MAX_TASKS

    def shape(self, total: int) -> tuple[int, int]:
        """(tasks, chunk) for ``total`` items."""
        return cut_tasks(total, tasks=self.tasks, chunk=self.chunk, limit=self.task_limit)

    def counted(self) -> BatchSpec:
        """The spec with its items counted (consumes them; for ``render``, which writes nothing)."""
        total = sum(1 for _ in self.items or ())
        if total == 0:
            raise UsageError(NO_ITEMS)
        count, size = self.shape(total)
        return replace(self.spec, tasks=count, chunk=size, total=total)


_OPTION_FIELDS = frozenset(f.name for f in fields(BatchOptions)) - {"workload_options"}

NO_ITEMS = "no items to run; give items (--item, --items FILE, --lines FILE) or --from-queue"


def plan_batch(workload: str = "exec", options: BatchOptions | None = None, **workload_options: Any) -> PlannedBatch:
    """Validate everything and build the batch's spec; touches neither Redis nor a cluster.

    Batch options come as ``options``, or as keywords named like its fields
    (``plan_batch("pi", parallel=3, digits=5000)``); other keywords are the
    workload's own. Raises UsageError naming the first bad value, TypeError for an
    unknown keyword. (``kiabatch render`` stops here.)
    """
    given = {name: workload_options.pop(name) for name in list(workload_options) if name in _OPTION_FIELDS}
    options = replace(options or BatchOptions(), **given) if given else options or BatchOptions()
    chosen = workloads.get(workload)
    check_workload_options(chosen, {**options.workload_options, **workload_options})
    extra = {**options.workload_options, **workload_options}
    if chosen.takes_command:
        extra.update(command=options.command, items=options.items, chunk=options.chunk, stdin=options.stdin,
                     non_retriable_exit_codes=options.non_retriable_exit_codes, image=options.image,
                     env=options.env)  # fmt: skip
    else:
        given = [name for name in ("items", "command", "from_queue") if getattr(options, name) is not None]
        if given:
            raise UsageError(f"workload {workload!r} makes its own items and command; drop {', '.join(given)}")
    target = backends.get(options.backend)
    plan = chosen.plan(target.runtime(), parallel=options.parallel, tasks=options.tasks, **extra)
    task_limit = target.task_limit(options.parallel)
    batch_id = options.batch_id or (run_batch_id(options.run) if options.run else None)
    results_to, s3_endpoint = options.results_location()
    spec = BatchSpec(
        id=batch_id or new_batch_id(workload if options.from_queue is None else options.from_queue),
        workload=chosen.name,
        worker=plan.worker,
        tasks=0,
        parallelism=options.parallel,
        chunk=0,
        retries=options.retries,
        total=0,
        created_at=time.time(),
        ttl=options.ttl,
        backend=options.backend,
        options=plan.options,
        deadline=None if options.timeout is None else float(options.timeout),
        task_timeout=None if options.task_timeout is None else float(options.task_timeout),
        source="items" if options.from_queue is None else f"queue:{options.from_queue}",
        cwd=os.getcwd(),
        schedule=options.schedule or "",
        run=options.run or "",
        results_to=results_to,
        s3_endpoint=s3_endpoint,
        inline_limit=options.inline_limit,
    )
    if options.from_queue is not None:
        return PlannedBatch(spec, None, options.from_queue, plan.chunk, plan.tasks, task_limit)
    return PlannedBatch(spec, items_mod.encode_many(plan.items), None, plan.chunk, plan.tasks, task_limit)


#: What :func:`submit` takes besides the batch options and the workload's own.
_SUBMIT_ONLY = ("redis", "wait", "start", "home", "on_update", "on_created", "on_warning", "kube")


def check_workload_options(workload: workloads.Workload, given: Mapping[str, Any]) -> None:
    """TypeError naming an option that neither :func:`submit` nor the workload takes (a typo, at once)."""
    known = [f.name for f in fields(BatchOptions) if f.name != "workload_options"] + list(_SUBMIT_ONLY)
    allowed = tuple(getattr(workload, "option_names", ()))
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, known + list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no options of its own"
            raise TypeError(f"submit() got an unexpected keyword argument {name!r} (workload {workload.name!r} "
                            f"{takes}){hint}")  # fmt: skip


def submit(
    workload: str = "exec",
    *,
    items: Iterable[Any] | None = None,
    command: str | Sequence[str] | None = None,
    from_queue: str | None = None,
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
    backend: str = backends.LOCAL,
    schedule: str | None = None,
    run: str | None = None,
    results_to: str | None = None,
    s3_endpoint: str | None = None,
    inline_limit: int = DEFAULT_INLINE_LIMIT,
    redis: redis.Redis | str | None = None,
    wait: bool = False,
    start: bool = True,
    home: settings.HomeLike = None,
    on_update: Callable[[Progress, str], None] | None = None,
    on_created: Callable[[Batch], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    kube: KubeOptions | None = None,
    **workload_options: Any,
) -> Batch | None:
    """Create a batch and start it; returns its :class:`Batch` handle.

    ``workload`` is ``"exec"`` (``command`` plus ``items`` or ``from_queue``) or a
    named workload such as ``"pi"`` with its own options (``digits=5000``). The
    batch options are described on :class:`BatchOptions`: ``parallel`` caps tasks
    running at once, ``tasks`` / ``chunk`` cut the items (default one item per
    task), ``retries`` is the per-task retry limit, ``timeout`` / ``task_timeout``
    the batch deadline and per-attempt limit in seconds, ``ttl`` how long results
    stay, ``backend`` "local" or "kubernetes". ``results_to`` (default
    ``$KIABATCH_RESULTS_URL``) names a results store, ``s3://bucket/prefix`` (with
    ``s3_endpoint`` for a store that is not AWS) or ``file:///path``: results above
    ``inline_limit`` bytes and every ``{output}`` file are stored there, and Redis
    keeps a reference (``ItemResult.url``, ``.read()``, ``.open()``).

    ``redis`` is a client or URL (default ``$KIABATCH_REDIS_URL``, else the embedded
    server of ``home``). ``home`` is the state directory, a path or string (default
    ``$KIABATCH_HOME``): the embedded server's data and the local runner's files.
    With ``wait`` the batch runs to its end before this returns (locally, in this
    process); ``on_update(progress, note)`` follows it (the note says what holds it,
    e.g. "waiting for admission"), ``on_created(batch)`` is called once it is
    written, and ``on_warning(message)`` once something needs the user's eye while
    the batch goes on (no pod has started after ``kube.pull_grace``). With
    ``start=False`` the batch is only written: run its tasks yourself with
    ``kiabatch task claim`` / ``task report``. ``kube`` holds the cluster-side
    settings of the kubernetes backend. Returns None when ``from_queue`` names an
    empty queue (nothing is created). Bad input raises UsageError (an unusable
    cluster ClusterError) before anything is written, and an unknown keyword raises
    TypeError naming it.
    """
    if isinstance(items, str | bytes | bytearray | Mapping):  # iterable, but surely not meant item by item
        raise UsageError(f"items must be a list (or another iterable) of items, not a {type(items).__name__}; "
                         "for one item, give [item]")  # fmt: skip
    options = BatchOptions(
        items=items, command=command, from_queue=from_queue, stdin=stdin, env=env, image=image,
        non_retriable_exit_codes=non_retriable_exit_codes, parallel=parallel, tasks=tasks, chunk=chunk,
        retries=retries, timeout=timeout, task_timeout=task_timeout, ttl=ttl, batch_id=batch_id, backend=backend,
        schedule=schedule, run=run, results_to=results_to, s3_endpoint=s3_endpoint, inline_limit=inline_limit,
        workload_options=workload_options,
    )  # fmt: skip
    return submit_options(workload, options, redis=redis, wait=wait, start=start, home=home, on_update=on_update,
                          on_created=on_created, on_warning=on_warning, kube=kube)  # fmt: skip


def submit_options(
    workload: str,
    options: BatchOptions,
    *,
    redis: redis.Redis | str | None = None,
    wait: bool = False,
    start: bool = True,
    home: settings.HomeLike = None,
    on_update: Callable[[Progress, str], None] | None = None,
    on_created: Callable[[Batch], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    kube: KubeOptions | None = None,
) -> Batch | None:
    """:func:`submit` with the batch options as one :class:`BatchOptions` value (what the CLI builds)."""
    planned = plan_batch(workload, options)
    spec = planned.spec
    home = runner_home(redis, settings.as_home(home))
    target = backends.get(spec.backend, home=home, kube=kube)
    # A batch run in this process must ride out a Redis restart; a detached one only writes once.
    store = open_store(redis, home=home, retry_seconds=settings.worker_retry_seconds() if wait else 0.0)
    if start:
        target.preflight(store)
    hooks = RunHooks(on_update=on_update, on_warning=on_warning)
    if spec.run and store.exists(spec.id):
        # This run started before (its launcher or scheduler died): finish that batch.
        batch = Batch(spec.id, store.redis, home=home)
        if start and not store.status(spec.id).finished:
            hooks = replace(hooks, on_running=batch.start_prepare if wait else None)
            target.attach(store, store.spec(spec.id), wait=wait, hooks=hooks)
        return batch
    if planned.from_queue is not None:
        if start:  # what can be checked before the queue's size is known (the shape is, with the Job)
            target.check(replace(spec, tasks=1, chunk=1, total=1))
        taken = store.create_from_queue(spec, planned.from_queue, chunk=planned.chunk, tasks=planned.tasks,
                                        limit=planned.task_limit)  # fmt: skip
        if taken == 0:
            return None
        spec = store.spec(spec.id)
    else:

        def shape(total: int) -> tuple[int, int]:
            # Runs once the items are counted, before the batch is committed: a Job the
            # cluster would refuse leaves nothing behind.
            tasks, chunk = planned.shape(total)
            if start:
                target.check(replace(spec, tasks=tasks, chunk=chunk, total=total))
            return tasks, chunk

        spec = store.create(spec, planned.items or iter(()), shape)
    batch = Batch(spec.id, store.redis, home=home)
    if on_created is not None:
        on_created(batch)
    warning = store.check_memory(spec.id)  # Redis already past half its maxmemory: say so before it fills up
    if warning:
        hooks.update(store.progress(spec.id), f"warning: {warning}")
    if not start:
        return batch
    # The workload's prepare step (e.g. π's square root) overlaps the map step; it
    # starts once workers run, as it may hold the GIL for a while.
    target.launch(store, spec, wait=wait, hooks=replace(hooks, on_running=batch.start_prepare if wait else None))
    return batch
