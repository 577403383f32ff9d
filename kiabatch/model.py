"""The batch data model shared by every backend (plain data, no I/O)."""

from __future__ import annotations

import io
import json
import re
import secrets
import string
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from .errors import KiabatchError, UsageError

if TYPE_CHECKING:
    from .results_store import ObjectRef, ResultsStore

#: Batch ids are DNS-1123 labels short enough to name a Job (and a CronJob's Jobs).
MAX_BATCH_ID = 52
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ALPHABET = string.ascii_lowercase + string.digits


class State(StrEnum):
    """Where a batch is in its life (stored as its plain text value)."""

    #: Written; no task has claimed items yet.
    QUEUED = "queued"
    #: Tasks have claimed items (or are claiming them).
    RUNNING = "running"
    #: Stopped before its end (Ctrl-C, SIGTERM, a runner that died): ``kiabatch resume`` finishes it.
    INTERRUPTED = "interrupted"
    #: Every item succeeded.
    SUCCEEDED = "succeeded"
    #: Finished with failed items (or a deadline, or a Job that failed).
    FAILED = "failed"


QUEUED, RUNNING, INTERRUPTED, SUCCEEDED, FAILED = State
TERMINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED})


def validate_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if it is a DNS-1123 label of at most 52 characters."""
    if len(batch_id) > MAX_BATCH_ID or not _DNS_LABEL.match(batch_id):
        raise UsageError(
            f"bad batch id {batch_id!r}: must be at most {MAX_BATCH_ID} lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return batch_id


def new_batch_id(prefix: str) -> str:
    """A fresh id such as ``pi-x7k2p``, its prefix cut to fit."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "batch"
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(5))
    return validate_batch_id(f"{cleaned[: MAX_BATCH_ID - 6].rstrip('-')}-{suffix}")


def validate_queue_name(name: str) -> str:
    """Queue names are 1-200 printable characters without braces (they form a hash tag)."""
    if not name or len(name) > 200 or any(c in name for c in "{}") or not name.isprintable() or name.strip() != name:
        raise UsageError(f"bad queue name {name!r}: use 1-200 printable characters, no braces or edge spaces")
    return name


@dataclass(frozen=True)
class WorkerSpec:
    """How a task runs the unmodified worker program on each of its items."""

    #: argv template; see ``kiabatch.templates``.
    command: list[str]
    #: Feed the item's text on standard input.
    stdin: bool = False
    #: Exit codes that fail an item at once, without retries.
    non_retriable_exit_codes: tuple[int, ...] = ()
    #: Container image of the worker on Kubernetes (None: the kiabatch image).
    image: str | None = None
    #: Extra environment variables for the worker.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def result_from_output_file(self) -> bool:
        """The result is the ``{output}`` file when the command names one, else stdout."""
        from .templates import placeholders

        return "output" in placeholders(self.command)

    def to_json(self) -> str:
        """Serialise for the batch meta hash."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerSpec:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["non_retriable_exit_codes"] = tuple(data.get("non_retriable_exit_codes", ()))
        return cls(**data)


@dataclass(frozen=True)
class BatchSpec:
    """Everything that defines a batch; stored in its meta hash."""

    id: str
    workload: str
    worker: WorkerSpec
    tasks: int
    parallelism: int
    chunk: int
    retries: int
    total: int
    created_at: float
    ttl: int
    backend: str = "local"
    #: Workload options (e.g. ``{"digits": 5000}``), used by its reduce step.
    options: dict[str, Any] = field(default_factory=dict)
    #: Batch deadline in seconds (activeDeadlineSeconds), None for none.
    deadline: float | None = None
    #: Per-attempt time limit in seconds, None for none.
    task_timeout: float | None = None
    #: Where the items came from: "items" or "queue:NAME".
    source: str = "items"
    #: Working directory of local workers.
    cwd: str = ""
    #: Kubernetes namespace, for batches on that backend.
    namespace: str = ""
    #: The schedule and run that started this batch ("" for a one-off submit).
    schedule: str = ""
    run: str = ""
    #: Results store URL (``s3://bucket/prefix``, ``file:///path``; "" keeps every result in Redis).
    results_to: str = ""
    #: S3 endpoint of a non-AWS store ("" for AWS's own).
    s3_endpoint: str = ""
    #: With a results store, results larger than this many bytes (and every {output} file) go to it.
    inline_limit: int = 64 * 1024

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for HSET (None values are left out)."""
        raw = asdict(self)
        raw["worker"] = self.worker.to_json()
        raw["options"] = json.dumps(self.options, separators=(",", ":"))
        return {key: str(value) for key, value in raw.items() if value is not None}

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> BatchSpec:
        """Inverse of :meth:`to_fields` (extra fields such as state are ignored)."""
        data = {key.decode(): value.decode() for key, value in raw.items()}

        def number(name: str, kind: type = int) -> Any:
            return kind(data[name]) if data.get(name) not in (None, "") else None

        return cls(
            id=data["id"],
            workload=data["workload"],
            worker=WorkerSpec.from_json(data["worker"]),
            tasks=number("tasks"),
            parallelism=number("parallelism"),
            chunk=number("chunk"),
            retries=number("retries"),
            total=number("total"),
            created_at=number("created_at", float),
            ttl=number("ttl"),
            backend=data.get("backend", "local"),
            options=json.loads(data.get("options") or "{}"),
            deadline=number("deadline", float),
            task_timeout=number("task_timeout", float),
            source=data.get("source", "items"),
            cwd=data.get("cwd", ""),
            namespace=data.get("namespace", ""),
            schedule=data.get("schedule", ""),
            run=data.get("run", ""),
            results_to=data.get("results_to", ""),
            s3_endpoint=data.get("s3_endpoint", ""),
            inline_limit=number("inline_limit") if data.get("inline_limit") else 64 * 1024,
        )


@dataclass(frozen=True)
class Progress:
    """Item counters of a batch, read in O(1)."""

    total: int
    done: int
    failed: int
    running: int

    @property
    def settled(self) -> int:
        """Items whose outcome is final."""
        return self.done + self.failed

    @property
    def pending(self) -> int:
        """Items neither settled nor running."""
        return max(0, self.total - self.settled - self.running)


@dataclass(frozen=True)
class Status:
    """A batch's state and progress at one moment."""

    id: str
    state: State
    progress: Progress
    workload: str
    backend: str
    tasks: int
    parallelism: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    source: str = "items"
    #: Who runs a local batch (``pid N on HOST``), as its runner recorded it ("" if none ever ran).
    runner: str = ""
    #: The schedule that started it ("" for a one-off submit).
    schedule: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once every item is settled."""
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = asdict(self)
        data["progress"] = asdict(self.progress)
        return data


@dataclass(frozen=True)
class ItemResult:
    """The result of one successful item.

    A result kept in Redis is in ``inline``; one in the batch's results store is
    described by ``ref`` and fetched (and checked against its sha256) by
    :meth:`read`, :meth:`open` or the first use of :attr:`result`.
    """

    index: int
    position: int
    item: Any
    inline: bytes
    exit_code: int
    duration: float
    attempt: int
    #: Where the result is stored, when it is an object (else None).
    ref: ObjectRef | None = None
    store: ResultsStore | None = field(default=None, repr=False, compare=False)

    @cached_property
    def result(self) -> bytes:
        """The result's bytes (downloaded and verified once, for a stored result)."""
        return self.read()

    @property
    def text(self) -> str:
        """The result decoded as UTF-8 (undecodable bytes replaced)."""
        return self.result.decode("utf-8", errors="replace")

    @property
    def size(self) -> int:
        """The result's size in bytes (without downloading it)."""
        return self.ref.size if self.ref is not None else len(self.inline)

    @property
    def url(self) -> str | None:
        """The stored object's URL (``s3://bucket/prefix/...``), or None for a result kept in Redis."""
        if self.ref is None:
            return None
        return self.store.object_url(self.ref.key) if self.store is not None else self.ref.key

    def read(self) -> bytes:
        """The result's bytes; a stored object is downloaded and its size and sha256 checked."""
        if self.ref is None:
            return self.inline
        return self._store().read(self.ref)

    def open(self) -> IO[bytes]:
        """A binary file object with the result (streamed and checked for a stored object)."""
        if self.ref is None:
            return io.BytesIO(self.inline)
        return self._store().open(self.ref)

    def _store(self) -> ResultsStore:
        if self.store is None:
            raise KiabatchError(f"item {self.index}:{self.position} is stored as {self.ref.key!r} "  # type: ignore[union-attr]
                                "but its batch names no results store")  # fmt: skip
        return self.store


@dataclass(frozen=True)
class FailedItem:
    """A dead-lettered item: it failed on every attempt (or could not be retried)."""

    index: int
    position: int
    item: Any
    exit_code: int | None
    reason: str
    stderr: str
    attempts: int
