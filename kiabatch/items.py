"""Work items: JSON values, stored as compact JSON text.

An item's *text* is what a worker sees of it (argv ``{item}``, stdin): a string
item is passed as is, any other value as compact JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .errors import UsageError

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ITEM_HELP = 'each item must be one JSON value, e.g. 42, "photo.png" or {"url": "https://..."}'


def encode(value: Any) -> str:
    """Compact JSON text of an item; raises UsageError for values JSON cannot hold."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"item {value!r:.60} is not JSON-serialisable: {exc}; {_ITEM_HELP}") from None


def encode_many(values: Iterable[Any]) -> Iterator[str]:
    """Encode items lazily (the fast path of ``Queue.enqueue_many``).

    Integers and strings, the common small items, skip the general encoder; the
    text is the same as :func:`encode` gives.
    """
    encode_one = _ENCODER.encode
    encode_string = json.encoder.encode_basestring  # what ensure_ascii=False uses
    for value in values:
        kind = type(value)
        if kind is int:
            yield int.__repr__(value)
        elif kind is str:
            yield encode_string(value)
        else:
            try:
                yield encode_one(value)
            except (TypeError, ValueError):
                yield encode(value)  # re-raise with the friendly message


def decode(text: str | bytes) -> Any:
    """Parse one stored item."""
    return json.loads(text)


def text(value: Any) -> str:
    """What the worker sees of an item: strings as is, other values as compact JSON."""
    return value if isinstance(value, str) else _ENCODER.encode(value)


def parse(source: str, where: str = "--item") -> Any:
    """Parse user-given item JSON, naming ``where`` it came from on error."""
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(f"malformed item JSON in {where}: {exc.msg} (column {exc.colno}); {_ITEM_HELP}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"malformed item JSON in {where}: {source!r} is not a finite number; {_ITEM_HELP}")
    return value


def parse_lines(stream: TextIO, name: str) -> list[Any]:
    """Items from a JSON-lines stream: one JSON value per non-blank line."""
    values = []
    for number, line in enumerate(stream, start=1):
        if line.strip():
            values.append(parse(line, f"{name} line {number}"))
    return values


def read_jsonl(path: Path | str) -> list[Any]:
    """Items from a JSON-lines file; ``-`` reads standard input."""
    import sys

    if str(path) == "-":
        return parse_lines(sys.stdin, "stdin")
    try:
        with open(path, encoding="utf-8") as stream:
            return parse_lines(stream, str(path))
    except OSError as exc:
        raise UsageError(f"cannot read items file {path}: {exc.strerror}") from None
