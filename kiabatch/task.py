"""The per-task plan every backend runs: claim -> run the worker -> report.

The *task directory* is the contract between the three steps (on Kubernetes, the
emptyDir shared by the init container, the worker and the reporter sidecar)::

    task.json              batch, index, attempt, claim fingerprint, item count
    run.sh                 the runner (static text; see kiabatch/data/run.sh)
    items/00000/item.json  the item as JSON                     ({input})
    items/00000/argv/0000  the worker's argv, one file per argument
    items/00000/stdin      the item's text, if the worker reads stdin
    items/00000/invalid    why the item cannot run (e.g. a missing field)
    items/00000/started    written by run.sh before the worker starts
    items/00000/stdout     the worker's stdout (the result, unless {output} is used)
    items/00000/stderr     the worker's stderr
    items/00000/output     the declared output file                 ({output})
    items/00000/exit_code  the worker's exit status
    done                   the task's exit status, once every item ran
    reported               written by the reporter once Redis has the outcome

``kiabatch task claim`` and ``kiabatch task report`` are thin wrappers around
:func:`claim_into` and :func:`report_from`; the local backend calls them in process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import items as items_mod
from . import templates
from .errors import UsageError
from .model import BatchSpec
from .store import Claim, ItemOutcome, ReportResult, Store

RUNNER_NAME = "run.sh"
TASK_FILE = "task.json"
DONE_FILE = "done"
REPORTED_FILE = "reported"
#: Exit status run.sh uses when the reporter never confirmed (Kubernetes only).
EXIT_REPORT_TIMEOUT = 75


def runner_script() -> str:
    """The text of run.sh."""
    return resources.files("kiabatch").joinpath("data", RUNNER_NAME).read_text()


@dataclass(frozen=True)
class TaskInfo:
    """The contents of task.json."""

    batch: str
    index: int
    attempt: int
    claim_sha1: str
    status: str  # "ok", or "final" when the index was already settled
    items: int
    output_file: bool
    non_retriable_exit_codes: tuple[int, ...]

    @classmethod
    def load(cls, directory: Path) -> TaskInfo:
        """Read task.json from a task directory."""
        data = json.loads((directory / TASK_FILE).read_text())
        data["non_retriable_exit_codes"] = tuple(data["non_retriable_exit_codes"])
        return cls(**data)


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def item_dir(directory: Path, position: int) -> Path:
    """Directory of item ``position`` inside a task directory."""
    return directory / "items" / f"{position:05d}"


def prepare(directory: Path, spec: BatchSpec, index: int, claim: Claim) -> TaskInfo:
    """Lay out the task directory for ``claim`` (idempotent for a given claim)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DONE_FILE).unlink(missing_ok=True)
    (directory / REPORTED_FILE).unlink(missing_ok=True)
    runner = directory / RUNNER_NAME
    _write(runner, runner_script())
    runner.chmod(0o755)
    values = claim.items if claim.status == "ok" else []
    for position, value in enumerate(values):
        where = item_dir(directory, position)
        (where / "argv").mkdir(parents=True, exist_ok=True)
        input_path = where / "item.json"
        _write(input_path, items_mod.encode(value))
        try:
            argv = templates.render(
                spec.worker.command,
                value,
                input_path=str(input_path),
                output_path=str(where / "output"),
                index=index,
            )
        except UsageError as exc:
            _write(where / "invalid", str(exc))
            continue
        for number, argument in enumerate(argv):
            _write(where / "argv" / f"{number:04d}", argument)
        if spec.worker.stdin:
            _write(where / "stdin", items_mod.text(value))
    info = TaskInfo(
        batch=spec.id,
        index=index,
        attempt=claim.attempt,
        claim_sha1=claim.sha1,
        status=claim.status,
        items=len(values),
        output_file=spec.worker.result_from_output_file,
        non_retriable_exit_codes=tuple(spec.worker.non_retriable_exit_codes),
    )
    _write(directory / TASK_FILE, json.dumps(info.__dict__))
    if claim.status != "ok":
        _write(directory / DONE_FILE, "0\n")
    return info


def claim_into(store: Store, batch_id: str, index: int, directory: Path, *, spec: BatchSpec | None = None) -> TaskInfo:
    """Claim task ``index`` of ``batch_id`` and lay its items out in ``directory``."""
    spec = spec or store.spec(batch_id)
    claim = store.claim(batch_id, index)
    return prepare(directory, spec, index, claim)


def _read_code(path: Path) -> int | None:
    """An exit status file's value; None while it is missing or half-written."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def done_status(directory: Path) -> int | None:
    """The task's exit status once run.sh finished, else None."""
    return _read_code(directory / DONE_FILE)


def _tail(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read()
    except OSError:
        return b""


def collect(directory: Path, info: TaskInfo, *, killed_reason: str = "") -> tuple[list[ItemOutcome], bool, bytes]:
    """Read the outcome of every item: (outcomes, non_retriable, stderr tail).

    ``killed_reason`` explains items that have no exit status because the
    runner was stopped (a time limit); they count as failed.
    """
    from .store import LOG_TAIL

    outcomes: list[ItemOutcome] = []
    non_retriable = False
    logs: list[bytes] = []
    for position in range(info.items):
        where = item_dir(directory, position)
        stderr = _tail(where / "stderr", LOG_TAIL)
        if info.items > 1:
            logs.append(f"--- item {position} ---\n".encode())
        logs.append(stderr)
        if (where / "invalid").exists():
            reason = (where / "invalid").read_text()
            outcomes.append(ItemOutcome(ok=False, exit_code=None, duration=0.0, reason=reason, stderr=reason.encode()))
            non_retriable = True
            continue
        code = _read_code(where / "exit_code")
        duration = _duration(where)
        if code is None:
            reason = killed_reason or "the worker did not finish"
            outcomes.append(ItemOutcome(ok=False, exit_code=None, duration=duration, reason=reason, stderr=stderr))
            continue
        if code != 0:
            non_retriable = non_retriable or code in info.non_retriable_exit_codes
            reason = f"exited with status {code}"
            outcomes.append(ItemOutcome(ok=False, exit_code=code, duration=duration, reason=reason, stderr=stderr))
            continue
        result_path = where / ("output" if info.output_file else "stdout")
        try:
            result = result_path.read_bytes()
        except OSError:
            reason = "the worker exited 0 but did not write its {output} file"
            outcomes.append(ItemOutcome(ok=False, exit_code=0, duration=duration, reason=reason, stderr=stderr))
            continue
        outcomes.append(ItemOutcome(ok=True, exit_code=0, duration=duration, result=result, stderr=stderr))
    return outcomes, non_retriable, b"".join(logs)


def _duration(where: Path) -> float:
    try:
        started = (where / "started").stat().st_mtime
        ended = (where / "exit_code").stat().st_mtime
    except OSError:
        return 0.0
    return max(0.0, ended - started)


def report_from(store: Store, directory: Path, *, killed_reason: str = "") -> ReportResult | None:
    """Report the task laid out in ``directory`` and write ``reported``.

    Returns None when there was nothing to report (the index was already settled).
    """
    info = TaskInfo.load(directory)
    result = None
    if info.status == "ok":
        outcomes, non_retriable, stderr = collect(directory, info, killed_reason=killed_reason)
        claimed = [
            items_mod.decode(item_dir(directory, p).joinpath("item.json").read_bytes()) for p in range(info.items)
        ]
        result = store.report(
            info.batch,
            info.index,
            info.attempt,
            info.claim_sha1,
            outcomes,
            claimed_items=claimed,
            non_retriable=non_retriable,
            stderr_tail=stderr,
        )
    _write(directory / REPORTED_FILE, f"{time.time()}\n")
    return result


def await_and_report(store: Store, directory: Path, *, poll: float = 0.2) -> ReportResult | None:
    """Sidecar mode: wait for run.sh to finish, then report (used on Kubernetes)."""
    while done_status(directory) is None:
        time.sleep(poll)
    if (directory / REPORTED_FILE).exists():
        return None
    return report_from(store, directory)


def task_env(spec: BatchSpec, index: int, directory: Path) -> dict[str, str]:
    """Environment variables the runner and worker see (besides the inherited ones)."""
    env: dict[str, Any] = {
        **spec.worker.env,
        "JOB_COMPLETION_INDEX": str(index),
        "KIABATCH_BATCH": spec.id,
        "KIABATCH_TASK_DIR": str(directory),
    }
    return {key: str(value) for key, value in env.items()}
