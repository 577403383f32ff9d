"""What commands print: statuses, results and failures as text tables or JSON, and a batch's conclusion."""

from __future__ import annotations

import base64
import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from json.encoder import encode_basestring
from typing import Any

import click

from .. import items as items_mod
from .. import workloads
from ..batch import Batch
from ..errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE
from ..model import FailedItem, ItemResult, Status
from ..store import Store, claimed_items, failed_item, page_items
from ..text import printable, when
from .context import CliError, Session, emit_json, note, user_errors


def duration(status: Status) -> str:
    """How long the batch ran (so far)."""
    if not status.started_at:
        return "-"
    end = status.finished_at or time.time()
    return f"{end - status.started_at:.1f}s"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def progress_text(status: Status) -> str:
    """``7/10 done, 1 failed, 2 running``."""
    p = status.progress
    return f"{p.done}/{p.total} done, {p.failed} failed, {p.running} running"


def status_block(status: Status) -> str:
    """The detailed view of one batch."""
    lines = [
        ("batch", status.id),
        ("state", status.state),
        ("workload", status.workload),
        ("backend", status.backend),
        ("source", status.source),
        ("progress", progress_text(status)),
        ("tasks", f"{status.tasks} (parallelism {status.parallelism})"),
        ("created", when(status.created_at)),
        ("started", when(status.started_at)),
        ("finished", when(status.finished_at)),
        ("duration", duration(status)),
    ]
    for key, value in sorted(status.detail.items()):
        if isinstance(value, dict | list):
            value = (
                ", ".join(f"{k}={v}" for k, v in value.items())
                if isinstance(value, dict)
                else ", ".join(map(str, value))
            )
        lines.append((key.replace("_", " "), value))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {printable(v)}" for k, v in lines)


def status_rows(statuses: Sequence[Status]) -> str:
    """One line per batch."""
    headers = ["BATCH", "STATE", "WORKLOAD", "BACKEND", "DONE", "FAILED", "CREATED", "DURATION"]
    rows = [
        [s.id, s.state, s.workload, s.backend, f"{s.progress.done}/{s.progress.total}", s.progress.failed,
         when(s.created_at), duration(s)]
        for s in statuses
    ]  # fmt: skip
    if any("job_state" in s.detail for s in statuses):  # Kubernetes batches: joined with their Jobs
        headers.append("JOB")
        for row, status in zip(rows, statuses, strict=True):
            row.append(status.detail.get("job_state", "-"))
    return table(rows, headers)


def result_value(result: bytes) -> dict[str, Any]:
    """JSON form of a result: ``result`` text if UTF-8, else ``result_base64``."""
    try:
        return {"result": result.decode("utf-8")}
    except UnicodeDecodeError:
        return {"result_base64": base64.b64encode(result).decode()}


def result_dict(r: ItemResult) -> dict[str, Any]:
    """JSON form of one item result (a stored one is downloaded, checked, and its URL, size and sha256 added)."""
    stored = {} if r.ref is None else {"url": r.url, "size": r.ref.size, "sha256": r.ref.sha256,
                                       "content_type": r.ref.content_type}  # fmt: skip
    return {"index": r.index, "position": r.position, "item": r.item, "failed": False, "exit_code": r.exit_code,
            "duration": r.duration, "attempt": r.attempt, **stored, **result_value(r.read())}  # fmt: skip


def failed_dict(f: FailedItem) -> dict[str, Any]:
    """JSON form of one dead-lettered item."""
    return {"index": f.index, "position": f.position, "item": f.item, "failed": True, "exit_code": f.exit_code,
            "reason": f.reason, "attempts": f.attempts, "stderr": f.stderr}  # fmt: skip


def outcome_dict(outcome: ItemResult | FailedItem) -> dict[str, Any]:
    """JSON form of an item's outcome, whichever it is."""
    return result_dict(outcome) if isinstance(outcome, ItemResult) else failed_dict(outcome)


def result_text(result: bytes) -> str:
    """A result on one line: text with control characters escaped, or a byte count for binary."""
    try:
        text = result.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(result)} bytes, binary; use --json or --raw>"
    return printable(text.rstrip("\n"))


def outcome_line(outcome: ItemResult | FailedItem) -> str:
    """``ITEM<TAB>RESULT``, or ``ITEM<TAB>FAILED (exit N, attempts M): reason`` for a dead-lettered item."""
    item = printable(items_mod.text(outcome.item))
    if isinstance(outcome, ItemResult):
        ref = outcome.ref
        if ref is not None and not ref.content_type.startswith(("text/", "application/json")):
            return (
                f"{item}\t<{ref.size} bytes, {ref.content_type} at {printable(outcome.url)}; use --raw or --download>"
            )
        return f"{item}\t{result_text(outcome.read())}"
    code = "-" if outcome.exit_code is None else outcome.exit_code
    return f"{item}\tFAILED (exit {code}, attempts {outcome.attempts}): {printable(outcome.reason)}"


def print_failed(failed: Iterable[FailedItem]) -> None:
    """The dead-letter set on stderr, one item per line plus its last stderr line."""
    for f in failed:
        code = "-" if f.exit_code is None else f.exit_code
        item = printable(items_mod.text(f.item))
        click.echo(f"FAILED {item}: {printable(f.reason)} (exit {code}, attempts {f.attempts})", err=True)
        last = f.stderr.strip().splitlines()[-1:] if f.stderr else []
        if last and last[0] != f.reason:
            click.echo(f"       stderr: {printable(last[0][:200])}", err=True)


#: Dead-lettered items listed on stderr after the results (all of them are on stdout, marked).
_FAILED_SHOWN = 20


def table_lines(store: Store, batch_id: str) -> Iterator[str]:
    """``outcome_line`` of every settled item, straight from the raw pages (no objects per item: fast)."""
    text_of, safe = items_mod.text, printable
    for page in store.iter_pages(batch_id, details=False, ahead=True):
        results, failed, at = page.results, page.failed, 0
        for (index, count), values in zip(page.chosen, page_items(page), strict=True):
            for offset in range(count):
                result = results[at]
                if result is not None:
                    item = values[offset]
                    item = item if type(item) is str else text_of(item)
                    try:  # result_text, inlined for the common case: one line of printable text
                        shown = result.decode("utf-8").rstrip("\n")
                    except UnicodeDecodeError:
                        shown = result_text(result)
                    yield (f"{item if item.isprintable() else safe(item)}\t"
                           f"{shown if shown.isprintable() else safe(shown)}")  # fmt: skip
                elif failed[at] is not None:
                    yield outcome_line(failed_item(index, offset, failed[at]))
                at += 1


def json_lines(store: Store, batch_id: str) -> Iterator[str]:
    """``outcome_dict`` of every settled item as JSON text, spliced from the stored JSON (no re-encoding).

    Each result line is ``{"index", "position", "item", "failed": false, "exit_code",
    "duration", "attempt", "result" | "result_base64"}`` — the same as ``outcome_dict`` gives.
    """
    encode = json.JSONEncoder(ensure_ascii=False).encode
    string = encode_basestring  # the C function encode() calls for a str
    for page in store.iter_pages(batch_id, ahead=True):
        results, outcomes, failed, at = page.results, page.outcomes or [], page.failed, 0
        for (index, count), raw_claim in zip(page.chosen, page.claims, strict=True):
            # "[ITEM]": a one-item claim holds the item's own compact JSON text.
            values = [raw_claim[1:-1].decode()] if count == 1 and raw_claim else _claimed_json(raw_claim, count)
            for offset in range(count):
                result = results[at]
                if result is not None:
                    details = (outcomes[at] or b"{}")[1:-1].decode()
                    try:
                        shown = f'"result":{string(result.decode("utf-8"))}'
                    except UnicodeDecodeError:
                        shown = f'"result_base64":"{base64.b64encode(result).decode()}"'
                    yield (f'{{"index":{index},"position":{offset},"item":{values[offset]},"failed":false,'
                           f"{details}{',' if details else ''}{shown}}}")  # fmt: skip
                elif failed[at] is not None:
                    yield encode(failed_dict(failed_item(index, offset, failed[at])))
                at += 1


def _claimed_json(raw: bytes | None, count: int) -> list[str]:
    """Each claimed item's JSON text, re-encoded compactly (placeholders if the claim is gone)."""
    if not raw:
        return ["null"] * count
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    return [encode(value) for value in claimed_items(raw, count)]


def write_lines(lines: Iterable[str], block: int = 1000) -> None:
    """Write ``lines`` to stdout a block at a time (a million of them print in seconds, not minutes)."""
    out = sys.stdout
    for chunk in iter(lambda: list(itertools.islice(lines, block)), []):
        out.write("\n".join(chunk) + "\n")
    out.flush()


def conclude(session: Session, batch: Batch, *, reduce: bool | None, quiet: bool = False) -> int:
    """Print a finished batch's answer, or every item's outcome in order (failed ones marked).

    Returns the exit code: 0, or 1 when items failed (those are also listed on stderr).
    """
    with user_errors():
        status = batch.status()
        failed = batch.store.failed_count(batch.id)
        reducible = isinstance(workloads.get(status.workload), workloads.Reducible)
        if not quiet:
            note(f"batch {batch.id} {status.state}: {progress_text(status)} in {duration(status)}")
        if reduce and not reducible:
            raise CliError(f"workload {status.workload!r} has no reduce step", EXIT_USAGE)
        if reduce or (reduce is None and reducible and not failed):
            answer = batch.reduce()  # BatchFailedError (exit 1) if items failed
            if session.json:
                emit_json({"batch": batch.id, "answer": answer})
            else:
                click.echo(answer)
            return EXIT_OK
        if batch.store.meta(batch.id).get("results_to"):
            # Stored results are read (and checked) through their references: one object per item.
            encode = json.JSONEncoder(ensure_ascii=False, default=str).encode
            lines: Iterator[str] = (encode(outcome_dict(o)) if session.json else outcome_line(o)
                                    for o in batch.iter_outcomes())  # fmt: skip
        else:
            lines = json_lines(batch.store, batch.id) if session.json else table_lines(batch.store, batch.id)
        write_lines(lines)
        if failed:
            print_failed(itertools.islice(batch.store.iter_outcomes(batch.id, results=False), _FAILED_SHOWN))
            if failed > _FAILED_SHOWN:
                note(f"... and {failed - _FAILED_SHOWN} more failed item(s): kiabatch -o json results {batch.id}")
            return EXIT_ITEMS_FAILED
    return EXIT_OK
