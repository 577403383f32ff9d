"""Every object of kiabatch's Redis, in apply order.

``kiabatch redis render`` prints :func:`redis_deployment_objects`, ``kiabatch redis
deploy`` applies them, and ``manifests/redis/`` holds them with default options,
one file per object (written by :mod:`kiabatch.kube.manifests`, namespace
``kiabatch``, which a kustomize overlay may change)::

    python -m kiabatch.kube.manifests --write   # regenerate manifests/
    python -m kiabatch.kube.manifests --check   # exit 1 on drift (a test runs this)

The password Secret is not among them: a password must not live in a repository.
``kiabatch redis deploy`` generates it; the README shows the kubectl equivalent.
"""

from __future__ import annotations

from typing import Any

from .redis_backup import backup_claim, backup_cronjob
from .redis_objects import (
    RedisOptions,
    config_map,
    disruption_budget,
    headless_service,
    network_policy,
    primary_service,
    replicas_service,
    statefulset,
)


def redis_deployment_objects(options: RedisOptions) -> list[dict[str, Any]]:
    """Everything ``render`` prints and ``deploy`` applies, in apply order (no Secret)."""
    return [
        config_map(options),
        headless_service(options),
        primary_service(options),
        replicas_service(options),
        statefulset(options),
        disruption_budget(options),
        network_policy(options),
        backup_claim(options),
        backup_cronjob(options),
    ]
