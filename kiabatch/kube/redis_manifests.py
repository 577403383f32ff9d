"""Every object of kiabatch's Redis, and the kustomize base ``manifests/redis/`` made from them.

``kiabatch redis render`` and ``deploy`` use :func:`redis_objects`; the files in
``manifests/redis/`` are the same objects with default options, one file per
object, written by :mod:`kiabatch.kube.manifests` (namespace ``kiabatch``, which a
kustomize overlay may change)::

    python -m kiabatch.kube.manifests --write   # regenerate manifests/
    python -m kiabatch.kube.manifests --check   # exit 1 on drift (a test runs this)

The password Secret is not among them: a password must not live in a repository.
``kiabatch redis deploy`` generates it; the README shows the kubectl equivalent.
"""

from __future__ import annotations

from typing import Any

from .manifests import NAMESPACE, document, kustomization
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

_NOTE = (
    "Needs the Secret kiabatch-redis-auth (key: password) in the namespace: kiabatch redis deploy\n"
    'creates it, or see the README\'s "Redis on Kubernetes".'
)


def redis_objects(options: RedisOptions) -> list[dict[str, Any]]:
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


def file_name(obj: dict[str, Any]) -> str:
    """``statefulset-kiabatch-redis.yaml``: one file per object, named by kind and name."""
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def redis_set() -> dict[str, str]:
    """File name -> text of ``manifests/redis/`` (default options)."""
    objects = redis_objects(RedisOptions(namespace=NAMESPACE))
    files = {file_name(obj): document([obj], _NOTE) for obj in objects}
    return {"kustomization.yaml": kustomization(list(files)), **files}
