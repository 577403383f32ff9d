"""Commands that change batches: ``delete``, ``resume``, ``scale``."""

from __future__ import annotations

import click

from .. import limits, settings
from ..batch import Batch
from ..errors import EXIT_USAGE
from ..progress import ProgressBar
from .context import CliError, Session, note, open_batch, pass_session, user_errors
from .options import count
from .output import conclude


@click.command("delete")
@click.argument("batch_ids", nargs=-1, required=True)
@click.option("--keep-results", is_flag=True, help="Stop the batch but keep its results and status.")
@pass_session
def delete_command(session: Session, batch_ids: tuple[str, ...], keep_results: bool) -> None:
    """Delete batches now: stop their workers (or Job) and remove their Redis keys."""
    missing = []
    for batch_id in batch_ids:
        with user_errors():
            if Batch(batch_id, session.store().redis).delete(keep_results=keep_results):
                note(f"deleted batch {batch_id}")
            else:
                missing.append(batch_id)
    if missing:
        raise CliError(f"no batch {', '.join(map(repr, missing))} (it may have expired)", EXIT_USAGE)


@click.command("resume")
@click.argument("batch_id")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Run in the foreground and print results.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@pass_session
def resume_command(session: Session, batch_id: str, wait: bool, quiet: bool) -> None:
    """Finish an interrupted batch: run every task whose outcome is not settled yet.

    Claimed items keep their task, so nothing is lost and nothing runs for a result twice.
    """
    batch = open_batch(session, batch_id, retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        status = batch.status()
        if status.finished:
            note(f"batch {batch_id} already {status.state}; nothing to resume")
            raise click.exceptions.Exit(conclude(session, batch, reduce=None, quiet=True))
        if not wait:
            batch.resume(wait=False)
            note(f"resumed {batch_id} in the background; follow it with: kiabatch status --watch {batch_id}")
            return
        with ProgressBar(status.progress.total, batch_id, enabled=not quiet) as bar:
            batch.resume(wait=True, on_update=bar.update, on_warning=lambda text: bar.say(f"kiabatch: warning: {text}"))
    raise click.exceptions.Exit(conclude(session, batch, reduce=None, quiet=quiet))


@click.command("scale")
@click.argument("batch_id")
@click.option("--parallel", "-p", type=count(1, limits.MAX_PARALLEL), required=True,
              help="Tasks to run at once from now on.")  # fmt: skip
@pass_session
def scale_command(session: Session, batch_id: str, parallel: int) -> None:
    """Change how many tasks of a running batch run at once (the Job's parallelism, or the local slots)."""
    batch = open_batch(session, batch_id)
    with user_errors():
        batch.scale(parallel)
    note(f"batch {batch_id}: parallelism {parallel}")
