"""What a workload is: how to turn user options into items plus a worker command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..model import ItemResult, WorkerSpec


@dataclass(frozen=True)
class Runtime:
    """How a backend's workers start kiabatch's worker programs.

    Locally: this interpreter and the program's path. In the kiabatch image the
    programs are commands on PATH (``interpreter`` is None).
    """

    workers_dir: str
    interpreter: str | None = None

    def worker_command(self, name: str) -> list[str]:
        """argv prefix that runs worker program ``name``."""
        if self.interpreter is None:
            return [name]
        return [self.interpreter, f"{self.workers_dir}/{name}"]


@dataclass(frozen=True)
class Plan:
    """A workload's answer: the items, the worker, and how to cut tasks."""

    items: list[Any]
    worker: WorkerSpec
    #: Options kept with the batch for the reduce step.
    options: dict[str, Any] = field(default_factory=dict)
    #: Items per task (None: derive from ``tasks``, else 1).
    chunk: int | None = None
    #: Number of tasks wanted (None: one per chunk).
    tasks: int | None = None


@runtime_checkable
class Workload(Protocol):
    """A named kind of batch. Optional hooks: ``prepare`` and ``reduce``."""

    name: str
    description: str
    #: True if the workload runs the caller's command on the caller's items (exec).
    takes_command: bool
    #: Keyword options of its own that ``submit`` passes to :meth:`plan` (e.g. ``digits``).
    option_names: tuple[str, ...]

    def plan(self, runtime: Runtime, *, parallel: int, tasks: int | None, **options: Any) -> Plan:
        """Validate ``options`` (raise UsageError) and describe the batch."""
        ...


@runtime_checkable
class Reducible(Protocol):
    """A workload whose results combine into one answer, client-side."""

    def prepare(self, options: dict[str, Any]) -> Any:
        """Work that can overlap the map step (run in a thread while tasks run)."""
        ...

    def reduce(self, results: list[ItemResult], options: dict[str, Any], prepared: Any) -> str:
        """Combine the results (in index order) into the batch's answer."""
        ...


def local_runtime() -> Runtime:
    """The runtime of the local backend: this interpreter, the installed workers."""
    import sys

    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_workers", here.parent / "workers"):
        if candidate.is_dir():
            return Runtime(workers_dir=str(candidate), interpreter=sys.executable)
    raise FileNotFoundError(f"kiabatch's worker programs are missing (looked in {here / '_workers'})")
