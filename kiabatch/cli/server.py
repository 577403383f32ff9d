"""``kiabatch server``: the embedded Redis server."""

from __future__ import annotations

import click

from .. import embedded
from .context import CliError, Session, emit_json, note, pass_session, user_errors


@click.group("server")
def server_group() -> None:
    """The embedded Redis (used when no --redis-url is given).

    It starts on demand, listens on a unix socket only, keeps its data in
    $KIABATCH_HOME/redis, and stops by itself once no client has been connected
    for KIABATCH_EMBEDDED_IDLE_TIMEOUT seconds (default 30). One server per data
    directory: a command that finds it running but not answering waits up to
    KIABATCH_EMBEDDED_WAIT seconds (default 30), then exits with status 3.
    """


@server_group.command("status")
@pass_session
def status_command(session: Session) -> None:
    """Show whether the embedded server runs, its pid, socket, clients and data directory."""
    with user_errors():
        info = embedded.status()
    if session.json:
        emit_json(info)
        return
    if info["state"] == "not answering":
        click.echo(f"not answering (redis-server pid {info.get('server_pid')}, data in {info['data_dir']})")
        return
    if not info["running"]:
        click.echo(f"{info['state']} (data in {info['data_dir']})")
        return
    for key in (
        "server_pid",
        "supervisor_pid",
        "socket",
        "data_dir",
        "version",
        "clients",
        "uptime_seconds",
        "used_memory_human",
        "maxmemory_human",
        "idle_timeout",
    ):
        click.echo(f"{key.replace('_', ' '):<18} {info.get(key)}")


@server_group.command("stop")
@click.option("--force", is_flag=True, help="Stop even while other kiabatch processes are connected.")
def stop_command(force: bool) -> None:
    """Stop the embedded server now (its data is saved)."""
    with user_errors():
        info = embedded.status()
        if info["running"] and info.get("clients", 0) > 0 and not force:
            raise CliError(f"{info['clients']} other client(s) are connected (a batch may be running); use --force")
        stopped = embedded.stop()
    note("stopped the embedded Redis" if stopped else "the embedded Redis was not running")
