"""``kiabatch secret``: the Secret that gives pods the Redis URL."""

from __future__ import annotations

import sys

import click

from ..connection import redact, validate_url
from ..kube.api import Cluster
from ..kube.batch_job import REDIS_SECRET, REDIS_SECRET_KEY, redis_secret
from .context import CliError, Session, note, pass_session, user_errors
from .options import cluster_options


@click.group("secret")
def secret_group() -> None:
    """The Kubernetes Secret holding the Redis URL that batch pods use."""


@secret_group.command("create")
@click.option("--name", default=REDIS_SECRET, show_default=True, help="Secret name (submit --redis-secret).")
@cluster_options
@click.option("--url-stdin", is_flag=True, help="Read the URL from standard input (keeps it out of shell history).")
@pass_session
def create_command(session: Session, name: str, namespace: str | None, context: str | None, url_stdin: bool) -> None:
    """Create or update the Secret with the Redis URL *as pods see it*.

    The URL comes from --url-stdin, else the global --redis-url / KIABATCH_REDIS_URL.
    It is stored under the key 'url' and never printed:

    \b
      echo "redis://:$PASSWORD@kiabatch-redis-primary:6379/0" | kiabatch secret create -n batch --url-stdin
    """
    url = sys.stdin.readline().strip() if url_stdin else session.redis_url
    if not url:
        raise CliError("no Redis URL: pass --url-stdin, or the global --redis-url / KIABATCH_REDIS_URL")
    with user_errors():
        validate_url(url)
        cluster = Cluster.connect(context, namespace)
        cluster.check_namespace()
        cluster.replace_secret(redis_secret(url, cluster.namespace, name, REDIS_SECRET_KEY))
    note(f"Secret {name!r} in namespace {cluster.namespace!r} now holds the Redis URL {redact(url)} (key 'url')")
