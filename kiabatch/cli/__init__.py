"""The ``kiabatch`` command line.

Exit codes: 0 every item succeeded; 1 some items failed (they are listed);
2 usage error (bad option, bad item, unknown batch, an output that cannot be
written); 3 Redis or the cluster cannot be reached; 130 interrupted (the batch
can be resumed); 141 the reader of the output went away (``| head``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Any

import click

from .. import settings
from .._version import __version__
from ..errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_UNREACHABLE, EXIT_USAGE, KiabatchError
from ..text import printable
from .context import CliError, Session, user_errors

#: Every command: name -> "module:attribute" under kiabatch.cli. A command's module is
#: imported only when that command runs (or its help is shown), so ``kiabatch status``
#: never loads the Kubernetes client and ``--version`` loads nothing at all.
COMMANDS = {
    "dashboard": "dashboard:dashboard_group",
    "delete": "manage:delete_command",
    "gc": "manage:gc_command",
    "list": "inspect:list_command",
    "logs": "inspect:logs_command",
    "queue": "queue:queue_group",
    "redis": "redis:redis_group",
    "render": "submit:render_group",
    "results": "inspect:results_command",
    "resume": "manage:resume_command",
    "scale": "manage:scale_command",
    "schedule": "schedule:schedule_group",
    "scheduler": "schedule:scheduler_command",
    "secret": "secret:secret_group",
    "server": "server:server_group",
    "status": "inspect:status_command",
    "submit": "submit:submit_group",
    "task": "task:task_group",
}


class KiabatchGroup(click.Group):
    """The root group: loads commands lazily, prints every error as one line, exits with kiabatch's codes.

    Doing this in ``main`` (not only in the console-script wrapper) gives
    ``CliRunner`` tests exactly what a user's shell sees.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name].split(":")
        return getattr(import_module(f".{module}", __name__), attribute)

    # Output is written while the arguments are parsed (--help, --version) and while a command
    # runs: a reader that went away is caught in both, before click, which would exit 1
    # ("items failed" here) for it.

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _reader_gone():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _reader_gone():
            return super().invoke(ctx)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        kwargs.setdefault("prog_name", "kiabatch")
        sys.exit(_run(lambda: super(KiabatchGroup, self).main(*args, standalone_mode=False, **kwargs)))


def _error(message: str, code: int) -> int:
    """Print ``message`` as the one error line (control characters escaped) and return ``code``."""
    click.echo(f"kiabatch: error: {printable(message)}", err=True)
    return code


def _run(invoke: Callable[[], Any]) -> int:
    try:
        outcome = invoke()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except CliError as exc:
        return _error(exc.format_message(), exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "kiabatch"
        return _error(f"{exc.format_message()} (see '{command} --help')", EXIT_USAGE)
    except click.ClickException as exc:
        return _error(exc.format_message(), exc.exit_code)
    except click.Abort:
        click.echo("kiabatch: aborted", err=True)
        return EXIT_INTERRUPTED
    except KiabatchError as exc:
        return _error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        click.echo("kiabatch: interrupted", err=True)
        return EXIT_INTERRUPTED
    except UnicodeEncodeError:  # a name or value with bytes the terminal could not decode, caught late
        return _error("an argument holds bytes that are not valid text (UTF-8); names and values must be text",
                      EXIT_USAGE)  # fmt: skip
    except Exception as exc:  # a Redis error (imported only now: --version must not load redis)
        import redis

        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            # Redis went away in the middle of a command (connecting is checked, and explained, earlier).
            return _error(f"lost the connection to Redis: {exc}", EXIT_UNREACHABLE)
        if isinstance(exc, redis.RedisError):
            return _error(f"Redis refused a command: {exc}", EXIT_UNREACHABLE)
        if isinstance(exc, OSError):  # the system refused: a full disk under the output, an I/O error
            _quiet_stdout()
            where = f": {exc.filename}" if exc.filename else " (writing the output)"
            return _error(f"{exc.strerror or exc}{where}", EXIT_USAGE)
        raise
    return outcome if isinstance(outcome, int) else 0


@contextlib.contextmanager
def _reader_gone() -> Iterator[None]:
    """A broken pipe on the output becomes exit 141 (128 + SIGPIPE), quietly."""
    try:
        yield
    except BrokenPipeError:
        _quiet_stdout()
        raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered must not fail again at exit ("Exception ignored")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (a test's stream)


@click.group(cls=KiabatchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--redis-url",
    envvar=settings.ENV_REDIS_URL,
    metavar="URL",
    help="Redis to use (redis://, rediss://, unix://); default: the embedded server. Env: KIABATCH_REDIS_URL.",
)
@click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="How to print results and statuses.",
)
@click.version_option(__version__, prog_name="kiabatch")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, output: str) -> None:
    """Run large parallel batch jobs through a Redis work queue, locally or on Kubernetes.

    \b
    Quick start:
      kiabatch submit pi --digits 5000 --parallel 3
      kiabatch submit --command 'wc -c {item}' --lines files.txt -p 4
    """
    if redis_url:
        from ..connection import validate_url

        with user_errors():
            validate_url(redis_url)
    ctx.obj = Session(redis_url=redis_url or None, output=output)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.stdout = whole_writes(sys.stdout)
    sys.stderr = whole_writes(sys.stderr)
    cli.main(args=argv)


def whole_writes(stream: Any) -> Any:
    """``stream``, made to write everything it is given.

    Under PYTHONUNBUFFERED (or ``python -u``; many images set it) a standard
    stream's binary layer is a raw file, and one write(2) to a pipe that a signal
    interrupts (Ctrl-Z then ``fg``, a frozen process) writes only part of a large
    buffer; the text layer, and code writing to ``.buffer``, drop the rest and exit 0.
    A buffered writer finishes partial writes; line buffering keeps output prompt.
    """
    if not isinstance(getattr(stream, "buffer", None), io.RawIOBase):
        return stream  # buffered already (the default), or not a real stream (a test's)
    encoding, errors = stream.encoding, stream.errors
    raw = stream.detach()  # the old wrapper must not close the file when it is collected
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors=errors, line_buffering=True)


__all__ = ["cli", "main"]
