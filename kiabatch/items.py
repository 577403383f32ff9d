"""Work items: JSON values, stored as compact JSON text.

An item's *text* is what a worker sees of it (argv ``{item}``, stdin): a string
item is passed as is, any other value as compact JSON.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from . import limits
from .errors import UsageError

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ITEM_HELP = 'each item must be one JSON value, e.g. 42, "photo.png" or {"url": "https://..."}'


#: Integers with more digits than Python's default conversion limit cannot be read back by a process
#: that keeps that limit (a worker, a runner): refused whatever limit this process has set. Computed
#: once: ``10**4300`` written in a comparison is computed anew each time (tens of µs per item).
_TOO_LONG = 10**4300
_TOO_LONG_NEGATIVE = -_TOO_LONG
_TOO_LONG_HELP = "an item holds an integer of more than 4,300 digits; give such a number as a string"


def _check_nesting_and_integers(value: Any) -> None:
    """UsageError if ``value`` nests arrays/objects deeper than MAX_ITEM_DEPTH, or holds an integer of
    more than 4,300 digits (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, int) and not _TOO_LONG_NEGATIVE < current < _TOO_LONG:
            raise UsageError(_TOO_LONG_HELP)
        if isinstance(current, dict | list):
            if depth > limits.MAX_ITEM_DEPTH:
                raise UsageError(
                    f"an item nests arrays/objects more than {limits.MAX_ITEM_DEPTH} levels deep; {_ITEM_HELP}"
                )
            children = current.values() if isinstance(current, dict) else current
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | int))


def _utf8(text: str, value: Any) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"item {value!r:.60} holds text that is not valid Unicode (a lone surrogate, e.g. from undecodable "
            f"bytes); {_ITEM_HELP}"
        ) from None


def encode(value: Any) -> str:
    """Compact JSON text of an item; UsageError for values JSON (or UTF-8) cannot hold, or nested too deep."""
    if isinstance(value, dict | list | int):
        _check_nesting_and_integers(value)
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        try:
            shown = f"{value!r:.60}"
        except ValueError:  # it holds an integer past Python's 4300-digit limit, which repr() cannot show either
            raise UsageError(_TOO_LONG_HELP) from None
        raise UsageError(f"item {shown} is not JSON-serialisable: {exc}; {_ITEM_HELP}") from None
    _utf8(text, value)
    return text


def encode_many(values: Iterable[Any]) -> Iterator[bytes]:
    """Encode items lazily as UTF-8 JSON (the fast path of ``Queue.enqueue_many``).

    Integers and strings, the common small items, skip the general encoder; the
    text is the same as :func:`encode` gives. Every item is checked like
    :func:`encode` checks it.
    """
    encode_string = json.encoder.encode_basestring  # what ensure_ascii=False uses
    for value in values:
        kind = type(value)
        if kind is int and _TOO_LONG_NEGATIVE < value < _TOO_LONG:  # longer ones are refused by encode
            yield int.__repr__(value).encode()
        elif kind is str:
            yield _utf8(encode_string(value), value)
        else:
            yield encode(value).encode()


def decode(text: str | bytes) -> Any:
    """Parse one stored item."""
    return json.loads(text)


def text(value: Any) -> str:
    """What the worker sees of an item: strings as is, other values as compact JSON (UsageError, as
    :func:`encode` gives, for a value JSON cannot hold)."""
    return value if isinstance(value, str) else encode(value)


def parse(source: str, where: str = "--item") -> Any:
    """Parse user-given item JSON, naming ``where`` it came from on error."""
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(f"malformed item JSON in {where}: {exc.msg} (column {exc.colno}); {_ITEM_HELP}") from None
    except RecursionError:
        raise UsageError(
            f"item in {where} nests arrays/objects more than {limits.MAX_ITEM_DEPTH} levels deep; {_ITEM_HELP}"
        ) from None
    except ValueError:  # an integer past Python's 4300-digit limit
        raise UsageError(
            f"item in {where[:80]}{'...' if len(where) > 80 else ''} holds an integer of more than 4,300 digits; "
            "give such a number as a string"
        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"malformed item JSON in {where}: {source!r:.60} is not a finite number; {_ITEM_HELP}")
    encode(value)  # depth, and text that UTF-8 cannot hold (a lone surrogate from "\ud800")
    return value


def _open_lines(path: Path | str, option: str) -> Iterator[tuple[int, str]]:
    """(number, text) of every line of ``path`` ('-': standard input), decoded strictly as UTF-8."""
    name = "stdin" if str(path) == "-" else str(path)
    try:
        stream: IO[bytes] = sys.stdin.buffer if str(path) == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {option} file {path}: {exc.strerror}") from None
    try:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(
                    f"{option} {name} line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); items must be UTF-8 text"
                ) from None
            yield number, line.removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise UsageError(f"cannot read {option} file {path}: {exc.strerror}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def iter_jsonl(path: Path | str, option: str = "--items") -> Iterator[Any]:
    """Items from a JSON-lines file (``-``: standard input): one JSON value per non-blank line."""
    name = "stdin" if str(path) == "-" else str(path)
    for number, line in _open_lines(path, option):
        if line.strip():
            yield parse(line, f"{option} {name} line {number}")


def iter_lines(path: Path | str, option: str = "--lines") -> Iterator[str]:
    """String items from a file (``-``: standard input): every non-blank line, without its line ending."""
    for _number, line in _open_lines(path, option):
        if line.strip():
            yield line


def read_jsonl(path: Path | str) -> list[Any]:
    """Items from a JSON-lines file; ``-`` reads standard input."""
    return list(iter_jsonl(path))
