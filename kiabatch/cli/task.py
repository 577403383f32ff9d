"""``kiabatch task``: the steps of one task, as the Kubernetes pod runs them."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import click

from .. import limits, settings, task
from ..connection import connect
from ..errors import EXIT_UNREACHABLE, KiabatchError
from ..store import Store
from .context import CliError, Session, emit_json, note, pass_session, user_errors
from .options import count, stack


@click.group("task")
def task_group() -> None:
    """Per-task steps (claim, report) that backends run; for pods and debugging."""


#: ``--batch``, ``--index``, ``--dir``: which task a pod step works on (from the pod's environment).
_task_options = stack(
    click.option("--batch", "batch_id", required=True, envvar="KIABATCH_BATCH", help="Batch id. Env: KIABATCH_BATCH."),
    click.option("--index", type=count(0, limits.MAX_INDEX), help="Completion index (default $JOB_COMPLETION_INDEX)."),
    click.option(
        "--dir",
        "directory",
        required=True,
        envvar="KIABATCH_TASK_DIR",
        type=click.Path(file_okay=False, path_type=Path),
        help="Task directory (the emptyDir shared with the worker). Env: KIABATCH_TASK_DIR.",
    ),
)


def _index(index: int | None) -> int:
    if index is not None:
        return index
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None or not raw.isdigit():
        raise CliError("no --index given and JOB_COMPLETION_INDEX is not set to a number")
    return int(raw)


@task_group.command("claim")
@_task_options
@pass_session
def claim_command(session: Session, batch_id: str, index: int | None, directory: Path) -> None:
    """Claim a task's items (the same ones on every retry) and lay them out in DIR."""
    position = _index(index)
    store = session.store(retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        info = task.claim_into(store, batch_id, position, directory)
    message = {"batch": batch_id, "index": position, "attempt": info.attempt, "items": info.items,
               "status": info.status}  # fmt: skip
    if session.json:
        emit_json(message)
    else:
        note(
            f"claimed index {position} of {batch_id}: {info.items} item(s), attempt {info.attempt}"
            + (" (already settled; nothing to run)" if info.status != "ok" else "")
        )


@task_group.command("report")
@click.option(
    "--dir",
    "directory",
    required=True,
    envvar="KIABATCH_TASK_DIR",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Task directory.",
)
@pass_session
def report_command(session: Session, directory: Path) -> None:
    """Report the outcome of the task in DIR to Redis (idempotent)."""
    store = session.store(retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        result = task.report_from(store, directory)
    note(f"reported {directory}: {result.status if result is not None else 'nothing to report'}")


@task_group.command("sidecar")
@_task_options
@pass_session
def sidecar_command(session: Session, batch_id: str, index: int | None, directory: Path) -> None:
    """What a pod's kiabatch sidecar runs: claim, lay out DIR, wait for run.sh, report, idle until SIGTERM.

    The pod's only kiabatch process. A claim that fails (the batch is gone, Redis
    away for longer than KIABATCH_REDIS_RETRY_SECONDS) makes run.sh fail the pod, so
    the Job retries the index; the sidecar itself never exits before SIGTERM.
    """

    def terminate(*_: object) -> None:
        # The pod is ending (its worker exited, or it was deleted): go at once, skipping the
        # interpreter's teardown (~0.15 s) — nothing is left to do. A handler is needed anyway:
        # as PID 1 of its container, this process would ignore SIGTERM.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, terminate)
    position = _index(index)
    retry = settings.worker_retry_seconds()

    def claimed(info: task.TaskInfo) -> None:
        note(
            f"claimed index {position} of {batch_id}: {info.items} item(s), attempt {info.attempt}"
            + (" (already settled; nothing to run)" if info.status != "ok" else "")
        )

    def open_store() -> Store:
        return Store(connect(session.redis_url, retry_seconds=retry))

    try:
        result = task.serve_task(open_store, batch_id, position, directory, retry_seconds=retry, on_claimed=claimed)
        note(f"reported {directory}: {result.status if result is not None else 'nothing to report'}")
    except task.TaskAbandoned as exc:
        note(f"kiabatch: error: {exc}; the worker fails this pod and the Job retries the index")
    except KiabatchError as exc:  # the report failed: exit, and the kubelet restarts this sidecar
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    while True:  # a native sidecar runs until the pod ends
        signal.pause()


@task_group.command("run-batch", hidden=True)
@click.argument("batch_id")
@pass_session
def run_batch_command(session: Session, batch_id: str) -> None:
    """Run a local batch in this process (what `submit --no-wait` starts in the background)."""
    from ..backends.local_runner import LocalRunner

    store = session.store(retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        status = LocalRunner(store, batch_id).run()  # in the background: nobody watches its progress
    note(f"batch {batch_id} {status.state}")
