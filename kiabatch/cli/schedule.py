"""``kiabatch schedule``: recurring batches (CronJobs on Kubernetes, ``kiabatch scheduler`` locally).

Every command is one call on the :class:`~kiabatch.schedules.Schedules` of the
chosen backend; this module parses options and prints.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from .. import settings
from ..backends.schedules import open_schedules
from ..errors import UsageError
from ..schedules import (
    CONCURRENCY,
    DEFAULT_STARTING_DEADLINE,
    Schedule,
    ScheduleRow,
    Schedules,
    validate_schedule_name,
)
from ..text import printable, shell_quoted
from .context import Session, emit_json, note, pass_session, user_errors
from .options import LIMIT, Duration, Interval, backend_option, cluster_options, stack
from .output import table
from .pod_options import image_option, kube_options_from, redis_secret_option
from .submit import inline_pod_template, parse_submit_args


class ScheduleName(click.ParamType):
    """A schedule's name: a DNS label of at most 52 characters (it names a CronJob)."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return validate_schedule_name(value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


SCHEDULE_NAME = ScheduleName()

#: Every schedule command: which backend, and where on Kubernetes.
schedule_backend = stack(
    backend_option("local: stored in Redis, run by `kiabatch scheduler`; kubernetes: a CronJob."), cluster_options
)


def _schedules(session: Session, params: dict[str, Any]) -> Schedules:
    """The schedules of the backend named in ``params`` (popping the backend options)."""
    backend, namespace, context = params.pop("backend"), params.pop("namespace"), params.pop("context")
    with user_errors():
        return open_schedules(backend, store=session.store, redis_url=session.redis_url, namespace=namespace,
                              context=context)  # fmt: skip


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
@click.argument("name", type=SCHEDULE_NAME)
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
    type=Duration(minimum=1),
    default=str(DEFAULT_STARTING_DEADLINE),
    show_default="5m",
    help="Skip a tick missed by more than this (at most one missed tick ever runs).",
)
@schedule_backend
@image_option
@redis_secret_option
@click.argument("submit_args", nargs=-1, type=click.UNPROCESSED)
@pass_session
def create_command(session: Session, name: str, cron: str, time_zone: str | None, concurrency: str, suspend: bool,
                   starting_deadline: float, submit_args: tuple[str, ...], **params: Any) -> None:  # fmt: skip
    """Create schedule NAME; the remaining arguments are what each run passes to `kiabatch submit`.

    The submit arguments are checked now exactly as submit checks them (nothing runs),
    cluster options too (--queue-name, --gpu, --pod-template...); a --pod-template file
    is stored inline, so every run gets it as it is now. The launcher of a Kubernetes
    schedule uses --image and --redis-secret.
    """
    args = list(submit_args[1:] if submit_args[:1] == ("--",) else submit_args)
    backend = params["backend"]
    kube = kube_options_from(params, namespace=params["namespace"], context=params["context"])
    with user_errors():
        parse_submit_args(args, backend)
        args = inline_pod_template(args)  # the runs get the template as it is now, wherever they run
        schedule = Schedule(name=name, cron=cron, submit_args=args, time_zone=time_zone, concurrency=concurrency,
                            suspend=suspend, starting_deadline=int(starting_deadline), backend=backend,
                            namespace=params["namespace"] or "", created_at=datetime.now(UTC).timestamp())  # fmt: skip
        message = _schedules(session, params).create(schedule, kube)
    note(message)


def _next_run(row: ScheduleRow) -> str:
    if row.schedule is None:
        return f"INVALID: {row.invalid}"
    if row.schedule.suspend:
        return "-"
    return row.schedule.next_tick(datetime.now(UTC)).strftime("%Y-%m-%d %H:%M %Z")


@schedule_group.command("list")
@schedule_backend
@pass_session
def list_command(session: Session, **params: Any) -> None:
    """List schedules with their last and next run."""
    with user_errors():
        rows = _schedules(session, params).rows()
    if session.json:
        emit_json([{**json.loads(r.schedule.to_json()), "last_run": r.last_run} if r.schedule is not None
                   else {"name": r.name, "invalid": r.invalid} for r in rows])  # fmt: skip
        return
    headers = ["NAME", "CRON", "TIME ZONE", "CONCURRENCY", "SUSPENDED", "BACKEND", "LAST RUN", "NEXT RUN"]
    lines = [
        [r.name, r.schedule.cron, r.schedule.time_zone or "UTC", r.schedule.concurrency,
         "yes" if r.schedule.suspend else "no", r.schedule.backend, r.last_run, _next_run(r)]
        if r.schedule is not None else [r.name, "-", "-", "-", "-", "-", "-", _next_run(r)]
        for r in rows
    ]  # fmt: skip
    click.echo(table(lines, headers) if lines else "no schedules")


@schedule_group.command("show")
@click.argument("name", type=SCHEDULE_NAME)
@schedule_backend
@pass_session
def show_command(session: Session, name: str, **params: Any) -> None:
    """Show a schedule's definition."""
    with user_errors():
        schedule = _schedules(session, params).get(name)
    data = json.loads(schedule.to_json())
    if session.json:
        emit_json(data)
        return
    data["submit_args"] = shell_quoted(schedule.submit_args)  # pastes back into a shell, escapes included
    data["time_zone"] = schedule.time_zone or "UTC"  # as `schedule list` shows it (was Python's None)
    data["next_run"] = "-" if schedule.suspend else schedule.next_tick(datetime.now(UTC)).isoformat()
    for key, value in data.items():
        if key not in ("extra", "created_at"):
            shown = "-" if value in ("", None) else value if key == "submit_args" else printable(value)
            click.echo(f"{key.replace('_', ' '):<18} {shown}")


@schedule_group.command("suspend")
@click.argument("name", type=SCHEDULE_NAME)
@schedule_backend
@pass_session
def suspend_command(session: Session, name: str, **params: Any) -> None:
    """Stop starting runs (runs already started continue)."""
    with user_errors():
        _schedules(session, params).set_suspend(name, True)
    note(f"suspended schedule {name}")


@schedule_group.command("resume")
@click.argument("name", type=SCHEDULE_NAME)
@schedule_backend
@pass_session
def resume_command(session: Session, name: str, **params: Any) -> None:
    """Start runs again from the next tick."""
    with user_errors():
        _schedules(session, params).set_suspend(name, False)
    note(f"resumed schedule {name}")


@schedule_group.command("delete")
@click.argument("name", type=SCHEDULE_NAME)
@click.option("--cascade", is_flag=True, help="Also delete its runs' Jobs and batches (results included).")
@schedule_backend
@pass_session
def delete_command(session: Session, name: str, cascade: bool, **params: Any) -> None:
    """Delete a schedule (its past batches stay unless --cascade)."""
    with user_errors():
        removed = _schedules(session, params).delete(name, cascade=cascade)
    note(f"deleted schedule {name}" + (f" and {len(removed)} batch(es)" if cascade else ""))


@schedule_group.command("run-now")
@click.argument("name", type=SCHEDULE_NAME)
@schedule_backend
@pass_session
def run_now_command(session: Session, name: str, **params: Any) -> None:
    """Start a run now, whatever the schedule says (like kubectl create job --from=cronjob/NAME).

    Prints what it started: the run's batch id (local) or launcher Job (kubernetes).
    """
    with user_errors():
        started = _schedules(session, params).run_now(name)
    click.echo(started.ref)
    note(started.note)


@schedule_group.command("history")
@click.argument("name", type=SCHEDULE_NAME)
@click.option("--limit", type=LIMIT, default=20, show_default=True, help="Most recent runs to show.")
@schedule_backend
@pass_session
def history_command(session: Session, name: str, limit: int, **params: Any) -> None:
    """Past runs: start, end, state, items done/failed, and the batches they launched."""
    with user_errors():
        rows = _schedules(session, params).history(name, limit)
    if session.json:
        emit_json(rows)
        return
    headers = ["RUN", "STARTED", "FINISHED", "STATE", "DONE", "FAILED", "BATCHES"]
    lines = [[r["run"], r["started"] or "-", r["finished"] or "-", r["state"],
              "-" if r["done"] is None else r["done"], "-" if r["failed"] is None else r["failed"],
              ",".join(r["batches"]) or "-"] for r in rows]  # fmt: skip
    click.echo(table(lines, headers) if lines else f"no runs of {name} yet")


@click.command("scheduler")
@click.option("--once", is_flag=True, help="Handle the ticks due now, then exit (e.g. from system cron).")
@click.option("--poll", type=Interval(), default=1.0, show_default=True, help="Seconds between checks.")
@pass_session
def scheduler_command(session: Session, once: bool, poll: float) -> None:
    """Run the local schedules in the foreground (SIGTERM or Ctrl-C stops it cleanly)."""
    from ..scheduler import LocalScheduler, serve_until_signalled

    with user_errors():
        scheduler = LocalScheduler(session.store(retry_seconds=settings.worker_retry_seconds()).redis,
                                   redis_url=session.redis_url)  # fmt: skip
        if once:
            for name, outcome in scheduler.tick():
                note(f"{name}: {outcome}")
            return
        serve_until_signalled(scheduler, poll)
