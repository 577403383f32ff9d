"""The contract every backend implements, and the small value carrying a run's callbacks.

A backend runs a batch's tasks somewhere (``local``: subprocesses of this machine;
``kubernetes``: one Indexed Job). Everything above this layer (``submit``,
``Batch``, the CLI) talks to a :class:`Backend` and never asks which one it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..model import BatchSpec, Progress, Status
from ..store import Store
from ..workloads.base import Runtime


@dataclass(frozen=True)
class RunHooks:
    """Callbacks a backend calls while it runs or follows a batch (all optional)."""

    #: The batch's progress changed, with a short note on what blocks it ("waiting for admission"), or "".
    on_update: Callable[[Progress, str], None] | None = None
    #: Called once, when the first worker has started (π starts its reduce preparation then).
    on_running: Callable[[], None] | None = None
    #: Something to tell the user once, while the run goes on ("no pod has started after 2m: ...").
    on_warning: Callable[[str], None] | None = None

    def update(self, progress: Progress, note: str = "") -> None:
        """Report progress (no-op without a callback)."""
        if self.on_update is not None:
            self.on_update(progress, note)

    def warn(self, message: str) -> None:
        """Tell the user ``message`` (no-op without a callback)."""
        if self.on_warning is not None:
            self.on_warning(message)

    def running(self) -> None:
        """Report that workers run (no-op without a callback)."""
        if self.on_running is not None:
            self.on_running()


@dataclass(frozen=True)
class LogChunk:
    """Part of a batch's worker logs."""

    #: Which task and attempt/pod/container the text is from.
    label: str
    data: bytes
    #: The completion index it belongs to.
    index: int
    #: The attempt number, where the backend knows it.
    attempt: int | None = None
    #: True: one complete log shown as a block under its label; False: a piece of a stream, each line labelled.
    whole: bool = True


class Backend(Protocol):
    """What ``submit``, ``Batch`` and the CLI need from a place that runs tasks."""

    #: "local" or "kubernetes", as stored in a batch's meta.
    name: str

    def runtime(self) -> Runtime:
        """How this backend's workers start kiabatch's own worker programs (e.g. ``pi``)."""
        ...

    def preflight(self, store: Store) -> None:
        """Check everything that can be checked before anything is written (raise a KiabatchError)."""
        ...

    def task_limit(self, parallelism: int) -> int:
        """Most tasks one batch may have here at ``parallelism`` (more items share tasks: a chunk is chosen)."""
        ...

    def check(self, spec: BatchSpec) -> None:
        """Refuse (UsageError) a batch this backend cannot run; called with its shape before it is committed."""
        ...

    def launch(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Start a batch just written to Redis; with ``wait``, run or follow it to its end."""
        ...

    def attach(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Finish a batch started before by a run that died (join what runs, start what does not)."""
        ...

    def resume(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Run a stopped batch's unsettled tasks again."""
        ...

    def wait(self, store: Store, batch_id: str, *, hooks: RunHooks, timeout: float | None = None) -> Status:
        """Block until the batch ends; its final status. Raises if it stops without ending."""
        ...

    def status_detail(self, store: Store, status: Status, *, read_only: bool = False) -> Status:
        """``status`` with what only the backend knows (a runner gone, the Job's conditions, pod problems).

        ``read_only`` never writes (otherwise outcomes the backend knows of and Redis
        misses may be settled in Redis).
        """
        ...

    def list_detail(self, store: Store, status: Status) -> Status:
        """A cheap form of :meth:`status_detail` for ``list`` (never fails on an unreachable cluster)."""
        ...

    def delete(self, store: Store, spec: BatchSpec) -> None:
        """Stop the batch's workers and remove what the backend made for it (not its Redis keys)."""
        ...

    def logs(
        self, store: Store, batch_id: str, *, index: int | None = None, follow: bool = False
    ) -> Iterator[LogChunk]:
        """The workers' logs, oldest first; ``follow`` keeps streaming where the backend can."""
        ...

    def scale(self, store: Store, batch_id: str, parallel: int) -> None:
        """Change how many tasks of a running batch run at once."""
        ...
