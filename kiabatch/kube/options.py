"""Cluster-side settings of a batch, and the names its objects use (no Kubernetes client needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def default_image() -> str:
    """``ghcr.io/kiabatch/kiabatch:<version>`` (override with --image / KIABATCH_IMAGE)."""
    from .._version import __version__

    return f"{DEFAULT_IMAGE}:{__version__}"


@dataclass(frozen=True)
class KubeOptions:
    """Cluster-side settings of a batch (everything the BatchSpec does not say)."""

    #: None: the kubeconfig context's namespace (else "default").
    namespace: str | None = None
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
    #: Secret holding the results store's AWS_* credentials for the reporter (None: the pod's identity).
    results_secret: str | None = None
    #: PersistentVolumeClaim mounted by the reporter at a ``file://`` results path.
    results_volume: str | None = None
