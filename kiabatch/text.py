"""Text from items, results and logs made safe for a terminal line or a table cell.

Item content is data: a newline must not start a new row, a tab must not add a
column, and an ANSI escape must not recolour (or rewrite) the user's terminal.
"""

from __future__ import annotations

import re
import shlex
import time

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# C0 controls, DEL, C1 controls, and the bidirectional overrides that can reorder what a line shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\\\\]")


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``value`` as one line of text with control characters escaped (``\\n``, ``\\t``, ``\\x1b``, ...).

    A backslash is doubled only when the text holds something to escape, so plain
    text (paths, URLs) reads as it is.
    """
    text = str(value)
    if text.isprintable() or not _UNSAFE.search(text.replace("\\", "")):
        return text
    return _UNSAFE.sub(_escape, text)


def when(timestamp: float | None) -> str:
    """A local time (``2026-03-14 10:15:00``), or '-'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def shell_quoted(args: list[str]) -> str:
    """``args`` as a POSIX shell command line that gives them back when pasted; an argument holding
    characters a terminal would act on (or hide) is written as bash's ``$'...'`` with escapes."""
    return " ".join(shlex.quote(arg) if arg.isprintable() else _ansi_c_quoted(arg) for arg in args)


def _ansi_c_quoted(arg: str) -> str:
    escaped = []
    for char in arg:
        if char in "\\'":
            escaped.append("\\" + char)
        elif char.isprintable():
            escaped.append(char)
        else:
            code = ord(char)
            escaped.append(
                f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "$'" + "".join(escaped) + "'"
