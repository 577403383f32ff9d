"""``kiabatch schedule``: recurring batches (CronJobs on Kubernetes, ``kiabatch scheduler`` locally)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from .. import backends, settings
from ..errors import UsageError
from ..scheduler import LocalScheduler, ScheduleStore, serve_until_signalled
from ..schedules import CONCURRENCY, DEFAULT_STARTING_DEADLINE, Schedule
from .context import CliError, Settings, emit_json, note, pass_settings, user_errors
from .options import LIMIT, Duration, Interval
from .render import table, when


def check_submit_args(args: tuple[str, ...]) -> None:
    """Parse ``args`` as ``kiabatch submit`` would (without running anything); UsageError if invalid."""
    from .submit import submit_group

    if not args:
        raise UsageError("no submit arguments: give a workload (e.g. pi --digits 1000) or --from-queue Q --command ...")
    try:
        with submit_group.make_context("submit", list(args)) as ctx:
            name, command, rest = submit_group.resolve_command(ctx, list(args))
            command.make_context(name, rest, parent=ctx).close()
    except click.UsageError as exc:
        raise UsageError(f"bad submit arguments for the schedule: {exc.format_message()}") from None


def backend_option(func: Any) -> Any:
    """--backend, --namespace, --context for every schedule command."""
    func = click.option("--context", "kube_context", metavar="NAME", help="kubeconfig context (kubernetes).")(func)
    func = click.option("--namespace", "-n", envvar="KIABATCH_NAMESPACE", help="Namespace (kubernetes).")(func)
    return click.option(
        "--backend",
        type=click.Choice(backends.NAMES),
        default=backends.LOCAL,
        envvar=settings.ENV_BACKEND,
        show_default=True,
        help="local: stored in Redis, run by `kiabatch scheduler`; kubernetes: a CronJob.",
    )(func)


def _kube(namespace: str | None, context: str | None) -> Any:
    from ..kube.api import Cluster
    from ..kube.schedule_ops import KubeSchedules

    return KubeSchedules(Cluster.connect(context, namespace))


@click.group("schedule")
def schedule_group() -> None:
    """Recurring batches: every tick runs `kiabatch submit ARGS` as an ordinary batch.

    \b
      kiabatch schedule create thumbs --cron '*/10 * * * *' --from-queue thumbs --command 'python thumb.py {input}'
      kiabatch schedule create nightly-pi --cron '0 3 * * *' --time-zone Europe/Berlin --backend kubernetes \\
          -n batch pi --digits 1000000 -p 4
      kiabatch scheduler        # runs the local schedules in the foreground
    """


@schedule_group.command("create", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--cron", required=True, help="When: 5 fields (min hour day month weekday) or @hourly, @daily, ...")
@click.option("--time-zone", help="IANA time zone of the schedule (default UTC), e.g. Europe/Berlin.")
@click.option(
    "--concurrency",
    type=click.Choice(CONCURRENCY),
    default="forbid",
    show_default=True,
    help="A tick while the previous run is active: skip it, run both, or replace the previous run.",
)
@click.option("--suspend", is_flag=True, help="Create it suspended.")
@click.option(
    "--starting-deadline",
    type=Duration(),
    default=str(DEFAULT_STARTING_DEADLINE),
    show_default="5m",
    help="Skip a tick missed by more than this (at most one missed tick ever runs).",
)
@click.option("--image", envvar=settings.ENV_IMAGE, help="kiabatch image for the launcher and batches (kubernetes).")
@click.option("--redis-secret", default="kiabatch-redis", show_default=True, help="Secret with the Redis URL.")
@backend_option
@click.argument("submit_args", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def create_command(
    settings_: Settings,
    name: str,
    cron: str,
    time_zone: str | None,
    concurrency: str,
    suspend: bool,
    starting_deadline: float,
    image: str | None,
    redis_secret: str,
    backend: str,
    namespace: str | None,
    kube_context: str | None,
    submit_args: tuple[str, ...],
) -> None:
    """Create schedule NAME; the remaining arguments are what each run passes to `kiabatch submit`."""
    args = tuple(a for a in submit_args if a != "--") if submit_args[:1] == ("--",) else submit_args
    with user_errors():
        check_submit_args(args)
        schedule = Schedule(name=name, cron=cron, submit_args=list(args), time_zone=time_zone,
                            concurrency=concurrency, suspend=suspend, starting_deadline=int(starting_deadline),
                            backend=backend, namespace=namespace or "",
                            created_at=datetime.now(UTC).timestamp())  # fmt: skip
        if backend == backends.KUBERNETES:
            from ..kube.batch_job import KubeOptions

            kube = _kube(namespace, kube_context)
            options = KubeOptions(namespace=kube.cluster.namespace, redis_secret=redis_secret,
                                  **({"image": image} if image else {}))  # fmt: skip
            kube.create(schedule.with_changes(namespace=kube.cluster.namespace), options)
            note(
                f"created CronJob {name} in namespace {kube.cluster.namespace} ({cron}"
                + (f", {time_zone}" if time_zone else "")
                + f", concurrency {concurrency})"
            )
            return
        ScheduleStore(settings_.store().redis).save(schedule)
    next_tick = schedule.next_tick(datetime.now(UTC))
    note(f"created schedule {name} ({cron}); next run {next_tick.isoformat()}; run `kiabatch scheduler` to start runs")


def _local(settings_: Settings) -> ScheduleStore:
    return ScheduleStore(settings_.store().redis)


def _row(schedule: Schedule, last: str) -> list[str]:
    next_tick = "-" if schedule.suspend else schedule.next_tick(datetime.now(UTC)).strftime("%Y-%m-%d %H:%M %Z")
    return [schedule.name, schedule.cron, schedule.time_zone or "UTC", schedule.concurrency,
            "yes" if schedule.suspend else "no", schedule.backend, last, next_tick]  # fmt: skip


@schedule_group.command("list")
@backend_option
@pass_settings
def list_command(settings_: Settings, backend: str, namespace: str | None, kube_context: str | None) -> None:
    """List schedules with their last and next run."""
    rows = []
    with user_errors():
        if backend == backends.KUBERNETES:
            kube = _kube(namespace, kube_context)
            for cron in kube.list():
                schedule = kube.schedule_of(cron)
                rows.append((schedule, cron.get("status", {}).get("lastScheduleTime") or "-"))
        else:
            store = _local(settings_)
            for schedule in store.all():
                last = store.state(schedule.name).get("last_tick")
                rows.append((schedule, when(float(last)) if last else "-"))
    if settings_.json:
        emit_json([{**json.loads(s.to_json()), "last_run": last} for s, last in rows])
        return
    headers = ["NAME", "CRON", "TIME ZONE", "CONCURRENCY", "SUSPENDED", "BACKEND", "LAST RUN", "NEXT RUN"]
    click.echo(table([_row(s, last) for s, last in rows], headers) if rows else "no schedules")


def _get(settings_: Settings, name: str, backend: str, namespace: str | None, context: str | None) -> Schedule:
    if backend == backends.KUBERNETES:
        kube = _kube(namespace, context)
        return kube.schedule_of(kube.cron_job(name))
    return _local(settings_).get(name)


@schedule_group.command("show")
@click.argument("name")
@backend_option
@pass_settings
def show_command(settings_: Settings, name: str, backend: str, namespace: str | None, kube_context: str | None) -> None:
    """Show a schedule's definition."""
    with user_errors():
        schedule = _get(settings_, name, backend, namespace, kube_context)
    data = json.loads(schedule.to_json())
    if settings_.json:
        emit_json(data)
        return
    data["submit_args"] = " ".join(schedule.submit_args)
    data["next_run"] = "-" if schedule.suspend else schedule.next_tick(datetime.now(UTC)).isoformat()
    for key, value in data.items():
        if key not in ("extra", "created_at"):
            click.echo(f"{key.replace('_', ' '):<18} {value}")


def _set_suspend(
    settings_: Settings, name: str, backend: str, namespace: str | None, context: str | None, suspend: bool
) -> None:
    with user_errors():
        if backend == backends.KUBERNETES:
            _kube(namespace, context).set_suspend(name, suspend)
        else:
            store = _local(settings_)
            store.save(store.get(name).with_changes(suspend=suspend), replace=True)
    note(f"{'suspended' if suspend else 'resumed'} schedule {name}")


@schedule_group.command("suspend")
@click.argument("name")
@backend_option
@pass_settings
def suspend_command(
    settings_: Settings, name: str, backend: str, namespace: str | None, kube_context: str | None
) -> None:
    """Stop starting runs (runs already started continue)."""
    _set_suspend(settings_, name, backend, namespace, kube_context, True)


@schedule_group.command("resume")
@click.argument("name")
@backend_option
@pass_settings
def resume_command(
    settings_: Settings, name: str, backend: str, namespace: str | None, kube_context: str | None
) -> None:
    """Start runs again from the next tick."""
    _set_suspend(settings_, name, backend, namespace, kube_context, False)


@schedule_group.command("delete")
@click.argument("name")
@click.option("--cascade", is_flag=True, help="Also delete its runs' Jobs and batches (results included).")
@backend_option
@pass_settings
def delete_command(
    settings_: Settings, name: str, cascade: bool, backend: str, namespace: str | None, kube_context: str | None
) -> None:
    """Delete a schedule (its past batches stay unless --cascade)."""
    with user_errors():
        if backend == backends.KUBERNETES:
            store = settings_.store() if cascade else None
            removed = _kube(namespace, kube_context).delete(name, cascade=cascade, store=store)
        else:
            local = _local(settings_)
            local.get(name)
            removed = []
            if cascade:
                from ..batch import Batch

                for entry in local.history(name, limit=10_000):
                    if entry.get("batch") and Batch(entry["batch"], local.redis).delete():
                        removed.append(entry["batch"])
            local.delete(name)
    note(f"deleted schedule {name}" + (f" and {len(removed)} batch(es)" if cascade else ""))


@schedule_group.command("run-now")
@click.argument("name")
@backend_option
@pass_settings
def run_now_command(
    settings_: Settings, name: str, backend: str, namespace: str | None, kube_context: str | None
) -> None:
    """Start a run now, whatever the schedule says (like kubectl create job --from=cronjob/NAME)."""
    with user_errors():
        if backend == backends.KUBERNETES:
            job = _kube(namespace, kube_context).run_now(name)
            click.echo(job["metadata"]["name"])
            note(f"started Job {job['metadata']['name']}; follow it with: kiabatch schedule history {name} -n ...")
            return
        result = LocalScheduler(settings_.store().redis, redis_url=settings_.redis_url).run_now(name)
    if result.outcome == "failed-to-start":
        raise CliError(f"the run of {name} did not start: {result.note}")
    click.echo(result.batch or "-")
    note(f"run of {name}: {result.outcome}" + (f" ({result.note})" if result.note else ""))


@schedule_group.command("history")
@click.argument("name")
@click.option("--limit", type=LIMIT, default=20, show_default=True)
@backend_option
@pass_settings
def history_command(
    settings_: Settings, name: str, limit: int, backend: str, namespace: str | None, kube_context: str | None
) -> None:
    """Past runs: start, end, state, items done/failed, and the batches they launched."""
    with user_errors():
        rows = _history(settings_, name, limit, backend, namespace, kube_context)
    if settings_.json:
        emit_json(rows)
        return
    headers = ["RUN", "STARTED", "FINISHED", "STATE", "DONE", "FAILED", "BATCHES"]
    lines = [[r["run"], r["started"] or "-", r["finished"] or "-", r["state"],
              "-" if r["done"] is None else r["done"], "-" if r["failed"] is None else r["failed"],
              ",".join(r["batches"]) or "-"] for r in rows]  # fmt: skip
    click.echo(table(lines, headers) if lines else f"no runs of {name} yet")


def _history(
    settings_: Settings, name: str, limit: int, backend: str, namespace: str | None, context: str | None
) -> list[dict[str, Any]]:
    store = settings_.store()
    if backend == backends.KUBERNETES:
        return _kube(namespace, context).history(name, store)[-limit:][::-1]
    local = _local(settings_)
    local.get(name)
    rows = []
    for entry in local.history(name, limit):
        batch = entry.get("batch") or ""
        done = failed = None
        started = finished = None
        state = entry["outcome"]
        if batch and store.exists(batch):
            status = store.status(batch)
            done, failed = status.progress.done, status.progress.failed
            started, finished = when(status.started_at), when(status.finished_at)
            state = status.state if entry["outcome"] == "launched" else entry["outcome"]
        rows.append({"run": entry["run"], "started": started or when(entry["tick"]), "finished": finished,
                     "state": state + (f" ({entry['note']})" if entry.get("note") else ""),
                     "batches": [batch] if batch else [], "done": done, "failed": failed})  # fmt: skip
    return rows


@click.command("scheduler")
@click.option("--once", is_flag=True, help="Handle the ticks due now, then exit (e.g. from system cron).")
@click.option("--poll", type=Interval(), default=1.0, show_default=True, help="Seconds between checks.")
@pass_settings
def scheduler_command(settings_: Settings, once: bool, poll: float) -> None:
    """Run the local schedules in the foreground (SIGTERM or Ctrl-C stops it cleanly)."""
    with user_errors():
        scheduler = LocalScheduler(settings_.store(retry_seconds=settings.worker_retry_seconds()).redis,
                                   redis_url=settings_.redis_url)  # fmt: skip
        if once:
            for name, outcome in scheduler.tick():
                note(f"{name}: {outcome}")
            return
        serve_until_signalled(scheduler, poll)


def register(cli: click.Group) -> None:
    """Attach ``schedule`` and ``scheduler``."""
    cli.add_command(schedule_group)
    cli.add_command(scheduler_command)
