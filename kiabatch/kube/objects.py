"""Small pure helpers shared by every Kubernetes object kiabatch builds.

Builders return plain dicts (what ``kubectl apply -f`` takes); :func:`prune`
drops ``None`` values so optional settings need no ``if`` ladders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .._version import __version__

#: Every object kiabatch renders carries these labels.
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
BATCH_LABEL = "kiabatch.io/batch"
WORKLOAD_LABEL = "kiabatch.io/workload"
SCHEDULE_LABEL = "kiabatch.io/schedule"
#: On a batch started by a schedule: the run (the launcher Job's name, or the local run's).
RUN_LABEL = "kiabatch.io/run"
#: Pods with this label may reach kiabatch's Redis (see the NetworkPolicy).
REDIS_CLIENT_LABEL = "kiabatch.io/redis-client"
VERSION_ANNOTATION = "kiabatch.io/version"
#: Labels the Job controller puts on the pods of an Indexed Job.
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"

#: UID and GID of the kiabatch image's non-root user (also used for user images).
NONROOT_UID = 65532


def prune(value: Any) -> Any:
    """A copy of ``value`` without ``None`` values (in dicts, recursively)."""
    if isinstance(value, Mapping):
        return {key: prune(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [prune(item) for item in value if item is not None]
    return value


def labels(component: str, **extra: str | None) -> dict[str, str]:
    """The standard labels plus ``extra`` (keys given with ``__`` for ``/`` are not needed)."""
    base = {NAME_LABEL: "kiabatch", MANAGED_BY_LABEL: "kiabatch", COMPONENT_LABEL: component}
    return {**base, **{key: value for key, value in extra.items() if value is not None}}


def metadata(
    name: str,
    namespace: str | None,
    object_labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """ObjectMeta with kiabatch's version annotation."""
    return prune(
        {
            "name": name,
            "namespace": namespace,
            "labels": dict(object_labels),
            "annotations": {VERSION_ANNOTATION: __version__, **(annotations or {})},
        }
    )


def container_security(read_only_root: bool = True) -> dict[str, Any]:
    """A container securityContext meeting the Pod Security Standard "restricted"."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security(uid: int = NONROOT_UID) -> dict[str, Any]:
    """A pod securityContext meeting the Pod Security Standard "restricted"."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(
    cpu: str | None,
    memory: str | None,
    *,
    limit_cpu: str | None = None,
    limit_memory: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Requests, and limits equal to them unless given; ``extra`` resources (GPUs, storage) get both."""
    return prune(
        {
            "requests": prune({"cpu": cpu, "memory": memory, **(extra or {})}),
            "limits": prune({"cpu": limit_cpu or cpu, "memory": limit_memory or memory, **(extra or {})}),
        }
    )


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An environment variable read from a Secret (never inlined)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env(values: Mapping[str, str]) -> list[dict[str, str]]:
    """Plain environment variables, sorted by name for stable output."""
    return [{"name": key, "value": str(value)} for key, value in sorted(values.items())]


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings as literal blocks."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream (what ``kubectl apply -f -`` reads)."""
    documents = [yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False) for obj in objects]
    return "---\n" + "---\n".join(documents)


def from_yaml(text: str) -> list[dict[str, Any]]:
    """Parse a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]
