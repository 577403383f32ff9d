"""The generic workload: run any program once per item."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
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
    description = "run any command once per item ({item}, {FIELD}, {input}, {output}, stdin)"

    def plan(
        self,
        runtime: Runtime,
        *,
        parallel: int,
        tasks: int | None,
        command: str | Sequence[str] | None = None,
        items: Sequence[Any] | None = None,
        stdin: bool = False,
        non_retriable_exit_codes: Sequence[int] = (),
        image: str | None = None,
        env: dict[str, str] | None = None,
        chunk: int | None = None,
        **unknown: Any,
    ) -> Plan:
        """Items are given by the caller; the worker is their command template."""
        del runtime, parallel  # the command names its own program
        if unknown:
            raise UsageError(f"unknown option(s) for workload exec: {', '.join(sorted(unknown))}")
        if command is None:
            raise UsageError("the exec workload needs a command, e.g. --command 'python my_worker.py {item}'")
        argv = parse_command(command)
        values = list(items or [])
        templates.check_items(argv, values)
        for code in non_retriable_exit_codes:
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
                raise UsageError(f"non-retriable exit code {code!r} must be an integer from 1 to 255")
        worker = WorkerSpec(
            command=argv,
            stdin=stdin,
            non_retriable_exit_codes=tuple(sorted(set(non_retriable_exit_codes))),
            image=image,
            env=dict(env or {}),
        )
        return Plan(items=values, worker=worker, chunk=chunk, tasks=tasks)
