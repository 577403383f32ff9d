"""kiabatch: large parallel batch jobs through a Redis work queue, on Kubernetes or locally.

The public API is small::

    from kiabatch import Queue, submit

    q = Queue("thumbs")
    q.enqueue({"url": "https://example.org/a.png"})
    batch = q.submit(command=["python", "thumb.py", "{url}"], parallel=4)
    batch.wait(progress=True)
    batch.results(); batch.failed(); batch.status()

    pi = submit("pi", digits=5000, parallel=3).wait().reduce()
"""

from ._version import __version__
from .batch import Batch
from .connection import connect
from .errors import (
    BatchFailedError,
    ClusterError,
    InterruptedBatchError,
    KiabatchError,
    NotFoundError,
    UnreachableError,
    UsageError,
)
from .model import FailedItem, ItemResult, Progress, State, Status
from .queue import Queue
from .submission import submit

__all__ = [
    "Batch",
    "BatchFailedError",
    "ClusterError",
    "FailedItem",
    "InterruptedBatchError",
    "ItemResult",
    "KiabatchError",
    "NotFoundError",
    "Progress",
    "Queue",
    "State",
    "Status",
    "UnreachableError",
    "UsageError",
    "__version__",
    "connect",
    "submit",
]
