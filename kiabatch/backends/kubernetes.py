"""The Kubernetes backend: one Indexed Job per batch (see ``kiabatch.kube.batch_job``).

Redis stays the source of truth for items and results; the Job is the executor.
This module creates the Job, follows it with a watch until it reaches a terminal
condition, merges its status into ``kiabatch status``, settles in Redis what the
Job gave up on (failed indexes, a failed Job), and deletes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .. import limits
from ..connection import url_of
from ..errors import ClusterError, KiabatchError, UsageError
from ..kube import batch_job
from ..kube.api import Cluster
from ..kube.batch_job import KubeOptions
from ..kube.jobs import (
    JOB,
    SlowStart,
    StuckPods,
    admission_note,
    conditions,
    job_outcome,
    job_states,
    job_summary,
    parse_indexes,
    pod_problems,
    pod_waits,
    suspended,
)
from ..kube.objects import BATCH_LABEL, COMPLETION_INDEX_LABEL
from ..model import FAILED, BatchSpec, Status
from ..store import Store
from ..workloads.base import Runtime
from .base import LogChunk, RunHooks


class KubernetesBackend:
    """One Indexed Job per batch; Redis stays the source of truth for items and results."""

    name = "kubernetes"

    def __init__(self, options: KubeOptions | None = None) -> None:
        #: Cluster-side settings for new Jobs (a batch started before keeps its own, from its meta).
        self.options = options or KubeOptions()
        self._cluster: Cluster | None = None

    def runtime(self) -> Runtime:
        """Python and the worker programs inside the kiabatch image."""
        return batch_job.IMAGE_RUNTIME

    # -- submitting ----------------------------------------------------------------------

    def preflight(self, store: Store) -> None:
        """Check before anything is written: a Redis pods can reach, the cluster (>= 1.33), namespace, Secret."""
        if url_of(store.redis) is None:
            raise UsageError(
                "the kubernetes backend needs a Redis the cluster can reach: give --redis-url "
                "(or KIABATCH_REDIS_URL), and store the URL pods use with: kiabatch secret create"
            )
        cluster = Cluster.connect(self.options.context, self.options.namespace)
        cluster.check_version()
        cluster.check_namespace()
        if _missing_secret(cluster, self.options.redis_secret):
            raise ClusterError(
                f"Secret {self.options.redis_secret!r} (the Redis URL for pods) does not exist in namespace "
                f"{cluster.namespace!r}; create it with: kiabatch secret create -n {cluster.namespace} "
                "--redis-url URL-AS-SEEN-FROM-PODS"
            )
        if self.options.results_secret and _missing_secret(cluster, self.options.results_secret):
            raise ClusterError(
                f"Secret {self.options.results_secret!r} (the results store's credentials) does not exist in "
                f"namespace {cluster.namespace!r}; create it with: kubectl -n {cluster.namespace} create secret "
                f"generic {self.options.results_secret} --from-literal=AWS_ACCESS_KEY_ID=... "
                "--from-literal=AWS_SECRET_ACCESS_KEY=..."
            )
        self._cluster = cluster

    def task_limit(self, parallelism: int) -> int:
        """An Indexed Job's: at most 100,000 completions above 10,000 at once (see kiabatch.limits)."""
        return limits.task_limit(parallelism)

    def check(self, spec: BatchSpec) -> None:
        """Build the batch's Job: UsageError for what the API server would refuse, or a refused pod template."""
        batch_job.job(spec, self.options)

    def _new_cluster(self) -> Cluster:
        """The cluster of a new Job: the one preflight checked, else the options' (checked now)."""
        if self._cluster is None:
            cluster = Cluster.connect(self.options.context, self.options.namespace)
            cluster.check_version()
            cluster.check_namespace()
            self._cluster = cluster
        return self._cluster

    def create_job(self, cluster: Cluster, store: Store, spec: BatchSpec, options: KubeOptions) -> dict[str, Any]:
        """Create the batch's ServiceAccount (if missing) and Job; record where it runs."""
        options = replace(options, namespace=cluster.namespace)
        account, job = batch_job.batch_objects(spec, options)
        # A schedule's launcher may not create ServiceAccounts; `schedule create` made this one.
        cluster.create(account, exist_ok=True, forbidden_ok=True)
        created = cluster.create(job)
        store.set_meta(
            spec.id,
            namespace=cluster.namespace,
            job=job["metadata"]["name"],
            kube_context=cluster.config.context or "",
            kube_image=options.image,
            # Everything the Job was built from: a resumed batch's new Job is built the same way
            # (the same queue, placement, resources and template).
            kube_options=options.to_json(),
        )
        return created

    def launch(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Create the Job; with ``wait``, follow it until it ends."""
        cluster = self._new_cluster()
        try:
            self.create_job(cluster, store, spec, self.options)
        except KiabatchError:
            store.undo_create(spec.id)  # nothing half-made stays behind; a queue gets its items back
            raise
        hooks.running()
        if not wait:
            return None
        return self._follow(store, spec.id, cluster, hooks, pull_grace=self.options.pull_grace)

    def attach(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Finish an existing, unfinished batch (a launcher that died and was replaced).

        The batch's Jobs are found by label, since a launcher may have died between
        creating the Job and recording it: a running one is followed; none at all means
        the Job was never created; only finished ones mean Redis still misses outcomes,
        so the unsettled indexes run again in a new Job.
        """
        cluster = self._new_cluster()
        jobs = cluster.list(JOB, f"{BATCH_LABEL}={spec.id}")
        live = [job for job in jobs if job_outcome(job) is None]
        if live:
            store.set_meta(spec.id, namespace=cluster.namespace, job=live[0]["metadata"]["name"])
        elif not jobs:
            self.create_job(cluster, store, spec, self.options)
        else:
            return self.resume(store, spec, wait=wait, hooks=hooks)
        hooks.running()
        return self._follow(store, spec.id, cluster, hooks, pull_grace=self.options.pull_grace) if wait else None

    def resume(self, store: Store, spec: BatchSpec, *, wait: bool, hooks: RunHooks) -> Status | None:
        """Run the unsettled indexes again in a new Job (settled ones exit at once).

        A Job that is still live — running, or suspended while Kueue has not admitted
        it — is followed instead: one Job per batch at a time, and its claims stay.
        The new Job is built from the settings the batch was submitted with.
        """
        meta = store.meta(spec.id)
        cluster = Cluster.connect(meta.get("kube_context") or None, meta.get("namespace") or None)
        old = meta.get("job")
        options = _stored_options(meta, namespace=cluster.namespace)
        if old:
            current = cluster.get(JOB, old)
            if current is not None and job_outcome(current) is None:
                hooks.running()
                return self._follow(store, spec.id, cluster, hooks, pull_grace=options.pull_grace) if wait else None
            cluster.delete(JOB, old)
        generation = int(meta.get("job_generation", "0")) + 1
        store.set_meta(spec.id, job_generation=generation)
        store.release_all(spec.id)
        options = replace(options, job_name=batch_job.resumed_job_name(spec.id, generation, spec.tasks))
        self.create_job(cluster, store, spec, options)
        hooks.running()
        return self._follow(store, spec.id, cluster, hooks, pull_grace=options.pull_grace) if wait else None

    # -- following -----------------------------------------------------------------------

    def cluster_for(self, store: Store, batch_id: str) -> tuple[Cluster, str]:
        """The cluster and Job name of a batch."""
        meta = store.meta(batch_id)
        if not meta.get("job"):
            raise UsageError(f"batch {batch_id} has no Kubernetes Job (it was never started on a cluster)")
        return Cluster.connect(meta.get("kube_context") or None, meta.get("namespace") or None), meta["job"]

    def reconcile(self, store: Store, batch_id: str, job: dict[str, Any]) -> None:
        """Settle in Redis what the Job gave up on, so the batch's state matches the Job's.

        An index the Job marked failed (its pods failed without reporting, e.g. an
        image that cannot run) and, once the Job failed (a deadline, too many failed
        indexes), every unsettled index are dead-lettered with the Job's reason.
        """
        status = job.get("status", {})
        failed = parse_indexes(status.get("failedIndexes"))
        if failed:
            store.abandon(batch_id, failed, "the Job failed this index after its retries (see kiabatch logs)")
        if job_outcome(job) == "failed":
            condition = conditions(job).get("Failed") or conditions(job).get("FailureTarget") or {}
            reason = f"{condition.get('reason', 'JobFailed')}: {condition.get('message', 'the Job failed')}"
            store.abandon(batch_id, store.unsettled_indexes(batch_id), reason)
            store.set_meta(batch_id, failure_reason=condition.get("reason", "JobFailed"))
            store.set_state(batch_id, FAILED)

    def wait(self, store: Store, batch_id: str, *, hooks: RunHooks, timeout: float | None = None) -> Status:
        """Follow the batch's Job until it ends (see :meth:`_follow`)."""
        cluster, _ = self.cluster_for(store, batch_id)
        return self._follow(store, batch_id, cluster, hooks, pull_grace=self.options.pull_grace, timeout=timeout)

    def _follow(
        self,
        store: Store,
        batch_id: str,
        cluster: Cluster,
        hooks: RunHooks,
        *,
        pull_grace: float,
        timeout: float | None = None,
    ) -> Status:
        """Follow the Job with a watch until it reaches a terminal condition (Complete,
        SuccessCriteriaMet, Failed, FailureTarget); returns the batch's final status.

        The progress note says what holds the batch: "waiting for admission" (with
        Kueue's reason) while the Job is suspended, pods the scheduler cannot place
        and why. Once ``pull_grace`` seconds pass with no pod started (not counting
        time suspended), it warns once and keeps waiting: a full cluster is not a
        failure. Raises ClusterError when pods cannot start (an image that cannot be
        pulled, a missing Secret) for longer than ``pull_grace`` seconds, and
        KiabatchError when the Job completed but Redis misses outcomes (a Redis that
        lost writes).
        """
        job_name = store.meta(batch_id)["job"]
        started = time.monotonic()
        stuck = StuckPods(pull_grace)
        slow = SlowStart(pull_grace)
        for job in job_states(cluster, job_name):
            self.reconcile(store, batch_id, job)
            outcome = job_outcome(job)
            if outcome is not None and store.status(batch_id).finished:
                hooks.update(store.progress(batch_id), "")
                return store.status(batch_id)
            if outcome == "succeeded":
                missing = len(store.unsettled_indexes(batch_id))
                raise KiabatchError(
                    f"Job {job_name} completed but Redis has no outcome for {missing} task(s) (did Redis lose "
                    f"writes?); run them again with: kiabatch resume {batch_id}"
                )
            pods = cluster.pods(f"{BATCH_LABEL}={batch_id}")
            if suspended(job):
                stuck.reset()  # waiting for admission is not a start problem
                hooks.update(store.progress(batch_id), admission_note(job, cluster.workload_of(job)))
            else:
                waits = pod_waits(pods)
                hooks.update(store.progress(batch_id), waits[0] if waits else "")
                warning = slow.check(job, pods, waits)
                if warning:
                    hooks.warn(f"batch {batch_id}: {warning}")
                problem = stuck.overdue(pods)
                if problem:
                    raise ClusterError(f"batch {batch_id} cannot start its pods: {problem}")
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"batch {batch_id} did not finish within {timeout:g}s")
        if store.status(batch_id).finished:
            return store.status(batch_id)
        raise ClusterError(f"Job {job_name} disappeared while we waited for it")

    # -- reading -------------------------------------------------------------------------

    def status_detail(self, store: Store, status: Status, *, read_only: bool = False) -> Status:
        """Merge the Job's status (and pod problems) into the batch's."""
        meta = store.meta(status.id)
        if not meta.get("job"):
            return status
        cluster, job_name = self.cluster_for(store, status.id)
        job = cluster.get(JOB, job_name)
        if job is not None and not read_only and not status.finished:
            self.reconcile(store, status.id, job)
            status = store.status(status.id)
        detail = {**status.detail, **job_summary(job)}
        if job is not None and job_outcome(job) == "succeeded" and not status.finished:
            missing = len(store.unsettled_indexes(status.id))
            detail["problem"] = (f"the Job completed but Redis has no outcome for {missing} task(s); "
                                 f"run them again with: kiabatch resume {status.id}")  # fmt: skip
        if job is not None and job_outcome(job) is None:
            if suspended(job):
                detail["admission"] = admission_note(job, cluster.workload_of(job))
            pods = cluster.pods(f"{BATCH_LABEL}={status.id}")
            problems = pod_problems(pods)
            if problems:
                detail["problem"] = problems[0]
            waits = pod_waits(pods)
            if waits:  # not a problem: the pods start once the cluster has room
                detail["waiting"] = "; ".join(waits)
            if problems or waits:  # every line, for the dashboard
                detail["pod_problems"] = problems + waits
        return replace(status, detail=detail)

    def list_detail(self, store: Store, status: Status) -> Status:
        """Add the Job's state for ``kiabatch list`` (degrades to "?" if the cluster is unreachable)."""
        try:
            cluster, job_name = self.cluster_for(store, status.id)
            job = cluster.get(JOB, job_name)
        except KiabatchError:
            return replace(status, detail={**status.detail, "job_state": "?"})
        if job is None:
            state = "gone"
        else:
            true = conditions(job)
            state = next((t for t in ("Failed", "Complete", "FailureTarget", "SuccessCriteriaMet") if t in true),
                         "Suspended" if job["spec"].get("suspend") else "Running")  # fmt: skip
        return replace(status, detail={**status.detail, "job_state": f"{job_name}: {state}"})

    def delete(self, store: Store, spec: BatchSpec) -> None:
        """Delete the batch's Job; its pods go with it (background propagation)."""
        meta = store.meta(spec.id)
        if meta.get("job"):
            cluster, job_name = self.cluster_for(store, spec.id)
            cluster.delete(JOB, job_name, propagation="Background")

    def logs(
        self, store: Store, batch_id: str, *, index: int | None = None, follow: bool = False
    ) -> Iterator[LogChunk]:
        """Pieces of the logs of the pods' containers (the kiabatch sidecar, the worker), each labelled."""
        cluster, _ = self.cluster_for(store, batch_id)
        selector = f"{BATCH_LABEL}={batch_id}"
        if index is not None:
            selector += f",{COMPLETION_INDEX_LABEL}={index}"
        pods = sorted(
            cluster.pods(selector),
            key=lambda p: (int(p["metadata"].get("labels", {}).get(COMPLETION_INDEX_LABEL, 0)),
                           p["metadata"].get("creationTimestamp", "")),
        )  # fmt: skip
        for pod in pods:
            number = int(pod["metadata"].get("labels", {}).get(COMPLETION_INDEX_LABEL, -1))
            spec = pod.get("spec", {})
            for container in [c["name"] for c in spec.get("initContainers", []) + spec.get("containers", [])]:
                label = f"index {number} {pod['metadata']['name']} {container}"
                for chunk in cluster.pod_log(
                    pod["metadata"]["name"], container, follow=follow and container == batch_job.WORKER
                ):
                    yield LogChunk(label=label, data=chunk, index=number, whole=False)

    def scale(self, store: Store, batch_id: str, parallel: int) -> None:
        """Patch the Job's ``spec.parallelism`` (mutable) and record it in the batch.

        Refused, with nothing changed, where the API server would refuse it (at most
        10,000 at once for a Job of more than 100,000 tasks). A Job in a Kueue queue is
        re-admitted with its new size (Kueue suspends and queues it again); nothing is lost.
        """
        limits.check_int("parallel", parallel, 1, limits.MAX_PARALLEL)
        cluster, job_name = self.cluster_for(store, batch_id)
        job = cluster.get(JOB, job_name)
        if job is None:
            raise UsageError(f"batch {batch_id}'s Job {job_name} is gone; nothing to scale")
        completions = int(job["spec"].get("completions") or 1)
        max_failed = int(job["spec"].get("maxFailedIndexes") or 1)
        limits.check_indexed_job(completions, parallel, max_failed, job_name)
        cluster.patch(JOB, job_name, {"spec": {"parallelism": parallel}})
        store.set_meta(batch_id, parallelism=parallel)


def _missing_secret(cluster: Cluster, name: str) -> bool:
    """True if Secret ``name`` surely does not exist (one we may not read counts as there: the pods will tell)."""
    try:
        return cluster.get(("v1", "Secret"), name) is None
    except ClusterError:
        return False


def _stored_options(meta: dict[str, str], *, namespace: str) -> KubeOptions:
    """The KubeOptions a batch's Job was built from, kept in its meta at submit time."""
    if meta.get("kube_options"):
        return KubeOptions.from_json(meta["kube_options"], namespace=namespace)
    # A batch submitted by an older kiabatch kept a few fields only.
    keep = {
        field: meta[f"kube_{field}"]
        for field in ("image", "cpu", "memory", "redis_secret")
        if meta.get(f"kube_{field}")
    }
    return KubeOptions(namespace=namespace, **keep)
