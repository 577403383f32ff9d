"""Schedules on Kubernetes: CronJobs, their launcher Jobs, and the batches those started."""

from __future__ import annotations

import json
from typing import Any

from ..errors import NotFoundError, UsageError
from ..schedules import Schedule
from ..store import Store
from .api import Cluster
from .batch_job import KubeOptions
from .jobs import JOB, job_outcome
from .objects import BATCH_LABEL, COMPONENT_LABEL, MANAGED_BY_LABEL, RUN_LABEL
from .schedule_objects import SPEC_ANNOTATION, job_from_cron_job, schedule_objects

CRONJOB = ("batch/v1", "CronJob")


def job_state(job: dict[str, Any]) -> str:
    """Complete, Failed or Running, from a Job's conditions."""
    return {"succeeded": "Complete", "failed": "Failed"}.get(job_outcome(job) or "", "Running")


class KubeSchedules:
    """Create, inspect and change schedules in one namespace."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def create(self, schedule: Schedule, options: KubeOptions) -> list[dict[str, Any]]:
        """Apply the launcher's account, Role and binding and the CronJob; refuse an existing schedule."""
        self.cluster.check_version()
        self.cluster.check_namespace()
        if self.cluster.get(CRONJOB, schedule.name) is not None:
            raise UsageError(f"schedule {schedule.name!r} already exists in namespace {self.cluster.namespace!r}")
        objects = schedule_objects(schedule, options)
        return [self.cluster.apply(obj) for obj in objects]

    def cron_job(self, name: str) -> dict[str, Any]:
        """The CronJob of schedule ``name``."""
        found = self.cluster.get(CRONJOB, name)
        if found is None:
            raise NotFoundError(f"no schedule {name!r} in namespace {self.cluster.namespace!r}")
        return found

    def list(self) -> list[dict[str, Any]]:
        """kiabatch's CronJobs in the namespace."""
        return self.cluster.list(CRONJOB, f"{MANAGED_BY_LABEL}=kiabatch,{COMPONENT_LABEL}=schedule")

    @staticmethod
    def schedule_of(cron: dict[str, Any]) -> Schedule:
        """The schedule a CronJob was made from (kept in an annotation), with its live suspend flag."""
        definition = json.loads(cron["metadata"]["annotations"][SPEC_ANNOTATION])
        return Schedule(**{**definition, "suspend": bool(cron["spec"].get("suspend"))})

    def set_suspend(self, name: str, suspend: bool) -> dict[str, Any]:
        """Suspend or resume: patch ``spec.suspend``."""
        self.cron_job(name)
        return self.cluster.patch(CRONJOB, name, {"spec": {"suspend": suspend}})

    def run_now(self, name: str) -> dict[str, Any]:
        """Start a run now: a Job from the CronJob's template, owned by it."""
        return self.cluster.create(job_from_cron_job(self.cron_job(name)))

    def launcher_jobs(self, cron: dict[str, Any]) -> list[dict[str, Any]]:
        """The CronJob's Jobs, found by ownerReferences (a CronJob has no label selector), oldest first."""
        uid = cron["metadata"]["uid"]
        owned = [job for job in self.cluster.list(JOB)
                 if any(ref.get("uid") == uid for ref in job["metadata"].get("ownerReferences") or [])]  # fmt: skip
        return sorted(owned, key=lambda job: job["metadata"].get("creationTimestamp", ""))

    def batches_of(self, run: str) -> list[str]:
        """Batch ids that run ``run`` started (its batch Jobs carry the run label)."""
        return sorted({job["metadata"]["labels"][BATCH_LABEL] for job in self.cluster.list(JOB, f"{RUN_LABEL}={run}")
                       if BATCH_LABEL in job["metadata"].get("labels", {})})  # fmt: skip

    def history(self, name: str, store: Store | None) -> list[dict[str, Any]]:
        """Past runs: start, end, state, the batches they launched and their item counts."""
        rows = []
        for job in self.launcher_jobs(self.cron_job(name)):
            run = job["metadata"]["name"]
            status = job.get("status", {})
            batches = self.batches_of(run)
            done = failed = None
            if store is not None:
                for batch in batches:
                    if store.exists(batch):
                        progress = store.progress(batch)
                        done, failed = (done or 0) + progress.done, (failed or 0) + progress.failed
            rows.append({"run": run, "started": status.get("startTime"), "finished": status.get("completionTime"),
                         "state": job_state(job), "batches": batches, "done": done, "failed": failed})  # fmt: skip
        return rows

    def delete(self, name: str, *, cascade: bool, store: Store | None) -> list[str]:
        """Delete the CronJob; with ``cascade`` also its Jobs and their batches. Returns the batches deleted."""
        cron = self.cron_job(name)
        removed: list[str] = []
        if cascade:
            for job in self.launcher_jobs(cron):
                for batch in self.batches_of(job["metadata"]["name"]):
                    for batch_job in self.cluster.list(JOB, f"{BATCH_LABEL}={batch}"):
                        self.cluster.delete(JOB, batch_job["metadata"]["name"], propagation="Background")
                    if store is not None:
                        store.delete(batch)
                    removed.append(batch)
        # Background: the garbage collector removes the CronJob's Jobs; Orphan keeps them.
        self.cluster.delete(CRONJOB, name, propagation="Background" if cascade else "Orphan")
        return removed
