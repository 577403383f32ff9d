"""The Kubernetes objects of ``kiabatch dashboard`` in a cluster (pure builders; no client).

* Deployment ``kiabatch-dashboard``: one pod of the kiabatch image running
  ``kiabatch dashboard serve --host 0.0.0.0``, restricted Pod Security, read-only root
  (a small /tmp emptyDir), the Redis URL from the Secret kiabatch uses
  (``secretKeyRef``), the label that lets it through kiabatch-redis's NetworkPolicy,
  HTTP probes on ``/healthz`` and Prometheus scrape annotations. Read-only unless
  ``allow_actions``: then it reads and writes the primary; else it reads the
  replicas (``kiabatch/readonly.py`` maps kiabatch-redis-primary to kiabatch-redis-replicas).
* Service ``kiabatch-dashboard`` (ClusterIP; reach it with ``kubectl port-forward``),
  with the same scrape annotations.
* ServiceAccount ``kiabatch-dashboard``; with ``kube_details`` its token is mounted
  and a Role in the namespace grants exactly :data:`READ_RULES` (get/list/watch Jobs
  and pods, get pods/log, and CronJobs for the schedules page), plus
  :data:`ACTION_RULES` with ``allow_actions`` (what delete, resume, scale and
  schedule suspend/resume call). Nothing cluster-wide.
* With ``token_secret``, the pod reads ``KIABATCH_DASHBOARD_TOKEN`` from that Secret
  and every route but ``/healthz`` wants it; ``deploy`` generates the Secret, ``render``
  never prints it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
from .options import REDIS_SECRET, REDIS_SECRET_KEY, default_image

NAME = "kiabatch-dashboard"
COMPONENT = "dashboard"
TOKEN_KEY = "token"  # noqa: S105 - a key name
DEFAULT_PORT = 8577
DEFAULT_RETENTION = 900
#: What the dashboard reads in its namespace (Job conditions, pod problems, logs, CronJob schedules).
READ_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
#: Added with ``--allow-actions``: delete a batch's Job, create its resumed Job, patch parallelism and suspend.
ACTION_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete", "patch"]},
    {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["patch"]},
]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_CPU = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
_MEMORY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")


@dataclass(frozen=True)
class DashboardOptions:
    """What varies between deployments of the dashboard."""

    #: None renders namespace-less objects (the kustomize base).
    namespace: str | None = "default"
    image: str = field(default_factory=default_image)
    image_pull_policy: str | None = None
    redis_secret: str = REDIS_SECRET
    redis_secret_key: str = REDIS_SECRET_KEY
    token_secret: str | None = None
    allow_actions: bool = False
    kube_details: bool = True
    port: int = DEFAULT_PORT
    cpu: str = "100m"
    memory: str = "256Mi"
    metrics_retention: int = DEFAULT_RETENTION


def validate(options: DashboardOptions) -> DashboardOptions:
    """``options`` if they make valid objects; else UsageError naming the bad value and what is allowed."""
    if options.namespace is not None and not _DNS_LABEL.match(options.namespace):
        raise UsageError(f"bad namespace {options.namespace!r:.80}: expected a DNS label (lower case, digits, -)")
    for flag, name in (("--redis-secret", options.redis_secret), ("--token-secret", options.token_secret)):
        if name is not None and not _DNS_SUBDOMAIN.match(name):
            raise UsageError(f"bad {flag} {name!r:.80}: a Secret name is lower case letters, digits, '-' and '.'")
    if not 1 <= options.port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, not {options.port}")
    if not _CPU.match(options.cpu):
        raise UsageError(f"bad --cpu {options.cpu!r:.80}: expected cores (0.5, 2) or millicores (100m)")
    if not _MEMORY.match(options.memory):
        raise UsageError(f"bad --memory {options.memory!r:.80}: expected a quantity such as 256Mi or 1Gi")
    if not options.image or any(c.isspace() or not c.isprintable() for c in options.image):
        raise UsageError(f"bad --image {options.image!r:.80}")
    if options.metrics_retention < 0:
        raise UsageError("--metrics-retention must not be negative")
    return options


def selector_labels() -> dict[str, str]:
    """The dashboard pod's identity (the Deployment's immutable selector, and the Service's)."""
    return {NAME_LABEL: "kiabatch", COMPONENT_LABEL: COMPONENT}


def scrape_annotations(options: DashboardOptions) -> dict[str, str]:
    """The ``prometheus.io/*`` annotations common Prometheus configurations discover targets by."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(options.port), "prometheus.io/path": "/metrics"}


def rules(options: DashboardOptions) -> list[dict[str, Any]]:
    """The Role's rules: :data:`READ_RULES`, plus :data:`ACTION_RULES` with ``allow_actions`` (merged per resource)."""
    merged: dict[tuple[str, str], list[str]] = {}
    for rule in READ_RULES + (ACTION_RULES if options.allow_actions else []):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs = merged.setdefault((group, resource), [])
                verbs += [verb for verb in rule["verbs"] if verb not in verbs]
    return [{"apiGroups": [group], "resources": [resource], "verbs": verbs}
            for (group, resource), verbs in merged.items()]  # fmt: skip


def service_account(options: DashboardOptions) -> dict[str, Any]:
    """The dashboard's ServiceAccount (its token is mounted only to read the Kubernetes details)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(NAME, options.namespace, labels(COMPONENT)),
        "automountServiceAccountToken": options.kube_details,
    }


def role(options: DashboardOptions) -> dict[str, Any]:
    """Exactly :func:`rules`, in the dashboard's namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(NAME, options.namespace, labels(COMPONENT)),
        "rules": rules(options),
    }


def role_binding(options: DashboardOptions) -> dict[str, Any]:
    """Binds the Role to the dashboard's ServiceAccount."""
    subject = prune({"kind": "ServiceAccount", "name": NAME, "namespace": options.namespace})
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(NAME, options.namespace, labels(COMPONENT)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [subject],
    }


def container_args(options: DashboardOptions) -> list[str]:
    """The container's ``kiabatch`` arguments."""
    args = ["dashboard", "serve", "--host", "0.0.0.0", "--port", str(options.port),  # noqa: S104 - a pod's port
            "--backend", "kubernetes" if options.kube_details else "local",
            "--metrics-retention", f"{options.metrics_retention}s"]  # fmt: skip
    return [*args, "--allow-actions"] if options.allow_actions else args


def deployment(options: DashboardOptions) -> dict[str, Any]:
    """One dashboard pod (see the module docstring)."""
    env = [
        secret_env("KIABATCH_REDIS_URL", options.redis_secret, options.redis_secret_key),
        {"name": "KIABATCH_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir
    ]
    if options.token_secret:
        env.append(secret_env("KIABATCH_DASHBOARD_TOKEN", options.token_secret, TOKEN_KEY))
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "timeoutSeconds": 5}
    container = prune(
        {
            "name": "dashboard",
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "args": container_args(options),
            "env": env,
            "ports": [{"name": "http", "containerPort": options.port, "protocol": "TCP"}],
            "readinessProbe": {**probe, "periodSeconds": 10},
            "livenessProbe": {**probe, "initialDelaySeconds": 10, "periodSeconds": 20, "failureThreshold": 3},
            "resources": resources(options.cpu, options.memory, limit_cpu="500m"),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
            "securityContext": container_security(read_only_root=True),
        }
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, options.namespace, labels(COMPONENT)),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector_labels()},
            "template": {
                "metadata": {
                    "labels": {**labels(COMPONENT), REDIS_CLIENT_LABEL: "true"},
                    "annotations": scrape_annotations(options),
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "automountServiceAccountToken": options.kube_details,
                    "enableServiceLinks": False,
                    "securityContext": pod_security(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def service(options: DashboardOptions) -> dict[str, Any]:
    """ClusterIP Service in front of the pod (``kubectl port-forward svc/kiabatch-dashboard 8577``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(NAME, options.namespace, labels(COMPONENT), scrape_annotations(options)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(),
            "ports": [{"name": "http", "port": options.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def token_secret(options: DashboardOptions, token: str) -> dict[str, Any]:
    """The token Secret ``deploy`` creates when it is missing (never rendered or printed)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(str(options.token_secret), options.namespace, labels(COMPONENT)),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def dashboard_objects(options: DashboardOptions) -> list[dict[str, Any]]:
    """Everything ``render`` prints and ``deploy`` applies, in apply order (no token Secret)."""
    objects = [service_account(options)]
    if options.kube_details:
        objects += [role(options), role_binding(options)]
    return [*objects, deployment(options), service(options)]
