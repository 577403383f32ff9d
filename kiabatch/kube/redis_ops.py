"""kiabatch's Redis on a cluster: deploy it, wait for it, read its status, back it up, restore it.

The objects come from the builders (:mod:`kiabatch.kube.redis_manifests`,
:mod:`kiabatch.kube.redis_objects`, :mod:`kiabatch.kube.redis_backup`). Whatever
needs to look inside the cluster (the status probe, the listing of snapshots, a
restore) runs a short Job with the Redis image and reads its log
(:func:`kiabatch.kube.jobs.run_job`): no exec, no port-forward, and the
NetworkPolicy stays closed to everything else.

:class:`RedisOps` returns plain data and raises :mod:`kiabatch.errors` exceptions
(ClusterError, exit code 3, when the cluster or a Job it ran fails; UsageError,
2, for bad input). Progress lines go to its ``say`` callback; ``kiabatch redis``
(:mod:`kiabatch.cli.redis`) prints them on stderr.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ..connection import connect, redact
from ..errors import ClusterError, KiabatchError, UsageError
from .api import Cluster
from .batch_job import REDIS_SECRET, REDIS_SECRET_KEY, redis_secret
from .jobs import JobFailedError, last_error, run_job
from .redis_backup import (
    BACKUP_CLAIM,
    BACKUP_CRONJOB,
    job_from_cronjob,
    job_name,
    list_job,
    restore_job,
    status_job,
    validate_snapshot,
)
from .redis_manifests import redis_deployment_objects
from .redis_objects import (
    AUTH_SECRET,
    AUTH_SECRET_KEY,
    PORT,
    PRIMARY_SERVICE,
    STATEFULSET,
    RedisOptions,
    auth_secret,
    data_claim,
    data_claim_name,
    selector_labels,
    statefulset,
    validate,
)
from .redis_status import parse_probe_log, pod_rows

STATEFULSET_KIND = ("apps/v1", "StatefulSet")
CRONJOB_KIND = ("batch/v1", "CronJob")
SECRET_KIND = ("v1", "Secret")
CLAIM_KIND = ("v1", "PersistentVolumeClaim")
#: Seconds between two looks at the StatefulSet while waiting for its pods to be ready.
READY_POLL_SECONDS = 2


@dataclass(frozen=True)
class RedisStatus:
    """What ``kiabatch redis status`` shows."""

    #: The live StatefulSet.
    statefulset: dict[str, Any]
    #: Where INFO came from: "probe" (the status Job), "redis-url" or "api" (none read).
    source: str
    #: One row per pod (see :func:`kiabatch.kube.redis_status.pod_rows`).
    pods: list[dict[str, Any]]
    #: Why INFO is incomplete (the probe failed, a pod did not answer); None if it is not.
    problem: str | None


def _silent(message: str) -> None:
    del message


def _selector() -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels().items())


def _secret_value(secret: dict[str, Any], key: str) -> str | None:
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key]).decode()
    return (secret.get("stringData") or {}).get(key)


def _reapplicable(live: dict[str, Any]) -> dict[str, Any]:
    """A live object as something to apply again (no status, no server-set metadata)."""
    meta = live["metadata"]
    return {
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": {key: meta[key] for key in ("name", "namespace", "labels", "annotations") if key in meta},
        "spec": live["spec"],
    }


def _wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(1)


def info_from_url(url: str) -> dict[str, str]:
    """INFO replication/memory/persistence from one endpoint, as text fields."""
    client = connect(url)
    try:
        parsed = client.info("everything")
    finally:
        client.close()
    flat = {}
    for key, value in parsed.items():
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        flat[key] = str(value)
    return flat


def parse_listing(log: str) -> list[dict[str, Any]]:
    """``backup.sh list`` output -> [{name, bytes, created}], oldest first."""
    snapshots = []
    for line in log.splitlines():
        name, _, size = line.partition("\t")
        try:
            validate_snapshot(name)
        except KiabatchError:
            continue
        created = datetime.strptime(name[len("kiabatch-redis-") : -len(".rdb")], "%Y%m%dT%H%M%SZ")
        snapshots.append({"name": name, "bytes": int(size or 0), "created": created.replace(tzinfo=UTC).isoformat()})
    return snapshots


class RedisOps:
    """kiabatch's Redis in the namespace of ``cluster``; ``say`` receives progress lines."""

    def __init__(self, cluster: Cluster, say: Callable[[str], None] = _silent) -> None:
        self.cluster = cluster
        self.say = say

    def live_options(self, source: dict[str, Any] | None, options: RedisOptions | None = None) -> RedisOptions:
        """``options`` (default: the defaults) in this namespace, with the image (and memory) of a live
        StatefulSet or CronJob when there is one, validated: what the Jobs run with."""
        options = replace(options or RedisOptions(), namespace=self.cluster.namespace)
        if source is not None:
            kind = source["kind"]
            spec = source["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else source["spec"]
            container = spec["template"]["spec"]["containers"][0]
            options = replace(options, image=container["image"])
            if container.get("imagePullPolicy"):
                options = replace(options, image_pull_policy=container["imagePullPolicy"])
            memory = (container.get("resources") or {}).get("limits", {}).get("memory")
            if kind == "StatefulSet" and memory:
                options = replace(options, memory=memory)
        return validate(options)

    # -- deploy ------------------------------------------------------------------------------

    def ensure_secrets(self) -> list[str]:
        """Create the password Secret (generated) and the batch pods' URL Secret if missing; say what was done."""
        cluster = self.cluster
        said = []
        stored = cluster.get(SECRET_KIND, AUTH_SECRET)
        password = _secret_value(stored, AUTH_SECRET_KEY) if stored else None
        if stored is None:
            password = secrets.token_urlsafe(32)
            cluster.create(auth_secret(password, cluster.namespace))
            said.append(f"created Secret {AUTH_SECRET!r} with a generated password (key {AUTH_SECRET_KEY!r})")
        elif not password:
            raise ClusterError(f"Secret {AUTH_SECRET!r} has no key {AUTH_SECRET_KEY!r}; delete it or add the key")
        else:
            said.append(f"kept the existing Secret {AUTH_SECRET!r}")
        if cluster.get(SECRET_KIND, REDIS_SECRET) is None:
            url = f"redis://:{password}@{PRIMARY_SERVICE}:{PORT}/0"
            cluster.create(redis_secret(url, cluster.namespace, REDIS_SECRET, REDIS_SECRET_KEY))
            said.append(f"created Secret {REDIS_SECRET!r} for batch pods: {redact(url)}")
        else:
            said.append(f"kept the existing Secret {REDIS_SECRET!r} (batch pods use its URL)")
        return said

    def deploy(self, options: RedisOptions) -> list[dict[str, str]]:
        """Make sure of the Secrets, then server-side apply every object (``options`` validated);
        returns the applied objects' kind and name."""
        for line in self.ensure_secrets():
            self.say(line)
        applied = []
        for obj in redis_deployment_objects(options):
            self.cluster.apply(obj)
            applied.append({"kind": obj["kind"], "name": obj["metadata"]["name"]})
            self.say(f"applied {obj['kind']} {obj['metadata']['name']!r}")
        return applied

    def wait_ready(self, replicas: int, timeout: float) -> None:
        """Wait until ``replicas`` pods of the StatefulSet are ready; ClusterError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.cluster.get(STATEFULSET_KIND, STATEFULSET) or {}
            ready = current.get("status", {}).get("readyReplicas", 0)
            if ready >= replicas:
                self.say(f"{ready}/{replicas} pods ready")
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"only {ready}/{replicas} pods of {STATEFULSET} ready after {timeout:g}s")
            time.sleep(READY_POLL_SECONDS)

    # -- status ------------------------------------------------------------------------------

    def status(self, *, probe: bool = True, redis_url: str | None = None, timeout: float) -> RedisStatus:
        """Every pod's state from the API, with INFO from the probe Job, else from ``redis_url`` if given."""
        cluster = self.cluster
        current = cluster.get(STATEFULSET_KIND, STATEFULSET)
        if current is None:
            raise ClusterError(
                f"no StatefulSet {STATEFULSET!r} in namespace {cluster.namespace!r} (kiabatch redis deploy)"
            )
        replicas = int(current["spec"].get("replicas", 1))
        pods = cluster.pods(_selector())
        claims = cluster.list(CLAIM_KIND, _selector())
        infos: dict[int, dict[str, str] | str] = {}
        problem = None
        source = "api"
        if probe:
            source = "probe"
            job = status_job(self.live_options(current), job_name("status"), replicas)
            ok, log = run_job(cluster, job, timeout)
            try:
                found = parse_probe_log(log)
            except ValueError as exc:
                found = {}
                problem = f"the status probe failed: {exc}: {last_error(log)}"
            if not ok and problem is None:
                problem = f"the status probe failed: {last_error(log)}"
            infos.update(found)
        elif redis_url:
            source = "redis-url"
            info = info_from_url(redis_url)
            if info.get("role") == "master":
                infos[0] = info  # the primary Service selects pod 0
            else:
                self.say(f"{redact(redis_url)} is a replica: pass the primary's URL to see every replica's lag")
        rows = pod_rows(replicas, pods, claims, infos)
        unreadable = [row["pod"] for row in rows if row["error"]]
        if unreadable and problem is None:
            problem = f"could not read INFO of {', '.join(unreadable)}"
        return RedisStatus(current, source, rows, problem)

    # -- backups -----------------------------------------------------------------------------

    def backup_cronjob(self) -> dict[str, Any]:
        """The live backup CronJob; ClusterError if there is none."""
        cronjob = self.cluster.get(CRONJOB_KIND, BACKUP_CRONJOB)
        if cronjob is None:
            raise ClusterError(
                f"no CronJob {BACKUP_CRONJOB!r} in namespace {self.cluster.namespace!r} (kiabatch redis deploy)"
            )
        return cronjob

    def backup_schedule(self) -> dict[str, Any]:
        """The backup CronJob's schedule, last run and last success."""
        cronjob = self.backup_cronjob()
        spec, status = cronjob["spec"], cronjob.get("status", {})
        return {
            "cronjob": BACKUP_CRONJOB,
            "schedule": spec["schedule"],
            "time_zone": spec.get("timeZone", "-"),
            "suspended": bool(spec.get("suspend")),
            "last_schedule": status.get("lastScheduleTime", "-"),
            "last_success": status.get("lastSuccessfulTime", "-"),
        }

    def start_backup(self) -> str:
        """Create a backup Job from the CronJob's template, owned by it; its name (not waited for)."""
        job = job_from_cronjob(self.backup_cronjob(), job_name("backup-manual"))
        self.cluster.create(job)
        return str(job["metadata"]["name"])

    def backup_now(self, timeout: float) -> str:
        """Take a snapshot now (a Job like :meth:`start_backup`'s, waited for and kept); its log.

        JobFailedError (with the log) if the backup failed.
        """
        job = job_from_cronjob(self.backup_cronjob(), job_name("backup-manual"))
        name = job["metadata"]["name"]
        ok, log = run_job(self.cluster, job, timeout, keep=True)
        if not ok:
            raise JobFailedError(f"backup Job {name!r} failed: {last_error(log)}", log)
        return log

    def _check_backup_claim(self) -> None:
        if self.cluster.get(CLAIM_KIND, BACKUP_CLAIM) is None:
            raise ClusterError(f"no backup volume {BACKUP_CLAIM!r} in namespace {self.cluster.namespace!r}")

    def list_snapshots(self, timeout: float) -> list[dict[str, Any]]:
        """The snapshots in the backup volume, oldest first, read by a listing Job."""
        self._check_backup_claim()
        options = self.live_options(self.cluster.get(CRONJOB_KIND, BACKUP_CRONJOB))
        ok, log = run_job(self.cluster, list_job(options, job_name("backups")), timeout)
        if not ok:
            raise ClusterError(f"listing the backups failed: {last_error(log)}")
        return parse_listing(log)

    # -- restore -----------------------------------------------------------------------------

    def _prepare_primary_claim(self, options: RedisOptions, timeout: float) -> None:
        """Make sure pod 0's data PVC exists and is not about to be deleted."""
        cluster = self.cluster
        name = data_claim_name(0)

        def doomed() -> bool:
            claim = cluster.get(CLAIM_KIND, name)
            owned = claim is not None and any(
                ref.get("kind") == "StatefulSet" for ref in claim["metadata"].get("ownerReferences") or []
            )
            return claim is not None and (owned or bool(claim["metadata"].get("deletionTimestamp")))

        # With whenDeleted: Delete the StatefulSet's deletion takes its PVCs along: wait, then make a fresh one.
        _wait_until(lambda: not doomed(), f"PVC {name!r} to be deleted", timeout)
        if cluster.get(CLAIM_KIND, name) is None:
            cluster.create(data_claim(options))
            self.say(f"created PVC {name!r}")

    def restore(self, snapshot: str, timeout: float, options: RedisOptions | None = None) -> str:
        """Load ``snapshot`` (a snapshot name, or "latest") into a fresh StatefulSet; the restore Job's log.

        1. the StatefulSet is deleted (its volumes stay) and its pods end;
        2. a Job with the backup volume and pod 0's data volume verifies the
           snapshot, loads it and moves the old data aside (``restore.sh``);
        3. the StatefulSet is created again as it was (or from ``options`` if
           there was none).

        Whatever fails after step 1, the StatefulSet is created again before the
        error is raised (JobFailedError, with the log, if the restore Job failed).
        """
        cluster = self.cluster
        if snapshot == "latest":
            listed = self.list_snapshots(timeout)
            if not listed:
                raise UsageError("there is no snapshot to restore (kiabatch redis backups)")
            snapshot = listed[-1]["name"]
            self.say(f"restoring the latest snapshot, {snapshot}")
        validate_snapshot(snapshot)
        self._check_backup_claim()
        live = cluster.get(STATEFULSET_KIND, STATEFULSET)
        options = self.live_options(live, options)
        again = _reapplicable(live) if live is not None else statefulset(options)
        if live is not None:
            cluster.delete(STATEFULSET_KIND, STATEFULSET)
            self.say(f"deleted StatefulSet {STATEFULSET!r}; waiting for its pods to end")
        job = restore_job(options, snapshot, job_name("restore"))
        try:
            _wait_until(lambda: not cluster.pods(_selector()), "the Redis pods to end", timeout)
            self._prepare_primary_claim(options, timeout)
            ok, log = run_job(cluster, job, timeout)
        except KiabatchError as exc:
            # Whatever failed, never leave the namespace without its Redis.
            cluster.apply(again)
            raise ClusterError(f"{exc}; StatefulSet {STATEFULSET!r} created again with its previous data") from None
        cluster.apply(again)
        self.say(f"created StatefulSet {STATEFULSET!r} again; see: kiabatch redis status")
        if not ok:
            raise JobFailedError(
                f"restore Job {job['metadata']['name']!r} failed: {last_error(log)}; "
                "the StatefulSet is back with its previous data",
                log,
            )
        return log
