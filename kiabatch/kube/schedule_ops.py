"""Schedules on Kubernetes: CronJobs, their launcher Jobs, and the batches those started."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from ..errors import NotFoundError, UsageError
from ..schedules import Schedule, ScheduleRow, StartedRun, validate_schedule_name
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
    """Schedules as CronJobs in one namespace (the :class:`~kiabatch.schedules.Schedules` of Kubernetes)."""

    def __init__(self, cluster: Cluster, store: Callable[[], Store] | None = None) -> None:
        self.cluster = cluster
        #: Opens the Redis store, for what joins runs with their batches (history, cascading deletes).
        self._store = store

    def create(self, schedule: Schedule, kube: KubeOptions) -> str:
        """Apply the launcher's account, Role and binding and the CronJob; refuse an existing schedule."""
        self.cluster.check_version()
        self.cluster.check_namespace()
        if self.cluster.get(CRONJOB, schedule.name) is not None:
            raise UsageError(f"schedule {schedule.name!r} already exists in namespace {self.cluster.namespace!r}")
        schedule = schedule.with_changes(namespace=self.cluster.namespace)
        for obj in schedule_objects(schedule, replace(kube, namespace=self.cluster.namespace)):
            self.cluster.apply(obj)
        zone = f", {schedule.time_zone}" if schedule.time_zone else ""
        return (f"created CronJob {schedule.name} in namespace {self.cluster.namespace} ({schedule.cron}{zone}, "
                f"concurrency {schedule.concurrency})")  # fmt: skip

    def rows(self) -> list[ScheduleRow]:
        """kiabatch's CronJobs, with their last schedule time."""
        return [ScheduleRow(cron["metadata"]["name"], self.schedule_of(cron),
                            cron.get("status", {}).get("lastScheduleTime") or "-") for cron in self.list()]  # fmt: skip

    def get(self, name: str) -> Schedule:
        """The schedule a CronJob was made from."""
        return self.schedule_of(self.cron_job(name))

    def cron_job(self, name: str) -> dict[str, Any]:
        """The CronJob of schedule ``name``."""
        validate_schedule_name(name)
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

    def set_suspend(self, name: str, suspend: bool) -> None:
        """Suspend or resume: patch ``spec.suspend``."""
        self.cron_job(name)
        self.cluster.patch(CRONJOB, name, {"spec": {"suspend": suspend}})

    def run_now(self, name: str) -> StartedRun:
        """Start a run now: a Job from the CronJob's template, owned by it (its name is the ref)."""
        job = self.cluster.create(job_from_cron_job(self.cron_job(name)))
        run = job["metadata"]["name"]
        return StartedRun(run, f"started Job {run}; follow it with: kiabatch schedule history {name} "
                               f"--backend kubernetes -n {self.cluster.namespace}")  # fmt: skip

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

    def history(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Recent runs, newest first: start, end, state, the batches they launched and their item counts."""
        store = self._store() if self._store is not None else None
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
        return rows[-limit:][::-1]

    def last_success(self, name: str) -> float | None:
        """The CronJob's ``status.lastSuccessfulTime`` (unix seconds), None if no Job of it completed yet."""
        stamp = self.cron_job(name).get("status", {}).get("lastSuccessfulTime")
        if not stamp:
            return None
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    def delete(self, name: str, *, cascade: bool) -> list[str]:
        """Delete the CronJob; with ``cascade`` also its Jobs and their batches. Returns the batches deleted."""
        cron = self.cron_job(name)
        store = self._store() if cascade and self._store is not None else None
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
