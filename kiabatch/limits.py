"""Every numeric range kiabatch accepts, in one place (the README's "Limits" table).

The CLI's option types and the Python API's checks both read these, so a value is
refused before anything is written, with the allowed range in the message. The
Kubernetes ones follow the API server's own validation of Indexed Jobs.
"""

from __future__ import annotations

import math
import os
import re

from .errors import UsageError

#: Tasks running at once (Job ``parallelism``; the API's limit for Indexed Jobs).
MAX_PARALLEL = 100_000
#: Tasks of one batch (Job ``completions``).
MAX_TASKS = 10_000_000
#: Items per task (one report carries them all).
MAX_CHUNK = 100_000
#: Retries per task (``backoffLimitPerIndex``).
MAX_RETRIES = 10_000
#: Longest duration any option takes: 10 years, in seconds (Redis TTLs, Job deadlines).
MAX_SECONDS = 10 * 365 * 86400
#: Rows a listing may ask for.
MAX_LIMIT = 100_000
#: Refresh intervals (``status --watch --interval``, ``scheduler --poll``), seconds.
MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0
#: Nesting depth of one item (JSON arrays and objects).
MAX_ITEM_DEPTH = 64
#: Digits of π without ``--force``, and with it (the reduce step alone would need tens of GiB beyond).
MAX_DIGITS = 10**8
MAX_DIGITS_FORCED = 10**9
#: Completion indexes (``task claim --index``).
MAX_INDEX = MAX_TASKS - 1
#: GPUs per worker (``--gpu``).
MAX_GPUS = 1024
#: The API server's limits on Indexed Jobs (pkg/apis/batch/validation): parallelism and
#: maxFailedIndexes at most 100,000; above 100,000 completions (with backoffLimitPerIndex,
#: which kiabatch always sets) parallelism and maxFailedIndexes at most 10,000.
MAX_FAILED_INDEXES = 100_000
COMPLETIONS_SOFT_LIMIT = 100_000
MAX_PARALLEL_HIGH_COMPLETIONS = 10_000
MAX_FAILED_INDEXES_HIGH_COMPLETIONS = 10_000
#: Pod names (``<job>-<index>-<5 characters>``) and their hostnames are DNS labels.
MAX_POD_NAME = 63


def check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """``value`` if it is an int in [minimum, maximum]; else UsageError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise UsageError(f"{name} must be an integer from {minimum:,} to {maximum:,}, not {value!r:.40}")
    return value


def check_seconds(name: str, value: object, minimum: float = 0.0, maximum: float = MAX_SECONDS) -> float:
    """``value`` as float seconds if finite and in (minimum, maximum]; else UsageError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not minimum < value <= maximum
    ):
        raise UsageError(
            f"{name} must be a number of seconds above {minimum:g} and at most {maximum:g} (10 years), "
            f"not {value!r:.40}"
        )
    return float(value)


def check_indexed_job(tasks: int, parallelism: int, max_failed_indexes: int, job_name: str) -> None:
    """UsageError for an Indexed Job the API server would refuse (or whose pod names it would cut).

    Checked before anything is written, with what is allowed in the message.
    """
    if tasks > COMPLETIONS_SOFT_LIMIT:
        above = f"above {COMPLETIONS_SOFT_LIMIT:,} tasks (the API's limit for Indexed Jobs)"
        fewer = f"or give --chunk or --tasks so there are at most {COMPLETIONS_SOFT_LIMIT:,} tasks"
        if parallelism > MAX_PARALLEL_HIGH_COMPLETIONS:
            raise UsageError(
                f"{tasks:,} tasks with parallelism {parallelism:,}: {above}, at most "
                f"{MAX_PARALLEL_HIGH_COMPLETIONS:,} may run at once; lower --parallel, {fewer}"
            )
        if max_failed_indexes > MAX_FAILED_INDEXES_HIGH_COMPLETIONS:
            raise UsageError(
                f"{tasks:,} tasks with max failed indexes {max_failed_indexes:,}: {above}, at most "
                f"{MAX_FAILED_INDEXES_HIGH_COMPLETIONS:,}; lower --max-failed-indexes, {fewer}"
            )
    longest = len(job_name) + len(f"-{tasks - 1}-") + 5
    if longest > MAX_POD_NAME:
        room = MAX_POD_NAME - len(f"-{tasks - 1}-") - 5
        raise UsageError(
            f"Job {job_name!r} with {tasks:,} tasks would name pods with {longest} characters "
            f"(<job>-<index>-<5 characters>, at most {MAX_POD_NAME}): use a batch id of at most {room} characters, "
            "or fewer tasks (--chunk)"
        )


def task_limit(parallelism: int) -> int:
    """Most tasks an Indexed Job may have at ``parallelism``: 100,000 above 10,000 at once, else MAX_TASKS."""
    return COMPLETIONS_SOFT_LIMIT if parallelism > MAX_PARALLEL_HIGH_COMPLETIONS else MAX_TASKS


_SIZE = re.compile(r"^\s*(\d{1,20})\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def parse_size(text: str) -> int | None:
    """Bytes from ``65536``, ``64KiB``, ``1MiB``, ``2GB`` (case-insensitive); None if it is not a size."""
    match = _SIZE.match(text)
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()] if match else None


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
