"""Options of the commands that make pods: the image, resources, placement, Kueue, templates.

Apart from :mod:`kiabatch.cli.options` so that commands that never make a pod
(``status``, ``list``, ``results``...) do not load the Kubernetes option types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .. import limits, settings
from ..errors import UsageError
from ..kube import validation
from ..kube.options import DEFAULT_GPU_RESOURCE, DEFAULT_TTL_AFTER_FINISHED, REDIS_SECRET, KubeOptions
from .options import Duration, count, human_duration, stack

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
