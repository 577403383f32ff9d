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

import copy
import math
import re
from typing import Any

from ..errors import UsageError
from ..model import BatchSpec
from ..workloads.base import Runtime
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
from .options import (  # noqa: F401 - re-exported: the names every batch object uses
    DEFAULT_IMAGE,
    DEFAULT_TTL_AFTER_FINISHED,
    REDIS_SECRET,
    REDIS_SECRET_KEY,
    WORKER_SERVICE_ACCOUNT,
    KubeOptions,
    default_image,
)

#: Where the task emptyDir is mounted in every container of the pod.
TASK_DIR = "/kiabatch/task"
#: The kiabatch image keeps the worker programs here, on PATH (see the Dockerfile).
IMAGE_WORKERS_DIR = "/opt/kiabatch/workers"
#: In the kiabatch image the worker programs are commands on PATH.
IMAGE_RUNTIME = Runtime(workers_dir=IMAGE_WORKERS_DIR)


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


#: Variables the reporter reads from ``--results-secret`` (the names AWS SDKs and obstore read), and
#: whether the Secret must have them.
RESULTS_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", True), ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", False),
                       ("AWS_REGION", False))  # fmt: skip
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def with_results_store(
    container: dict[str, Any], spec: BatchSpec, options: KubeOptions
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reporter ``container`` given what it needs to upload to the batch's results store, and the pod volumes.

    The store's URL, endpoint and inline limit travel in the batch's meta (the claim
    writes them to task.json); here only what must come from the cluster is added:
    credentials from ``--results-secret`` through ``secretKeyRef`` (never inlined),
    or nothing, so the pod's identity (IRSA, Workload Identity) signs; and for a
    ``file://`` store the ``--results-volume`` claim mounted at its path. Only this
    container gets them: the worker never sees the credentials.
    """
    for name in (options.results_secret, options.results_volume):
        if name is not None and not _DNS_SUBDOMAIN.match(name):
            raise UsageError(f"bad Kubernetes object name {name!r}: expected lower case letters, digits, '-' or '.'")
    if not spec.results_to:
        if options.results_secret or options.results_volume:
            raise UsageError("--results-secret and --results-volume need --results-to")
        return container, []
    container = copy.deepcopy(container)
    volumes: list[dict[str, Any]] = []
    if spec.results_to.startswith("file://"):
        if options.results_secret:
            raise UsageError("--results-secret is for s3:// stores; a file:// store needs --results-volume")
        if not options.results_volume:
            raise UsageError("a file:// --results-to on Kubernetes needs --results-volume CLAIM (a ReadWriteMany "
                             "PersistentVolumeClaim mounted at that path)")  # fmt: skip
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": options.results_volume}})
        mount = {"name": "results", "mountPath": spec.results_to.removeprefix("file://")}
        container["volumeMounts"] = [*container.get("volumeMounts", []), mount]
        return container, volumes
    if options.results_volume:
        raise UsageError("--results-volume is for a file:// --results-to; an s3:// store needs no volume")
    if options.results_secret:
        extra = [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": options.results_secret, "key": key,
                                                         **({} if required else {"optional": True})}}}
            for key, required in RESULTS_SECRET_KEYS
        ]  # fmt: skip
        container["env"] = [*container.get("env", []), *extra]
    return container, volumes


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
    reporter, results_volumes = with_results_store(
        _kiabatch_container(
            "reporter",
            ["task", "report", "--await", "--dir", TASK_DIR],
            options,
            restartPolicy="Always",  # a native sidecar: runs beside the worker, stops after it
            resources=resources("50m", "512Mi", limit_cpu="500m"),
        ),
        spec,
        options,
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
                        "volumes": [
                            {"name": "task", "emptyDir": {}},
                            {"name": "tmp", "emptyDir": {}},
                            *results_volumes,
                        ],
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
