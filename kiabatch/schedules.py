"""Recurring batches: what a schedule is, and how its cron expression and time zone are checked.

A schedule is a cron expression plus ordinary ``kiabatch submit`` arguments. Each
tick starts one *run*: ``kiabatch submit ARGS`` with the run's name in
``KIABATCH_RUN``. The run's batch id is derived from the run's name, so a run that
is started again (its launcher pod was killed, the scheduler restarted) attaches
to the batch it already created instead of taking a second snapshot of a queue:
nothing is lost and nothing is taken twice.

Cron syntax is the one Kubernetes CronJobs accept: five fields (minute, hour, day
of month, month, day of week) or a macro such as ``@hourly``. Parsing and next-tick
arithmetic use croniter; time zones use the IANA database (``zoneinfo``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from .errors import UsageError
from .model import MAX_BATCH_ID, validate_batch_id

if TYPE_CHECKING:
    from .kube.options import KubeOptions

CONCURRENCY = ("forbid", "allow", "replace")
DEFAULT_STARTING_DEADLINE = 300
_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_ALLOWED = {
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-6 or SUN-SAT",
}
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def _croniter() -> Any:
    """croniter, imported on first use: ``submit`` and ``status`` need this module's names but
    not its cron arithmetic, and importing croniter runs a child process (``file``, through
    ``platform.architecture()``)."""
    from croniter import croniter

    return croniter


def validate_cron(expression: str) -> str:
    """Return ``expression`` if Kubernetes and croniter accept it; else UsageError naming the bad field."""
    text = expression.strip()
    if text in _MACROS:
        return text
    if "TZ=" in text:
        raise UsageError(f"bad cron expression {expression!r}: put the time zone in --time-zone, not in the schedule")
    parts = text.split()
    if len(parts) != 5:
        raise UsageError(
            f"bad cron expression {expression!r}: needs 5 fields (minute hour day-of-month month day-of-week) "
            f"or one of {', '.join(_MACROS)}; got {len(parts)} field(s)"
        )
    for position, name in enumerate(_FIELDS):
        _check_kubernetes_field(expression, name, parts[position])
    croniter = _croniter()
    if croniter.is_valid(text):
        _check_fires(expression, text)
        return text
    for position, name in enumerate(_FIELDS):
        probe = ["*"] * 5
        probe[position] = parts[position]
        if not croniter.is_valid(" ".join(probe)):
            raise UsageError(
                f"bad cron expression {expression!r}: the {name} field {parts[position]!r} is not valid "
                f"(allowed: {_ALLOWED[name]}, with *, lists a,b, ranges a-b and steps */n)"
            )
    raise UsageError(f"bad cron expression {expression!r}: its fields do not combine into a valid schedule")


_TOKEN = re.compile(r"^(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?$")
#: Each field's values, as Kubernetes' parser (robfig/cron) bounds them, and the names it knows.
_BOUNDS = {"minute": (0, 59), "hour": (0, 23), "day-of-month": (1, 31), "month": (1, 12), "day-of-week": (0, 6)}
_NUMBER_OF = {
    "month": {name: number for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)},
    "day-of-week": {name: number for number, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))},
}  # fmt: skip


def _check_kubernetes_field(expression: str, name: str, field: str) -> None:
    """UsageError for what croniter reads but a CronJob refuses: L, W and # (last, weekday, nth),
    names in a numeric field, values out of the field's bounds (day-of-week 7, croniter's other
    Sunday) and ranges that run backwards (``22-2``, which croniter wraps round)."""
    if not all(_kubernetes_token(name, token) for token in field.split(",")):
        raise UsageError(
            f"bad cron expression {expression!r}: the {name} field {field!r} is not valid "
            f"(allowed: {_ALLOWED[name]}, with *, lists a,b, ranges a-b (low to high) and steps */n; "
            "no L, W or #, which Kubernetes CronJobs do not take)"
        )


def _kubernetes_token(name: str, token: str) -> bool:
    """True if one list element (``*/5``, ``MON-FRI``, ``7``) is one a CronJob takes in field ``name``."""
    if not _TOKEN.match(token):
        return False
    span = token.split("/")[0]
    if span in ("*", "?"):
        return True
    names = _NUMBER_OF.get(name, {})
    ends = [int(end) if end.isdigit() else names.get(end.upper()) for end in span.split("-")]
    low, high = _BOUNDS[name]
    return all(end is not None and low <= end <= high for end in ends) and ends == sorted(ends)


def _as_kubernetes_reads_it(cron: str) -> list[str]:
    """croniter expressions whose ticks together are the CronJob's ticks for ``cron``.

    Kubernetes (robfig/cron) and croniter differ: ``?`` and ``*/1`` are ``*`` there, ``5-5`` is 5
    (croniter reads every value), and when neither day field is a star a day matches if either
    matches, which croniter gets wrong once it has folded a full range such as ``0-6`` into ``*``.
    So the fields are normalised, and such an expression becomes two: one per day field.
    """
    if cron.startswith("@"):
        return [cron]
    fields = []
    for text in cron.split():
        tokens = []
        for token in text.split(","):
            span, _, step = token.partition("/")
            if span == "?" or (span == "*" and step in ("", "1")):
                tokens.append("*")
                continue
            ends = span.split("-")
            tokens.append(ends[0] if len(ends) == 2 and ends[0].upper() == ends[1].upper() else token)
        fields.append(",".join(tokens))
    minute, hour, day, month, weekday = fields
    if day == "*" or weekday == "*":
        return [" ".join(fields)]
    return [f"{minute} {hour} {day} {month} *", f"{minute} {hour} * {month} {weekday}"]


def _check_fires(expression: str, text: str) -> None:
    """UsageError for an expression that names no real moment (``0 0 31 2 *``: February 31st)."""
    from croniter import CroniterBadDateError

    try:
        _croniter()(text, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise UsageError(
            f"bad cron expression {expression!r}: it never fires (no month has that day, e.g. February 30 or 31)"
        ) from None


def validate_time_zone(name: str | None) -> str | None:
    """Return ``name`` if it is an IANA time zone (e.g. Europe/Berlin); None means UTC."""
    if name is None:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(name, sorted(available_timezones()), n=1)
        hint = f"; did you mean {close[0]}?" if close else " (e.g. Europe/Berlin, America/New_York, UTC)"
        raise UsageError(f"bad time zone {name!r}: not an IANA time zone name{hint}") from None
    return name


def validate_schedule_name(name: str) -> str:
    """Schedule names are DNS labels of at most 52 characters (they name a CronJob)."""
    try:
        return validate_batch_id(name)
    except UsageError:
        raise UsageError(
            f"bad schedule name {name!r}: must be at most {MAX_BATCH_ID} lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        ) from None


def validate_run_name(run: str) -> str:
    """A run's name (a launcher Job's, or a local run's): 1-253 printable characters of UTF-8 text."""
    try:
        run.encode()
    except UnicodeEncodeError:
        raise UsageError(f"bad run name {run!r:.60}: it is not valid UTF-8 text") from None
    if not run or len(run) > 253 or not run.isprintable():
        raise UsageError(f"bad run name {run!r:.60}: use 1 to 253 printable characters")
    return run


def run_batch_id(run: str) -> str:
    """The batch id of a run: stable, so starting the same run again finds its batch."""
    digest = hashlib.sha256(run.encode()).hexdigest()[:10]
    prefix = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")[: MAX_BATCH_ID - 11].rstrip("-") or "run"
    return validate_batch_id(f"{prefix}-{digest}")


def submit_argv(submit_args: list[str], *options: str) -> list[str]:
    """``kiabatch submit`` argv: the schedule's arguments with ``options`` where submit reads them.

    They go after a workload name (``pi --digits 5`` -> ``pi OPTIONS --digits 5``) and
    before everything else, never after a ``--`` (which starts an exec command).
    """
    if submit_args and not submit_args[0].startswith("-"):
        return ["submit", submit_args[0], *options, *submit_args[1:]]
    return ["submit", *options, *submit_args]


@dataclass(frozen=True)
class Schedule:
    """One recurring batch."""

    name: str
    cron: str
    #: ``kiabatch submit`` arguments, e.g. ["--from-queue", "thumbs", "--command", "..."].
    submit_args: list[str]
    time_zone: str | None = None
    concurrency: str = "forbid"
    suspend: bool = False
    #: A tick missed by more than this many seconds is skipped.
    starting_deadline: int = DEFAULT_STARTING_DEADLINE
    backend: str = "local"
    namespace: str = ""
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_schedule_name(self.name)
        # Stored as validated: croniter refuses the spaces around a macro ('@daily ') that the check strips.
        object.__setattr__(self, "cron", validate_cron(self.cron))
        validate_time_zone(self.time_zone)
        if self.concurrency not in CONCURRENCY:
            raise UsageError(f"bad concurrency {self.concurrency!r}; allowed: {', '.join(CONCURRENCY)}")
        if self.starting_deadline < 1:
            raise UsageError(f"starting deadline must be at least 1 second, not {self.starting_deadline}")

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone (UTC when none is given)."""
        return ZoneInfo(self.time_zone or "UTC")

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (an aware datetime), as a CronJob would fire."""
        start = after.astimezone(self.zone)
        return min(_croniter()(cron, start).get_next(datetime) for cron in _as_kubernetes_reads_it(self.cron))

    def last_tick(self, at_or_before: datetime) -> datetime:
        """The latest tick at or before ``at_or_before`` (ticks are at least a minute apart)."""
        moment = at_or_before.astimezone(self.zone) + timedelta(seconds=1)
        return max(_croniter()(cron, moment).get_prev(datetime) for cron in _as_kubernetes_reads_it(self.cron))

    def to_json(self) -> str:
        """Serialised for storage."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Schedule:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def with_changes(self, **changes: Any) -> Schedule:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class ScheduleRow:
    """One line of ``schedule list``: a schedule and when it last ran, or why it cannot be evaluated."""

    name: str
    schedule: Schedule | None
    last_run: str = "-"
    #: Why a stored schedule cannot be evaluated ("" when it can).
    invalid: str = ""


@dataclass(frozen=True)
class StartedRun:
    """What ``schedule run-now`` started: ``ref`` (printed: a batch id, or a launcher Job's name) and a note."""

    ref: str
    note: str


class Schedules(Protocol):
    """Where schedules live and run: Redis plus ``kiabatch scheduler`` (local), or CronJobs (kubernetes)."""

    def create(self, schedule: Schedule, kube: KubeOptions) -> str:
        """Store ``schedule`` (refused if its name exists); returns a line saying what was made."""
        ...

    def rows(self) -> list[ScheduleRow]:
        """Every schedule, by name, with its last run."""
        ...

    def get(self, name: str) -> Schedule:
        """The schedule ``name`` (NotFoundError if there is none)."""
        ...

    def set_suspend(self, name: str, suspend: bool) -> None:
        """Stop (or start again) starting runs; runs already started go on."""
        ...

    def delete(self, name: str, *, cascade: bool) -> list[str]:
        """Remove the schedule (with ``cascade``, its runs' batches too); returns the batches removed."""
        ...

    def run_now(self, name: str) -> StartedRun:
        """Start a run at once, whatever the schedule says."""
        ...

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Recent runs, newest first: run, started, finished, state, batches, done, failed."""
        ...

    def last_success(self, name: str) -> float | None:
        """When a run of ``name`` last succeeded (unix seconds); None if none did (or it is no longer known)."""
        ...
