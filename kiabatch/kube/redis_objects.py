"""kiabatch's own Redis on Kubernetes: a replicated StatefulSet and what goes with it.

Pure functions from :class:`RedisOptions` to dicts. ``kiabatch redis render``
prints them, ``kiabatch redis deploy`` applies them (server-side apply) and
``manifests/redis/`` is generated from them (``python -m kiabatch.kube.manifests --write``).

The design:

* StatefulSet ``kiabatch-redis`` (OrderedReady): pod 0 is the primary, every
  other pod a replica. The ``init`` container (``init.sh``) picks the role from the
  pod's ordinal: pod N waits until pod 0's stable name
  ``kiabatch-redis-0.kiabatch-redis.<ns>.svc.<domain>`` answers PING, then writes
  ``replicaof``. Scaling up adds replicas; nothing else changes.
* Each pod has its own volume (volumeClaimTemplate ``data``) with an append-only
  file fsynced every second, so a replaced pod 0 comes back with its data.
* The password lives only in the Secret ``kiabatch-redis-auth``; containers read it
  through ``secretKeyRef`` and ``start.sh`` hands it to redis-server on standard
  input. ConfigMap ``kiabatch-redis-config`` holds redis.conf and the scripts
  (``kiabatch/data/redis/*.sh``), never the password. ``render`` leaves the Secret
  out (it would have to print the password); ``deploy`` generates it.
* Services: headless ``kiabatch-redis`` (per-pod DNS names), ``kiabatch-redis-primary``
  (pod 0 only, for writes) and ``kiabatch-redis-replicas`` (every ready pod, for
  reads: a Service selector cannot exclude pod 0, and while the primary is down
  or not ready only replicas answer there).
* A PodDisruptionBudget (one pod down at a time) and a NetworkPolicy admitting, on
  the Redis port, only pods labelled ``kiabatch.io/redis-client: "true"`` (every
  batch pod), the backup Job's pods and the Redis pods themselves (replication).

Backups and restores are in :mod:`kiabatch.kube.redis_backup`; the full list of
objects in :mod:`kiabatch.kube.redis_manifests`; the workflows that apply and
inspect them on a cluster in :mod:`kiabatch.kube.redis_ops`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

from ..errors import UsageError
from .objects import (
    COMPONENT_LABEL,
    NAME_LABEL,
    REDIS_CLIENT_LABEL,
    container_security,
    labels,
    metadata,
    pod_security,
    prune,
    resources,
    secret_env,
)
from .options import PRIMARY_SERVICE, REPLICAS_SERVICE

STATEFULSET = "kiabatch-redis"
#: The headless Service shares the StatefulSet's name (pod DNS names).
HEADLESS_SERVICE = STATEFULSET
CONFIG_MAP = "kiabatch-redis-config"
AUTH_SECRET = "kiabatch-redis-auth"  # noqa: S105 - a Secret's name
AUTH_SECRET_KEY = "password"  # noqa: S105 - a key in that Secret
DISRUPTION_BUDGET = "kiabatch-redis"
NETWORK_POLICY = "kiabatch-redis"
DATA_VOLUME = "data"
PORT = 6379
#: The official redis image's ``redis`` user and group.
REDIS_UID = 999
#: Redis 7.2 is the last BSD-licensed release line; any Redis >= 7.0 image with sh works.
DEFAULT_IMAGE = "docker.io/library/redis:7.2-bookworm"
COMPONENT = "redis"
#: Pods of the backup, restore and listing Jobs (admitted by the NetworkPolicy).
BACKUP_COMPONENT = "redis-backup"
#: Mount paths inside the Redis containers.
CONFIG_DIR = "/etc/kiabatch-redis"
RUN_DIR = "/run/kiabatch-redis"
DATA_DIR = "/data"
#: The label the StatefulSet controller puts on each pod (selects pod 0 for the primary Service).
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
#: The shell scripts the ConfigMap carries (kiabatch/data/redis/).
SCRIPTS = ("init.sh", "start.sh", "probe.sh", "backup.sh", "restore.sh", "info.sh")
RETENTION_POLICIES = ("Retain", "Delete")
#: redis.conf's maxmemory, as a share of the container's memory limit (forks for
#: AOF rewrites and replica syncs need headroom for copy-on-write).
MAXMEMORY_SHARE = 0.7

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_CPU = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class RedisOptions:
    """Everything that varies between deployments of kiabatch's Redis."""

    #: None renders namespace-less objects (the kustomize base).
    namespace: str | None = "default"
    replicas: int = 3
    image: str = DEFAULT_IMAGE
    image_pull_policy: str | None = None
    storage_size: str = "8Gi"
    storage_class: str | None = None
    #: persistentVolumeClaimRetentionPolicy: what happens to the pods' volumes.
    pvc_when_deleted: str = "Retain"
    pvc_when_scaled: str = "Retain"
    cpu: str = "250m"
    memory: str = "1Gi"
    cluster_domain: str = "cluster.local"
    #: How long a replica's init container waits for pod 0 (tries x seconds).
    primary_wait_tries: int = 60
    primary_wait_seconds: int = 2
    backup_schedule: str = "17 3 * * *"
    backup_time_zone: str = "Etc/UTC"
    backup_keep: int = 7
    backup_storage_size: str = "20Gi"
    backup_storage_class: str | None = None
    #: A missed scheduled backup may still start this many seconds late.
    backup_starting_deadline: int = 3600
    #: Finished backup Jobs (and their pods) are removed after this many seconds.
    backup_ttl: int = 86400


def quantity_bytes(text: str) -> int:
    """Bytes in a Kubernetes memory/storage quantity (``1Gi``, ``512M``, ``1000``)."""
    match = _QUANTITY.match(text)
    if not match:
        raise UsageError(f"bad quantity {text!r}: expected a number with an optional unit like 512Mi or 8Gi")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def validate(options: RedisOptions) -> RedisOptions:
    """``options`` if they make a valid deployment; else UsageError naming the bad value."""
    if options.namespace is not None and not _DNS_LABEL.match(options.namespace):
        raise UsageError(f"bad namespace {options.namespace!r}: expected a DNS label (lower case, digits, -)")
    if not 1 <= options.replicas <= 100:
        raise UsageError(f"--replicas must be between 1 and 100, not {options.replicas}")
    for name, value in (("--pvc-when-deleted", options.pvc_when_deleted),
                        ("--pvc-when-scaled", options.pvc_when_scaled)):  # fmt: skip
        if value not in RETENTION_POLICIES:
            raise UsageError(f"{name} must be Retain or Delete, not {value!r}")
    for value in (options.storage_size, options.backup_storage_size, options.memory):
        if quantity_bytes(value) <= 0:
            raise UsageError(f"quantity {value!r} must be more than zero")
    if not _CPU.match(options.cpu):
        raise UsageError(f"bad --cpu {options.cpu!r}: expected cores (0.5, 2) or millicores (250m)")
    if quantity_bytes(options.memory) < 64 * 2**20:
        raise UsageError(f"--memory {options.memory!r} is too small for Redis (at least 64Mi)")
    if options.backup_keep < 1:
        raise UsageError(f"--backup-keep must be at least 1, not {options.backup_keep}")
    fields = options.backup_schedule.split()
    if not (len(fields) == 5 or (len(fields) == 1 and fields[0].startswith("@"))):
        raise UsageError(f"bad --backup-schedule {options.backup_schedule!r}: expected 5 cron fields or @daily")
    if not options.image or any(c.isspace() for c in options.image):
        raise UsageError(f"bad --image {options.image!r}")
    if options.primary_wait_tries < 1 or options.primary_wait_seconds < 1:
        raise UsageError("the primary wait tries and seconds must be at least 1")
    return options


def backup_pod_labels() -> dict[str, str]:
    """Labels of the backup Jobs' pods (the NetworkPolicy admits them)."""
    return labels(BACKUP_COMPONENT)


def selector_labels() -> dict[str, str]:
    """The labels every kiabatch-redis pod has (the StatefulSet's immutable selector)."""
    return {NAME_LABEL: "kiabatch", COMPONENT_LABEL: COMPONENT}


def pod_address(ordinal: int) -> str:
    """``host:port`` of one pod, by its stable DNS name (resolved inside the namespace)."""
    return f"{STATEFULSET}-{ordinal}.{HEADLESS_SERVICE}:{PORT}"


def script(name: str) -> str:
    """The text of one of the scripts in ``kiabatch/data/redis/``."""
    return importlib_resources.files("kiabatch").joinpath("data", "redis", name).read_text()


def redis_conf(options: RedisOptions) -> str:
    """redis.conf for every pod (the role and the password are added by start.sh)."""
    maxmemory = int(quantity_bytes(options.memory) * MAXMEMORY_SHARE)
    return "\n".join(
        [
            "# kiabatch-redis: the settings every pod shares. start.sh adds the data",
            "# directory, this pod's role (role.conf, from init.sh) and requirepass/masterauth",
            "# from the Secret.",
            "bind * -::*",
            f"port {PORT}",
            "protected-mode yes",
            "# Durability: an append-only file fsynced every second; no RDB saves.",
            "appendonly yes",
            "appendfsync everysec",
            'appendfilename "appendonly.aof"',
            'appenddirname "appendonlydir"',
            "aof-use-rdb-preamble yes",
            'save ""',
            "dbfilename dump.rdb",
            "# A work queue must never lose keys to eviction.",
            f"maxmemory {maxmemory}",
            "maxmemory-policy noeviction",
            "# Replicas serve reads (kiabatch status --read-only), even while the primary is away.",
            "replica-read-only yes",
            "replica-serve-stale-data yes",
            "repl-diskless-sync yes",
            "tcp-keepalive 60",
            "loglevel notice",
            'logfile ""',
            "",
        ]
    )


def config_map(options: RedisOptions) -> dict[str, Any]:
    """redis.conf and the scripts (no secret)."""
    data = {"redis.conf": redis_conf(options), **{name: script(name) for name in SCRIPTS}}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(CONFIG_MAP, options.namespace, labels(COMPONENT)),
        "data": data,
    }


def config_hash(options: RedisOptions) -> str:
    """A digest of the ConfigMap's data: a change rolls the pods (pod template annotation)."""
    data = json.dumps(config_map(options)["data"], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def auth_secret(password: str, namespace: str) -> dict[str, Any]:
    """The password Secret (created by ``redis deploy``; never rendered or printed)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(AUTH_SECRET, namespace, labels("redis-credentials")),
        "type": "Opaque",
        "stringData": {AUTH_SECRET_KEY: password},
    }


def password_env(name: str) -> dict[str, Any]:
    """An environment variable holding the password, from the Secret."""
    return secret_env(name, AUTH_SECRET, AUTH_SECRET_KEY)


def _service(name: str, options: RedisOptions, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, options.namespace, labels(COMPONENT)),
        "spec": {
            **spec,
            "selector": selector,
            "ports": [{"name": "redis", "port": PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def headless_service(options: RedisOptions) -> dict[str, Any]:
    """Gives every pod its DNS name, published before the pod is ready (replicas find pod 0 early)."""
    return _service(HEADLESS_SERVICE, options, selector_labels(), clusterIP="None",
                    publishNotReadyAddresses=True)  # fmt: skip


def primary_service(options: RedisOptions) -> dict[str, Any]:
    """Writes go to pod 0 only."""
    return _service(PRIMARY_SERVICE, options, {**selector_labels(), POD_NAME_LABEL: f"{STATEFULSET}-0"})


def replicas_service(options: RedisOptions) -> dict[str, Any]:
    """Reads: every ready pod (replicas are read-only; the primary too, while it is ready)."""
    return _service(REPLICAS_SERVICE, options, selector_labels())


def _script_command(name: str, *args: str) -> list[str]:
    return ["sh", f"{CONFIG_DIR}/{name}", *args]


def _mounts(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "run", "mountPath": RUN_DIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        *extra,
    ]


def config_volumes() -> list[dict[str, Any]]:
    """The ConfigMap (scripts, redis.conf) and two small emptyDirs (role.conf / sockets, /tmp)."""
    return [
        {"name": "config", "configMap": {"name": CONFIG_MAP, "defaultMode": 0o444}},
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]


def _probe(mode: str, **timing: int) -> dict[str, Any]:
    return {"exec": {"command": _script_command("probe.sh", mode)}, "timeoutSeconds": 5, **timing}


def init_container(options: RedisOptions) -> dict[str, Any]:
    """Chooses the pod's role (init.sh); a replica waits here until pod 0 answers."""
    return prune(
        {
            "name": "init",
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "command": _script_command("init.sh"),
            "env": [
                {"name": "KIABATCH_REDIS_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "KIABATCH_REDIS_SERVICE", "value": HEADLESS_SERVICE},
                {"name": "KIABATCH_REDIS_CLUSTER_DOMAIN", "value": options.cluster_domain},
                {"name": "KIABATCH_REDIS_PORT", "value": str(PORT)},
                {"name": "KIABATCH_REDIS_RUN", "value": RUN_DIR},
                {"name": "KIABATCH_REDIS_WAIT_TRIES", "value": str(options.primary_wait_tries)},
                {"name": "KIABATCH_REDIS_WAIT_SECONDS", "value": str(options.primary_wait_seconds)},
                password_env("REDISCLI_AUTH"),
            ],
            "resources": resources("50m", "64Mi", limit_cpu="500m"),
            "volumeMounts": _mounts(),
            "securityContext": container_security(read_only_root=True),
        }
    )


def redis_container(options: RedisOptions) -> dict[str, Any]:
    """redis-server, started by start.sh with the role and the password."""
    return prune(
        {
            "name": "redis",
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "command": _script_command("start.sh"),
            "env": [
                {"name": "KIABATCH_REDIS_CONFIG", "value": CONFIG_DIR},
                {"name": "KIABATCH_REDIS_RUN", "value": RUN_DIR},
                {"name": "KIABATCH_REDIS_DATA", "value": DATA_DIR},
                {"name": "KIABATCH_REDIS_PORT", "value": str(PORT)},
                password_env("REDIS_PASSWORD"),
                password_env("REDISCLI_AUTH"),  # for the probes' redis-cli
            ],
            "ports": [{"name": "redis", "containerPort": PORT, "protocol": "TCP"}],
            "readinessProbe": _probe("ready", periodSeconds=5, failureThreshold=3),
            # LOADING counts as alive: a large append-only file may take minutes to load.
            "livenessProbe": _probe("live", initialDelaySeconds=15, periodSeconds=10, failureThreshold=6),
            "resources": resources(options.cpu, options.memory),
            "volumeMounts": _mounts({"name": DATA_VOLUME, "mountPath": DATA_DIR}),
            "securityContext": container_security(read_only_root=True),
        }
    )


def redis_pod_security() -> dict[str, Any]:
    """Restricted, as the image's redis user; volumes are chowned only when needed."""
    return {**pod_security(REDIS_UID), "fsGroupChangePolicy": "OnRootMismatch"}


def data_claim_spec(options: RedisOptions) -> dict[str, Any]:
    """The PVC spec of one pod's data volume."""
    return prune(
        {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": options.storage_class,
            "resources": {"requests": {"storage": options.storage_size}},
        }
    )


def statefulset(options: RedisOptions) -> dict[str, Any]:
    """Pod 0 the primary, pods 1..N-1 replicas, each with its own ``data`` volume."""
    pod_labels = labels(COMPONENT)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(STATEFULSET, options.namespace, labels(COMPONENT)),
        "spec": {
            "serviceName": HEADLESS_SERVICE,
            "replicas": options.replicas,
            # Pod N starts only once pods 0..N-1 are ready: the primary comes first.
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels()},
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": options.pvc_when_deleted,
                "whenScaled": options.pvc_when_scaled,
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"kiabatch.io/config-hash": config_hash(options)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": redis_pod_security(),
                    # Spread over nodes when possible, so one node loss takes one pod.
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": selector_labels()},
                                    },
                                }
                            ]
                        }
                    },
                    "initContainers": [init_container(options)],
                    "containers": [redis_container(options)],
                    "volumes": config_volumes(),
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": DATA_VOLUME, "labels": labels(COMPONENT)},
                    "spec": data_claim_spec(options),
                }
            ],
        },
    }


def data_claim_name(ordinal: int) -> str:
    """The PVC the StatefulSet gives pod ``ordinal`` (``data-kiabatch-redis-0``)."""
    return f"{DATA_VOLUME}-{STATEFULSET}-{ordinal}"


def data_claim(options: RedisOptions, ordinal: int = 0) -> dict[str, Any]:
    """Pod ``ordinal``'s data PVC as the StatefulSet would create it (the StatefulSet adopts it)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(data_claim_name(ordinal), options.namespace, labels(COMPONENT)),
        "spec": data_claim_spec(options),
    }


def disruption_budget(options: RedisOptions) -> dict[str, Any]:
    """Voluntary disruptions (drains) take one pod at a time; stuck unhealthy pods may go."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(DISRUPTION_BUDGET, options.namespace, labels(COMPONENT)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels()},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(options: RedisOptions) -> dict[str, Any]:
    """Only kiabatch's pods reach Redis: batch pods, the backup Job, and the Redis pods themselves."""

    def peer(match: dict[str, str]) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": match}}

    backup = backup_pod_labels()
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(NETWORK_POLICY, options.namespace, labels(COMPONENT)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels()},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        peer({REDIS_CLIENT_LABEL: "true"}),
                        peer({NAME_LABEL: backup[NAME_LABEL], COMPONENT_LABEL: backup[COMPONENT_LABEL]}),
                        peer(selector_labels()),
                    ],
                    "ports": [{"protocol": "TCP", "port": PORT}],
                }
            ],
        },
    }
