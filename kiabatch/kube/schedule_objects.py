"""The Kubernetes objects of a schedule: a CronJob whose pod is a small *launcher*.

The launcher (kiabatch image) runs ``kiabatch submit ARGS --backend kubernetes
--wait``, so every run is an ordinary batch with its own Indexed Job. It runs
under its own ServiceAccount, bound to a Role with exactly the verbs it needs in
its namespace — nothing cluster-wide:

* ``jobs``: create, get, list, watch, delete (create the batch's Job, follow it,
  replace it when a run is resumed);
* ``pods``: get, list (spot pods that cannot start); ``pods/log``: get.

Each launcher pod knows its run by the Job it belongs to (the downward API gives it
the ``batch.kubernetes.io/job-name`` label as ``KIABATCH_RUN``); the run's batch id is
derived from that name, so a launcher pod that is killed and replaced (the Job's
``backoffLimit``) attaches to the batch its predecessor created.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from ..schedules import Schedule, submit_argv
from .batch_job import KubeOptions, worker_service_account
from .objects import (
    JOB_NAME_LABEL,
    REDIS_CLIENT_LABEL,
    SCHEDULE_LABEL,
    container_security,
    labels,
    metadata,
    pod_security,
    prune,
    resources,
    secret_env,
)

LAUNCHER_SERVICE_ACCOUNT = "kiabatch-launcher"
LAUNCHER_ROLE = "kiabatch-launcher"
#: The schedule's definition, kept on the CronJob for ``schedule show``.
SPEC_ANNOTATION = "kiabatch.io/schedule-spec"
#: Exactly what the launcher may do, in its own namespace.
LAUNCHER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
SUCCESSFUL_HISTORY = 3
FAILED_HISTORY = 3
#: A launcher that dies is replaced this many times; the replacement attaches to the run's batch.
LAUNCHER_RETRIES = 3


def launcher_service_account(namespace: str) -> dict[str, Any]:
    """The launcher's ServiceAccount (its token is mounted: it talks to the API)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(LAUNCHER_SERVICE_ACCOUNT, namespace, labels("launcher")),
        "automountServiceAccountToken": True,
    }


def launcher_role(namespace: str) -> dict[str, Any]:
    """The launcher's Role: exactly :data:`LAUNCHER_RULES`."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(LAUNCHER_ROLE, namespace, labels("launcher")),
        "rules": LAUNCHER_RULES,
    }


def launcher_role_binding(namespace: str) -> dict[str, Any]:
    """Binds the launcher's Role to its ServiceAccount, in one namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(LAUNCHER_ROLE, namespace, labels("launcher")),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": LAUNCHER_SERVICE_ACCOUNT, "namespace": namespace}],
    }


def launcher_args(schedule: Schedule) -> list[str]:
    """The launcher's ``kiabatch`` arguments: the schedule's submit, on this cluster, waited for."""
    return submit_argv(schedule.submit_args, "--backend", "kubernetes", "--wait", "--quiet")


def cron_job(schedule: Schedule, options: KubeOptions) -> dict[str, Any]:
    """The CronJob that starts ``schedule``'s runs."""
    schedule_labels = labels("schedule", **{SCHEDULE_LABEL: schedule.name})
    pod_labels = {**schedule_labels, REDIS_CLIENT_LABEL: "true"}
    launcher = {
        "name": "launcher",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": launcher_args(schedule),
        "env": [
            secret_env("KIABATCH_REDIS_URL", options.redis_secret, options.redis_secret_key),
            {"name": "KIABATCH_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "KIABATCH_RUN", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}}},
            {"name": "KIABATCH_SCHEDULE", "value": schedule.name},
            {"name": "KIABATCH_IMAGE", "value": options.image},
            {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir
        ],
        "resources": resources("100m", "256Mi", limit_cpu="500m"),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
        "securityContext": container_security(read_only_root=True),
    }
    definition = {k: v for k, v in json.loads(schedule.to_json()).items() if k not in ("created_at",)}
    return prune(
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": metadata(
                schedule.name,
                options.namespace,
                schedule_labels,
                {SPEC_ANNOTATION: json.dumps(definition, sort_keys=True)},
            ),
            "spec": {
                "schedule": schedule.cron,
                "timeZone": schedule.time_zone,
                "concurrencyPolicy": schedule.concurrency.capitalize(),
                "startingDeadlineSeconds": schedule.starting_deadline,
                "successfulJobsHistoryLimit": SUCCESSFUL_HISTORY,
                "failedJobsHistoryLimit": FAILED_HISTORY,
                "suspend": schedule.suspend,
                "jobTemplate": {
                    "metadata": {"labels": schedule_labels},
                    "spec": {
                        "backoffLimit": LAUNCHER_RETRIES,
                        "podReplacementPolicy": "Failed",  # never two launchers of one run at once
                        "ttlSecondsAfterFinished": options.ttl_after_finished,
                        "template": {
                            "metadata": {"labels": pod_labels},
                            "spec": {
                                "restartPolicy": "Never",
                                "serviceAccountName": LAUNCHER_SERVICE_ACCOUNT,
                                "automountServiceAccountToken": True,
                                "enableServiceLinks": False,
                                "securityContext": pod_security(),
                                "containers": [launcher],
                                "volumes": [{"name": "tmp", "emptyDir": {}}],
                            },
                        },
                    },
                },
            },
        }
    )


def schedule_objects(schedule: Schedule, options: KubeOptions) -> list[dict[str, Any]]:
    """Everything ``schedule create --backend kubernetes`` applies, in order."""
    namespace = options.namespace
    return [
        worker_service_account(namespace),
        launcher_service_account(namespace),
        launcher_role(namespace),
        launcher_role_binding(namespace),
        cron_job(schedule, options),
    ]


def job_from_cron_job(cron: dict[str, Any], suffix: str | None = None) -> dict[str, Any]:
    """A Job from the CronJob's template, owned by it (``kubectl create job --from=cronjob/NAME``)."""
    name = cron["metadata"]["name"]
    suffix = suffix or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    template = cron["spec"]["jobTemplate"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{name}-manual-{suffix}",
            "namespace": cron["metadata"]["namespace"],
            "labels": dict(template.get("metadata", {}).get("labels", {})),
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": name,
                    "uid": cron["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }
