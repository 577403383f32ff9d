"""``kiabatch task``: the steps of one task, as the Kubernetes pod runs them."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from .. import limits, settings, task
from .context import CliError, Session, emit_json, note, pass_session, user_errors
from .options import count


@click.group("task")
def task_group() -> None:
    """Per-task steps (claim, report) that backends run; for pods and debugging."""


def _index(index: int | None) -> int:
    if index is not None:
        return index
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None or not raw.isdigit():
        raise CliError("no --index given and JOB_COMPLETION_INDEX is not set to a number")
    return int(raw)


@task_group.command("claim")
@click.option("--batch", "batch_id", required=True, envvar="KIABATCH_BATCH", help="Batch id. Env: KIABATCH_BATCH.")
@click.option("--index", type=count(0, limits.MAX_INDEX), help="Completion index (default $JOB_COMPLETION_INDEX).")
@click.option(
    "--dir",
    "directory",
    required=True,
    envvar="KIABATCH_TASK_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Task directory (the emptyDir).",
)
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
@click.option(
    "--await",
    "await_worker",
    is_flag=True,
    help="Sidecar mode: wait for run.sh to finish, report, then idle until terminated.",
)
@pass_session
def report_command(session: Session, directory: Path, await_worker: bool) -> None:
    """Report the outcome of the task in DIR to Redis (idempotent)."""
    store = session.store(retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        result = task.await_and_report(store, directory) if await_worker else task.report_from(store, directory)
    summary = result.status if result is not None else "nothing to report"
    note(f"reported {directory}: {summary}")
    if await_worker:
        # A native sidecar must keep running until the pod's main container exits.
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()


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
