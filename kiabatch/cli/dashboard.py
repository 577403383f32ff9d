"""``kiabatch dashboard``: serve the web dashboard and /metrics; ``render`` / ``deploy`` it on Kubernetes.

``kiabatch dashboard [OPTIONS]`` is ``kiabatch dashboard serve [OPTIONS]``. The web
stack (Starlette, uvicorn, Jinja2, prometheus_client) is imported only by ``serve``.
"""

from __future__ import annotations

import os
from typing import Any

import click

from .. import settings
from ..kube.dashboard_objects import (
    DEFAULT_RETENTION,
    NAME,
    TOKEN_KEY,
    DashboardOptions,
    dashboard_objects,
    token_secret,
    validate,
)
from ..kube.objects import to_yaml
from .context import Session, emit_json, note, pass_session, user_errors
from .options import Duration, backend_option, cluster_options, count, human_duration, stack
from .pod_options import image_option

ENV_TOKEN = "KIABATCH_DASHBOARD_TOKEN"  # noqa: S105 - the variable's name


class _ServeByDefault(click.Group):
    """A group whose default subcommand is ``serve``: ``kiabatch dashboard --port 9000`` serves."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


@click.group("dashboard", cls=_ServeByDefault)
def dashboard_group() -> None:
    """A live web dashboard of batches, queues, schedules and Redis, with Prometheus /metrics.

    `kiabatch dashboard [OPTIONS]` is `kiabatch dashboard serve [OPTIONS]` (see its --help).

    \b
      kiabatch dashboard                      # http://127.0.0.1:8577/, read-only, until Ctrl-C
      kiabatch dashboard --open --allow-actions
      kiabatch dashboard render -n batch | kubectl apply -f -
      kiabatch dashboard deploy -n batch --token-secret kiabatch-dashboard-token
    """


@dashboard_group.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (an IP address; 0.0.0.0 for every interface, as in a pod).",
)
@click.option(
    "--port",
    type=count(0, 65535),
    default=8577,
    show_default=True,
    help="Port to listen on (0: any free port; the URL is printed).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the dashboard in a web browser.")
@click.option(
    "--allow-actions",
    is_flag=True,
    help="Offer delete, resume, scale and schedule suspend/resume (default: read-only, and Redis is "
    "opened through a client that refuses every write).",
)
@click.option(
    "--replica-url",
    envvar="KIABATCH_REDIS_REPLICA_URL",
    metavar="URL",
    help="Read-only: the Redis to read (default: kiabatch-redis-replicas when --redis-url names "
    "kiabatch-redis-primary, else --redis-url). Env: KIABATCH_REDIS_REPLICA_URL.",
)
@backend_option("Where the schedules shown live (local: Redis; kubernetes: CronJobs).")
@cluster_options
@click.option(
    "--metrics-retention",
    type=Duration(minimum=0),
    default="15m",
    show_default=True,
    help="How long a finished batch keeps its per-batch series in /metrics.",
)
@pass_session
def serve_command(session: Session, host: str, port: int, open_browser: bool, allow_actions: bool,
                  replica_url: str | None, backend: str, namespace: str | None, context: str | None,
                  metrics_retention: float) -> None:  # fmt: skip
    """Serve the dashboard until Ctrl-C (the default subcommand).

    With KIABATCH_DASHBOARD_TOKEN set, every page and /metrics want that token
    (Authorization: Bearer TOKEN, or the sign-in form); /healthz does not.
    """
    from ..dashboard.app import Settings, build_app
    from ..dashboard.data import Dashboard
    from ..dashboard.server import is_loopback, listen, parse_host, serve

    token = os.environ.get(ENV_TOKEN) or None
    with user_errors():
        address = parse_host(host)
        if allow_actions:
            store = session.store()
        else:
            from ..readonly import open_read_only

            store = open_read_only(session.redis_url, replica_url)
        dashboard = Dashboard(store, redis_url=session.redis_url, schedules_backend=backend, namespace=namespace,
                              context=context)  # fmt: skip
        app = build_app(dashboard, Settings(allow_actions=allow_actions, token=token,
                                            loopback_only=is_loopback(address), read_only_store=not allow_actions),
                        retention=metrics_retention)  # fmt: skip
        sock = listen(address, port)
    if not is_loopback(address) and token is None:
        note(f"kiabatch dashboard: warning: listening on {address} without a token: anyone who can reach this "
             f"port sees every batch (set {ENV_TOKEN})")  # fmt: skip

    def ready(url: str) -> None:
        mode = "actions allowed" if allow_actions else "read-only"
        click.echo(f"kiabatch dashboard: {url} ({mode}; metrics at {url}metrics; Ctrl-C stops it)")

    serve(app, sock, open_browser=open_browser, on_ready=ready)


#: The settings of the rendered objects (render and deploy).
object_options = stack(
    image_option,
    click.option("--image-pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]),
                 help="imagePullPolicy of the dashboard's pod."),
    click.option("--redis-secret", default=DashboardOptions.redis_secret, show_default=True,
                 help="Secret whose 'url' key holds the Redis URL (kiabatch secret create; kiabatch redis deploy "
                      "makes it). Read-only dashboards read kiabatch-redis-replicas when it names the primary."),
    click.option("--token-secret", metavar="NAME",
                 help=f"Require a bearer token, kept in this Secret's {TOKEN_KEY!r} key (deploy generates it if "
                      "missing; it is never printed)."),
    click.option("--allow-actions", is_flag=True,
                 help="Offer delete, resume, scale and schedule suspend/resume (and grant the Role the verbs)."),
    click.option("--kube-details/--no-kube-details", default=True, show_default=True,
                 help="Show Jobs, pods, logs and CronJobs: a ServiceAccount token and a Role reading them."),
    click.option("--port", type=count(1, 65535), default=DashboardOptions.port, show_default=True,
                 help="Port of the container and the Service."),
    click.option("--cpu", default=DashboardOptions.cpu, show_default=True, help="CPU request of the pod."),
    click.option("--memory", default=DashboardOptions.memory, show_default=True,
                 help="Memory request and limit of the pod."),
    click.option("--metrics-retention", type=Duration(minimum=0), default=human_duration(DEFAULT_RETENTION),
                 show_default=True, help="How long a finished batch keeps its per-batch series in /metrics."),
)  # fmt: skip


def _options(namespace: str | None, values: dict[str, Any]) -> DashboardOptions:
    image = values.pop("kube_image", None)
    values["metrics_retention"] = int(values["metrics_retention"])
    with user_errors():
        return validate(DashboardOptions(namespace=namespace, **({"image": image} if image else {}), **values))


@dashboard_group.command("render")
@click.option("--namespace", "-n", envvar=settings.ENV_NAMESPACE, default="default", show_default=True,
              help="Namespace of the objects. Env: KIABATCH_NAMESPACE.")  # fmt: skip
@object_options
def render_command(namespace: str, **values: Any) -> None:
    """Print the objects `dashboard deploy` applies, as YAML (no cluster needed).

    A Deployment (restricted Pod Security, read-only root), a ClusterIP Service with
    Prometheus scrape annotations, and a ServiceAccount (with a Role reading Jobs, pods,
    their logs and CronJobs in the namespace, unless --no-kube-details). The token
    Secret of --token-secret is not printed.
    """
    options = _options(namespace, values)
    click.echo(to_yaml(dashboard_objects(options)), nl=False)
    if options.token_secret:
        note(f"# not rendered: Secret {options.token_secret!r} (key {TOKEN_KEY!r}); `kiabatch dashboard deploy` "
             "creates it")  # fmt: skip


@dashboard_group.command("deploy")
@cluster_options
@object_options
@pass_session
def deploy_command(session: Session, namespace: str | None, context: str | None, **values: Any) -> None:
    """Apply the objects (server-side apply); with --token-secret, create that Secret if it is missing."""
    import secrets as random_secrets

    from ..kube.api import Cluster

    with user_errors():
        cluster = Cluster.connect(context, namespace)
        cluster.check_version()
        cluster.check_namespace()
    options = _options(cluster.namespace, values)
    with user_errors():
        if options.token_secret and cluster.get(("v1", "Secret"), options.token_secret) is None:
            cluster.create(token_secret(options, random_secrets.token_urlsafe(32)))
            note(f"created Secret {options.token_secret} with a new token (read it with: kubectl -n "
                 f"{cluster.namespace} get secret {options.token_secret} -o jsonpath='{{.data.{TOKEN_KEY}}}' "
                 "| base64 -d)")  # fmt: skip
        applied = [f"{obj['kind']}/{obj['metadata']['name']}" for obj in dashboard_objects(options)
                   if cluster.apply(obj) is not None]  # fmt: skip
    if session.json:
        emit_json({"namespace": cluster.namespace, "applied": applied})
    else:
        click.echo(f"{NAME} deployed in namespace {cluster.namespace!r}; reach it with: kubectl -n "
                   f"{cluster.namespace} port-forward svc/{NAME} {options.port}  (then http://127.0.0.1:"
                   f"{options.port}/)")  # fmt: skip
