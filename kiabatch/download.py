"""``results --download DIR``: one file per successful item, named by its position or one of its fields."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import UsageError
from .files import FILE_MODE
from .model import ItemResult
from .text import printable

#: Longest file name most file systems take, in bytes.
_MAX_NAME = 255


def file_name(result: ItemResult, name_from: str | None, chunked: bool) -> str:
    """The file name of ``result``: its position (``INDEX`` or ``INDEX-POSITION``), or its item's field."""
    if name_from is None:
        return f"{result.index}-{result.position}" if chunked else str(result.index)
    where = f"item {result.index}:{result.position}"
    if not isinstance(result.item, dict) or name_from not in result.item:
        raise UsageError(f"{where} has no field {name_from!r} to name its file (--name-from takes a field of "
                         "object items)")  # fmt: skip
    value = result.item[name_from]
    name = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if (
        name in ("", ".", "..")
        or "/" in name
        or not name.isprintable()
        or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME
    ):
        raise UsageError(
            f"{where}: its {name_from!r} value {printable(name)!r:.80} is not a file name (no '/', control "
            f"characters, '.' or '..'; 1 to {_MAX_NAME} bytes)"
        )
    return name


def download_results(
    results: Callable[[], Iterable[ItemResult]], directory: Path, *, name_from: str | None, chunked: bool
) -> int:
    """See :meth:`kiabatch.Batch.download`; ``results()`` streams the batch's results (it is read twice).

    Only the results the first pass checked are written: in a batch still running,
    an item that succeeds between the passes was never checked (its name could
    replace another item's file), so it waits for the next download.
    """
    # First pass: every name is checked and distinct before a byte is written.
    seen: dict[str, str] = {}
    checked: dict[tuple[int, int], str] = {}
    for result in results():
        name = file_name(result, name_from, chunked)
        where = f"{result.index}:{result.position}"
        if name in seen:
            raise UsageError(f"items {seen[name]} and {where} would both be written to {printable(name)!r:.80}; "
                             "choose a --name-from field whose values are distinct")  # fmt: skip
        seen[name] = where
        checked[(result.index, result.position)] = name
    del seen
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the download directory {directory}: {exc.strerror}") from None
    if not directory.is_dir():
        raise UsageError(f"the download directory {directory} is not a directory")
    written = 0
    for result in results():
        name = checked.get((result.index, result.position))
        if name is not None:
            _write_verified(directory, name, result)
            written += 1
    return written


def _write_verified(directory: Path, name: str, result: ItemResult) -> None:
    """Stream the result into a new temporary file, then rename it into place (never follows a link).

    The temporary name is random and created exclusively (mkstemp, mode 0600): it can
    be neither an item's file nor too long, and nothing already in DIR is removed.
    """
    fd, partial = tempfile.mkstemp(dir=directory, prefix=".kiabatch-", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as target, result.open() as source:
            shutil.copyfileobj(source, target, 1024 * 1024)
        os.chmod(partial, FILE_MODE)
        os.replace(partial, directory / name)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        if not isinstance(exc, OSError):
            raise
        raise UsageError(
            f"cannot write the result of item {result.index}:{result.position} to "
            f"{printable(str(directory / name))!r}: {exc.strerror or exc}"
        ) from None


__all__: list[Any] = ["download_results", "file_name"]
