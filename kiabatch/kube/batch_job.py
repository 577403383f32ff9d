"""The Kubernetes objects of one batch: an Indexed Job and the workers' ServiceAccount.

Pure functions from a :class:`~kiabatch.model.BatchSpec` and :class:`KubeOptions`
to dicts. ``kiabatch submit --backend kubernetes`` creates exactly what
``kiabatch render`` prints, and ``manifests/`` is generated from them too.

The pod runs the same three steps as the local backend:

* ``claim`` (init container, kiabatch image): ``kiabatch task claim`` claims the
  completion index's items from Redis and lays them out in the ``task`` emptyDir;
* ``worker`` (the workload's image): ``/bin/sh run.sh`` runs the unmodified
  program once per item, reading every argument from files (never shell text);
* ``reporter`` (native sidecar, kiabatch image): ``kiabatch task report --await``
  uploads the outcome once run.sh is done, then writes ``reported``.

Why a sidecar reports, and why the worker waits for it: the worker image may
have no Python or kiabatch at all, so the upload cannot run in it; and run.sh
exits only after the reporter confirmed, so a pod never *succeeds* before its
result is in Redis. A pod killed between the worker's exit and the upload
therefore fails, the Job retries the index, the claim returns the same items,
and the idempotent report counts the outcome once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..model import BatchSpec
from ..workloads.base import Runtime
from .jobs import DEFAULT_PULL_GRACE
from .objects import (
    BATCH_LABEL,
    REDIS_CLIENT_LABEL,
    RUN_LABEL,
    SCHEDULE_LABEL,
    WORKLOAD_LABEL,
    container_security,
    env,
    labels,
    metadata,
    pod_security,
    prune,
    resources,
    secret_env,
)

#: Where the task emptyDir is mounted in every container of the pod.
TASK_DIR = "/kiabatch/task"
#: The kiabatch image keeps the worker programs here, on PATH (see the Dockerfile).
IMAGE_WORKERS_DIR = "/opt/kiabatch/workers"
#: In the kiabatch image the worker programs are commands on PATH.
IMAGE_RUNTIME = Runtime(workers_dir=IMAGE_WORKERS_DIR)
DEFAULT_IMAGE = "ghcr.io/kiabatch/kiabatch"
WORKER_SERVICE_ACCOUNT = "kiabatch-worker"
REDIS_SECRET = "kiabatch-redis"  # noqa: S105 - the Secret's name, not a secret
REDIS_SECRET_KEY = "url"  # noqa: S105 - a key name
#: A finished Job (and its pods) is removed after a day; results stay in Redis.
DEFAULT_TTL_AFTER_FINISHED = 86400


def default_image() -> str:
    """``ghcr.io/kiabatch/kiabatch:<version>`` (override with --image / KIABATCH_IMAGE)."""
    from .._version import __version__

    return f"{DEFAULT_IMAGE}:{__version__}"


@dataclass(frozen=True)
class KubeOptions:
    """Cluster-side settings of a batch (everything the BatchSpec does not say)."""

    namespace: str = "default"
    #: The kiabatch image (claim, reporter, and the worker unless the workload names one).
    image: str = field(default_factory=default_image)
    image_pull_policy: str | None = None
    cpu: str = "1"
    memory: str = "1Gi"
    redis_secret: str = REDIS_SECRET
    redis_secret_key: str = REDIS_SECRET_KEY
    service_account: str = WORKER_SERVICE_ACCOUNT
    ttl_after_finished: int = DEFAULT_TTL_AFTER_FINISHED
    #: None: derived from the number of tasks (see :func:`default_max_failed_indexes`).
    max_failed_indexes: int | None = None
    #: The worker container's root filesystem is read-only (a /tmp emptyDir is mounted).
    read_only_root: bool = True
    #: Name of the Job (default: the batch id; a resumed batch gets a suffix).
    job_name: str | None = None
    #: kubeconfig context (None: the current one). Not rendered.
    context: str | None = None
    #: Seconds a finished worker waits for the reporter to confirm the upload before failing the pod.
    report_timeout: int = 600
    #: Seconds pods may fail to start (image pull, missing Secret) before ``--wait`` gives up. Not rendered.
    pull_grace: float = DEFAULT_PULL_GRACE


def default_max_failed_indexes(tasks: int) -> int:
    """Failed indexes tolerated before the Job stops: 10% of the tasks, at least 10.

    One poison item fails only its own index; a flood of failures (a broken image,
    a bad command) stops the Job early instead of burning through every index.
    """
    limit = min(tasks, max(10, math.ceil(tasks / 10)))
    return min(limit, 10_000) if tasks > 100_000 else limit


def batch_labels(spec: BatchSpec) -> dict[str, str]:
    """Labels of a batch's Job and pods (plus the schedule and run that started it, if any)."""
    extra = {BATCH_LABEL: spec.id, WORKLOAD_LABEL: spec.workload, SCHEDULE_LABEL: spec.schedule or None,
             RUN_LABEL: spec.run or None}  # fmt: skip
    return labels("batch", **extra)


def _task_mount() -> dict[str, str]:
    return {"name": "task", "mountPath": TASK_DIR}


def _kiabatch_container(name: str, args: list[str], options: KubeOptions, **extra: Any) -> dict[str, Any]:
    return prune(
        {
            "name": name,
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "args": args,
            "env": [
                secret_env("KIABATCH_REDIS_URL", options.redis_secret, options.redis_secret_key),
                {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir
            ],
            "volumeMounts": [_task_mount(), {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
            "securityContext": container_security(read_only_root=True),
            **extra,
        }
    )


def pod_failure_policy(spec: BatchSpec) -> dict[str, Any]:
    """Evictions and preemptions do not count; declared exit codes fail the index at once."""
    rules: list[dict[str, Any]] = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    codes = sorted(spec.worker.non_retriable_exit_codes)
    if codes:
        rules.append(
            {
                "action": "FailIndex",
                "onExitCodes": {"containerName": "worker", "operator": "In", "values": codes},
            }
        )
    return {"rules": rules}


def job(spec: BatchSpec, options: KubeOptions) -> dict[str, Any]:
    """The Indexed Job that runs ``spec``'s tasks."""
    pod_labels = {**batch_labels(spec), REDIS_CLIENT_LABEL: "true"}
    worker_env = {
        **spec.worker.env,
        "KIABATCH_TASK_DIR": TASK_DIR,
        "KIABATCH_AWAIT_REPORT": "1",
        "KIABATCH_REPORT_TIMEOUT": str(options.report_timeout),
        "KIABATCH_BATCH": spec.id,
        "HOME": "/tmp",  # noqa: S108 - an emptyDir
    }
    worker = {
        "name": "worker",
        "image": spec.worker.image or options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["/bin/sh", f"{TASK_DIR}/run.sh"],
        "env": env(worker_env),
        "resources": resources(options.cpu, options.memory),
        "volumeMounts": [_task_mount(), {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
        "securityContext": container_security(read_only_root=options.read_only_root),
    }
    claim = _kiabatch_container(
        "claim",
        ["task", "claim", "--batch", spec.id, "--dir", TASK_DIR],
        options,
        resources=resources("50m", "128Mi", limit_cpu="500m"),
    )
    reporter = _kiabatch_container(
        "reporter",
        ["task", "report", "--await", "--dir", TASK_DIR],
        options,
        restartPolicy="Always",  # a native sidecar: runs beside the worker, stops after it
        resources=resources("50m", "512Mi", limit_cpu="500m"),
    )
    tasks = spec.tasks
    return prune(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(options.job_name or spec.id, options.namespace, batch_labels(spec)),
            "spec": {
                "completionMode": "Indexed",
                "completions": tasks,
                "parallelism": min(spec.parallelism, tasks),
                "backoffLimitPerIndex": spec.retries,
                "maxFailedIndexes": options.max_failed_indexes or default_max_failed_indexes(tasks),
                "podFailurePolicy": pod_failure_policy(spec),
                "podReplacementPolicy": "Failed",  # never two pods on one index
                "ttlSecondsAfterFinished": options.ttl_after_finished,
                "activeDeadlineSeconds": math.ceil(spec.deadline) if spec.deadline else None,
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "serviceAccountName": options.service_account,
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "activeDeadlineSeconds": math.ceil(spec.task_timeout) if spec.task_timeout else None,
                        "securityContext": pod_security(),
                        "initContainers": [claim, reporter],
                        "containers": [worker],
                        "volumes": [{"name": "task", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                    },
                },
            },
        }
    )


def worker_service_account(namespace: str, name: str = WORKER_SERVICE_ACCOUNT) -> dict[str, Any]:
    """The workers' ServiceAccount: no API token is mounted and no Role is bound."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(name, namespace, labels("worker")),
        "automountServiceAccountToken": False,
    }


def redis_secret(url: str, namespace: str, name: str = REDIS_SECRET, key: str = REDIS_SECRET_KEY) -> dict[str, Any]:
    """The Secret holding the Redis URL pods use (created by ``kiabatch secret create``; never printed)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(name, namespace, labels("redis-credentials")),
        "type": "Opaque",
        "stringData": {key: url},
    }


def batch_objects(spec: BatchSpec, options: KubeOptions) -> list[dict[str, Any]]:
    """Everything ``submit`` creates in the cluster for ``spec``, in creation order."""
    return [worker_service_account(options.namespace, options.service_account), job(spec, options)]
