"""The generic workload: run any program once per item."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import templates
from ..errors import UsageError
from ..model import WorkerSpec
from .base import Plan, Runtime


def parse_command(command: str | Sequence[str]) -> list[str]:
    """A command template as an argv list; a string is split like a POSIX shell would (no expansion)."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise UsageError(f"bad --command {command!r}: {exc}") from None
    else:
        argv = [str(part) for part in command]
    templates.validate(argv)
    return argv


class ExecWorkload:
    """``kiabatch submit --command 'prog {item}'``: your own program, once per item."""

    name = "exec"
    #: Takes the batch's items and command (submit's ``items``, ``command``, ``stdin``, ...).
    takes_command = True
    #: No options of its own.
    option_names: tuple[str, ...] = ()
    description = "run any command once per item ({item}, {FIELD}, {input}, {output}, stdin)"

    def plan(
        self,
        runtime: Runtime,
        *,
        parallel: int,
        tasks: int | None,
        command: str | Sequence[str] | None = None,
        items: Iterable[Any] | None = None,
        stdin: bool = False,
        non_retriable_exit_codes: Sequence[int] = (),
        image: str | None = None,
        env: Mapping[str, str] | None = None,
        chunk: int | None = None,
        **unknown: Any,
    ) -> Plan:
        """Items are given by the caller (checked lazily, as they are written); the worker is their command."""
        del runtime, parallel  # the command names its own program
        if unknown:
            raise UsageError(f"unknown option(s) for workload exec: {', '.join(sorted(unknown))}")
        if command is None:
            raise UsageError("the exec workload needs a command, e.g. --command 'python my_worker.py {item}'")
        argv = parse_command(command)
        for code in non_retriable_exit_codes:
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
                raise UsageError(f"non-retriable exit code {code!r} must be an integer from 1 to 255")
        worker = WorkerSpec(
            command=argv,
            stdin=stdin,
            non_retriable_exit_codes=tuple(sorted(set(non_retriable_exit_codes))),
            image=image,
            env=check_env(env or {}),
        )
        values = templates.checked_items(argv, items or ())
        return Plan(items=values, worker=worker, chunk=chunk, tasks=tasks)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """Worker environment variables: valid names, text values without NUL bytes."""
    checked = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise UsageError(
                f"environment variable name {name!r:.60} is not valid (letters, digits, _; not first a digit)"
            )
        if not isinstance(value, str) or "\0" in value:
            raise UsageError(f"the value of environment variable {name} must be text without NUL bytes")
        checked[name] = value
    return checked
