"""``kiabatch queue``: named queues that producers fill and batches drain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import items as items_mod
from ..queue import Queue, queue_names
from .context import CliError, Session, emit_json, note, pass_session, user_errors
from .options import LIMIT
from .output import table


@click.group("queue")
def queue_group() -> None:
    """Named work queues: enqueue now, submit a batch from them later."""


def _queue(session: Session, name: str) -> Queue:
    with user_errors():
        return Queue(name, session.store().redis)


@queue_group.command("enqueue")
@click.argument("name")
@click.argument("values", nargs=-1)
@click.option(
    "--items",
    "items_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="File of items, one JSON value per line ('-' for stdin).",
)
@click.option(
    "--lines",
    "lines_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="File whose non-blank lines are string items.",
)
@pass_session
def enqueue_command(
    session: Session, name: str, values: tuple[str, ...], items_file: Path | None, lines_file: Path | None
) -> None:
    """Add items (JSON values) to queue NAME.

    \b
      kiabatch queue enqueue thumbs '{"url": "https://example.org/a.png"}' 42 '"b.png"'
      kiabatch queue enqueue thumbs --lines urls.txt
    """
    with user_errors():
        parsed: list[Any] = [items_mod.parse(v, f"argument {v!r}") for v in values]
        if items_file is not None:
            parsed += items_mod.read_jsonl(items_file)
        if lines_file is not None:
            parsed += items_mod.iter_lines(lines_file)
        if not parsed:
            raise click.UsageError("no items given; pass JSON values, --items FILE or --lines FILE")
        queue = _queue(session, name)
        count = queue.enqueue_many(parsed)
        note(f"enqueued {count} item(s) into {name!r} (now {len(queue)})")


@queue_group.command("list")
@click.argument("name", required=False)
@click.option("--limit", type=LIMIT, default=20, show_default=True, help="Items to show for NAME.")
@pass_session
def list_command(session: Session, name: str | None, limit: int) -> None:
    """List queues and their lengths, or the first items of queue NAME."""
    if name is not None:
        queue = _queue(session, name)
        with user_errors():
            head = queue.peek(limit)
            length = len(queue)
        if session.json:
            emit_json({"queue": name, "length": length, "items": head})
            return
        for value in head:
            click.echo(items_mod.text(value))
        note(f"{length} item(s) in {name!r}" + (f", first {len(head)} shown" if length > len(head) else ""))
        return
    with user_errors():
        store = session.store()
        rows = [(q, len(Queue(q, store.redis))) for q in queue_names(store.redis)]
    if session.json:
        emit_json([{"queue": q, "length": n} for q, n in rows])
    else:
        click.echo(table(rows, ["QUEUE", "LENGTH"]) if rows else "no queues")


@queue_group.command("purge")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_session
def purge_command(session: Session, name: str, yes: bool) -> None:
    """Remove every item queued in NAME."""
    queue = _queue(session, name)
    asked_about = None  # with --yes, everything; else only what was counted: items enqueued meanwhile stay
    if not yes:
        with user_errors():
            asked_about = len(queue)
        if not asked_about:
            note(f"queue {name!r} is empty; nothing to remove")
            return
        if not sys.stdin.isatty():
            raise CliError(f"purge removes all {asked_about:,} item(s) from {name!r}; pass --yes to confirm "
                           "(there is no terminal to ask)")  # fmt: skip
        # Read here rather than by click.confirm, which calls end of input an abort (exit 130, Ctrl-C's code).
        click.echo(f"remove all {asked_about:,} item(s) from {name!r}? [y/N]: ", err=True, nl=False)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CliError(f"nothing removed from {name!r} (not confirmed; --yes skips the question)")
    with user_errors():
        note(f"removed {queue.purge(first=asked_about)} item(s) from {name!r}")
