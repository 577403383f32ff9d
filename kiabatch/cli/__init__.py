"""The ``kiabatch`` command line.

Exit codes: 0 every item succeeded; 1 some items failed (they are listed);
2 usage error (bad option, bad item, unknown batch); 3 Redis or the cluster
cannot be reached; 130 interrupted (the batch can be resumed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import redis as redis_py  # not "redis": that name is the package's own redis command module

from .. import settings
from .._version import __version__
from ..connection import validate_url
from ..errors import EXIT_INTERRUPTED, EXIT_UNREACHABLE, EXIT_USAGE, KiabatchError
from ..text import printable
from .context import CliError, Session, user_errors


class KiabatchGroup(click.Group):
    """The root group: prints every error as one line and exits with kiabatch's codes.

    Doing this in ``main`` (not only in the console-script wrapper) gives
    ``CliRunner`` tests exactly what a user's shell sees.
    """

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
    except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
        # Redis went away in the middle of a command (connecting is checked, and explained, earlier).
        return _error(f"lost the connection to Redis: {exc}", EXIT_UNREACHABLE)
    except redis_py.RedisError as exc:
        return _error(f"Redis refused a command: {exc}", EXIT_UNREACHABLE)
    except BrokenPipeError:
        return 0
    return outcome if isinstance(outcome, int) else 0


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
        with user_errors():
            validate_url(redis_url)
    ctx.obj = Session(redis_url=redis_url or None, output=output)


def _register() -> None:
    from . import inspect, manage, queue, schedule, secret, server, submit, task
    from . import redis as redis_commands

    for module in (submit, inspect, manage, queue, server, task, secret, redis_commands, schedule):
        module.register(cli)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv)


__all__ = ["cli", "main"]
