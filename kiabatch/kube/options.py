"""Cluster-side settings of a batch, and the names its objects use (no Kubernetes client needed)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .. import limits
from ..errors import UsageError
from . import validation

DEFAULT_IMAGE = "ghcr.io/kiabatch/kiabatch"
WORKER_SERVICE_ACCOUNT = "kiabatch-worker"
REDIS_SECRET = "kiabatch-redis"  # noqa: S105 - the Secret's name, not a secret
REDIS_SECRET_KEY = "url"  # noqa: S105 - a key name
#: kiabatch's Redis on Kubernetes: the Service of its primary (writes) and of every ready pod (reads).
PRIMARY_SERVICE = "kiabatch-redis-primary"
REPLICAS_SERVICE = "kiabatch-redis-replicas"
#: Seconds a Job's pods may be unable to start (an image pull, a missing Secret) before a
#: wait gives up (a registry may be slow): ``submit --image-pull-grace``'s default, and the
#: grace of the Jobs ``kiabatch redis`` runs.
DEFAULT_PULL_GRACE = 120.0
#: A finished Job (and its pods) is removed after a day; results stay in Redis.
DEFAULT_TTL_AFTER_FINISHED = 86400
#: The extended resource ``--gpu`` requests unless ``--gpu-resource`` names another.
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
#: Kueue's labels on a Job: the LocalQueue it is queued in, and its WorkloadPriorityClass.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def default_image() -> str:
    """``$KIABATCH_IMAGE``, else ``ghcr.io/kiabatch/kiabatch:<version>`` (``--image`` overrides both)."""
    from .. import settings
    from .._version import __version__

    return os.environ.get(settings.ENV_IMAGE) or f"{DEFAULT_IMAGE}:{__version__}"


@dataclass(frozen=True)
class KubeOptions:
    """Cluster-side settings of a batch (everything the BatchSpec does not say).

    Values are checked when it is made (UsageError naming the setting and what is
    allowed), so a bad one is refused before anything is written; the pod-template
    fragment is merged and checked when the Job is built (:mod:`kiabatch.kube.pod_template`).
    """

    #: None: the kubeconfig context's namespace (else "default").
    namespace: str | None = None
    #: The kiabatch image (the sidecar, and the worker unless the workload names one).
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
    #: Seconds the worker waits for the sidecar (to lay out its task, then to confirm the upload) before failing.
    report_timeout: int = 600
    #: Seconds pods may fail to start (image pull, missing Secret) before ``--wait`` gives up. Not rendered.
    pull_grace: float = DEFAULT_PULL_GRACE
    #: Secret holding the results store's AWS_* credentials for the reporter (None: the pod's identity).
    results_secret: str | None = None
    #: PersistentVolumeClaim mounted by the reporter at a ``file://`` results path.
    results_volume: str | None = None
    #: Kueue: the LocalQueue to queue the Job in (label kueue.x-k8s.io/queue-name). The Job is then
    #: created suspended, and Kueue starts it when it admits it.
    queue_name: str | None = None
    #: Kueue: a WorkloadPriorityClass for the Job's place in the queue (label
    #: kueue.x-k8s.io/priority-class); needs ``queue_name``.
    workload_priority_class: str | None = None
    #: The pods' PriorityClass (priorityClassName); Kueue also takes the workload's priority from it.
    priority_class: str | None = None
    #: Node labels the pods must match (nodeSelector).
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: Taints the pods tolerate: kubectl's ``key[=value]:Effect`` strings, or toleration dicts.
    tolerations: Sequence[str | Mapping[str, Any]] = ()
    #: GPUs for the worker (limits ``gpu_resource: N``).
    gpu: int | None = None
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    #: The worker's ephemeral-storage request and limit (e.g. "10Gi").
    ephemeral_storage: str | None = None
    #: More resources for the worker: name -> quantity (``example.com/fpga: "1"``), as requests and limits.
    resources: Mapping[str, str] = field(default_factory=dict)
    #: A pod-template fragment (``{"metadata": {...}, "spec": {...}}``) merged into the Job's
    #: pod template with strategic-merge semantics (see kiabatch.kube.pod_template).
    pod_template: Mapping[str, Any] | None = None
    #: Accept a pod template that breaks the "restricted" Pod Security Standard (a security decision).
    allow_privileged_template: bool = False

    def __post_init__(self) -> None:
        validation.positive_quantity(self.cpu, "cpu")
        validation.positive_quantity(self.memory, "memory")
        if self.ephemeral_storage is not None:
            validation.positive_quantity(self.ephemeral_storage, "ephemeral storage")
        if self.max_failed_indexes is not None:
            limits.check_int("max_failed_indexes", self.max_failed_indexes, 1, limits.MAX_FAILED_INDEXES)
        for name, value in (("queue name", self.queue_name), ("workload priority class", self.workload_priority_class)):
            if value is not None:
                validation.object_name(value, name, label=True)  # both are label values too
        if self.workload_priority_class is not None and self.queue_name is None:
            raise UsageError("a workload priority class is Kueue's: give it with a queue name (--queue-name)")
        if self.priority_class is not None:
            validation.object_name(self.priority_class, "priority class")
        for key, value in self.node_selector.items():
            validation.qualified_name(key, "node selector key")
            validation.label_value(value, "node selector value")
        parsed = tuple(_toleration(t) for t in self.tolerations)
        object.__setattr__(self, "tolerations", parsed)
        object.__setattr__(self, "node_selector", dict(self.node_selector))
        extra = dict(self.resources)
        for name, quantity in extra.items():
            validation.resource_name(name, "resource")
            validation.positive_quantity(quantity, f"resource {name}", whole=validation.is_extended(name))
        object.__setattr__(self, "resources", extra)
        if self.gpu is not None:
            limits.check_int("gpu", self.gpu, 1, limits.MAX_GPUS)
        validation.resource_name(self.gpu_resource, "GPU resource")
        if not validation.is_extended(self.gpu_resource):
            raise UsageError(f"GPU resource {self.gpu_resource!r:.60} must be an extended resource (e.g. amd.com/gpu)")
        clashes = {"ephemeral-storage": self.ephemeral_storage is not None, self.gpu_resource: self.gpu is not None}
        for name, given in clashes.items():
            if given and name in extra:
                option = "--ephemeral-storage" if name == "ephemeral-storage" else "--gpu"
                raise UsageError(f"{name} is given twice: with {option} and with --resource; give it once")
        if self.pod_template is not None and not isinstance(self.pod_template, Mapping):
            raise UsageError("the pod template must be a mapping (a pod template's metadata and spec)")

    def worker_resources(self) -> dict[str, str]:
        """The worker's requests (and limits) besides CPU and memory: storage, GPUs, extended resources."""
        extra = dict(self.resources)
        if self.ephemeral_storage is not None:
            extra["ephemeral-storage"] = self.ephemeral_storage
        if self.gpu is not None:
            extra[self.gpu_resource] = str(self.gpu)
        return extra

    def to_json(self) -> str:
        """The settings a Job is built from, for the batch meta (a resumed batch's new Job gets the same)."""
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_KEPT}
        return json.dumps(kept, sort_keys=True, default=_plain)

    @classmethod
    def from_json(cls, text: str, **overrides: Any) -> KubeOptions:
        """Inverse of :meth:`to_json` (fields this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in json.loads(text).items() if key in known}
        return cls(**{**data, **overrides})


#: Where a batch runs is decided anew when it is resumed; these are not kept in the meta.
_NOT_KEPT = frozenset({"namespace", "context", "job_name"})


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot store {type(value).__name__}")


def _toleration(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A toleration dict from kubectl's ``key[=value]:Effect`` (or a dict, checked and copied)."""
    if isinstance(value, str):
        return validation.toleration(value)
    if not isinstance(value, Mapping):
        raise UsageError(f"a toleration must be key[=value]:Effect or a mapping, not {type(value).__name__}")
    allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise UsageError(f"toleration field {unknown[0]!r:.40} is not one of {', '.join(sorted(allowed))}")
    if value.get("operator", "Equal") not in ("Equal", "Exists"):
        raise UsageError("a toleration's operator is Equal or Exists")
    if value.get("effect") not in (None, "", *validation.EFFECTS):
        raise UsageError(f"a toleration's effect is one of {', '.join(validation.EFFECTS)}")
    if value.get("key"):
        validation.qualified_name(value["key"], "toleration key")
    if value.get("value"):
        validation.label_value(value["value"], "toleration value")
    return dict(value)
