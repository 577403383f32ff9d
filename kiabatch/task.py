"""The per-task plan every backend runs: claim -> run the worker -> report.

The *task directory* is the contract between the three steps (on Kubernetes, the
emptyDir shared by the task sidecar, which claims and reports, and the worker)::

    task.json              batch, index, attempt, claim fingerprint, item count
    run.sh                 the runner (static text; see kiabatch/data/run.sh)
    items/00000/item.json  the item as JSON                     ({input})
    items/00000/argv/0000  the worker's argv, one file per argument
    items/00000/stdin      the item's text, if the worker reads stdin
    items/00000/invalid    why the item cannot run (e.g. a missing field)
    items/00000/started    written by run.sh before the worker starts
    items/00000/stdout     the worker's stdout (the result, unless {output} is used)
    items/00000/stderr     the worker's stderr
    items/00000/output     the declared output file                 ({output})
    items/00000/exit_code  the worker's exit status
    ready                  written once the task is laid out (or abandoned): run.sh may start
    abandoned              why the task could not be claimed (run.sh then fails the pod)
    done                   the task's exit status, once every item ran
    reported               written by the reporter once Redis has the outcome

``kiabatch task claim`` and ``kiabatch task report`` are thin wrappers around
:func:`claim_into` and :func:`report_from`; ``kiabatch task sidecar`` (the pod's
one kiabatch process) runs :func:`serve_task`, which does both. The local backend
runs workers with pipes instead of files, but decides every outcome with the same
functions (:func:`item_argv`, :func:`item_outcome`, :func:`outcome_report`).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from . import items as items_mod
from . import templates
from .errors import KiabatchError, UnreachableError, UsageError
from .model import BatchSpec
from .results_store import ResultsPlan, ResultsStore, ResultsStoreError
from .store import LOG_TAIL, Claim, ItemOutcome, Report, ReportResult, Store

RUNNER_NAME = "run.sh"
#: Written by the claim step when an item cannot be run; run.sh skips the item.
INVALID_FILE = "invalid"
TASK_FILE = "task.json"
DONE_FILE = "done"
REPORTED_FILE = "reported"
READY_FILE = "ready"
ABANDONED_FILE = "abandoned"
#: Seconds between the sidecar's looks at ``done`` (a stat: cheap, and the pod ends this much sooner).
SIDECAR_POLL = 0.05


def runner_script() -> str:
    """The text of run.sh."""
    return resources.files("kiabatch").joinpath("data", RUNNER_NAME).read_text()


@dataclass(frozen=True)
class TaskInfo:
    """The contents of task.json."""

    batch: str
    index: int
    attempt: int
    claim_sha1: str
    status: str  # "ok", or "final" when the index was already settled
    items: int
    output_file: bool
    non_retriable_exit_codes: tuple[int, ...]
    #: The batch's results store (see :class:`~kiabatch.results_store.ResultsPlan`); "" for none.
    results_to: str = ""
    s3_endpoint: str = ""
    inline_limit: int = 0
    results_prefix: str = ""

    @property
    def results(self) -> ResultsPlan | None:
        """Where large results of this task go, or None."""
        if not self.results_to:
            return None
        return ResultsPlan(self.results_to, self.s3_endpoint, self.inline_limit, self.results_prefix)

    @classmethod
    def load(cls, directory: Path) -> TaskInfo:
        """Read task.json from a task directory (UsageError if there is none, or it is not kiabatch's)."""
        try:
            data = json.loads((directory / TASK_FILE).read_text())
            data["non_retriable_exit_codes"] = tuple(data["non_retriable_exit_codes"])
            return cls(**data)
        except FileNotFoundError:
            missing = f"no task in {directory} ({TASK_FILE} is missing)"
            raise UsageError(f"{missing}: `kiabatch task claim` lays one out") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{directory / TASK_FILE} is not a task kiabatch wrote: {exc}") from None


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def item_dir(directory: Path, position: int) -> Path:
    """Directory of item ``position`` inside a task directory."""
    return directory / "items" / f"{position:05d}"


def item_argv(spec: BatchSpec, value: Any, index: int, where: Path | str) -> list[str]:
    """The worker's argv for item ``value`` laid out in ``where``; UsageError says why it cannot run."""
    return templates.fill(
        spec.worker.command, value, input_path=f"{where}/item.json", output_path=f"{where}/output", index=index
    )


def prepare(directory: Path, spec: BatchSpec, index: int, claim: Claim) -> TaskInfo:
    """Lay out the task directory for ``claim`` (idempotent for a given claim)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (DONE_FILE, REPORTED_FILE, READY_FILE, ABANDONED_FILE):
        (directory / stale).unlink(missing_ok=True)
    _write_runner(directory)
    values = claim.items if claim.status == "ok" else []
    for position, value in enumerate(values):
        where = item_dir(directory, position)
        (where / "argv").mkdir(parents=True, exist_ok=True)
        _write(where / "item.json", items_mod.encode(value))
        try:
            argv = item_argv(spec, value, index, where)
        except UsageError as exc:  # the reporter fails it with this reason, without retries
            _write(where / INVALID_FILE, str(exc))
            continue
        for number, argument in enumerate(argv):
            _write(where / "argv" / f"{number:04d}", argument)
        if spec.worker.stdin:
            _write(where / "stdin", items_mod.text(value))
    info = TaskInfo(
        batch=spec.id,
        index=index,
        attempt=claim.attempt,
        claim_sha1=claim.sha1,
        status=claim.status,
        items=len(values),
        output_file=spec.worker.result_from_output_file,
        non_retriable_exit_codes=tuple(spec.worker.non_retriable_exit_codes),
    )
    plan = ResultsPlan.of(spec)
    if plan is not None:
        info = replace(info, results_to=plan.url, s3_endpoint=plan.endpoint, inline_limit=plan.inline_limit,
                       results_prefix=plan.prefix)  # fmt: skip
    _write(directory / TASK_FILE, json.dumps(info.__dict__))
    if claim.status != "ok":
        _write(directory / DONE_FILE, "0\n")
    return info


def _write_runner(directory: Path) -> None:
    runner = directory / RUNNER_NAME
    _write(runner, runner_script())
    runner.chmod(0o755)


def claim_into(store: Store, batch_id: str, index: int, directory: Path, *, spec: BatchSpec | None = None) -> TaskInfo:
    """Claim task ``index`` of ``batch_id`` and lay its items out in ``directory``."""
    spec = spec or store.spec(batch_id)
    claim = store.claim(batch_id, index)
    return prepare(directory, spec, index, claim)


def _read_code(path: Path) -> int | None:
    """An exit status file's value; None while it is missing or half-written."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def done_status(directory: Path) -> int | None:
    """The task's exit status once run.sh finished, else None."""
    return _read_code(directory / DONE_FILE)


def _tail(path: Path, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read()
    except OSError:
        return b""


class OutputError(Exception):
    """A result file kiabatch will not read (missing, a symbolic link, not a regular file)."""


def read_result_file(path: Path, what: str) -> bytes:
    """The bytes of a file the worker wrote, without following a symbolic link it may have planted.

    Opened with O_NOFOLLOW and O_NONBLOCK (a FIFO cannot block us) and read only if it
    is a regular file: a worker cannot make its result someone else's file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OutputError(f"the worker exited 0 but did not write its {what} file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"the worker's {what} is a symbolic link; kiabatch does not follow it") from None
        raise OutputError(f"cannot read the worker's {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OutputError(f"the worker's {what} is not a regular file")
        return handle.read()


def item_outcome(
    *,
    exit_code: int | None,
    duration: float,
    stdout: bytes,
    stderr: bytes,
    output: Path | None = None,
    invalid: str | None = None,
    killed_reason: str = "",
) -> ItemOutcome:
    """How one item ended: the single rule both backends apply.

    ``invalid``: why the item could not even be run (a missing field): failed, not
    retried. ``exit_code`` None: the worker was stopped (``killed_reason`` says why).
    A non-zero status fails the item; status 0 succeeds with stdout as the result, or
    with the ``output`` file when the command declares ``{output}``.
    """
    if invalid is not None:
        return ItemOutcome(ok=False, exit_code=None, duration=0.0, reason=invalid, stderr=invalid.encode(),
                           retriable=False)  # fmt: skip
    if exit_code is None:
        reason = killed_reason or "the worker did not finish"
        return ItemOutcome(ok=False, exit_code=None, duration=duration, reason=reason, stderr=stderr)
    if exit_code != 0:
        return ItemOutcome(ok=False, exit_code=exit_code, duration=duration, reason=f"exited with status {exit_code}",
                           stderr=stderr)  # fmt: skip
    result = stdout
    if output is not None:
        try:
            result = read_result_file(output, "{output}")
        except OutputError as exc:
            return ItemOutcome(ok=False, exit_code=0, duration=duration, reason=str(exc), stderr=stderr)
    return ItemOutcome(ok=True, exit_code=0, duration=duration, result=result, stderr=stderr,
                       from_file=output is not None)  # fmt: skip


def non_retriable(outcomes: Sequence[ItemOutcome], codes: Iterable[int]) -> bool:
    """True when retrying the task cannot help: an item that cannot run, or a declared exit code."""
    fatal = set(codes)
    return any(not o.ok and (not o.retriable or o.exit_code in fatal) for o in outcomes)


def stderr_log(outcomes: Sequence[ItemOutcome]) -> bytes:
    """The attempt's stderr as ``kiabatch logs`` shows it (items marked when there are several)."""
    if len(outcomes) == 1:
        return outcomes[0].stderr
    return b"".join(f"--- item {p} ---\n".encode() + o.stderr for p, o in enumerate(outcomes))


#: Results stores opened by this process, by (url, endpoint): one HTTP client each, shared by threads.
_OPEN_STORES: dict[tuple[str, str], ResultsStore] = {}


def open_results_store(plan: ResultsPlan) -> ResultsStore:
    """The (cached) store of ``plan``."""
    key = (plan.url, plan.endpoint)
    if key not in _OPEN_STORES:
        _OPEN_STORES[key] = ResultsStore(plan.url, endpoint=plan.endpoint)
    return _OPEN_STORES[key]


def store_results(
    plan: ResultsPlan | None, index: int, attempt: int, outcomes: Sequence[ItemOutcome]
) -> list[ItemOutcome]:
    """Upload the results that leave Redis, before the report, so Redis only references stored objects.

    Every ``{output}`` file and every result above the inline limit goes to the
    results store under its deterministic key (an upload retried after a crash
    replaces the same object). An upload that fails fails its item's attempt (the
    index is retried by the usual rules), with the store's reason.
    """
    if plan is None:
        return list(outcomes)
    stored: list[ItemOutcome] = []
    for position, outcome in enumerate(outcomes):
        if outcome.ok and plan.offloads(len(outcome.result), outcome.from_file):
            try:
                ref = open_results_store(plan).put(plan.key(index, position, attempt), outcome.result)
            except ResultsStoreError as exc:
                outcome = replace(outcome, ok=False, result=b"", reason=f"cannot store the result: {exc}")
            else:
                outcome = replace(outcome, result=b"", ref=ref)
        stored.append(outcome)
    return stored


def outcome_report(
    batch_id: str,
    index: int,
    *,
    attempt: int,
    claim_sha1: str,
    outcomes: Sequence[ItemOutcome],
    claimed_items: Sequence[Any],
    non_retriable_exit_codes: Iterable[int],
    results: ResultsPlan | None = None,
) -> Report:
    """One attempt's outcomes as a :class:`~kiabatch.store.Report`, its large results already stored.

    With a results ``plan``, every ``{output}`` file and every result above the inline
    limit is uploaded first (:func:`store_results`), so Redis only ever references
    stored objects. Applies the non-retriable rule and the log join. Both backends
    build their reports here: the local runner and a pod's reporter.
    """
    outcomes = store_results(results, index, attempt, outcomes)
    return Report(batch_id, index, attempt, claim_sha1, tuple(outcomes), tuple(claimed_items),
                  non_retriable(outcomes, non_retriable_exit_codes), stderr_log(outcomes))  # fmt: skip


def collect(directory: Path, info: TaskInfo, *, killed_reason: str = "") -> list[ItemOutcome]:
    """Read the outcome of every item run.sh ran in ``directory``."""
    outcomes: list[ItemOutcome] = []
    for position in range(info.items):
        where = item_dir(directory, position)
        invalid_path = where / INVALID_FILE
        invalid = invalid_path.read_text() if invalid_path.exists() else None
        try:
            stdout = b"" if info.output_file else read_result_file(where / "stdout", "stdout")
        except OutputError:
            stdout = b""
        outcomes.append(
            item_outcome(
                exit_code=_read_code(where / "exit_code"),
                duration=_duration(where),
                stdout=stdout,
                stderr=_tail(where / "stderr", LOG_TAIL),
                output=where / "output" if info.output_file else None,
                invalid=invalid,
                killed_reason=killed_reason,
            )
        )
    return outcomes


def _duration(where: Path) -> float:
    try:
        started = (where / "started").stat().st_mtime
        ended = (where / "exit_code").stat().st_mtime
    except OSError:
        return 0.0
    return max(0.0, ended - started)


def report_from(store: Store, directory: Path, *, killed_reason: str = "") -> ReportResult | None:
    """Report the task laid out in ``directory`` and write ``reported``.

    Returns None when there was nothing to report (the index was already settled).
    """
    info = TaskInfo.load(directory)
    result = None
    if info.status == "ok":
        outcomes = collect(directory, info, killed_reason=killed_reason)
        claimed = [
            items_mod.decode(item_dir(directory, p).joinpath("item.json").read_bytes()) for p in range(info.items)
        ]
        result = store.record(outcome_report(
            info.batch, info.index, attempt=info.attempt, claim_sha1=info.claim_sha1, outcomes=outcomes,
            claimed_items=claimed, non_retriable_exit_codes=info.non_retriable_exit_codes, results=info.results,
        ))  # fmt: skip
    _write(directory / REPORTED_FILE, f"{time.time()}\n")
    return result


def await_and_report(store: Store, directory: Path, *, poll: float = SIDECAR_POLL) -> ReportResult | None:
    """Wait for run.sh to finish, then report (once: a ``reported`` task is left alone)."""
    TaskInfo.load(directory)  # a directory with no task would be waited on forever
    while done_status(directory) is None:
        time.sleep(poll)
    if (directory / REPORTED_FILE).exists():
        return None
    return report_from(store, directory)


class TaskAbandoned(KiabatchError):
    """The sidecar could not claim its task; run.sh fails the pod with this reason, and the Job retries."""


def abandon(directory: Path, reason: str) -> None:
    """Tell run.sh that there is no task to run, and why (it fails the pod; the Job retries the index)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_runner(directory)
    _write(directory / ABANDONED_FILE, reason)
    _write(directory / READY_FILE, f"{time.time()}\n")


def _connect_within(open_store: Callable[[], Store], seconds: float) -> Store:
    """``open_store()``, retried while Redis does not answer, for up to ``seconds`` (a Redis restarting)."""
    deadline = time.monotonic() + seconds
    pause = 0.1
    while True:
        try:
            return open_store()
        except UnreachableError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def serve_task(
    open_store: Callable[[], Store],
    batch_id: str,
    index: int,
    directory: Path,
    *,
    retry_seconds: float = 0.0,
    poll: float = SIDECAR_POLL,
    on_claimed: Callable[[TaskInfo], None] | None = None,
) -> ReportResult | None:
    """The pod's sidecar: claim task ``index``, lay it out, write ``ready``, wait for run.sh, report.

    The worker container starts beside it and waits for ``ready``, so claiming
    overlaps the worker's container start. A sidecar that is restarted (it crashed,
    or was OOM-killed) finds ``ready`` and never claims twice: it goes on waiting for
    run.sh, or reports again if its predecessor died before Redis confirmed.

    A claim that fails — the batch is gone, or Redis stays away longer than
    ``retry_seconds`` — abandons the task: run.sh then fails the pod, so the Job
    retries the index within its ``backoffLimitPerIndex`` and gives up after that
    (never a sidecar crash-looping forever). Raises :class:`TaskAbandoned` then.
    An index that is already settled lays out no items, and the pod succeeds at once.
    """
    if (directory / READY_FILE).exists():
        if (directory / ABANDONED_FILE).exists():
            raise TaskAbandoned((directory / ABANDONED_FILE).read_text())
        store = _connect_within(open_store, retry_seconds)
    else:
        try:
            store = _connect_within(open_store, retry_seconds)
            info = claim_into(store, batch_id, index, directory)
        except (KiabatchError, redis.RedisError) as exc:
            reason = f"cannot claim index {index} of batch {batch_id}: {exc}"
            abandon(directory, reason)
            raise TaskAbandoned(reason) from None
        _write(directory / READY_FILE, f"{time.time()}\n")
        if on_claimed is not None:
            on_claimed(info)
    return await_and_report(store, directory, poll=poll)


def task_env(spec: BatchSpec, index: int, directory: Path | None) -> dict[str, str]:
    """Environment variables the runner and worker see (besides the inherited ones)."""
    env: dict[str, Any] = {**spec.worker.env, "JOB_COMPLETION_INDEX": str(index), "KIABATCH_BATCH": spec.id}
    if directory is not None:
        env["KIABATCH_TASK_DIR"] = str(directory)
    return {key: str(value) for key, value in env.items()}
