"""Open the :class:`~kiabatch.schedules.Schedules` of a backend: Redis and the local scheduler, or CronJobs.

A module of its own so that neither implementation imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..schedules import Schedules
from ..store import Store


def open_schedules(
    backend: str,
    *,
    store: Callable[[], Store],
    redis_url: str | None = None,
    home: Path | None = None,
    namespace: str | None = None,
    context: str | None = None,
) -> Schedules:
    """The schedules of ``backend``; ``store`` opens the Redis store when it is needed."""
    if backend == "kubernetes":
        from ..kube.api import Cluster  # the Kubernetes client, only when it is needed
        from ..kube.schedule_ops import KubeSchedules

        return KubeSchedules(Cluster.connect(context, namespace), store)
    from ..scheduler import LocalSchedules

    return LocalSchedules(store(), redis_url=redis_url, home=home)
