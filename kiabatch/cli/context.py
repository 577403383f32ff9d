"""Shared CLI state: where Redis is, how to print, and error translation."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ..errors import EXIT_USAGE, KiabatchError

if TYPE_CHECKING:
    from ..batch import Batch
    from ..store import Store


class CliError(click.ClickException):
    """A user-facing error with kiabatch's exit code (printed as one line)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn kiabatch errors into one-line CLI errors with the documented exit code."""
    try:
        yield
    except KiabatchError as exc:
        raise CliError(str(exc), exc.exit_code) from None


@dataclass
class Session:
    """One invocation of the CLI: its global options (where Redis is, how to print) and the Store it opened."""

    redis_url: str | None = None
    output: str = "table"
    _store: Store | None = field(default=None, repr=False)

    def store(self, *, retry_seconds: float = 0.0) -> Store:
        """The Store for this invocation (connects on first use)."""
        if self._store is None:
            from ..batch import open_store

            with user_errors():
                self._store = open_store(self.redis_url, retry_seconds=retry_seconds)
        return self._store

    @property
    def json(self) -> bool:
        """True with ``--output json``."""
        return self.output == "json"


pass_session = click.make_pass_decorator(Session)


def open_batch(
    session: Session,
    batch_id: str,
    retry_seconds: float = 0.0,
    *,
    read_only: bool = False,
    replica_url: str | None = None,
) -> Batch:
    """The batch ``batch_id`` (UsageError, exit 2, if there is none).

    ``read_only``: through a replica and a client that never writes (see kiabatch/readonly.py).
    """
    from ..batch import Batch

    with user_errors():
        if read_only:
            from ..readonly import ReadOnlyBatch, open_read_only

            batch: Batch = ReadOnlyBatch(batch_id, open_read_only(session.redis_url, replica_url))
        else:
            batch = Batch(batch_id, session.store(retry_seconds=retry_seconds).redis)
        batch.store.meta(batch_id)
    return batch


def emit_json(data: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


def note(message: str) -> None:
    """A human message on stderr (stdout stays machine-readable)."""
    click.echo(message, err=True)
