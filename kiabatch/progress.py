"""A live progress line on a terminal (bar, done/failed/running/total, ETA, a note); silent in pipes.

Callers update it whenever they learn something (a task claimed or settled, a Job
event); it redraws at most 10 times a second, and every update is thread-safe.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from .model import Progress
from .text import printable

_REDRAW = 0.1
_BAR = 20


def eta_text(seconds: float | None) -> str:
    """``1:02:03``-style time left, or ``?``."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """One line, redrawn in place on ``stream`` (stderr) when it is a terminal."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.progress = Progress(total=total, done=0, failed=0, running=0)
        self.note = ""
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._first_settled: tuple[float, int] | None = None
        self._drawn = 0.0
        self._width = 0

    def update(self, progress: Progress, note: str | None = None) -> None:
        """Show ``progress`` (and ``note``, e.g. "waiting for admission"; None keeps the last one)."""
        with self._lock:
            self.progress = progress
            if note is not None:
                self.note = note
            if self._first_settled is None and progress.settled:
                self._first_settled = (time.monotonic(), progress.settled)
            if self.enabled and time.monotonic() - self._drawn >= _REDRAW:
                self._draw()

    def say(self, message: str) -> None:
        """Print a line of its own (a warning) above the progress line, which is drawn again below it."""
        with self._lock:
            if self.enabled and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
            self.stream.write(printable(message) + "\n")
            self.stream.flush()
            self._width = 0
            if self.enabled:
                self._draw()

    def eta(self) -> float | None:
        """Seconds left at the rate seen since the first settled item."""
        p = self.progress
        if self._first_settled is None or p.settled >= p.total:
            return 0.0 if p.total and p.settled >= p.total else None
        since, base = self._first_settled
        elapsed = time.monotonic() - since
        if p.settled <= base or elapsed <= 0:
            return None
        return (p.total - p.settled) * elapsed / (p.settled - base)

    def line(self) -> str:
        """The text of the line (without terminal control characters)."""
        p = self.progress
        total = max(p.total, 1)
        filled = min(_BAR, _BAR * p.settled // total)
        text = (
            f"{self.label} [{'#' * filled}{'-' * (_BAR - filled)}] {100 * p.settled // total:3d}% "
            f"{p.done}/{p.total} done, {p.failed} failed, {p.running} running, ETA {eta_text(self.eta())}"
        )
        return f"{text}  {printable(self.note)}" if self.note else text

    def _draw(self) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns
        text = self.line()[: max(10, columns - 1)]
        self.stream.write("\r" + text.ljust(self._width) + "\r" + text)
        self.stream.flush()
        self._width = len(text)
        self._drawn = time.monotonic()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.enabled and self._width:
            with self._lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
