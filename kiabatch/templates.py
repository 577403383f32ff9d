"""Worker command templates: argv lists with ``{placeholder}`` substitution.

Substitution happens per argument and yields a list for ``exec``; an item never
passes through a shell. Placeholders:

``{item}``    the item's text (strings as is, other values as compact JSON)
``{input}``   path of a file holding the item's JSON
``{output}``  path of a file the worker writes; its content becomes the result
``{index}``   the task's completion index
``{FIELD}``   field FIELD of an object item (its text)

``{{`` and ``}}`` stand for literal braces.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from . import items as items_mod
from .errors import UsageError

RESERVED = ("item", "input", "output", "index")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def placeholders(command: Sequence[str]) -> list[str]:
    """Every placeholder name used in ``command``, in order, validating the syntax."""
    names: list[str] = []
    for argument in command:
        for match in _TOKEN.finditer(argument):
            token = match.group(0)
            if token in ("{{", "}}"):
                continue
            name = match.group(1)
            if name is None or not name.strip():
                raise UsageError(
                    f"bad command template argument {argument!r}: unmatched or empty brace; "
                    "use {item}, {input}, {output}, {index} or {FIELD}, and {{ }} for literal braces"
                )
            names.append(name)
    return names


def validate(command: Sequence[str]) -> list[str]:
    """Check a command template; returns its placeholder names."""
    if not command or not command[0]:
        raise UsageError("the worker command is empty; give a program and its arguments, e.g. --command 'echo {item}'")
    for argument in command:
        if "\0" in argument:
            raise UsageError(f"command argument {argument!r:.60} contains a NUL byte, which no program can receive")
    return placeholders(command)


def fields(command: Sequence[str]) -> list[str]:
    """Placeholder names that refer to item fields rather than reserved names."""
    return [name for name in placeholders(command) if name not in RESERVED]


def _substituted(names: Sequence[str], item: Any, where: str) -> list[str]:
    """The texts ``names`` put into argv for ``item``; UsageError if a field is missing."""
    needed = [name for name in names if name not in RESERVED]
    if needed and not isinstance(item, dict):
        raise UsageError(
            f"{where} {items_mod.text(item)!r:.80} is not a JSON object, but the command uses "
            f"{{{needed[0]}}}; give object items or use {{item}}"
        )
    texts = [items_mod.text(item)] if "item" in names else []
    for name in needed:
        if name not in item:
            raise UsageError(f"{where} {items_mod.text(item)!r:.80} has no field {name!r}, which the command uses")
        texts.append(items_mod.text(item[name]))
    for text in texts:
        if "\0" in text:
            raise UsageError(
                f"{where} {items_mod.text(item)!r:.80} has a NUL byte where the command puts it in an argument, "
                "which no program can receive; pass such items with {input} or --stdin"
            )
    return texts


def check_item(command: Sequence[str], item: Any, where: str = "item") -> None:
    """Raise UsageError if ``item`` cannot be put into ``command`` (a missing field, a NUL byte in argv)."""
    _substituted(placeholders(command), item, where)


def check_items(command: Sequence[str], values: Iterable[Any]) -> None:
    """``check_item`` for every item, numbering them from 1 in messages."""
    for _ in checked_items(command, values):
        pass


def checked_items(command: Sequence[str], values: Iterable[Any]) -> Iterator[Any]:
    """``values`` as they are consumed, each checked like :func:`check_item` checks it (numbered from 1)."""
    names = placeholders(command)
    if not any(name == "item" or name not in RESERVED for name in names):
        yield from values
        return
    for number, value in enumerate(values, start=1):
        _substituted(names, value, f"item {number}")
        yield value


@functools.lru_cache(maxsize=64)
def _compiled(command: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str | None, ...], ...]]:
    """(placeholder names, each argument as literal text and names (None-marked)) — parsed once per template."""
    names = tuple(placeholders(command))
    arguments = []
    for argument in command:
        parts: list[str | None] = []
        position = 0
        for match in _TOKEN.finditer(argument):
            parts.append(argument[position : match.start()])
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append(token[0])
            else:
                parts += [None, match.group(1)]  # None marks: the next part is a placeholder name
            position = match.end()
        parts.append(argument[position:])
        arguments.append(tuple(parts))
    return names, tuple(arguments)


def fill(command: Sequence[str], item: Any, *, input_path: str, output_path: str, index: int) -> list[str]:
    """The argv for one item. Raises UsageError if a field is missing or a value holds a NUL byte."""
    names, arguments = _compiled(tuple(command))
    _substituted(names, item, "item")
    known = {"item": items_mod.text(item) if "item" in names else "", "input": input_path, "output": output_path,
             "index": str(index)}  # fmt: skip
    argv = []
    for parts in arguments:
        if len(parts) == 1:
            argv.append(parts[0])  # no placeholder: the common case, no work
            continue
        pieces, follows_marker = [], False
        for part in parts:
            if part is None:
                follows_marker = True
            elif follows_marker:
                pieces.append(known[part] if part in known else items_mod.text(item[part]))
                follows_marker = False
            else:
                pieces.append(part)
        argv.append("".join(pieces))
    return argv
