"""``kiabatch redis``: kiabatch's own replicated Redis on Kubernetes.

Option parsing and printing only: the objects are built in
:mod:`kiabatch.kube.redis_objects` and :mod:`kiabatch.kube.redis_backup`, and the
workflows (deploy, status, backups, restore) are :class:`kiabatch.kube.redis_ops.RedisOps`.
Exit codes: 2 for bad input, 3 when the cluster or Redis cannot be reached or a
Job the command ran failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .. import settings
from ..errors import EXIT_UNREACHABLE
from ..kube.api import Cluster
from ..kube.jobs import JobFailedError
from ..kube.objects import to_yaml
from ..kube.redis_backup import validate_snapshot
from ..kube.redis_manifests import redis_deployment_objects
from ..kube.redis_objects import AUTH_SECRET, AUTH_SECRET_KEY, DEFAULT_IMAGE, RedisOptions, validate
from ..kube.redis_ops import RedisOps
from ..kube.redis_status import HEADERS, memory_warnings, statefulset_line, table_cells
from .context import CliError, Session, emit_json, note, pass_session, user_errors
from .options import Duration, cluster_options
from .output import table


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


def _connect(namespace: str | None, context: str | None) -> RedisOps:
    with user_errors():
        cluster = Cluster.connect(context, namespace)
        cluster.check_version()
        cluster.check_namespace()
    return RedisOps(cluster, say=note)


@contextmanager
def _job_errors() -> Iterator[None]:
    """:func:`user_errors`, printing the log of a Job that failed (on stdout) before its one-line error."""
    with user_errors():
        try:
            yield
        except JobFailedError as exc:
            click.echo(exc.log, nl=False)
            raise


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
@click.option("--namespace", "-n", envvar=settings.ENV_NAMESPACE, default="default", show_default=True,
              help="Namespace of the objects. Env: KIABATCH_NAMESPACE.")  # fmt: skip
@object_options
def render_command(namespace: str, **values: Any) -> None:
    """Print the objects `redis deploy` applies, as YAML (no cluster needed).

    The password Secret is not printed: `redis deploy` generates it, or create it
    yourself (key 'password') before applying this output with kubectl.
    """
    click.echo(to_yaml(redis_deployment_objects(_options(namespace, values))), nl=False)
    note(f"# not rendered: Secret {AUTH_SECRET!r} (key {AUTH_SECRET_KEY!r}); `kiabatch redis deploy` creates it")


@redis_group.command("deploy")
@cluster_options
@object_options
@click.option("--wait/--no-wait", default=False, show_default=True, help="Wait until every pod is ready.")
@click.option("--timeout", type=Duration(), default="10m", show_default=True, help="How long --wait waits.")
@pass_session
def deploy_command(
    session: Session, namespace: str | None, context: str | None, wait: bool, timeout: float,
    **values: Any,
) -> None:  # fmt: skip
    """Apply the objects (server-side apply), generating the password Secret if missing.

    Also creates the Secret 'kiabatch-redis' (the URL batch pods use) when it does
    not exist yet, pointing at kiabatch-redis-primary. Nothing secret is printed.
    """
    ops = _connect(namespace, context)
    options = _options(ops.cluster.namespace, values)
    with user_errors():
        applied = ops.deploy(options)
        if wait:
            ops.wait_ready(options.replicas, timeout)
    if session.json:
        emit_json({"namespace": ops.cluster.namespace, "applied": applied})
    else:
        click.echo(f"kiabatch-redis deployed in namespace {ops.cluster.namespace!r}; see: kiabatch redis status")


# -- status ----------------------------------------------------------------------------------


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
@pass_session
def status_command(session: Session, namespace: str | None, context: str | None, probe: bool,
                   timeout: float) -> None:  # fmt: skip
    """Role, replication offset and lag, memory and persistence of every pod.

    Pod states and volumes come from the Kubernetes API; each pod's INFO comes from
    a probe Job that asks every pod by its stable DNS name. Exits 3 if INFO could
    not be read.
    """
    ops = _connect(namespace, context)
    with user_errors():
        status = ops.status(probe=probe, redis_url=session.redis_url, timeout=timeout)
    if session.json:
        emit_json({"statefulset": statefulset_line(status.statefulset), "source": status.source, "pods": status.pods})
    else:
        click.echo(statefulset_line(status.statefulset))
        click.echo(table([table_cells(row) for row in status.pods], HEADERS))
    for warning in memory_warnings(status.pods):
        note(f"kiabatch: {warning}")
    if status.problem:
        raise CliError(status.problem, EXIT_UNREACHABLE)


# -- backups ---------------------------------------------------------------------------------


@redis_group.command("backup")
@cluster_options
@click.option("--now", is_flag=True, help="Take a snapshot now: a Job from the backup CronJob's template.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the backup and print its log.")
@click.option("--timeout", type=Duration(), default="1h", show_default=True, help="How long --wait waits.")
@pass_session
def backup_command(session: Session, namespace: str | None, context: str | None, now: bool, wait: bool,
                   timeout: float) -> None:  # fmt: skip
    """Show the backup schedule, or with --now take a snapshot at once.

    --now creates a Job from the CronJob's jobTemplate, owned by the CronJob
    (what `kubectl create job --from=cronjob/kiabatch-redis-backup` does).
    """
    ops = _connect(namespace, context)
    if not now:
        with user_errors():
            summary = ops.backup_schedule()
        if session.json:
            emit_json(summary)
        else:
            click.echo("\n".join(f"{key:14} {value}" for key, value in summary.items()))
    elif not wait:
        with user_errors():
            click.echo(ops.start_backup())
    else:
        with _job_errors():
            log = ops.backup_now(timeout)
        click.echo(log, nl=False)


@redis_group.command("backups")
@cluster_options
@click.option("--timeout", type=Duration(), default="5m", show_default=True, help="How long the listing may take.")
@pass_session
def backups_command(session: Session, namespace: str | None, context: str | None, timeout: float) -> None:
    """List the snapshots in the backup volume, oldest first (read by a short Job)."""
    ops = _connect(namespace, context)
    with user_errors():
        snapshots = ops.list_snapshots(timeout)
    if session.json:
        emit_json(snapshots)
    elif not snapshots:
        click.echo("no snapshots")
    else:
        click.echo(table([[s["name"], s["bytes"], s["created"]] for s in snapshots], ["NAME", "BYTES", "CREATED"]))


# -- restore ---------------------------------------------------------------------------------


@redis_group.command("restore")
@click.argument("snapshot")
@cluster_options
@object_options
@click.option("--yes", is_flag=True, help="Confirm: the StatefulSet is stopped and pod 0's data replaced.")
@click.option("--timeout", type=Duration(), default="1h", show_default=True, help="How long each step may take.")
@pass_session
def restore_command(session: Session, snapshot: str, namespace: str | None, context: str | None, yes: bool,
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
    ops = _connect(namespace, context)
    with _job_errors():
        log = ops.restore(snapshot, timeout, RedisOptions(**values))
    click.echo(log, nl=False)
