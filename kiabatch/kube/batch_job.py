"""The Kubernetes objects of one batch: an Indexed Job and the workers' ServiceAccount.

Pure functions from a :class:`~kiabatch.model.BatchSpec` and :class:`KubeOptions`
to dicts. ``kiabatch submit --backend kubernetes`` creates exactly what
``kiabatch render`` prints, and ``manifests/`` is generated from them too.

A pod runs the same three steps as the local backend, with **one** kiabatch
process beside the worker:

* ``kiabatch`` (native sidecar: an init container with ``restartPolicy: Always``,
  kiabatch image) runs ``kiabatch task sidecar``: it claims the completion index's
  items from Redis, lays them out in the ``task`` emptyDir and writes ``ready``;
  then it waits for run.sh's ``done``, uploads the outcome, writes ``reported``, and
  idles until the pod ends (it exits at once on SIGTERM);
* ``worker`` (the workload's image) waits for ``ready``, then ``/bin/sh run.sh``
  runs the unmodified program once per item, reading every argument from files
  (never shell text), and waits for ``reported`` before it exits.

Why this shape (issue 10: a kiabatch pod should live at most 1.3x as long as a bare
pod running the same worker):

* **One Python start per pod.** Claiming in an init container and reporting from a
  sidecar started two interpreters, one after the other, before and after the
  worker. The sidecar now does both.
* **The worker starts as early as Kubernetes allows.** The kubelet starts the next
  container once a sidecar is *started*: its process runs and its startupProbe, if
  any, has succeeded (a postStart hook would block it too). A startupProbe polls at
  most once a second and a postStart hook serialises the worker's container
  creation behind the claim; with neither, the worker's container is created while
  the sidecar's interpreter starts and claims, and run.sh begins within 20 ms of
  ``ready`` (a shell loop in the worker's command). Nothing runs before the claim.
* **No idle waiting.** The sidecar looks for ``done`` every 50 ms and run.sh for
  ``reported`` every 20 ms (once a second where the image's ``sleep`` takes no
  fractions); the sidecar handles SIGTERM, so the pod ends as soon as the worker does.
* **Not throttled.** The sidecar requests little (50m CPU, 128Mi) and its CPU limit
  is the worker's, at least one core: a Python start under a 500m limit took seconds.

The invariant is kept: run.sh exits only after ``reported``, so a pod never
*succeeds* before its result is in Redis. A pod killed between the worker's exit and
the upload fails instead; the Job retries the index, the claim returns the same items,
and the idempotent report counts the outcome once. A claim that fails for good (the
batch was deleted) or for too long (Redis away beyond KIABATCH_REDIS_RETRY_SECONDS)
makes run.sh fail the pod, so the index's retries bound it: no container crash-loops.
An index that is already settled lays out nothing, and its pod succeeds at once.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from .. import limits
from ..errors import UsageError
from ..model import BatchSpec
from ..workloads.base import Runtime
from . import pod_template
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
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    REDIS_SECRET,
    REDIS_SECRET_KEY,
    WORKER_SERVICE_ACCOUNT,
    KubeOptions,
    default_image,
)
from .validation import parse_quantity

#: Where the task emptyDir is mounted in every container of the pod.
TASK_DIR = "/kiabatch/task"
#: The kiabatch image keeps the worker programs here, on PATH (see the Dockerfile).
IMAGE_WORKERS_DIR = "/opt/kiabatch/workers"
#: In the kiabatch image the worker programs are commands on PATH.
IMAGE_RUNTIME = Runtime(workers_dir=IMAGE_WORKERS_DIR)
#: The pod's containers: the kiabatch sidecar and the worker.
SIDECAR = "kiabatch"
WORKER = "worker"
#: What a ``--pod-template`` may not change (see kiabatch.kube.pod_template).
TEMPLATE_GUARD = pod_template.Guard(sidecar=SIDECAR, worker=WORKER, task_volume="task", task_dir=TASK_DIR)
#: The worker container's command: wait until the sidecar has laid the task out (``ready``),
#: then run it. Polls every 20 ms where ``sleep`` takes fractions, else every second; gives
#: up (exit 75: the Job retries the index) after KIABATCH_REPORT_TIMEOUT seconds.
WORKER_SCRIPT = """\
d=$KIABATCH_TASK_DIR limit=${KIABATCH_REPORT_TIMEOUT:-600} nap=0.02
ticks=$((limit * 50))
if ! sleep "$nap" 2>/dev/null; then nap=1; ticks=$limit; fi
until [ -e "$d/ready" ]; do
  if [ "$ticks" -le 0 ]; then
    echo "kiabatch: the task was not laid out within ${limit}s; failing so the index is retried" >&2
    exit 75
  fi
  sleep "$nap"
  ticks=$((ticks - 1))
done
exec /bin/sh "$d/run.sh"
"""


def default_max_failed_indexes(tasks: int) -> int:
    """Failed indexes tolerated before the Job stops: 10% of the tasks, at least 10.

    One poison item fails only its own index; a flood of failures (a broken image,
    a bad command) stops the Job early instead of burning through every index.
    """
    limit = min(tasks, max(10, math.ceil(tasks / 10)))
    return min(limit, 10_000) if tasks > 100_000 else limit


def resumed_job_name(batch_id: str, generation: int, tasks: int) -> str:
    """The name of a batch's Job after ``generation`` resumes: ``<id>-r<N>``, the id cut so pod names fit."""
    suffix = f"-r{generation}"
    room = limits.MAX_POD_NAME - len(f"-{tasks - 1}-") - 5 - len(suffix)
    return f"{batch_id[:room].rstrip('-')}{suffix}"


def batch_labels(spec: BatchSpec) -> dict[str, str]:
    """Labels of a batch's Job and pods (plus the schedule and run that started it, if any)."""
    extra = {BATCH_LABEL: spec.id, WORKLOAD_LABEL: spec.workload, SCHEDULE_LABEL: spec.schedule or None,
             RUN_LABEL: spec.run or None}  # fmt: skip
    return labels("batch", **extra)


def _task_mount() -> dict[str, str]:
    return {"name": "task", "mountPath": TASK_DIR}


def sidecar_cpu_limit(worker_cpu: str) -> str:
    """The sidecar's CPU limit: the worker's, and at least one core (a throttled interpreter starts slowly)."""
    return worker_cpu if parse_quantity(worker_cpu) >= 1 else "1"


def task_sidecar(spec: BatchSpec, options: KubeOptions) -> dict[str, Any]:
    """The pod's one kiabatch container: a native sidecar that claims, then reports (see the module doc)."""
    return prune(
        {
            "name": SIDECAR,
            "image": options.image,
            "imagePullPolicy": options.image_pull_policy,
            "args": ["task", "sidecar", "--batch", spec.id, "--dir", TASK_DIR],
            "restartPolicy": "Always",  # a native sidecar: starts before the worker, stops after it
            "env": [
                secret_env("KIABATCH_REDIS_URL", options.redis_secret, options.redis_secret_key),
                {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir
            ],
            "resources": resources("50m", "128Mi", limit_cpu=sidecar_cpu_limit(options.cpu), limit_memory="512Mi"),
            "volumeMounts": [_task_mount(), {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
            "securityContext": container_security(read_only_root=True),
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
                "onExitCodes": {"containerName": WORKER, "operator": "In", "values": codes},
            }
        )
    return {"rules": rules}


def job(spec: BatchSpec, options: KubeOptions) -> dict[str, Any]:
    """The Indexed Job that runs ``spec``'s tasks.

    UsageError (naming what is wrong and what is allowed) for a Job the API server
    would refuse — its fan-out (:func:`kiabatch.limits.check_indexed_job`) — or a
    ``--pod-template`` that breaks what kiabatch relies on.
    """
    tasks = spec.tasks
    name = options.job_name or spec.id
    parallelism = min(spec.parallelism, tasks)
    # Never more than the Job's completions (the API refuses it; the meaning is the same).
    max_failed = min(options.max_failed_indexes or default_max_failed_indexes(tasks), tasks)
    limits.check_indexed_job(tasks, parallelism, max_failed, name)
    worker_env = {
        **spec.worker.env,
        "KIABATCH_TASK_DIR": TASK_DIR,
        "KIABATCH_AWAIT_REPORT": "1",
        "KIABATCH_REPORT_TIMEOUT": str(options.report_timeout),
        "KIABATCH_BATCH": spec.id,
        "HOME": "/tmp",  # noqa: S108 - an emptyDir
    }
    worker = {
        "name": WORKER,
        "image": spec.worker.image or options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["/bin/sh", "-c", WORKER_SCRIPT],
        "env": env(worker_env),
        "resources": resources(options.cpu, options.memory, extra=options.worker_resources()),
        "volumeMounts": [_task_mount(), {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
        "securityContext": container_security(read_only_root=options.read_only_root),
    }
    # The sidecar reports, so it alone gets what the results store needs (credentials, a volume).
    sidecar, results_volumes = with_results_store(task_sidecar(spec, options), spec, options)
    template = prune(
        {
            "metadata": {"labels": {**batch_labels(spec), REDIS_CLIENT_LABEL: "true"}},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": options.service_account,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "activeDeadlineSeconds": math.ceil(spec.task_timeout) if spec.task_timeout else None,
                "priorityClassName": options.priority_class,
                "nodeSelector": dict(options.node_selector) or None,
                "tolerations": [dict(t) for t in options.tolerations] or None,
                "securityContext": pod_security(),
                "initContainers": [sidecar],
                "containers": [worker],
                "volumes": [{"name": "task", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, *results_volumes],
            },
        }
    )
    if options.pod_template:
        template = pod_template.merge(template, options.pod_template, TEMPLATE_GUARD,
                                      allow_privileged=options.allow_privileged_template)  # fmt: skip
    job_labels = {**batch_labels(spec), KUEUE_QUEUE_LABEL: options.queue_name,
                  KUEUE_PRIORITY_LABEL: options.workload_priority_class}  # fmt: skip
    return prune(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(name, options.namespace, prune(job_labels)),
            "spec": {
                # Queued in Kueue: created suspended; Kueue starts it (suspend: false) when it admits it.
                "suspend": True if options.queue_name else None,
                "completionMode": "Indexed",
                "completions": tasks,
                "parallelism": parallelism,
                "backoffLimitPerIndex": spec.retries,
                "maxFailedIndexes": max_failed,
                "podFailurePolicy": pod_failure_policy(spec),
                "podReplacementPolicy": "Failed",  # never two pods on one index
                "ttlSecondsAfterFinished": options.ttl_after_finished,
                "activeDeadlineSeconds": math.ceil(spec.deadline) if spec.deadline else None,
                "template": template,
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
