"""Following a Kubernetes Job: its conditions, its states as it changes, pods that cannot start.

The one Job follower of kiabatch: :mod:`kiabatch.backends.kubernetes` follows a
batch's Indexed Job with :func:`job_states` and :class:`StuckPods`, and the
short Jobs of ``kiabatch redis`` (:mod:`kiabatch.kube.redis_ops`) run through
:func:`run_job`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import ClusterError
from .objects import JOB_NAME_LABEL
from .options import DEFAULT_PULL_GRACE, KUEUE_QUEUE_LABEL

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
#: Seconds a scheduled pod's containers may stay ContainerCreating before ``status`` says so.
SLOW_START = 60.0


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


def _when(text: str | None) -> float | None:
    """Seconds since the epoch of an API timestamp (``2024-03-21T13:43:00Z``), or None."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _age(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.2g}s"


def pod_waits(pods: list[dict[str, Any]], now: float | None = None, slow: float = SLOW_START) -> list[str]:
    """Pods that cannot start yet, and why, most frequent reason first (not failures: a full cluster drains).

    ``Pending`` pods the scheduler could not place, with its FailedScheduling message
    (``0/3 nodes are available: 3 Insufficient nvidia.com/gpu.``), and containers
    still ``ContainerCreating`` (or ``PodInitializing``) ``slow`` seconds after the pod
    was scheduled (a big image pulling, a volume that does not attach). Identical
    reasons are counted once: ``3 pods Pending: ...``.
    """
    now = time.time() if now is None else now
    reasons: dict[str, list[str]] = {}
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "Pending", "Running"):
            continue
        scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if scheduled is not None and scheduled.get("status") == "False":
            message = (scheduled.get("message") or scheduled.get("reason") or "not scheduled yet").splitlines()[0]
            reasons.setdefault(f"Pending: {message[:300]}", []).append(pod["metadata"]["name"])
            continue
        since = _when((scheduled or {}).get("lastTransitionTime")) or _when(pod["metadata"].get("creationTimestamp"))
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = ((container.get("state") or {}).get("waiting") or {}).get("reason")
            if waiting in ("ContainerCreating", "PodInitializing") and since is not None and now - since >= slow:
                name = container.get("name")
                text = f"{waiting} for over {_age(slow)} (container {name}: an image pulling or a volume attaching)"
                reasons.setdefault(text, []).append(pod["metadata"]["name"])
                break
    ordered = sorted(reasons.items(), key=lambda item: -len(item[1]))
    return [f"{len(names)} pods {text}" if len(names) > 1 else f"pod {names[0]} {text}" for text, names in ordered]


def started_any(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """True once one of the Job's pods has started (or finished)."""
    status = job.get("status") or {}
    if status.get("succeeded") or status.get("failed") or status.get("ready"):
        return True
    return any((pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for pod in pods)


def suspended(job: dict[str, Any] | None) -> bool:
    """True while the Job is suspended (Kueue has not admitted it yet, or preempted it)."""
    return bool(job is not None and (job.get("spec") or {}).get("suspend"))


def admission_note(job: dict[str, Any], workload: dict[str, Any] | None) -> str:
    """Why a suspended Job does not run: Kueue's verdict from its Workload, when there is one.

    ``waiting for admission`` for a Job in a Kueue queue, with the Workload's
    reason — preempted, no quota (``couldn't assign flavors to pod set main:
    insufficient quota for cpu``), admission checks pending, an unknown LocalQueue.
    """
    labels = job["metadata"].get("labels") or {}
    queue = labels.get(KUEUE_QUEUE_LABEL)
    text = f"waiting for admission in Kueue queue {queue}" if queue else "suspended (spec.suspend is true)"
    reason = _workload_reason(workload) if workload is not None else ""
    return f"{text}: {reason}" if reason else text


def _workload_reason(workload: dict[str, Any]) -> str:
    status = workload.get("status") or {}
    by_type = {c.get("type"): c for c in status.get("conditions") or []}
    evicted = by_type.get("Evicted") or {}
    reserved = by_type.get("QuotaReserved") or {}
    parts = []
    if evicted.get("status") == "True":
        parts.append(f"evicted ({evicted.get('reason', '?')}): {evicted.get('message', '')}".rstrip(": "))
    if reserved.get("status") == "False" and reserved.get("message"):
        parts.append(str(reserved["message"]))
    elif reserved.get("status") == "True":
        pending = [c.get("name") for c in status.get("admissionChecks") or [] if c.get("state") != "Ready"]
        if pending:
            parts.append(f"quota reserved, admission checks pending: {', '.join(map(str, pending))}")
    return "; ".join(" ".join(part.split())[:300] for part in parts)


def job_summary(job: dict[str, Any] | None) -> dict[str, Any]:
    """The Job fields ``status`` shows."""
    if job is None:
        return {"job": "gone (removed after ttlSecondsAfterFinished, or deleted)"}
    status = job.get("status", {})
    true = conditions(job)
    return {
        "job": f"{job['metadata']['namespace']}/{job['metadata']['name']}",
        "job_parallelism": job.get("spec", {}).get("parallelism", 1),
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

    def reset(self) -> None:
        """Start counting afresh (the Job was suspended: waiting for admission is not a start problem)."""
        self._since = None

    def overdue(self, pods: list[dict[str, Any]]) -> str | None:
        """The first start problem of ``pods`` once they have had one for longer than the grace, else None."""
        problems = pod_problems(pods)
        if not problems:
            self._since = None
            return None
        self._since = self._since or time.monotonic()
        return problems[0] if time.monotonic() - self._since > self.grace else None


class SlowStart:
    """Says once when no pod of a running (admitted) Job has started for ``grace`` seconds.

    Time spent suspended (waiting for Kueue) does not count: the clock starts when
    the Job is seen running, and starts again after a preemption.
    """

    def __init__(self, grace: float = DEFAULT_PULL_GRACE) -> None:
        self.grace = grace
        self._since: float | None = None
        self._said = False

    def check(self, job: dict[str, Any], pods: list[dict[str, Any]], waits: list[str]) -> str | None:
        """The warning to show now (once), else None."""
        if suspended(job):
            self._since = None
            return None
        if self._said or started_any(job, pods):
            return None
        self._since = self._since or time.monotonic()
        if time.monotonic() - self._since < self.grace:
            return None
        self._said = True
        why = waits[0] if waits else "no pod is running yet"
        return (f"no pod of Job {job['metadata']['name']} has started after {_age(self.grace)}: {why}; "
                "still waiting (a full cluster is not a failure)")  # fmt: skip


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
