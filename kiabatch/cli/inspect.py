"""Read-only commands: ``status``, ``list``, ``results``, ``logs``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import backends, limits, settings
from ..batch import Batch
from ..errors import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK
from ..model import INTERRUPTED, TERMINAL_STATES, Status
from ..progress import ProgressBar
from ..store import Store
from ..text import printable
from .context import CliError, Session, emit_json, note, open_batch, pass_session, user_errors
from .options import LIMIT, Interval, count
from .output import conclude, status_block, status_rows


def _read_only_options(func):  # noqa: ANN001 - a click decorator
    func = click.option(
        "--replica-url",
        envvar=settings.ENV_REPLICA_URL,
        metavar="URL",
        help="With --read-only: the Redis to read (default: kiabatch-redis-replicas when --redis-url names "
        "kiabatch-redis-primary, else --redis-url). Env: KIABATCH_REDIS_REPLICA_URL.",
    )(func)
    return click.option(
        "--read-only",
        is_flag=True,
        help="Read from a replica and never write (watch progress while the primary is busy or being repaired; "
        "a Kubernetes batch is not reconciled with its Job).",
    )(func)


def _show(session: Session, status: Status) -> None:
    if session.json:
        emit_json(status.to_dict())
    else:
        click.echo(status_block(status))


@click.command("status")
@click.argument("batch_id", required=False)
@click.option("--watch", "-w", is_flag=True, help="Keep updating until the batch finishes.")
@click.option(
    "--interval",
    type=Interval(),
    default=1.0,
    show_default=True,
    help="Seconds between updates with --watch.",
)
@_read_only_options
@pass_session
def status_command(
    session: Session,
    batch_id: str | None,
    watch: bool,
    interval: float,
    read_only: bool,
    replica_url: str | None,
) -> None:
    """Show a batch's state and progress (without BATCH_ID: every unfinished batch)."""
    if batch_id is None:
        with user_errors():
            if read_only:
                from ..readonly import open_read_only

                store = open_read_only(session.redis_url, replica_url)
            else:
                store = session.store()
            statuses = [_augment(store, s) for s in store.list_batches(limit=1000) if s.state not in TERMINAL_STATES]
        if session.json:
            emit_json([s.to_dict() for s in statuses])
        else:
            click.echo(status_rows(statuses) if statuses else "no unfinished batches")
        return
    batch = open_batch(session, batch_id, read_only=read_only, replica_url=replica_url)
    with user_errors():
        status = batch.status(read_only=read_only)
    if not watch or status.finished:
        _show(session, status)
        raise click.exceptions.Exit(_exit_code(status))
    if not session.json:
        click.echo(status_block(status))
    with ProgressBar(status.progress.total, batch_id) as bar, user_errors():
        last = None
        while True:
            status = batch.status(read_only=read_only)
            waiting = status.detail.get("admission") or status.detail.get("waiting") or ""
            bar.update(status.progress, waiting)
            if session.json and status.to_dict() != last:
                last = status.to_dict()
                emit_json(last)
            elif not bar.enabled and not session.json:
                line = (
                    f"{status.state}: {status.progress.done}/{status.progress.total} done, "
                    f"{status.progress.failed} failed" + (f" ({waiting})" if waiting else "")
                )
                if line != last:
                    click.echo(line)
                    last = line
            if status.finished or status.state == INTERRUPTED or status.detail.get("problem"):
                break
            time.sleep(interval)
    if not session.json:
        click.echo(status_block(status))
    raise click.exceptions.Exit(_exit_code(status))


def _exit_code(status: Status) -> int:
    """0 all done so far, 1 items failed, 130 interrupted (``kiabatch resume`` finishes it)."""
    if status.state == INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_ITEMS_FAILED if status.progress.failed else EXIT_OK


@click.command("list")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="Newest batches to show.")
@pass_session
def list_command(session: Session, limit: int) -> None:
    """List recent batches, newest first."""
    with user_errors():
        store = session.store()
        statuses = [_augment(store, s) for s in store.list_batches(limit=limit)]
    if session.json:
        emit_json([s.to_dict() for s in statuses])
    else:
        click.echo(status_rows(statuses) if statuses else "no batches")


def _augment(store: Store, status: Status) -> Status:
    return backends.get(status.backend).list_detail(store, status)


@click.command("results")
@click.argument("batch_id")
@click.option(
    "--reduce/--no-reduce",
    default=None,
    help="Print the workload's combined answer (default when it has one) or per-item results.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as the global --output json.")
@click.option("--raw", is_flag=True, help="Write the raw result bytes of every item, in order, to stdout.")
@click.option("--download", "download_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write each successful item's result to its own file in DIR (named INDEX, or INDEX-POSITION "
                   "when tasks hold several items); stored results are checked against their sha256.")  # fmt: skip
@click.option("--name-from", metavar="FIELD",
              help="With --download: name each file after this field of its (object) item.")  # fmt: skip
@_read_only_options
@pass_session
def results_command(
    session: Session,
    batch_id: str,
    reduce: bool | None,
    as_json: bool,
    raw: bool,
    download_dir: Path | None,
    name_from: str | None,
    read_only: bool,
    replica_url: str | None,
) -> None:
    """Print a batch's per-item results (or its reduced answer) and list failed items.

    Results kept in a results store (--results-to) are streamed back and checked
    against their sha256. Exits 1 if any item failed.
    """
    if as_json:
        session.output = "json"
    if name_from is not None and download_dir is None:
        raise CliError("--name-from names the files of --download DIR; give --download too")
    if raw and download_dir is not None:
        raise CliError("give either --raw or --download, not both")
    batch = open_batch(session, batch_id, read_only=read_only, replica_url=replica_url)
    if download_dir is not None:
        with user_errors():
            written = batch.download(download_dir, name_from=name_from)
            failed = batch.store.failed_count(batch_id)
        note(f"wrote {written} result file(s) to {printable(str(download_dir))}"
             + (f"; {failed} item(s) failed (kiabatch results {batch_id})" if failed else ""))  # fmt: skip
        raise click.exceptions.Exit(EXIT_ITEMS_FAILED if failed else EXIT_OK)
    if raw:
        with user_errors():
            _write_raw(batch)
            raise click.exceptions.Exit(EXIT_ITEMS_FAILED if batch.store.failed_count(batch_id) else EXIT_OK)
    with user_errors():
        status = batch.status()
    if not status.finished and reduce:
        raise CliError(f"batch {batch_id} is {status.state}; --reduce needs a finished batch")
    if not status.finished and reduce is None:
        reduce = False
    raise click.exceptions.Exit(conclude(session, batch, reduce=reduce, quiet=True))


def _write_raw(batch: Batch) -> None:
    """Every successful item's result bytes, in order, to stdout (stored ones streamed and verified)."""
    out = sys.stdout.buffer
    if not batch.store.meta(batch.id).get("results_to"):  # every result is in Redis: raw pages, no objects
        for page in batch.store.iter_pages(batch.id, failed=False, details=False, items=False, ahead=True):
            out.write(b"".join(filter(None, page.results)))
    else:  # stored results need their references (the details)
        for result in batch.store.iter_outcomes(batch.id, failed=False):
            if result.ref is None:  # type: ignore[union-attr]
                out.write(result.inline)  # type: ignore[union-attr]
                continue
            with result.open() as stream:  # type: ignore[union-attr]
                while chunk := stream.read(1024 * 1024):
                    out.write(chunk)
    out.flush()


@click.command("logs")
@click.argument("batch_id")
@click.option("--index", "-i", type=count(0, limits.MAX_INDEX), help="Only this task (completion index).")
@click.option("--follow", "-f", is_flag=True, help="Kubernetes: keep streaming the workers' output.")
@pass_session
def logs_command(session: Session, batch_id: str, index: int | None, follow: bool) -> None:
    """Print the workers' stderr per task and attempt (the last 64 KiB of each).

    For a Kubernetes batch: the logs of its pods' claim, reporter and worker
    containers, each line labelled with its index, pod and container.
    """
    batch = open_batch(session, batch_id)
    with user_errors():
        chunks = batch.log_chunks(index, follow=follow)
        if session.json:
            emit_json([{"index": c.index, "attempt": c.attempt, "label": c.label,
                        "stderr": c.data.decode("utf-8", "replace")} for c in chunks])  # fmt: skip
            return
        for chunk in chunks:
            text = chunk.data.decode("utf-8", "replace")
            if chunk.whole:
                click.echo(f"==> {printable(chunk.label)} <==")
                click.echo(_terminal_safe(text.rstrip("\n")))
            else:
                for line in text.splitlines():
                    click.echo(f"[{printable(chunk.label)}] {_terminal_safe(line)}")


def _terminal_safe(text: str) -> str:
    """Log text with its lines kept but escape sequences and other control characters escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))
