"""Option types and options shared by several commands, each declared (and defaulted) once."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .. import backends, limits, settings
from .. import items as items_mod
from ..errors import UsageError
from ..kube import validation
from ..kube.options import DEFAULT_GPU_RESOURCE, DEFAULT_TTL_AFTER_FINISHED, REDIS_SECRET, KubeOptions
from ..results_store import DEFAULT_INLINE_LIMIT, MAX_INLINE_LIMIT

_DURATION = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,9})?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class Duration(click.ParamType):
    """Seconds, or a number with unit s/m/h/d (``90``, ``30m``, ``7d``), within a range.

    ``minimum`` is inclusive; without one, any duration above 0 is allowed.
    """

    name = "duration"

    def __init__(self, minimum: float | None = None, maximum: float = limits.MAX_SECONDS) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            match = _DURATION.match(str(value))
            if not match:
                self.fail(
                    f"{str(value)!r:.60} is not a positive duration; "
                    "use seconds or a number with s, m, h or d (e.g. 30m)",
                    param,
                    ctx,
                )
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        low_ok = seconds > 0 if self.minimum is None else seconds >= self.minimum
        if not math.isfinite(seconds) or not low_ok or seconds > self.maximum:
            low = "above 0" if self.minimum is None else f"from {human_duration(self.minimum)}"
            allowed = f"allowed {low} up to {human_duration(self.maximum)}"
            self.fail(f"{str(value)!r:.60} is out of range: {allowed}", param, ctx)
        return seconds


class Interval(click.ParamType):
    """A finite number of seconds in [MIN_INTERVAL, MAX_INTERVAL] (``nan``, ``inf`` refused)."""

    name = "seconds"

    def __init__(self, minimum: float = limits.MIN_INTERVAL, maximum: float = limits.MAX_INTERVAL) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)!r:.60} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not self.minimum <= seconds <= self.maximum:
            self.fail(f"{str(value)!r:.60} is out of range: allowed {self.minimum:g} to {self.maximum:g}", param, ctx)
        return seconds


def human_size(count: int) -> str:
    """``64KiB``-style text for a byte count that is a whole number of units."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


class Size(click.ParamType):
    """Bytes, or a number with a unit (``65536``, ``64KiB``, ``1MiB``, ``2GB``), within a range."""

    name = "size"

    def __init__(self, minimum: int = 0, maximum: int = 2**40) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            count_ = value
        else:
            parsed = limits.parse_size(str(value))
            if parsed is None:
                self.fail(f"{str(value)!r:.60} is not a size; use bytes or a number with KiB, MiB or GiB", param, ctx)
            count_ = parsed
        if not self.minimum <= count_ <= self.maximum:
            allowed = f"allowed {human_size(self.minimum)} to {human_size(self.maximum)}"
            self.fail(f"{str(value)!r:.60} is out of range: {allowed}", param, ctx)
        return count_


def count(minimum: int, maximum: int) -> click.IntRange:
    """An integer option type with a documented range."""
    return click.IntRange(minimum, maximum)


#: ``--limit`` of listings.
LIMIT = count(1, limits.MAX_LIMIT)


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def stack(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` in the order listed (the first is outermost in ``--help``)."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


#: ``--namespace/-n`` and ``--context``: where a command talks to Kubernetes (as kubectl resolves them).
cluster_options = stack(
    click.option("--namespace", "-n", "namespace", envvar=settings.ENV_NAMESPACE, metavar="NS",
                 help="Kubernetes namespace (default: the kubeconfig context's, else 'default'). "
                      "Env: KIABATCH_NAMESPACE."),
    click.option("--context", "context", metavar="NAME", help="kubeconfig context (default: the current one)."),
)  # fmt: skip


def backend_option(help_text: str) -> Decorator:
    """``--backend local|kubernetes`` (env KIABATCH_BACKEND)."""
    return click.option("--backend", type=click.Choice(backends.NAMES), default=backends.LOCAL,
                        envvar=settings.ENV_BACKEND, show_default=True,
                        help=f"{help_text} Env: KIABATCH_BACKEND.")  # fmt: skip


#: ``--item``, ``--items FILE``, ``--lines FILE``: items given on the command line (see :func:`read_items`).
item_options = stack(
    click.option("--item", "item_values", multiple=True, metavar="JSON", help="One item (JSON). Repeatable."),
    click.option("--items", "items_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                 help="File of items, one JSON value per line ('-' for stdin)."),
    click.option("--lines", "lines_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                 help="File whose non-blank lines are string items ('-' for stdin)."),
)  # fmt: skip


def read_items(params: dict[str, Any], *, where: str = "--item") -> Iterator[Any] | None:
    """The items of :data:`item_options` (popped from ``params``), parsed lazily; None if none were given.

    ``--item`` values are parsed at once (a bad one is reported before anything
    else happens); files are read as the items are consumed.
    """
    values, items_file, lines_file = params.pop("item_values"), params.pop("items_file"), params.pop("lines_file")
    if not values and items_file is None and lines_file is None:
        return None
    parsed = [items_mod.parse(value, f"{where} {value!r}") for value in values]
    sources: list[Any] = [parsed]
    if items_file is not None:
        sources.append(items_mod.iter_jsonl(items_file))
    if lines_file is not None:
        sources.append(items_mod.iter_lines(lines_file))
    return itertools.chain.from_iterable(sources)


#: ``--results-to``, ``--s3-endpoint-url``, ``--inline-limit``: where results that leave Redis go.
results_options = stack(
    click.option("--results-to", "results_to", envvar=settings.ENV_RESULTS_URL, metavar="URL",
                 help="Store results larger than --inline-limit, and every {output} file, in s3://BUCKET/PREFIX "
                      "or file:///PATH; Redis keeps a reference (URL, size, sha256). Credentials come from "
                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the pod's identity). Env: KIABATCH_RESULTS_URL."),
    click.option("--s3-endpoint-url", "s3_endpoint", envvar=settings.ENV_S3_ENDPOINT, metavar="URL",
                 help="Endpoint of an S3-compatible store that is not AWS (MinIO, SeaweedFS, Ceph RGW, GCS), "
                      "e.g. http://minio:9000. Env: KIABATCH_S3_ENDPOINT_URL."),
    click.option("--inline-limit", "inline_limit", type=Size(0, MAX_INLINE_LIMIT),
                 default=human_size(DEFAULT_INLINE_LIMIT), show_default=True,
                 help="With --results-to: results up to this size stay in Redis (0: every result is stored)."),
)  # fmt: skip

#: ``--image``: the kiabatch image pods (and schedule launchers) run.
image_option = click.option("--image", "kube_image", envvar=settings.ENV_IMAGE, metavar="IMAGE",
                            help="The kiabatch image for pods. Env: KIABATCH_IMAGE.")  # fmt: skip
#: ``--redis-secret``: the Secret holding the Redis URL pods use.
redis_secret_option = click.option(
    "--redis-secret", "kube_redis_secret", default=REDIS_SECRET, show_default=True,
    help="Secret whose 'url' key holds the Redis URL pods use (kiabatch secret create).",
)  # fmt: skip


class KubeValue(click.ParamType):
    """A Kubernetes value checked by one of :mod:`kiabatch.kube.validation`'s functions (one line if bad)."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.check(value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


class PodTemplate(click.ParamType):
    """``--pod-template``: a YAML file, or a JSON object inline (what a schedule stores), parsed to a mapping."""

    name = "file|json"
    #: Largest template file read (a pod template is a few KiB).
    MAX_BYTES = 1 << 20

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        import yaml  # only when a template is given: reading commands stay lean

        if value.lstrip().startswith("{"):
            source, text = "the inline template", value
        else:
            try:
                with open(value, "rb") as handle:
                    data = handle.read(self.MAX_BYTES + 1)
            except OSError as exc:
                self.fail(f"cannot read {value!r:.80}: {exc.strerror}", param, ctx)
            except ValueError:  # a NUL in the path
                self.fail(f"{value!r:.80} is not a file name", param, ctx)
            if len(data) > self.MAX_BYTES:
                self.fail(f"{value!r:.80} is over {self.MAX_BYTES // 1024} KiB; is it a pod template?", param, ctx)
            try:
                source, text = repr(value)[:80], data.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{value!r:.80} is not UTF-8 text", param, ctx)
        try:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            self.fail(f"{source} is not valid YAML or JSON{where}: {getattr(exc, 'problem', None) or exc}", param, ctx)
        except RecursionError:
            self.fail(f"{source} is nested too deeply", param, ctx)
        if len(documents) != 1 or not isinstance(documents[0], dict):
            self.fail(f"{source} must hold one mapping: a pod template's metadata and/or spec", param, ctx)
        return documents[0]


def _quantity(what: str, *, whole: bool = False) -> KubeValue:
    return KubeValue("quantity", lambda text: validation.positive_quantity(text, what, whole=whole))


#: Session of the Kubernetes objects a batch creates (ignored by the local backend); see :func:`kube_options_from`.
kube_options = stack(
    image_option,
    click.option("--image-pull-policy", "kube_image_pull_policy",
                 type=click.Choice(["Always", "IfNotPresent", "Never"]), help="imagePullPolicy of pods."),
    click.option("--cpu", "kube_cpu", default=KubeOptions.cpu, show_default=True, type=_quantity("cpu"),
                 help="CPU request and limit of a worker (a Kubernetes quantity: 500m, 2)."),
    click.option("--memory", "kube_memory", default=KubeOptions.memory, show_default=True, type=_quantity("memory"),
                 help="Memory request and limit of a worker (512Mi, 2Gi)."),
    click.option("--ephemeral-storage", "kube_ephemeral_storage", type=_quantity("ephemeral storage"),
                 metavar="QTY", help="Local disk request and limit of a worker (10Gi)."),
    click.option("--gpu", "kube_gpu", type=count(1, limits.MAX_GPUS), metavar="N",
                 help=f"GPUs for a worker (limits {DEFAULT_GPU_RESOURCE}: N; 1 to {limits.MAX_GPUS})."),
    click.option("--gpu-resource", "kube_gpu_resource", default=DEFAULT_GPU_RESOURCE, show_default=True,
                 type=KubeValue("resource", lambda text: validation.resource_name(text, "GPU resource")),
                 metavar="NAME", help="The extended resource --gpu requests (e.g. amd.com/gpu)."),
    click.option("--resource", "kube_resources", multiple=True, metavar="NAME=QTY",
                 type=KubeValue("resource", validation.resource_quantity),
                 help="Another resource for a worker, as request and limit (example.com/fpga=1, "
                      "hugepages-2Mi=1Gi). Repeatable."),
    redis_secret_option,
    click.option("--max-failed-indexes", "kube_max_failed_indexes", type=count(1, limits.MAX_FAILED_INDEXES),
                 help="Failed tasks after which the Job stops (default: 10% of tasks, at least 10)."),
    click.option("--job-ttl", "kube_ttl_after_finished", type=Duration(minimum=1),
                 default=human_duration(DEFAULT_TTL_AFTER_FINISHED), show_default=True,
                 help="Delete the finished Job (not the results) after this long (ttlSecondsAfterFinished)."),
    click.option("--image-pull-grace", "kube_pull_grace", type=Duration(),
                 default=human_duration(KubeOptions.pull_grace), show_default=True,
                 help="With --wait, fail once pods could not start (image pull, missing Secret) this long, and "
                      "warn once no pod has started this long (a full cluster: still waiting)."),
    click.option("--report-timeout", "kube_report_timeout", type=Duration(minimum=1),
                 default=human_duration(KubeOptions.report_timeout), show_default=True,
                 help="How long a pod's worker waits for the sidecar (its task laid out, then its result "
                      "uploaded) before it fails the pod, so the index is retried."),
    click.option("--writable-root", "kube_writable_root", is_flag=True,
                 help="Give the worker container a writable root filesystem (default: read-only + /tmp)."),
    click.option("--queue-name", "kube_queue_name", metavar="LOCALQUEUE",
                 type=KubeValue("name", lambda text: validation.object_name(text, "queue name", label=True)),
                 help="Queue the Job in this Kueue LocalQueue (label kueue.x-k8s.io/queue-name; the Job starts "
                      "suspended and runs once Kueue admits it)."),
    click.option("--workload-priority-class", "kube_workload_priority_class", metavar="NAME",
                 type=KubeValue("name", lambda text: validation.object_name(text, "workload priority class",
                                                                            label=True)),
                 help="Kueue WorkloadPriorityClass of the Job (label kueue.x-k8s.io/priority-class); "
                      "needs --queue-name."),
    click.option("--priority-class", "kube_priority_class", metavar="NAME",
                 type=KubeValue("name", lambda text: validation.object_name(text, "priority class")),
                 help="PriorityClass of the pods (priorityClassName; Kueue queues by it too)."),
    click.option("--node-selector", "kube_node_selector", multiple=True, metavar="KEY=VALUE",
                 type=KubeValue("label", lambda text: validation.key_value(text, "node selector")),
                 help="Run only on nodes with this label (nodeSelector). Repeatable."),
    click.option("--toleration", "kube_tolerations", multiple=True, metavar="KEY[=VALUE]:EFFECT",
                 type=KubeValue("toleration", validation.toleration),
                 help="Tolerate this taint (kubectl's syntax; EFFECT: NoSchedule, PreferNoSchedule, NoExecute). "
                      "Repeatable."),
    click.option("--pod-template", "kube_pod_template", type=PodTemplate(),
                 help="YAML file (or inline JSON) merged into the pods' template: affinity, volumes, "
                      "annotations... (strategic merge; checked against the restricted Pod Security Standard)."),
    click.option("--allow-privileged-template", "kube_allow_privileged_template", is_flag=True,
                 help="Accept a --pod-template that breaks the restricted Pod Security Standard "
                      "(a security decision: the pods may then run privileged, as root, on the host...)."),
    click.option("--results-secret", "kube_results_secret", metavar="SECRET",
                 help="Secret with the results store's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and optional "
                      "AWS_SESSION_TOKEN) for the reporter (default: the pod's identity, e.g. IRSA)."),
    click.option("--results-volume", "kube_results_volume", metavar="CLAIM",
                 help="PersistentVolumeClaim (ReadWriteMany) the reporter mounts at a file:// --results-to path."),
)  # fmt: skip


def kube_options_from(params: dict[str, Any], *, namespace: str | None, context: str | None) -> KubeOptions:
    """Pop the ``kube_*`` option values out of ``params`` into KubeOptions (absent ones keep their defaults)."""
    values = {key.removeprefix("kube_"): params.pop(key) for key in [k for k in params if k.startswith("kube_")]}
    if "writable_root" in values:
        values["read_only_root"] = not values.pop("writable_root")
    for name in ("ttl_after_finished", "report_timeout"):
        if values.get(name) is not None:
            values[name] = int(values[name])
    for name, what in (("node_selector", "--node-selector"), ("resources", "--resource")):
        pairs = values.pop(name, ()) or ()
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise click.BadParameter(f"{twice[0]!r:.60} is given twice", param_hint=what)
        values[name] = dict(pairs)
    values["tolerations"] = tuple(values.pop("tolerations", ()) or ())
    values["namespace"], values["context"] = namespace or None, context or None
    return KubeOptions(**{key: value for key, value in values.items() if value is not None})
