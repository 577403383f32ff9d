"""Following a Kubernetes Job: its conditions, its states as it changes, pods that cannot start.

The one Job follower of kiabatch: :mod:`kiabatch.backends.kubernetes` follows a
batch's Indexed Job with :func:`job_states` and :class:`StuckPods`, and the
short Jobs of ``kiabatch redis`` (:mod:`kiabatch.kube.redis_ops`) run through
:func:`run_job`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ClusterError
from .objects import JOB_NAME_LABEL
from .options import DEFAULT_PULL_GRACE

if TYPE_CHECKING:
    from .api import Cluster

JOB = ("batch/v1", "Job")
#: Container waiting reasons that will not fix themselves.
PULL_PROBLEMS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
#: Seconds one watch of a Job lasts (server-side) when nothing changes.
WATCH_SECONDS = 5


def parse_indexes(text: str | None) -> list[int]:
    """Indexes from the Job status format: ``"1,3-5,7"`` -> [1, 3, 4, 5, 7]."""
    result: list[int] = []
    for part in (text or "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        result.extend(range(int(low), int(high or low) + 1))
    return result


def conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Job's true conditions by type."""
    found = job.get("status", {}).get("conditions") or []
    return {c["type"]: c for c in found if c.get("status") == "True"}


def job_outcome(job: dict[str, Any]) -> str | None:
    """ "succeeded" or "failed" once the Job reached (or is about to reach) a terminal state."""
    true = conditions(job)
    if "Complete" in true or "SuccessCriteriaMet" in true:
        return "succeeded"
    if "Failed" in true or "FailureTarget" in true:
        return "failed"
    return None


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """One line per container stuck on an image or configuration problem."""
    problems = []
    for pod in pods:
        statuses = (pod.get("status", {}).get("initContainerStatuses") or []) + (
            pod.get("status", {}).get("containerStatuses") or []
        )
        for status in statuses:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in PULL_PROBLEMS:
                message = (waiting.get("message") or "").splitlines()[0][:200] if waiting.get("message") else ""
                problems.append(
                    f"pod {pod['metadata']['name']} container {status['name']} ({status.get('image', '?')}): "
                    f"{waiting['reason']}" + (f": {message}" if message else "")
                )
    return problems


#: Waiting reasons every starting container passes through (not problems).
_STARTING = frozenset({"ContainerCreating", "PodInitializing"})


def pending_reasons(pods: list[dict[str, Any]]) -> list[str]:
    """Why Pending pods wait, besides image and configuration problems: an unschedulable pod
    (``PodScheduled`` False: resources, taints, affinity) or a container waiting for another reason."""
    reasons = []
    for pod in pods:
        status = pod.get("status", {})
        if status.get("phase") != "Pending":
            continue
        name = pod["metadata"]["name"]
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                message = (condition.get("message") or "").splitlines()[0][:200] if condition.get("message") else ""
                reasons.append(f"pod {name} is not scheduled: {condition.get('reason', 'Pending')}"
                               + (f": {message}" if message else ""))  # fmt: skip
        statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in statuses:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason and reason not in PULL_PROBLEMS and reason not in _STARTING:
                reasons.append(f"pod {name} container {container['name']} is waiting: {reason}")
    return reasons


def job_summary(job: dict[str, Any] | None) -> dict[str, Any]:
    """The Job fields ``status`` shows."""
    if job is None:
        return {"job": "gone (removed after ttlSecondsAfterFinished, or deleted)"}
    status = job.get("status", {})
    true = conditions(job)
    return {
        "job": f"{job['metadata']['namespace']}/{job['metadata']['name']}",
        "job_pods": f"active {status.get('active', 0)}, ready {status.get('ready', 0)}, "
        f"succeeded {status.get('succeeded', 0)}, failed {status.get('failed', 0)}",
        "job_failed_indexes": status.get("failedIndexes") or "-",
        "job_conditions": ", ".join(
            f"{t}" + (f" ({c.get('reason')})" if c.get("reason") else "") for t, c in true.items()
        )
        or "-",
    }


def job_states(cluster: Cluster, name: str) -> Iterator[dict[str, Any]]:
    """The Job now, and again after each change (or every few seconds) it shows; ends when it is gone.

    Each watch is closed at its first event, before the caller makes other
    requests, so no stream is left half-read.
    """
    while True:
        job = cluster.get(JOB, name)
        if job is None:
            return
        yield job
        version = job["metadata"].get("resourceVersion")
        for _changed in cluster.watch_job(name, version, WATCH_SECONDS):
            break


class StuckPods:
    """Tells when a Job's pods have been unable to start for longer than ``grace`` seconds."""

    def __init__(self, grace: float = DEFAULT_PULL_GRACE) -> None:
        self.grace = grace
        self._since: float | None = None

    def overdue(self, pods: list[dict[str, Any]]) -> str | None:
        """The first start problem of ``pods`` once they have had one for longer than the grace, else None."""
        problems = pod_problems(pods)
        if not problems:
            self._since = None
            return None
        self._since = self._since or time.monotonic()
        return problems[0] if time.monotonic() - self._since > self.grace else None


class JobFailedError(ClusterError):
    """A Job kiabatch ran to do or read something failed; ``log`` is its pod's output."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def last_error(log: str) -> str:
    """The line of a Job's log that says what went wrong (its last error, else its last line)."""
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or ["(no output)"])[-1]


def job_log(cluster: Cluster, job: dict[str, Any]) -> str:
    """The log of the Job's newest pod (its only container)."""
    name = job["metadata"]["name"]
    container = job["spec"]["template"]["spec"]["containers"][0]["name"]
    pods = sorted(cluster.pods(f"{JOB_NAME_LABEL}={name}"), key=lambda p: p["metadata"].get("creationTimestamp", ""))
    if not pods:
        return ""
    chunks = cluster.pod_log(pods[-1]["metadata"]["name"], container)
    return b"".join(chunks).decode("utf-8", "replace")


def run_job(
    cluster: Cluster,
    job: dict[str, Any],
    timeout: float,
    *,
    keep: bool = False,
    pull_grace: float = DEFAULT_PULL_GRACE,
) -> tuple[bool, str]:
    """Create ``job``, follow it until it succeeds or fails, return (succeeded, its pod's log).

    The Job is deleted afterwards unless ``keep`` (or it failed: it stays for
    inspection until its ttlSecondsAfterFinished). ClusterError if it disappears,
    its pod cannot start for ``pull_grace`` seconds, or it runs past ``timeout``.
    """
    name = job["metadata"]["name"]
    cluster.create(job)
    deadline = time.monotonic() + timeout
    stuck = StuckPods(pull_grace)
    outcome = None
    for current in job_states(cluster, name):
        outcome = job_outcome(current)
        if outcome:
            break
        problem = stuck.overdue(cluster.pods(f"{JOB_NAME_LABEL}={name}"))
        if problem:
            raise ClusterError(f"Job {name!r} cannot start: {problem}")
        if time.monotonic() > deadline:
            raise ClusterError(f"Job {name!r} did not finish within {timeout:g}s (kubectl describe job {name})")
    if outcome is None:
        raise ClusterError(f"Job {name!r} disappeared before it finished")
    log = job_log(cluster, job)
    if outcome == "succeeded" and not keep:
        cluster.delete(JOB, name)
    return outcome == "succeeded", log
