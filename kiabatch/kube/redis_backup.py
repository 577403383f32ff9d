"""Backups, restores and status probes of kiabatch's Redis: a CronJob, a PVC and short Jobs.

Every Job here runs the Redis image with a script from the ConfigMap
(``kiabatch/data/redis/``), so the tools (redis-cli, redis-check-rdb,
redis-server) match the server's version:

* the backup CronJob (``backup.sh take``) snapshots the primary with
  ``redis-cli --rdb`` into the backup PVC as ``kiabatch-redis-<UTC time>.rdb``,
  verifies it with ``redis-check-rdb`` and keeps the newest N;
* ``kiabatch redis backup --now`` creates a Job from the CronJob's jobTemplate
  with an ownerReference to it, as ``kubectl create job --from=cronjob/...`` does;
* ``kiabatch redis backups`` runs a listing Job (``backup.sh list``) with the
  backup PVC mounted read-only and reads its log;
* ``kiabatch redis restore`` runs ``restore.sh`` in a Job that mounts the backup
  PVC and pod 0's data PVC while the StatefulSet is down;
* ``kiabatch redis status`` runs ``info.sh`` in a Job that reads INFO from every
  pod by its stable DNS name (the NetworkPolicy admits it as a Redis client).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from ..errors import UsageError
from .objects import (
    REDIS_CLIENT_LABEL,
    container_security,
    env,
    labels,
    metadata,
    pod_security,
    prune,
    resources,
)
from .redis_objects import (
    BACKUP_COMPONENT,
    CONFIG_DIR,
    DATA_DIR,
    PORT,
    PRIMARY_SERVICE,
    REDIS_UID,
    RUN_DIR,
    STATEFULSET,
    RedisOptions,
    backup_pod_labels,
    config_volumes,
    data_claim_name,
    password_env,
    pod_address,
)

BACKUP_CRONJOB = "kiabatch-redis-backup"
BACKUP_CLAIM = "kiabatch-redis-backups"
BACKUP_DIR = "/backups"
#: Snapshot file names: kiabatch-redis-20260314T031700Z.rdb (UTC; they sort by time).
SNAPSHOT_PATTERN = re.compile(r"kiabatch-redis-[0-9]{8}T[0-9]{6}Z\.rdb")
#: kubectl's annotation on a Job created by hand from a CronJob.
INSTANTIATE_ANNOTATION = "cronjob.kubernetes.io/instantiate"
#: Jobs kiabatch starts itself (listing, status, restore) are deleted by the CLI; this is a fallback.
CLI_JOB_TTL = 600


def validate_snapshot(name: str) -> str:
    """``name`` if it is a snapshot file name; else UsageError (nothing path-like gets through)."""
    if not SNAPSHOT_PATTERN.fullmatch(name):
        raise UsageError(
            f"bad snapshot name {name!r}: expected kiabatch-redis-YYYYMMDDTHHMMSSZ.rdb (see kiabatch redis backups)"
        )
    return name


def job_name(kind: str, now: float | None = None) -> str:
    """A fresh Job name: ``kiabatch-redis-<kind>-<UTC time>-<4 hex>`` (at most 63 characters)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{STATEFULSET}-{kind}-{stamp}-{secrets.token_hex(2)}"


def backup_claim(options: RedisOptions) -> dict[str, Any]:
    """The backup volume (its own PVC: deleting the StatefulSet's volumes never touches it)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(BACKUP_CLAIM, options.namespace, labels(BACKUP_COMPONENT)),
        "spec": prune(
            {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": options.backup_storage_class,
                "resources": {"requests": {"storage": options.backup_storage_size}},
            }
        ),
    }


def _job_container(
    options: RedisOptions,
    name: str,
    command: list[str],
    variables: dict[str, str],
    mounts: list[dict[str, Any]],
    *,
    password: bool,
    memory: str = "256Mi",
) -> dict[str, Any]:
    return prune(
        {
            "name": name,
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", f"{CONFIG_DIR}/{command[0]}", *command[1:]],
            "env": env({"KIABATCH_REDIS_CONFIG": CONFIG_DIR, "KIABATCH_REDIS_RUN": RUN_DIR, **variables})
            + ([password_env("REDISCLI_AUTH")] if password else []),
            "resources": resources("100m", memory, limit_cpu="1"),
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "run", "mountPath": RUN_DIR},
                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
                *mounts,
            ],
            "securityContext": container_security(read_only_root=True),
        }
    )


def _job_spec(
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    pod_labels: dict[str, str],
    *,
    ttl: int,
    deadline: int,
    retries: int,
) -> dict[str, Any]:
    return {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": retries,
        "activeDeadlineSeconds": deadline,
        "ttlSecondsAfterFinished": ttl,
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": pod_security(REDIS_UID),
                "containers": [container],
                "volumes": [*config_volumes(), *volumes],
            },
        },
    }


def _backup_volume(read_only: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "backups", "persistentVolumeClaim": {"claimName": BACKUP_CLAIM, "readOnly": read_only}}
    mount = {"name": "backups", "mountPath": BACKUP_DIR, "readOnly": read_only}
    return volume, mount


def backup_job_spec(options: RedisOptions) -> dict[str, Any]:
    """The Job that takes, verifies and prunes one snapshot (the CronJob's template)."""
    volume, mount = _backup_volume(read_only=False)
    container = _job_container(
        options,
        "backup",
        ["backup.sh", "take"],
        {
            "KIABATCH_REDIS_PRIMARY_ADDRESS": f"{PRIMARY_SERVICE}:{PORT}",
            "KIABATCH_BACKUP_DIR": BACKUP_DIR,
            "KIABATCH_BACKUP_KEEP": str(options.backup_keep),
        },
        [mount],
        password=True,
    )
    return _job_spec(container, [volume], backup_pod_labels(), ttl=options.backup_ttl, deadline=3600,
                     retries=2)  # fmt: skip


def backup_cronjob(options: RedisOptions) -> dict[str, Any]:
    """Snapshots on a schedule, never two at once, skipped if more than the deadline late."""
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(BACKUP_CRONJOB, options.namespace, labels(BACKUP_COMPONENT)),
        "spec": {
            "schedule": options.backup_schedule,
            "timeZone": options.backup_time_zone,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": options.backup_starting_deadline,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels(BACKUP_COMPONENT)},
                "spec": backup_job_spec(options),
            },
        },
    }


def job_from_cronjob(cronjob: dict[str, Any], name: str) -> dict[str, Any]:
    """A Job from a live CronJob's jobTemplate, owned by it (``kubectl create job --from=cronjob/``)."""
    template = cronjob["spec"]["jobTemplate"]
    annotations = {**(template.get("metadata", {}).get("annotations") or {}), INSTANTIATE_ANNOTATION: "manual"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": prune(
            {
                "name": name,
                "namespace": cronjob["metadata"].get("namespace"),
                "labels": dict(template.get("metadata", {}).get("labels") or {}),
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "CronJob",
                        "name": cronjob["metadata"]["name"],
                        "uid": cronjob["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            }
        ),
        "spec": template["spec"],
    }


def list_job(options: RedisOptions, name: str) -> dict[str, Any]:
    """Prints the snapshots in the backup PVC (mounted read-only), one per line."""
    volume, mount = _backup_volume(read_only=True)
    container = _job_container(options, "list", ["backup.sh", "list"], {"KIABATCH_BACKUP_DIR": BACKUP_DIR},
                               [mount], password=False, memory="64Mi")  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, options.namespace, labels(BACKUP_COMPONENT)),
        "spec": _job_spec(container, [volume], backup_pod_labels(), ttl=CLI_JOB_TTL, deadline=300, retries=0),
    }


def restore_job(options: RedisOptions, snapshot: str, name: str) -> dict[str, Any]:
    """Loads ``snapshot`` into pod 0's data PVC (run while the StatefulSet is down)."""
    validate_snapshot(snapshot)
    backups, backups_mount = _backup_volume(read_only=True)
    data = {"name": "data", "persistentVolumeClaim": {"claimName": data_claim_name(0)}}
    container = _job_container(
        options,
        "restore",
        ["restore.sh", snapshot],
        {"KIABATCH_BACKUP_DIR": BACKUP_DIR, "KIABATCH_REDIS_DATA": DATA_DIR},
        [backups_mount, {"name": "data", "mountPath": DATA_DIR}],
        password=False,
        memory=options.memory,  # the snapshot is loaded into memory once
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, options.namespace, labels(BACKUP_COMPONENT)),
        "spec": _job_spec(container, [backups, data], backup_pod_labels(), ttl=CLI_JOB_TTL, deadline=21600, retries=0),
    }


def status_job(options: RedisOptions, name: str, replicas: int) -> dict[str, Any]:
    """Prints INFO of pods 0..replicas-1 (read by ``kiabatch redis status``)."""
    pods = " ".join(pod_address(ordinal) for ordinal in range(replicas))
    container = _job_container(options, "info", ["info.sh"], {"KIABATCH_REDIS_PODS": pods}, [],
                               password=True, memory="64Mi")  # fmt: skip
    pod_labels = {**labels("redis-status"), REDIS_CLIENT_LABEL: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, options.namespace, labels("redis-status")),
        "spec": _job_spec(container, [], pod_labels, ttl=CLI_JOB_TTL, deadline=300, retries=0),
    }
