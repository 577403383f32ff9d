"""``kiabatch redis``: kiabatch's own replicated Redis on Kubernetes.

The objects are built in :mod:`kiabatch.kube.redis_objects` and
:mod:`kiabatch.kube.redis_backup`. Commands that need to look inside the cluster
(``status``, ``backups``, ``restore``) run a short Job with the Redis image and
read its log: no exec, no port-forward, and the NetworkPolicy stays closed to
everything else. Exit codes: 2 for bad input, 3 when the cluster or Redis cannot
be reached or a Job the command ran failed.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from ..connection import connect, redact
from ..errors import EXIT_UNREACHABLE, ClusterError, KiabatchError
from ..kube.api import Cluster
from ..kube.batch_job import REDIS_SECRET, REDIS_SECRET_KEY, redis_secret
from ..kube.jobs import last_error, run_job
from ..kube.objects import to_yaml
from ..kube.redis_backup import (
    BACKUP_CLAIM,
    BACKUP_CRONJOB,
    job_from_cronjob,
    job_name,
    list_job,
    restore_job,
    status_job,
    validate_snapshot,
)
from ..kube.redis_manifests import redis_deployment_objects
from ..kube.redis_objects import (
    AUTH_SECRET,
    AUTH_SECRET_KEY,
    DEFAULT_IMAGE,
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
from ..kube.redis_status import HEADERS, parse_probe_log, pod_rows, statefulset_line, table_cells
from .context import CliError, Settings, emit_json, note, pass_settings, user_errors
from .options import Duration
from .render import table

STATEFULSET_KIND = ("apps/v1", "StatefulSet")
CRONJOB_KIND = ("batch/v1", "CronJob")
SECRET_KIND = ("v1", "Secret")
CLAIM_KIND = ("v1", "PersistentVolumeClaim")


def _selector() -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels().items())


def cluster_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--namespace/-n`` and ``--context``."""
    func = click.option("--context", "kube_context", metavar="NAME", help="kubeconfig context (default: current).")(
        func
    )
    return click.option(
        "--namespace",
        "-n",
        envvar="KIABATCH_NAMESPACE",
        help="Namespace (default: the context's, else 'default'). Env: KIABATCH_NAMESPACE.",
    )(func)


def object_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The settings of the rendered objects (render, deploy, restore without a StatefulSet)."""
    defaults = RedisOptions()
    retention = click.Choice(["Retain", "Delete"])
    options = [
        click.option("--replicas", type=click.IntRange(1, 100), default=defaults.replicas, show_default=True,
                     help="Pods: one primary (pod 0) and replicas."),
        click.option("--image", default=DEFAULT_IMAGE, show_default=True, envvar="KIABATCH_REDIS_IMAGE",
                     help="Redis image (>= 7.0, with sh; runs as UID 999). Env: KIABATCH_REDIS_IMAGE."),
        click.option("--image-pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"])),
        click.option("--storage-size", default=defaults.storage_size, show_default=True,
                     help="Each pod's data volume."),
        click.option("--storage-class", help="StorageClass of the data volumes (default: the cluster's)."),
        click.option("--pvc-when-deleted", type=retention, default=defaults.pvc_when_deleted, show_default=True,
                     help="Data volumes when the StatefulSet is deleted (persistentVolumeClaimRetentionPolicy)."),
        click.option("--pvc-when-scaled", type=retention, default=defaults.pvc_when_scaled, show_default=True,
                     help="Data volumes of pods removed by a scale-down."),
        click.option("--cpu", default=defaults.cpu, show_default=True, help="CPU request of each Redis pod."),
        click.option("--memory", default=defaults.memory, show_default=True,
                     help="Memory request and limit of each Redis pod (maxmemory is 70% of it)."),
        click.option("--backup-schedule", default=defaults.backup_schedule, show_default=True,
                     help="Cron schedule of the backup CronJob."),
        click.option("--backup-time-zone", default=defaults.backup_time_zone, show_default=True,
                     help="Time zone of the schedule."),
        click.option("--backup-keep", type=click.IntRange(1, 1000), default=defaults.backup_keep, show_default=True,
                     help="Snapshots kept (the oldest are removed)."),
        click.option("--backup-storage-size", default=defaults.backup_storage_size, show_default=True,
                     help="The backup volume."),
        click.option("--backup-storage-class", help="StorageClass of the backup volume."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _options(namespace: str | None, values: dict[str, Any]) -> RedisOptions:
    with user_errors():
        return validate(RedisOptions(namespace=namespace, **values))


def _connect(namespace: str | None, context: str | None) -> Cluster:
    with user_errors():
        cluster = Cluster.connect(context, namespace)
        cluster.check_version()
        cluster.check_namespace()
    return cluster


@click.group("redis")
def redis_group() -> None:
    """kiabatch's own Redis on Kubernetes: a replicated StatefulSet with backups.

    \b
      kiabatch redis render -n batch | kubectl apply --dry-run=server -f -
      kiabatch redis deploy -n batch
      kiabatch redis status -n batch
      kiabatch redis backup --now -n batch
      kiabatch redis backups -n batch
      kiabatch redis restore kiabatch-redis-20260314T031700Z.rdb -n batch --yes
    """


# -- render / deploy ------------------------------------------------------------------------


@redis_group.command("render")
@click.option("--namespace", "-n", envvar="KIABATCH_NAMESPACE", default="default", show_default=True,
              help="Namespace of the objects. Env: KIABATCH_NAMESPACE.")  # fmt: skip
@object_options
def render_command(namespace: str, **values: Any) -> None:
    """Print the objects `redis deploy` applies, as YAML (no cluster needed).

    The password Secret is not printed: `redis deploy` generates it, or create it
    yourself (key 'password') before applying this output with kubectl.
    """
    click.echo(to_yaml(redis_deployment_objects(_options(namespace, values))), nl=False)
    note(f"# not rendered: Secret {AUTH_SECRET!r} (key {AUTH_SECRET_KEY!r}); `kiabatch redis deploy` creates it")


def _secret_value(secret: dict[str, Any], key: str) -> str | None:
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key]).decode()
    return (secret.get("stringData") or {}).get(key)


def ensure_secrets(cluster: Cluster) -> list[str]:
    """Create the password Secret (generated) and the batch pods' URL Secret if missing; say what was done."""
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


@redis_group.command("deploy")
@cluster_options
@object_options
@click.option("--wait/--no-wait", default=False, show_default=True, help="Wait until every pod is ready.")
@click.option("--timeout", type=Duration(), default="10m", show_default=True, help="How long --wait waits.")
@pass_settings
def deploy_command(
    settings_: Settings, namespace: str | None, kube_context: str | None, wait: bool, timeout: float,
    **values: Any,
) -> None:  # fmt: skip
    """Apply the objects (server-side apply), generating the password Secret if missing.

    Also creates the Secret 'kiabatch-redis' (the URL batch pods use) when it does
    not exist yet, pointing at kiabatch-redis-primary. Nothing secret is printed.
    """
    cluster = _connect(namespace, kube_context)
    options = _options(cluster.namespace, values)
    applied = []
    with user_errors():
        for line in ensure_secrets(cluster):
            note(line)
        for obj in redis_deployment_objects(options):
            cluster.apply(obj)
            applied.append({"kind": obj["kind"], "name": obj["metadata"]["name"]})
            note(f"applied {obj['kind']} {obj['metadata']['name']!r}")
    if wait:
        _wait_ready(cluster, options.replicas, timeout)
    if settings_.json:
        emit_json({"namespace": cluster.namespace, "applied": applied})
    else:
        click.echo(f"kiabatch-redis deployed in namespace {cluster.namespace!r}; see: kiabatch redis status")


def _wait_ready(cluster: Cluster, replicas: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with user_errors():
        while True:
            current = cluster.get(STATEFULSET_KIND, STATEFULSET) or {}
            ready = current.get("status", {}).get("readyReplicas", 0)
            if ready >= replicas:
                note(f"{ready}/{replicas} pods ready")
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"only {ready}/{replicas} pods of {STATEFULSET} ready after {timeout:g}s")
            time.sleep(2)


def _live_options(cluster: Cluster, source: dict[str, Any] | None, values: dict[str, Any]) -> RedisOptions:
    """Options for a Job: the image (and memory) of a live object when there is one."""
    if source is not None:
        kind = source["kind"]
        spec = source["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else source["spec"]
        container = spec["template"]["spec"]["containers"][0]
        values = {**values, "image": container["image"]}
        if container.get("imagePullPolicy"):
            values["image_pull_policy"] = container["imagePullPolicy"]
        memory = (container.get("resources") or {}).get("limits", {}).get("memory")
        if kind == "StatefulSet" and memory:
            values["memory"] = memory
    return _options(cluster.namespace, values)


# -- status ----------------------------------------------------------------------------------


def _info_from_url(url: str) -> dict[str, str]:
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


@redis_group.command("status")
@cluster_options
@click.option(
    "--probe/--no-probe",
    default=True,
    show_default=True,
    help="Read INFO of every pod through a short Job in the namespace; --no-probe: only the API, "
    "plus INFO from --redis-url (e.g. a port-forward to kiabatch-redis-primary) if given.",
)
@click.option("--timeout", type=Duration(), default="2m", show_default=True, help="How long the probe may take.")
@pass_settings
def status_command(settings_: Settings, namespace: str | None, kube_context: str | None, probe: bool,
                   timeout: float) -> None:  # fmt: skip
    """Role, replication offset and lag, memory and persistence of every pod.

    Pod states and volumes come from the Kubernetes API; each pod's INFO comes from
    a probe Job that asks every pod by its stable DNS name. Exits 3 if INFO could
    not be read.
    """
    cluster = _connect(namespace, kube_context)
    with user_errors():
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
        options = _live_options(cluster, current, {})
        job = status_job(options, job_name("status"), replicas)
        with user_errors():
            ok, log = run_job(cluster, job, timeout)
        try:
            found = parse_probe_log(log)
        except ValueError as exc:
            found = {}
            problem = f"the status probe failed: {exc}: {last_error(log)}"
        if not ok and problem is None:
            problem = f"the status probe failed: {last_error(log)}"
        infos.update(found)
    elif settings_.redis_url:
        source = "redis-url"
        with user_errors():
            info = _info_from_url(settings_.redis_url)
        if info.get("role") == "master":
            infos[0] = info  # the primary Service selects pod 0
        else:
            note(f"{redact(settings_.redis_url)} is a replica: pass the primary's URL to see every replica's lag")
    rows = pod_rows(replicas, pods, claims, infos)
    unreadable = [row["pod"] for row in rows if row["error"]]
    if unreadable and problem is None:
        problem = f"could not read INFO of {', '.join(unreadable)}"
    if settings_.json:
        emit_json({"statefulset": statefulset_line(current), "source": source, "pods": rows})
    else:
        click.echo(statefulset_line(current))
        click.echo(table([table_cells(row) for row in rows], HEADERS))
    if problem:
        raise CliError(problem, EXIT_UNREACHABLE)


# -- backups ---------------------------------------------------------------------------------


@redis_group.command("backup")
@cluster_options
@click.option("--now", is_flag=True, help="Take a snapshot now: a Job from the backup CronJob's template.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the backup and print its log.")
@click.option("--timeout", type=Duration(), default="1h", show_default=True, help="How long --wait waits.")
@pass_settings
def backup_command(settings_: Settings, namespace: str | None, kube_context: str | None, now: bool, wait: bool,
                   timeout: float) -> None:  # fmt: skip
    """Show the backup schedule, or with --now take a snapshot at once.

    --now creates a Job from the CronJob's jobTemplate, owned by the CronJob
    (what `kubectl create job --from=cronjob/kiabatch-redis-backup` does).
    """
    cluster = _connect(namespace, kube_context)
    with user_errors():
        cronjob = cluster.get(CRONJOB_KIND, BACKUP_CRONJOB)
    if cronjob is None:
        raise CliError(
            f"no CronJob {BACKUP_CRONJOB!r} in namespace {cluster.namespace!r} (kiabatch redis deploy)",
            EXIT_UNREACHABLE,
        )
    if not now:
        spec, status = cronjob["spec"], cronjob.get("status", {})
        summary = {
            "cronjob": BACKUP_CRONJOB,
            "schedule": spec["schedule"],
            "time_zone": spec.get("timeZone", "-"),
            "suspended": bool(spec.get("suspend")),
            "last_schedule": status.get("lastScheduleTime", "-"),
            "last_success": status.get("lastSuccessfulTime", "-"),
        }
        if settings_.json:
            emit_json(summary)
        else:
            click.echo("\n".join(f"{key:14} {value}" for key, value in summary.items()))
        return
    job = job_from_cronjob(cronjob, job_name("backup-manual"))
    name = job["metadata"]["name"]
    if not wait:
        with user_errors():
            cluster.create(job)
        click.echo(name)
        return
    with user_errors():
        ok, log = run_job(cluster, job, timeout, keep=True)
    click.echo(log, nl=False)
    if not ok:
        raise CliError(f"backup Job {name!r} failed: {last_error(log)}", EXIT_UNREACHABLE)


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


def list_snapshots(cluster: Cluster, timeout: float) -> list[dict[str, Any]]:
    """The snapshots in the backup volume, read by a listing Job."""
    with user_errors():
        if cluster.get(CLAIM_KIND, BACKUP_CLAIM) is None:
            raise ClusterError(f"no backup volume {BACKUP_CLAIM!r} in namespace {cluster.namespace!r}")
        options = _live_options(cluster, cluster.get(CRONJOB_KIND, BACKUP_CRONJOB), {})
        ok, log = run_job(cluster, list_job(options, job_name("backups")), timeout)
    if not ok:
        raise CliError(f"listing the backups failed: {last_error(log)}", EXIT_UNREACHABLE)
    return parse_listing(log)


@redis_group.command("backups")
@cluster_options
@click.option("--timeout", type=Duration(), default="5m", show_default=True, help="How long the listing may take.")
@pass_settings
def backups_command(settings_: Settings, namespace: str | None, kube_context: str | None, timeout: float) -> None:
    """List the snapshots in the backup volume, oldest first (read by a short Job)."""
    cluster = _connect(namespace, kube_context)
    snapshots = list_snapshots(cluster, timeout)
    if settings_.json:
        emit_json(snapshots)
    elif not snapshots:
        click.echo("no snapshots")
    else:
        click.echo(table([[s["name"], s["bytes"], s["created"]] for s in snapshots], ["NAME", "BYTES", "CREATED"]))


# -- restore ---------------------------------------------------------------------------------


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


def _prepare_primary_claim(cluster: Cluster, options: RedisOptions, timeout: float) -> None:
    """Make sure pod 0's data PVC exists and is not about to be deleted."""
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
        note(f"created PVC {name!r}")


@redis_group.command("restore")
@click.argument("snapshot")
@cluster_options
@object_options
@click.option("--yes", is_flag=True, help="Confirm: the StatefulSet is stopped and pod 0's data replaced.")
@click.option("--timeout", type=Duration(), default="1h", show_default=True, help="How long each step may take.")
@pass_settings
def restore_command(settings_: Settings, snapshot: str, namespace: str | None, kube_context: str | None, yes: bool,
                    timeout: float, **values: Any) -> None:  # fmt: skip
    """Load SNAPSHOT (a name from `redis backups`, or 'latest') into a fresh StatefulSet.

    \b
    1. the StatefulSet is deleted (its volumes stay) and its pods end;
    2. a Job with the backup volume and pod 0's data volume verifies SNAPSHOT,
       loads it into a private redis-server, which writes new append-only files,
       and moves the old data aside into pre-restore-<time>/ on that volume;
    3. the StatefulSet is created again as it was (or from these options if there
       was none); the replicas resync from the restored primary.
    Stop running batches first: Redis is unavailable meanwhile.
    """
    if snapshot != "latest":
        with user_errors():
            validate_snapshot(snapshot)
    if not yes:
        raise CliError("restore stops kiabatch-redis and replaces pod 0's data; pass --yes to confirm")
    cluster = _connect(namespace, kube_context)
    if snapshot == "latest":
        listed = list_snapshots(cluster, timeout)
        if not listed:
            raise CliError("there is no snapshot to restore (kiabatch redis backups)")
        snapshot = listed[-1]["name"]
        note(f"restoring the latest snapshot, {snapshot}")
    with user_errors():
        if cluster.get(CLAIM_KIND, BACKUP_CLAIM) is None:
            raise ClusterError(f"no backup volume {BACKUP_CLAIM!r} in namespace {cluster.namespace!r}")
        live = cluster.get(STATEFULSET_KIND, STATEFULSET)
        options = _live_options(cluster, live, values)
        again = _reapplicable(live) if live is not None else statefulset(options)
        if live is not None:
            cluster.delete(STATEFULSET_KIND, STATEFULSET)
            note(f"deleted StatefulSet {STATEFULSET!r}; waiting for its pods to end")
        job = restore_job(options, snapshot, job_name("restore"))
        try:
            _wait_until(lambda: not cluster.pods(_selector()), "the Redis pods to end", timeout)
            _prepare_primary_claim(cluster, options, timeout)
            ok, log = run_job(cluster, job, timeout)
        except KiabatchError as exc:
            # Whatever failed, never leave the namespace without its Redis.
            cluster.apply(again)
            raise ClusterError(f"{exc}; StatefulSet {STATEFULSET!r} created again with its previous data") from None
        click.echo(log, nl=False)
        cluster.apply(again)
        note(f"created StatefulSet {STATEFULSET!r} again; see: kiabatch redis status")
    if not ok:
        raise CliError(
            f"restore Job {job['metadata']['name']!r} failed: {last_error(log)}; "
            "the StatefulSet is back with its previous data",
            EXIT_UNREACHABLE,
        )


def register(cli: click.Group) -> None:
    """Attach ``redis``."""
    cli.add_command(redis_group)
