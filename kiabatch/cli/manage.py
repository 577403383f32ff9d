"""Commands that change batches: ``delete``, ``resume``, ``scale``."""

from __future__ import annotations

import click

from .. import limits, settings
from ..batch import Batch
from ..errors import EXIT_OK, EXIT_USAGE
from ..progress import ProgressBar
from ..results_store import MAX_INLINE_LIMIT
from .context import CliError, Session, emit_json, note, open_batch, pass_session, user_errors
from .options import Size, count
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
                kept = "its results, status and stored objects stay until its TTL (delete without --keep-results)"
                note(f"stopped batch {batch_id}; {kept}" if keep_results else f"deleted batch {batch_id}")
            else:
                missing.append(batch_id)
    if missing:
        raise CliError(f"no batch {', '.join(map(repr, missing))} (it may have expired or been deleted)", EXIT_USAGE)


@click.command("resume")
@click.argument("batch_id")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Run in the foreground and print results.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--results-to", "results_to", metavar="URL",
              help="From now on store large results here (s3://BUCKET/PREFIX or file:///PATH), e.g. after "
                   "'Redis is full'.")  # fmt: skip
@click.option("--s3-endpoint-url", "s3_endpoint", metavar="URL", help="Endpoint of an S3-compatible store.")
@click.option("--inline-limit", "inline_limit", type=Size(0, MAX_INLINE_LIMIT),
              help="With a results store: results up to this size stay in Redis.")  # fmt: skip
@pass_session
def resume_command(
    session: Session,
    batch_id: str,
    wait: bool,
    quiet: bool,
    results_to: str | None,
    s3_endpoint: str | None,
    inline_limit: int | None,
) -> None:
    """Finish an interrupted batch: run every task whose outcome is not settled yet.

    Claimed items keep their task, so nothing is lost and nothing runs for a result twice.
    Items that failed because Redis was full run again too (give --results-to for their results).
    """
    batch = open_batch(session, batch_id, retry_seconds=settings.worker_retry_seconds())
    with user_errors():
        reopened = batch.reopen(results_to=results_to, s3_endpoint=s3_endpoint, inline_limit=inline_limit)
        if reopened and not quiet:
            note(f"batch {batch_id}: {reopened} task(s) that failed because Redis was full will run again")
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


@click.command("gc")
@click.option(
    "--results-to",
    "results_to",
    envvar=settings.ENV_RESULTS_URL,
    required=True,
    metavar="URL",
    help="The results store to clean (s3://BUCKET/PREFIX or file:///PATH). Env: KIABATCH_RESULTS_URL.",
)
@click.option(
    "--s3-endpoint-url",
    "s3_endpoint",
    envvar=settings.ENV_S3_ENDPOINT,
    metavar="URL",
    help="Endpoint of an S3-compatible store that is not AWS. Env: KIABATCH_S3_ENDPOINT_URL.",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@pass_session
def gc_command(session: Session, results_to: str, s3_endpoint: str | None, dry_run: bool) -> None:
    """Remove stored results no batch references: batches that expired or were deleted, and retried
    attempts' objects that lost the report. Run it with the Redis of the batches that use the store.
    """
    from ..results_store import ResultsStore, collect_garbage

    with user_errors():
        results = ResultsStore(results_to, endpoint=s3_endpoint or "")
        store = session.store()
        report = collect_garbage(results, store.result_references, dry_run=dry_run)
    if session.json:
        emit_json(
            {
                "scanned": report.scanned,
                "removed": len(report.removed),
                "dry_run": dry_run,
                "gone_batches": report.gone_batches,
            }
        )
    else:
        for key in report.removed if dry_run else ():
            click.echo(results.object_url(key))
        verb = "would remove" if dry_run else "removed"
        note(
            f"gc {results.url}: {report.scanned} object(s) scanned, {verb} {len(report.removed)} "
            f"({len(report.gone_batches)} batch(es) gone from Redis)"
        )
    raise click.exceptions.Exit(EXIT_OK)
