"""``kiabatch submit`` and ``kiabatch render``: one subcommand per workload; bare options mean ``exec``.

Both groups are built by one factory from the same option declarations, so they
parse the same arguments; ``render`` passes ``dry_run=True`` and writes nothing.
:func:`parse_submit_args` parses a schedule's submit arguments exactly as
``submit`` would, without running anything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import click

from .. import backends, limits, settings
from ..batch import Batch
from ..errors import EXIT_OK, UsageError
from ..kube.options import KubeOptions
from ..progress import ProgressBar
from ..schedules import submit_argv
from ..submission import BatchOptions, chunk_notice, plan_batch, submit_options
from .context import CliError, Session, note, pass_session, user_errors
from .options import Duration, backend_option, cluster_options, count, item_options, read_items, results_options, stack
from .output import conclude
from .pod_options import PodTemplate, kube_options, kube_options_from


@dataclass(frozen=True)
class SubmitRequest:
    """What one ``submit`` / ``render`` command line asks for."""

    workload: str
    options: BatchOptions
    kube: KubeOptions
    wait: bool = True
    quiet: bool = False
    dry_run: bool = False


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
                f"unknown workload {args[0]!r:.60}; available: {', '.join(sorted(self.commands))} "
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


#: Options every workload takes (BatchOptions, how to run, where).
common_options = stack(
    click.option("--parallel", "-p", type=count(1, limits.MAX_PARALLEL), default=1, show_default=True,
                 help="Tasks running at once (Job parallelism)."),
    click.option("--tasks", type=count(1, limits.MAX_TASKS),
                 help="Number of tasks (Job completions); default one per chunk of items (pi: --parallel)."),
    click.option("--retries", type=count(0, limits.MAX_RETRIES), default=3, show_default=True,
                 help="Retries per task before its items are dead-lettered (backoffLimitPerIndex)."),
    click.option("--timeout", type=Duration(), help="Batch deadline, e.g. 2h (activeDeadlineSeconds)."),
    click.option("--task-timeout", type=Duration(), help="Time limit of one task attempt, e.g. 10m."),
    click.option("--ttl", type=Duration(minimum=1), default=str(settings.DEFAULT_TTL), show_default="7d",
                 help="Keep a finished batch's results this long."),
    click.option("--batch-id", help="Id for the batch (DNS label, <= 52 chars); default WORKLOAD-xxxxx."),
    backend_option("Where tasks run."),
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
    results_options,
    cluster_options,
    kube_options,
)  # fmt: skip

#: The exec workload's own options.
exec_options = stack(
    click.option("--command", "-c", "command_text", metavar="TEMPLATE",
                 help="Worker command; {item}, {FIELD}, {input}, {output}, {index} are filled per item."),
    item_options,
    click.option("--from-queue", metavar="QUEUE", help="Take everything queued in this named queue right now."),
    click.option("--chunk", type=count(1, limits.MAX_CHUNK), help="Items per task (default 1)."),
    click.option("--stdin", "use_stdin", is_flag=True, help="Feed each item's text to the worker's stdin."),
    click.option("--non-retriable-exit-code", "non_retriable", type=click.IntRange(1, 255), multiple=True,
                 help="An exit code that fails the item at once, without retries. Repeatable."),
    click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="Environment for the worker."),
    click.option("--worker-image", metavar="IMAGE",
                 help="Run the worker in this image (kubernetes backend; default: the kiabatch image)."),
)  # fmt: skip

#: The π workload's own options.
pi_options = stack(
    click.option("--digits", "-d", type=count(1, limits.MAX_DIGITS_FORCED), default=1000, show_default=True,
                 help=f"Decimals of pi to compute (up to {limits.MAX_DIGITS:,} without --force)."),
    click.option("--force", is_flag=True,
                 help=f"Allow more than 10^8 digits (up to {limits.MAX_DIGITS_FORCED:,})."),
)  # fmt: skip


def _request(workload: str, params: dict[str, Any], **specific: Any) -> SubmitRequest:
    """Turn the common options (popped from ``params``) plus ``specific`` BatchOptions fields into a request."""
    flags = {name: params.pop(name) for name in ("wait", "quiet", "dry_run")}
    kube = kube_options_from(params, namespace=params.pop("namespace"), context=params.pop("context"))
    values = {key: value for key, value in params.items() if value is not None}
    for name in ("timeout", "task_timeout"):
        if name in values:
            values[name] = float(values[name])
    values["ttl"] = int(values["ttl"])
    workload_options = {key: values.pop(key) for key in list(values) if key not in _BATCH_FIELDS}
    with user_errors():
        options = BatchOptions(**values, **specific, workload_options=workload_options)
    return SubmitRequest(workload, options, kube, **flags)


_BATCH_FIELDS = frozenset(BatchOptions.__dataclass_fields__)


def pi_request(params: dict[str, Any]) -> SubmitRequest:
    """``submit pi`` values as a request."""
    return _request("pi", dict(params))


def exec_request(params: dict[str, Any]) -> SubmitRequest:
    """``submit [exec]`` values as a request (items are read lazily, as the batch is written)."""
    params = dict(params)
    command_text, argv = params.pop("command_text"), params.pop("argv")
    if command_text and argv:
        raise click.UsageError("give the command either with --command or after --, not both")
    command: str | list[str] | None = command_text or (list(argv) if argv else None)
    if command is None:
        raise click.UsageError("no worker command; give --command 'prog {item}' or put it after --")
    with user_errors():
        values = read_items(params)
    if params["from_queue"] is not None and values is not None:
        raise click.UsageError("--from-queue takes its items from the queue; drop --item/--items/--lines")
    specific = {
        "command": command,
        "items": values,
        "stdin": params.pop("use_stdin"),
        "non_retriable_exit_codes": tuple(params.pop("non_retriable")),
        "env": _parse_env(params.pop("env_pairs")),
        "image": params.pop("worker_image"),
    }
    return _request("exec", params, **specific)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier() or not name.isascii():
            raise click.BadParameter(f"{pair!r:.60} is not NAME=VALUE with a valid variable name", param_hint="--env")
        env[name] = value
    return env


_BUILDERS: dict[str, Callable[[dict[str, Any]], SubmitRequest]] = {"pi": pi_request, "exec": exec_request}


def run_submit(session: Session, request: SubmitRequest) -> None:
    """Submit, show progress, then print the answer (or results) and exit with the batch's code."""
    if request.dry_run:
        render_batch(request)
        return
    wait, quiet = request.wait, request.quiet
    with contextlib.ExitStack() as stack_:
        bars: list[ProgressBar] = []
        warned: set[str] = set()

        def created(batch: Batch) -> None:
            spec = batch.store.spec(batch.id)
            notice = chunk_notice(request.options, spec)
            if notice and not quiet:
                note(f"kiabatch: {notice}")
            if not quiet and wait:
                note(f"batch {batch.id}: {spec.total} item(s), {request.workload} on {request.options.backend}")
                bars.append(stack_.enter_context(ProgressBar(spec.total, batch.id)))

        def update(progress: Any, note_text: str = "") -> None:
            if note_text.startswith("warning: "):  # a line of its own, once: not a progress note that passes
                if note_text not in warned and not quiet:
                    warned.add(note_text)
                    note(f"kiabatch: {note_text}")
                note_text = ""
            for bar in bars:
                bar.update(progress, note_text)

        def warn(message: str) -> None:
            text = f"kiabatch: warning: {message}"
            bars[0].say(text) if bars else note(text)

        with user_errors():
            batch = submit_options(
                request.workload, request.options, redis=session.redis_url, wait=wait, on_created=created,
                on_update=update, on_warning=None if quiet else warn, kube=request.kube,
            )  # fmt: skip
    if batch is None:
        note(f"queue {request.options.from_queue!r} is empty: nothing to run, no batch created")
        raise click.exceptions.Exit(EXIT_OK)
    if not wait:
        click.echo(batch.id)
        if not quiet:
            note(f"started in the background; follow it with: kiabatch status --watch {batch.id}")
        return
    raise click.exceptions.Exit(conclude(session, batch, reduce=None, quiet=quiet))


def render_batch(request: SubmitRequest) -> None:
    """Print the YAML of what ``submit --backend kubernetes`` would create; write nothing."""
    from ..kube.batch_job import batch_objects
    from ..kube.objects import to_yaml

    if request.options.from_queue:
        raise CliError("cannot render a batch from a queue: its size is known only when it is submitted")
    options = replace(request.options, backend="kubernetes")
    with user_errors():
        spec = plan_batch(request.workload, options).counted()
        kube = replace(request.kube, namespace=request.kube.namespace or "default")
        objects = batch_objects(spec, kube)
    notice = chunk_notice(options, spec)
    if notice:
        note(f"kiabatch: {notice}")
    click.echo(to_yaml(objects), nl=False)


def parse_submit_args(args: list[str], backend: str | None = None) -> SubmitRequest:
    """Parse ``kiabatch submit ARGS`` as submit would, and validate the batch (its items included).

    ``backend``: where the runs will go (a Kubernetes schedule's launcher adds
    ``--backend kubernetes``); the batch is checked as that backend would check it,
    so a Job the cluster would refuse is refused now. Nothing is written and nothing
    runs; UsageError names the first problem.
    """
    if not args:
        raise UsageError("no submit arguments: give a workload (e.g. pi --digits 1000) or --from-queue Q --command ...")
    if "-" in (args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--items", "--lines")):
        raise UsageError("a schedule cannot read items from standard input ('-'); give a file or --from-queue")
    if backend is not None:  # exactly what a run will get: the launcher or scheduler inserts it so
        args = submit_argv(list(args), "--backend", backend)[1:]
    try:
        with submit_group.make_context("submit", list(args)) as ctx:
            name, command, rest = submit_group.resolve_command(ctx, list(args))
            assert name is not None and command is not None
            with command.make_context(name, rest, parent=ctx) as sub:
                request = _BUILDERS[name](sub.params)
    except click.UsageError as exc:
        raise UsageError(f"bad submit arguments: {exc.format_message()}") from None
    except CliError as exc:
        raise UsageError(f"bad submit arguments: {exc.format_message()}") from None
    planned = plan_batch(request.workload, request.options)
    spec = planned.counted() if planned.items is not None else replace(planned.spec, tasks=1, chunk=1, total=1)
    backends.get(request.options.backend, kube=request.kube).check(spec)
    return request


def inline_pod_template(args: list[str]) -> list[str]:
    """``args`` with a ``--pod-template FILE`` replaced by the template itself, as compact JSON.

    A schedule stores this, so every run — on another machine, or in a launcher pod
    where the file does not exist — gets the template as it was when the schedule was
    created. Arguments after the worker command starts are left alone.
    """
    with submit_group.make_context("submit", list(args)) as ctx:
        _, command, rest = submit_group.resolve_command(ctx, list(args))
    assert command is not None
    takes_value = _value_options(command)
    head = args[: len(args) - len(rest)]
    out: list[str] = []
    position = 0
    while position < len(rest):
        arg = rest[position]
        if arg == "--" or not arg.startswith("-"):
            out += rest[position:]
            break
        flag, equals, attached = arg.partition("=")
        if flag == "--pod-template":
            value = attached if equals else rest[position + 1]
            template = PodTemplate().convert(value, None, None)
            out += ["--pod-template", json.dumps(template, separators=(",", ":"), sort_keys=True)]
            position += 1 if equals else 2
            continue
        out.append(arg)
        if arg in takes_value and not equals and position + 1 < len(rest):
            out.append(rest[position + 1])
            position += 1
        position += 1
    return [*head, *out]


def _workload_group(name: str, help_text: str, *, dry_run: bool) -> click.Group:
    """The ``submit`` (or, with ``dry_run``, ``render``) group with one command per workload."""

    @click.group(
        name,
        cls=WorkloadGroup,
        invoke_without_command=True,
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
        help=help_text,
    )
    @click.pass_context
    def group(ctx: click.Context) -> None:
        if ctx.invoked_subcommand is None:
            click.echo(ctx.get_help())

    @group.command("pi")
    @pi_options
    @common_options
    @pass_session
    def pi_command(session: Session, **params: Any) -> None:
        """Digits of pi: the Chudnovsky series cut into --tasks ranges (default --parallel), reduced here."""
        request = pi_request(params)
        run_submit(session, replace(request, dry_run=request.dry_run or dry_run))

    @group.command("exec", context_settings={"allow_interspersed_args": False})
    @exec_options
    @common_options
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    @pass_session
    def exec_command(session: Session, **params: Any) -> None:
        """Run your own program once per item (the command after -- or in --command)."""
        request = exec_request(params)
        run_submit(session, replace(request, dry_run=request.dry_run or dry_run))

    return group


submit_group = _workload_group(
    "submit",
    """Submit a batch: a workload name and its options, or --command for your own program.

    \b
    Examples:
      kiabatch submit pi --digits 5000 --parallel 3
      kiabatch submit --command 'convert {item} -resize 64x64 thumbs/{item}' --lines files.txt -p 4
      kiabatch submit --items jobs.jsonl -p 8 -- python my_worker.py --url {url}
      kiabatch submit --from-queue thumbs --command 'python thumb.py {input}'

    Options: `kiabatch submit exec --help` (your own program: `exec` may be left out) and
    `kiabatch submit pi --help`.
    """,
    dry_run=False,
)

render_group = _workload_group(
    "render",
    """Print the Kubernetes objects `submit --backend kubernetes` would create, as YAML.

    Takes the same arguments as submit and writes nothing (no Redis, no cluster):

    \b
      kiabatch render pi --digits 5000 -p 3 -n batch --image registry.example/kiabatch:0.1.0
      kiabatch render --lines urls.txt -n batch -- curl -sS -o {output} {item} | kubectl apply --dry-run=server -f -

    Options: `kiabatch render exec --help` and `kiabatch render pi --help`.
    """,
    dry_run=True,
)


__all__ = ["SubmitRequest", "common_options", "conclude", "parse_submit_args", "run_submit"]
