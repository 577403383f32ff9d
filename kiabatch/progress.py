"""A live progress bar (done/failed/total, ETA) on a terminal; silent in pipes."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

import click

from .model import Progress


class ProgressBar:
    """Wraps ``click.progressbar``; shown only when ``stream`` is a terminal."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._failed = 0
        self._running = 0
        self._shown = 0
        self._bar: Any = None
        if self.enabled:
            self._bar = click.progressbar(
                length=max(total, 1),
                label=label,
                show_eta=True,
                show_pos=True,
                item_show_func=self._describe,
                file=self.stream,
            )

    def _describe(self, _item: object) -> str:
        return f"running {self._running}, failed {self._failed}"

    def update(self, progress: Progress) -> None:
        """Move the bar to ``progress``."""
        if self._bar is None:
            return
        self._failed, self._running = progress.failed, progress.running
        advance = progress.settled - self._shown
        self._shown = progress.settled
        self._bar.update(max(0, advance), current_item=progress)

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, value, traceback)
