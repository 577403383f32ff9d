"""Option types and options shared by several commands, each declared (and defaulted) once."""

from __future__ import annotations

import math
import re
from typing import Any

import click

from .. import limits

_DURATION = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,9})?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_text(seconds: float) -> str:
    """``120`` -> ``2m``: a duration as the largest whole unit (what :class:`Duration` reads back)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class Duration(click.ParamType):
    """Seconds, or a number with unit s/m/h/d (``90``, ``30m``, ``7d``), within a range.

    ``minimum`` is inclusive; without one, any duration above 0 is allowed.
    """

    name = "duration"

    def __init__(self, minimum: float | None = None, maximum: float = limits.MAX_SECONDS) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            match = _DURATION.match(str(value))
            if not match:
                self.fail(
                    f"{str(value)!r:.60} is not a positive duration; "
                    "use seconds or a number with s, m, h or d (e.g. 30m)",
                    param,
                    ctx,
                )
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        low_ok = seconds > 0 if self.minimum is None else seconds >= self.minimum
        if not math.isfinite(seconds) or not low_ok or seconds > self.maximum:
            low = "above 0" if self.minimum is None else f"from {duration_text(self.minimum)}"
            self.fail(
                f"{str(value)!r:.60} is out of range: allowed {low} up to {duration_text(self.maximum)}", param, ctx
            )
        return seconds


class Interval(click.ParamType):
    """A finite number of seconds in [MIN_INTERVAL, MAX_INTERVAL] (``nan``, ``inf`` refused)."""

    name = "seconds"

    def __init__(self, minimum: float = limits.MIN_INTERVAL, maximum: float = limits.MAX_INTERVAL) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)!r:.60} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not self.minimum <= seconds <= self.maximum:
            self.fail(f"{str(value)!r:.60} is out of range: allowed {self.minimum:g} to {self.maximum:g}", param, ctx)
        return seconds


def count(minimum: int, maximum: int) -> click.IntRange:
    """An integer option type with a documented range."""
    return click.IntRange(minimum, maximum)


#: ``--limit`` of listings.
LIMIT = count(1, limits.MAX_LIMIT)
