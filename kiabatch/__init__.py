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

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time each name loads on first use
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
    from .kube.options import KubeOptions
    from .model import FailedItem, ItemResult, Progress, State, Status
    from .queue import Queue
    from .submission import BatchOptions, submit

#: Public name -> the module defining it. Loaded lazily, so ``kiabatch --version`` and the
#: CLI commands import only what they use.
_WHERE = {
    "Batch": ".batch",
    "BatchOptions": ".submission",
    "connect": ".connection",
    "FailedItem": ".model",
    "ItemResult": ".model",
    "KubeOptions": ".kube.options",
    "Progress": ".model",
    "Queue": ".queue",
    "State": ".model",
    "Status": ".model",
    "submit": ".submission",
    **dict.fromkeys(
        ("BatchFailedError", "ClusterError", "InterruptedBatchError", "KiabatchError", "NotFoundError",
         "UnreachableError", "UsageError"),
        ".errors",
    ),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kiabatch' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "Batch",
    "BatchFailedError",
    "BatchOptions",
    "ClusterError",
    "FailedItem",
    "InterruptedBatchError",
    "ItemResult",
    "KiabatchError",
    "KubeOptions",
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
