"""Every Redis key name kiabatch uses, built here and nowhere else.

Layout (``{...}`` is a Redis Cluster hash tag, so all keys of one batch, or of
one named queue, live in the same slot):

=====================================  ======  =============================================
key                                    type    holds
=====================================  ======  =============================================
``kiabatch:{B}:meta``                  hash    spec, counts, state, timestamps of batch B
``kiabatch:{B}:queue``                 list    items (JSON text) not yet claimed by a task
``kiabatch:{B}:claims``                hash    index -> JSON array of the items it claimed
``kiabatch:{B}:sizes``                 hash    index -> number of items in its claim
``kiabatch:{B}:attempts``              hash    index -> attempts started (claims made)
``kiabatch:{B}:failures``              hash    index -> failed attempts reported
``kiabatch:{B}:reported``              set     ``index:attempt`` already reported
``kiabatch:{B}:final``                 set     indexes whose outcome is settled
``kiabatch:{B}:running``               hash    index -> items, for attempts in progress
``kiabatch:{B}:progress``              hash    total, done, failed, running (items)
``kiabatch:{B}:results``               hash    ``index:pos`` -> result bytes
``kiabatch:{B}:outcomes``              hash    ``index:pos`` -> JSON exit code, duration, attempt
``kiabatch:{B}:failed``                hash    ``index:pos`` -> JSON dead-letter entry
``kiabatch:{B}:logs``                  hash    ``index:attempt`` -> tail of the worker's stderr
``kiabatch:{B}:stats``                 hash    item-duration histogram (``d:<le>``, ``d_sum``,
                                               ``d_count``, ``d_max``) and ``retries`` (for /metrics)
``kiabatch:{B}:staging``               list    items being written by submit (renamed to queue
                                               once all are in; expires if submit dies)
``kiabatch:batches``                   zset    batch id -> creation time (for ``list``)
``kiabatch:queue:{Q}``                 list    named queue Q
``kiabatch:queue:{Q}:since``           string  when Q last became non-empty (its oldest item's age)
``kiabatch:queues``                    set     names of named queues ever used
``kiabatch:schedules``                 hash    schedule name -> JSON definition
``kiabatch:schedule:{S}:state``        hash    last tick handled, active run and batch
``kiabatch:schedule:{S}:runs``         zset    run name -> tick time, for ``history``
``kiabatch:schedule:{S}:history``      hash    run name -> JSON record (tick, batch, outcome)
=====================================  ======  =============================================
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

PREFIX = "kiabatch"

#: Sorted set of every batch id, scored by creation time.
BATCH_INDEX = f"{PREFIX}:batches"
#: Set of the names of named queues.
QUEUE_INDEX = f"{PREFIX}:queues"
#: Hash of schedule definitions for the local scheduler.
SCHEDULES = f"{PREFIX}:schedules"


@dataclass(frozen=True)
class BatchKeys:
    """The keys of one batch; all share the batch id as hash tag."""

    meta: str
    queue: str
    claims: str
    sizes: str
    attempts: str
    failures: str
    reported: str
    final: str
    running: str
    progress: str
    results: str
    outcomes: str
    failed: str
    logs: str
    stats: str
    staging: str

    def all(self) -> list[str]:
        """Every key of the batch, in a fixed order (for DEL and EXPIRE)."""
        return [getattr(self, name) for name in _FIELDS]


_FIELDS = tuple(f.name for f in fields(BatchKeys))


@functools.lru_cache(maxsize=1024)
def batch_keys(batch_id: str) -> BatchKeys:
    """Build the keys of ``batch_id`` (cached: a runner asks for them on every claim and report)."""
    tag = f"{PREFIX}:{{{batch_id}}}"
    return BatchKeys(**{name: f"{tag}:{name}" for name in _FIELDS})


def batch_key(batch_id: str, part: str) -> str:
    """One key of a batch (``part`` is a :class:`BatchKeys` field), without building them all (hot loops)."""
    return f"{PREFIX}:{{{batch_id}}}:{part}"


def queue_key(name: str) -> str:
    """The list holding the items of named queue ``name``."""
    return f"{PREFIX}:queue:{{{name}}}"


def queue_since_key(name: str) -> str:
    """When named queue ``name`` last went from empty to non-empty (unix seconds): its oldest item's enqueue time."""
    return f"{PREFIX}:queue:{{{name}}}:since"


def schedule_key(name: str, part: str) -> str:
    """Key ``part`` (state, runs, history) of local schedule ``name``."""
    return f"{PREFIX}:schedule:{{{name}}}:{part}"


def result_field(index: int, position: int) -> str:
    """Hash field naming item ``position`` of task ``index``."""
    return f"{index}:{position}"


def parse_result_field(field: str | bytes) -> tuple[int, int]:
    """Inverse of :func:`result_field`."""
    text = field.decode() if isinstance(field, bytes) else field
    index, position = text.split(":", 1)
    return int(index), int(position)
