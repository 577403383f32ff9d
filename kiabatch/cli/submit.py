"""``kiabatch submit``: one subcommand per workload; bare options mean ``exec``."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .. import backends, limits, settings, workloads
from .. import items as items_mod
from ..backends import KUBERNETES
from ..batch import Batch
from ..errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE
from ..kube.batch_job import REDIS_SECRET, KubeOptions, batch_objects
from ..kube.jobs import DEFAULT_PULL_GRACE
from ..kube.objects import to_yaml
from ..progress import ProgressBar
from ..submission import plan_batch, submit
from .context import CliError, Settings, emit_json, note, pass_settings, user_errors
from .options import Duration, count, duration_text
from .render import duration, outcome_dict, outcome_line, print_failed, progress_text


class WorkloadGroup(click.Group):
    """``submit WORKLOAD ...``; options without a workload name mean the exec workload."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
            misplaced = _first_positional_token(self.commands["exec"], args)
            if misplaced in self.commands and misplaced != "exec":
                raise click.UsageError(f"put the workload name first: 'kiabatch submit {misplaced} [OPTIONS]'", ctx)
            return "exec", self.commands["exec"], args
        if args and args[0] not in self.commands:
            raise click.UsageError(
                f"unknown workload {args[0]!r}; available: {', '.join(sorted(self.commands))} "
                "(or give --command for your own program)",
                ctx,
            )
        return super().resolve_command(ctx, args)


def _value_options(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) and not p.is_flag for name in p.opts}


def _first_positional_token(command: click.Command, args: list[str]) -> str | None:
    """The first argument that is neither an option nor an option's value."""
    takes_value = _value_options(command)
    skip = False
    for arg in args:
        if arg == "--":
            return None
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in takes_value
        else:
            return arg
    return None


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every workload takes."""
    options = [
        click.option("--parallel", "-p", type=count(1, limits.MAX_PARALLEL), default=1, show_default=True,
                     help="Tasks running at once (Job parallelism)."),
        click.option("--tasks", type=count(1, limits.MAX_TASKS), help="Number of tasks (Job completions); "
                     "default one per chunk of items."),
        click.option("--retries", type=count(0, limits.MAX_RETRIES), default=3, show_default=True,
                     help="Retries per task before its items are dead-lettered (backoffLimitPerIndex)."),
        click.option("--timeout", type=Duration(), help="Batch deadline, e.g. 2h (activeDeadlineSeconds)."),
        click.option("--task-timeout", type=Duration(), help="Time limit of one task attempt, e.g. 10m."),
        click.option("--ttl", type=Duration(minimum=1), default=str(settings.DEFAULT_TTL), show_default="7d",
                     help="Keep a finished batch's results this long."),
        click.option("--batch-id", help="Id for the batch (DNS label, <= 52 chars); default WORKLOAD-xxxxx."),
        click.option("--backend", type=click.Choice(backends.NAMES), default=backends.LOCAL,
                     envvar=settings.ENV_BACKEND, show_default=True,
                     help="Where tasks run. Env: KIABATCH_BACKEND."),
        click.option("--wait/--no-wait", default=True, show_default=True,
                     help="Wait for the batch and print its results (else print its id and return)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary on stderr."),
        click.option("--schedule", envvar="KIABATCH_SCHEDULE", metavar="NAME",
                     help="The schedule this run belongs to (set by schedule launchers). Env: KIABATCH_SCHEDULE."),
        click.option("--run", envvar="KIABATCH_RUN", metavar="RUN",
                     help="Name of this run; its batch id derives from it, and submitting the same run again "
                          "finishes that batch instead of starting another (set by launchers). Env: KIABATCH_RUN."),
        click.option("--dry-run", is_flag=True,
                     help="Print the Kubernetes objects submit would create (as YAML) and exit."),
        # Kubernetes backend settings (ignored by the local backend).
        click.option("--context", "kube_context", metavar="NAME", help="kubeconfig context (default: current)."),
        click.option("--namespace", "-n", "kube_namespace", envvar="KIABATCH_NAMESPACE",
                     help="Namespace (default: the context's, else 'default'). Env: KIABATCH_NAMESPACE."),
        click.option("--image", "kube_image", envvar=settings.ENV_IMAGE, metavar="IMAGE",
                     help="The kiabatch image for pods. Env: KIABATCH_IMAGE."),
        click.option("--image-pull-policy", "kube_image_pull_policy",
                     type=click.Choice(["Always", "IfNotPresent", "Never"]), help="imagePullPolicy of pods."),
        click.option("--cpu", "kube_cpu", default="1", show_default=True, help="CPU request and limit of a worker."),
        click.option("--memory", "kube_memory", default="1Gi", show_default=True,
                     help="Memory request and limit of a worker."),
        click.option("--redis-secret", "kube_redis_secret", default=REDIS_SECRET, show_default=True,
                     help="Secret whose 'url' key holds the Redis URL pods use (kiabatch secret create)."),
        click.option("--max-failed-indexes", "kube_max_failed_indexes", type=count(1, limits.MAX_TASKS),
                     help="Failed tasks after which the Job stops (default: 10% of tasks, at least 10)."),
        click.option("--job-ttl", "kube_ttl_after_finished", type=Duration(minimum=1), default="1d", show_default=True,
                     help="Delete the finished Job (not the results) after this long (ttlSecondsAfterFinished)."),
        click.option("--image-pull-grace", "kube_pull_grace", type=Duration(),
                     default=duration_text(DEFAULT_PULL_GRACE), show_default=True,
                     help="With --wait, fail once pods could not start (image pull, missing Secret) this long."),
        click.option("--report-timeout", "kube_report_timeout", type=Duration(minimum=1), default="10m",
                     show_default=True,
                     help="How long a finished worker waits for its result to be uploaded before the pod fails."),
        click.option("--writable-root", "kube_writable_root", is_flag=True,
                     help="Give the worker container a writable root filesystem (default: read-only + /tmp)."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


@click.group(
    cls=WorkloadGroup,
    invoke_without_command=True,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.pass_context
def submit_group(ctx: click.Context) -> None:
    """Submit a batch: a workload name and its options, or --command for your own program.

    \b
    Examples:
      kiabatch submit pi --digits 5000 --parallel 3
      kiabatch submit --command 'convert {item} -resize 64x64 thumbs/{item}' --lines files.txt -p 4
      kiabatch submit --items jobs.jsonl -p 8 -- python my_worker.py --url {url}
      kiabatch submit --from-queue thumbs --command 'python thumb.py {input}'
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@submit_group.command("pi")
@click.option(
    "--digits",
    "-d",
    type=count(1, workloads.pi.MAX_DIGITS_FORCED),
    default=1000,
    show_default=True,
    help=f"Decimals of pi to compute (up to {workloads.pi.MAX_DIGITS:,} without --force).",
)
@click.option("--force", is_flag=True, help=f"Allow more than 10^8 digits (up to {workloads.pi.MAX_DIGITS_FORCED:,}).")
@common_options
@pass_settings
def submit_pi(settings_: Settings, digits: int, force: bool, **common: Any) -> None:
    """Digits of pi: the Chudnovsky series cut into --tasks ranges (default --parallel), reduced here."""
    run_submit(settings_, "pi", common, digits=digits, force=force)


@submit_group.command("exec", context_settings={"allow_interspersed_args": False})
@click.option(
    "--command",
    "-c",
    "command_text",
    metavar="TEMPLATE",
    help="Worker command; {item}, {FIELD}, {input}, {output}, {index} are filled per item.",
)
@click.option("--item", "item_values", multiple=True, metavar="JSON", help="One item (JSON). Repeatable.")
@click.option(
    "--items",
    "items_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="File of items, one JSON value per line ('-' for stdin).",
)
@click.option(
    "--lines",
    "lines_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="File whose non-blank lines are string items ('-' for stdin).",
)
@click.option("--from-queue", metavar="QUEUE", help="Take everything queued in this named queue right now.")
@click.option("--chunk", type=count(1, limits.MAX_CHUNK), help="Items per task (default 1).")
@click.option("--stdin", "use_stdin", is_flag=True, help="Feed each item's text to the worker's stdin.")
@click.option(
    "--non-retriable-exit-code",
    "non_retriable",
    type=click.IntRange(1, 255),
    multiple=True,
    help="An exit code that fails the item at once, without retries. Repeatable.",
)
@click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="Environment for the worker.")
@click.option(
    "--worker-image",
    "worker_image",
    metavar="IMAGE",
    help="Run the worker in this image (kubernetes backend; default: the kiabatch image).",
)
@common_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def submit_exec(
    settings_: Settings,
    command_text: str | None,
    item_values: tuple[str, ...],
    items_file: Path | None,
    lines_file: Path | None,
    from_queue: str | None,
    chunk: int | None,
    use_stdin: bool,
    non_retriable: tuple[int, ...],
    env_pairs: tuple[str, ...],
    worker_image: str | None,
    argv: tuple[str, ...],
    **common: Any,
) -> None:
    """Run your own program once per item (the command after -- or in --command)."""
    if command_text and argv:
        raise click.UsageError("give the command either with --command or after --, not both")
    command: str | list[str] | None = command_text or (list(argv) if argv else None)
    if command is None:
        raise click.UsageError("no worker command; give --command 'prog {item}' or put it after --")
    with user_errors():
        values: list[Any] | None = [items_mod.parse(v, f"--item {v!r}") for v in item_values]
        if items_file is not None:
            values += items_mod.read_jsonl(items_file)
        if lines_file is not None:
            values += items_mod.iter_lines(lines_file)
    if from_queue is not None:
        if values:
            raise click.UsageError("--from-queue takes its items from the queue; drop --item/--items/--lines")
        values = None
    options = {
        "command": command,
        "items": values,
        "from_queue": from_queue,
        "chunk": chunk,
        "stdin": use_stdin,
        "non_retriable_exit_codes": list(non_retriable),
        "env": _parse_env(env_pairs),
        "image": worker_image,
    }
    run_submit(settings_, "exec", common, **options)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE with a valid variable name", param_hint="--env")
        env[name] = value
    return env


def kube_options(common: dict[str, Any]) -> KubeOptions:
    """Pop the ``kube_*`` CLI values out of ``common`` into KubeOptions."""
    values = {key[len("kube_") :]: common.pop(key) for key in [k for k in common if k.startswith("kube_")]}
    writable = values.pop("writable_root", False)
    values["read_only_root"] = not writable
    values["ttl_after_finished"] = int(values["ttl_after_finished"])
    values["report_timeout"] = int(values["report_timeout"])
    values["namespace"] = values.get("namespace") or None
    return KubeOptions(**{key: value for key, value in values.items() if value is not None})


def run_submit(settings_: Settings, workload: str, common: dict[str, Any], **options: Any) -> None:
    """Submit, show progress, then print the answer (or results) and exit with the batch's code."""
    quiet = common.pop("quiet")
    dry_run = common.pop("dry_run") or getattr(click.get_current_context().parent.command, "dry_run", False)
    kube = kube_options(common)
    wait = common["wait"]
    if common.get("ttl") is not None:
        common["ttl"] = int(common["ttl"])
    if options.get("from_queue") is None:
        options.pop("from_queue", None)
    if dry_run:
        render_batch(workload, kube, common, options)
        return
    with contextlib.ExitStack() as stack:
        bars: list[ProgressBar] = []

        def created(batch: Batch) -> None:
            if not quiet and wait:
                total = batch.progress().total
                note(f"batch {batch.id}: {total} item(s), {workload} on {common['backend']}")
                bars.append(stack.enter_context(ProgressBar(total, batch.id)))

        def update(progress: Any) -> None:
            for bar in bars:
                bar.update(progress)

        with user_errors():
            batch = submit(
                workload,
                redis=settings_.redis_url,
                on_created=created,
                on_update=update,
                kube=kube,
                **{k: v for k, v in common.items() if v is not None},
                **options,
            )
    if batch is None:
        note(f"queue {options.get('from_queue')!r} is empty: nothing to run, no batch created")
        raise click.exceptions.Exit(EXIT_OK)
    if not wait:
        click.echo(batch.id)
        if not quiet:
            note(f"started in the background; follow it with: kiabatch status --watch {batch.id}")
        return
    raise click.exceptions.Exit(conclude(settings_, batch, reduce=None, quiet=quiet))


def render_batch(workload: str, kube: KubeOptions, common: dict[str, Any], options: dict[str, Any]) -> None:
    """Print the YAML of what ``submit --backend kubernetes`` would create; write nothing."""
    if options.get("from_queue"):
        raise CliError("cannot render a batch from a queue: its size is known only when it is submitted")
    values = {k: v for k, v in common.items() if v is not None and k != "wait"}
    values["backend"] = KUBERNETES
    with user_errors():
        planned = plan_batch(workload, **values, **options)
    click.echo(to_yaml(batch_objects(planned.spec, replace(kube, namespace=kube.namespace or "default"))), nl=False)


#: Dead-lettered items listed on stderr after the results (all of them are on stdout, marked).
_FAILED_SHOWN = 20


def conclude(settings_: Settings, batch: Batch, *, reduce: bool | None, quiet: bool = False) -> int:
    """Print a finished batch's answer, or every item's outcome in order (failed ones marked).

    Returns the exit code: 0, or 1 when items failed (those are also listed on stderr).
    """
    with user_errors():
        status = batch.status()
        failed = batch.store.failed_count(batch.id)
        reducible = isinstance(workloads.get(status.workload), workloads.Reducible)
        if not quiet:
            note(f"batch {batch.id} {status.state}: {progress_text(status)} in {duration(status)}")
        if reduce and not reducible:
            raise CliError(f"workload {status.workload!r} has no reduce step", EXIT_USAGE)
        if reduce or (reduce is None and reducible and not failed):
            answer = batch.reduce()  # BatchFailedError (exit 1) if items failed
            if settings_.json:
                emit_json({"batch": batch.id, "answer": answer})
            else:
                click.echo(answer)
            return EXIT_OK
        for outcome in batch.store.iter_outcomes(batch.id):
            if settings_.json:
                emit_json(outcome_dict(outcome))
            else:
                click.echo(outcome_line(outcome))
        if failed:
            print_failed(itertools.islice(batch.store.iter_outcomes(batch.id, results=False), _FAILED_SHOWN))
            if failed > _FAILED_SHOWN:
                note(f"... and {failed - _FAILED_SHOWN} more failed item(s): kiabatch -o json results {batch.id}")
            return EXIT_ITEMS_FAILED
    return EXIT_OK


@click.group(
    cls=WorkloadGroup,
    invoke_without_command=True,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.pass_context
def render_group(ctx: click.Context) -> None:
    """Print the Kubernetes objects `submit --backend kubernetes` would create, as YAML.

    Takes the same arguments as submit and writes nothing (no Redis, no cluster):

    
      kiabatch render pi --digits 5000 -p 3 -n batch --image registry.example/kiabatch:0.1.0
      kiabatch render --lines urls.txt -n batch -- curl -sS -o {output} {item} | kubectl apply --dry-run=server -f -
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


render_group.dry_run = True  # type: ignore[attr-defined]
for _command in (submit_pi, submit_exec):
    render_group.add_command(_command)


def register(cli: click.Group) -> None:
    """Attach ``submit`` and ``render`` to the root command."""
    cli.add_command(submit_group, "submit")
    cli.add_command(render_group, "render")


__all__ = ["common_options", "conclude", "register", "run_submit"]
