"""Option types and options shared by several commands, each declared (and defaulted) once."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .. import backends, limits, settings
from .. import items as items_mod
from ..results_store import DEFAULT_INLINE_LIMIT, MAX_INLINE_LIMIT

_DURATION = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,9})?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def human_duration(seconds: float) -> str:
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
            low = "above 0" if self.minimum is None else f"from {human_duration(self.minimum)}"
            allowed = f"allowed {low} up to {human_duration(self.maximum)}"
            self.fail(f"{str(value)!r:.60} is out of range: {allowed}", param, ctx)
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


def human_size(count: int) -> str:
    """``64KiB``-style text for a byte count that is a whole number of units."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


class Size(click.ParamType):
    """Bytes, or a number with a unit (``65536``, ``64KiB``, ``1MiB``, ``2GB``), within a range."""

    name = "size"

    def __init__(self, minimum: int = 0, maximum: int = 2**40) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            count_ = value
        else:
            parsed = limits.parse_size(str(value))
            if parsed is None:
                self.fail(f"{str(value)!r:.60} is not a size; use bytes or a number with KiB, MiB or GiB", param, ctx)
            count_ = parsed
        if not self.minimum <= count_ <= self.maximum:
            allowed = f"allowed {human_size(self.minimum)} to {human_size(self.maximum)}"
            self.fail(f"{str(value)!r:.60} is out of range: {allowed}", param, ctx)
        return count_


def count(minimum: int, maximum: int) -> click.IntRange:
    """An integer option type with a documented range."""
    return click.IntRange(minimum, maximum)


#: ``--limit`` of listings.
LIMIT = count(1, limits.MAX_LIMIT)


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def stack(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` in the order listed (the first is outermost in ``--help``)."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


#: ``--namespace/-n`` and ``--context``: where a command talks to Kubernetes (as kubectl resolves them).
cluster_options = stack(
    click.option("--namespace", "-n", "namespace", envvar=settings.ENV_NAMESPACE, metavar="NS",
                 help="Kubernetes namespace (default: the kubeconfig context's, else 'default'). "
                      "Env: KIABATCH_NAMESPACE."),
    click.option("--context", "context", metavar="NAME", help="kubeconfig context (default: the current one)."),
)  # fmt: skip


def backend_option(help_text: str) -> Decorator:
    """``--backend local|kubernetes`` (env KIABATCH_BACKEND)."""
    return click.option("--backend", type=click.Choice(backends.NAMES), default=backends.LOCAL,
                        envvar=settings.ENV_BACKEND, show_default=True,
                        help=f"{help_text} Env: KIABATCH_BACKEND.")  # fmt: skip


#: ``--item``, ``--items FILE``, ``--lines FILE``: items given on the command line (see :func:`read_items`).
item_options = stack(
    click.option("--item", "item_values", multiple=True, metavar="JSON", help="One item (JSON). Repeatable."),
    click.option("--items", "items_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                 help="File of items, one JSON value per line ('-' for stdin)."),
    click.option("--lines", "lines_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                 help="File whose non-blank lines are string items ('-' for stdin)."),
)  # fmt: skip


def read_items(params: dict[str, Any], *, where: str = "--item") -> Iterator[Any] | None:
    """The items of :data:`item_options` (popped from ``params``), parsed lazily; None if none were given.

    ``--item`` values are parsed at once (a bad one is reported before anything
    else happens); files are read as the items are consumed.
    """
    values, items_file, lines_file = params.pop("item_values"), params.pop("items_file"), params.pop("lines_file")
    if not values and items_file is None and lines_file is None:
        return None
    parsed = [items_mod.parse(value, f"{where} {value!r}") for value in values]
    sources: list[Any] = [parsed]
    if items_file is not None:
        sources.append(items_mod.iter_jsonl(items_file))
    if lines_file is not None:
        sources.append(items_mod.iter_lines(lines_file))
    return itertools.chain.from_iterable(sources)


#: ``--results-to``, ``--s3-endpoint-url``, ``--inline-limit``: where results that leave Redis go.
results_options = stack(
    click.option("--results-to", "results_to", envvar=settings.ENV_RESULTS_URL, metavar="URL",
                 help="Store results larger than --inline-limit, and every {output} file, in s3://BUCKET/PREFIX "
                      "or file:///PATH; Redis keeps a reference (URL, size, sha256). Credentials come from "
                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the pod's identity). Env: KIABATCH_RESULTS_URL."),
    click.option("--s3-endpoint-url", "s3_endpoint", envvar=settings.ENV_S3_ENDPOINT, metavar="URL",
                 help="Endpoint of an S3-compatible store that is not AWS (MinIO, SeaweedFS, Ceph RGW, GCS), "
                      "e.g. http://minio:9000. Env: KIABATCH_S3_ENDPOINT_URL."),
    click.option("--inline-limit", "inline_limit", type=Size(0, MAX_INLINE_LIMIT),
                 default=human_size(DEFAULT_INLINE_LIMIT), show_default=True,
                 help="With --results-to: results up to this size stay in Redis (0: every result is stored)."),
)  # fmt: skip
