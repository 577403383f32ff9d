"""``--pod-template``: a user's pod-template fragment merged into the Job's pod template.

For everything kiabatch has no option for (affinity, topologySpreadConstraints, the
worker's volumes and mounts, annotations, labels, imagePullSecrets, runtimeClassName,
hostAliases, more init containers or sidecars...), a fragment shaped like a pod
template — ``metadata`` (labels, annotations) and ``spec`` — is merged into the
rendered one with the semantics of a Kubernetes strategic merge patch
(``kubectl patch --type strategic``):

* maps merge key by key, and a key set to ``null`` is removed;
* lists the API merges by a key merge item by item on it — containers, init
  containers and volumes by ``name``, volume mounts by ``mountPath``, env by ``name``,
  ports by ``containerPort``, ... (the ``patchMergeKey`` of the core API) — and new
  items are appended;
* every other list (tolerations, args, nodeSelectorTerms...) is replaced.

Patch directives (``$patch``, ``$retainKeys``...) are not supported. Every field
name is checked against the Kubernetes API's own schema (the client's models), so a
typo is refused with the field named instead of being dropped by the API server.

The merged pod is checked again: kiabatch's sidecar, the worker's command and the
task volume cannot be replaced, the worker stays the only main container, kiabatch's
labels and environment keep their values, and the pod must still meet the
"restricted" Pod Security Standard unless ``--allow-privileged-template`` says
otherwise (a security decision: see the README).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .pod_security import restricted_violations

#: The core API's patchMergeKey of each list a pod template merges by key.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "schedulingGates": "name",
    "resourceClaims": "name",
    "claims": "name",
}
WHERE = "--pod-template"
#: Deepest nesting accepted (a pod template's deepest fields are about 15 levels down).
MAX_DEPTH = 40
#: Most values (maps, lists, scalars) a template may hold, counted with YAML aliases expanded.
MAX_NODES = 50_000


class Guard:
    """What a fragment may not change: kiabatch's containers, volume, labels and variables."""

    def __init__(self, sidecar: str, worker: str, task_volume: str, task_dir: str) -> None:
        self.sidecar, self.worker, self.task_volume, self.task_dir = sidecar, worker, task_volume, task_dir


def merge(base: Mapping[str, Any], fragment: Mapping[str, Any], guard: Guard, *, allow_privileged: bool) -> dict:
    """The pod template ``base`` with ``fragment`` merged in, checked; UsageError names a refused field."""
    _check_directives(fragment, "", budget=[MAX_NODES])
    _check_fragment(fragment, base, guard)
    check_fields(fragment)
    merged = _merge(base, fragment, "")
    _check_merged(merged, base, guard)
    if not allow_privileged:
        problems = restricted_violations(merged.get("spec") or {}, (merged.get("metadata") or {}).get("annotations"))
        if problems:
            raise UsageError(
                f"{WHERE} breaks the restricted Pod Security Standard: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + "; fix the template, or accept it with --allow-privileged-template (a security decision)"
            )
    return merged


def _check_directives(value: Any, path: str, depth: int = 0, *, budget: list[int]) -> None:
    """Refuse patch directives, nesting deeper than any pod template needs, and templates too big to be one.

    The size is counted as the values are walked, so YAML aliases that expand
    exponentially (a "billion laughs") are refused after a bounded amount of work.
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise UsageError(f"{WHERE} has more than {MAX_NODES:,} values (YAML aliases expanded); is it a pod template?")
    if depth > MAX_DEPTH:
        raise UsageError(f"{WHERE}: {path} is nested more than {MAX_DEPTH} levels deep; is it a pod template?")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).startswith("$"):
                raise UsageError(f"{WHERE}: {path or 'the template'} uses {key}; patch directives are not supported")
            _check_directives(item, f"{path}.{key}" if path else str(key), depth + 1, budget=budget)
    elif isinstance(value, list):
        for item in value:
            _check_directives(item, path, depth + 1, budget=budget)


def _merge(base: Any, patch: Any, path: str) -> Any:
    if isinstance(patch, Mapping):
        merged = dict(base) if isinstance(base, Mapping) else {}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(merged.get(key), value, f"{path}.{key}" if path else key)
        return merged
    if isinstance(patch, list) and path.rsplit(".", 1)[-1] in MERGE_KEYS and isinstance(base, list):
        key = MERGE_KEYS[path.rsplit(".", 1)[-1]]
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            if not isinstance(item, Mapping) or key not in item:
                raise UsageError(f"{WHERE}: every item of {path} needs its {key!r}")
            at = next((i for i, old in enumerate(merged_list) if old.get(key) == item[key]), None)
            if at is None:
                merged_list.append(_merge({}, item, f"{path}[{item[key]}]"))
            else:
                merged_list[at] = _merge(merged_list[at], item, f"{path}[{item[key]}]")
        return merged_list
    return copy.deepcopy(patch)


def _check_fragment(fragment: Mapping[str, Any], base: Mapping[str, Any], guard: Guard) -> None:
    """Refuse, by field, what may not be changed at all."""
    for key in fragment:
        if key not in ("metadata", "spec"):
            raise UsageError(f"{WHERE}: top-level field {key!r:.40} is not allowed (a pod template has metadata "
                             "and spec)")  # fmt: skip
    meta = fragment.get("metadata") or {}
    for key in meta:
        if key not in ("labels", "annotations"):
            raise UsageError(f"{WHERE}: metadata.{key} cannot be set (only labels and annotations)")
    spec = fragment.get("spec") or {}
    base_spec = base.get("spec") or {}
    for container in spec.get("initContainers") or []:
        if isinstance(container, Mapping) and container.get("name") == guard.sidecar:
            raise UsageError(f"{WHERE}: spec.initContainers[{guard.sidecar}] is kiabatch's sidecar and cannot be "
                             "changed")  # fmt: skip
    for container in spec.get("containers") or []:
        name = container.get("name") if isinstance(container, Mapping) else None
        if name != guard.worker:
            raise UsageError(f"{WHERE}: spec.containers[{name}]: the pod's only main container is {guard.worker!r} "
                             "(add a sidecar as an init container with restartPolicy: Always)")  # fmt: skip
        for field in ("command", "args"):
            if field in container:
                raise UsageError(f"{WHERE}: spec.containers[{guard.worker}].{field} cannot be changed (it runs the "
                                 "task; give your program after -- or with --command)")  # fmt: skip
        for mount in container.get("volumeMounts") or []:
            if isinstance(mount, Mapping) and (mount.get("mountPath") == guard.task_dir
                                               or mount.get("name") == guard.task_volume):  # fmt: skip
                raise UsageError(f"{WHERE}: spec.containers[{guard.worker}].volumeMounts[{guard.task_dir}] is the "
                                 "task volume and cannot be changed")  # fmt: skip
        for variable in container.get("env") or []:
            if isinstance(variable, Mapping) and str(variable.get("name", "")).startswith("KIABATCH_"):
                raise UsageError(f"{WHERE}: spec.containers[{guard.worker}].env[{variable['name']}]: KIABATCH_ "
                                 "variables are kiabatch's (use --env for your own)")  # fmt: skip
    for volume in spec.get("volumes") or []:
        if isinstance(volume, Mapping) and volume.get("name") == guard.task_volume:
            raise UsageError(f"{WHERE}: spec.volumes[{guard.task_volume}] is the task volume and cannot be replaced")
    if "restartPolicy" in spec and spec["restartPolicy"] != base_spec.get("restartPolicy"):
        raise UsageError(f"{WHERE}: spec.restartPolicy must stay {base_spec.get('restartPolicy')} (the Job retries "
                         "failed pods itself)")  # fmt: skip


def _check_merged(merged: Mapping[str, Any], base: Mapping[str, Any], guard: Guard) -> None:
    """Refuse a merge that changed what kiabatch relies on (labels it set, its containers)."""
    labels = (merged.get("metadata") or {}).get("labels") or {}
    for key, value in ((base.get("metadata") or {}).get("labels") or {}).items():
        if labels.get(key) != value:
            raise UsageError(f"{WHERE}: metadata.labels[{key}] is kiabatch's ({value!r}) and cannot be changed")
    spec = merged.get("spec") or {}
    names = [c.get("name") for c in spec.get("initContainers") or []]
    if len(names) != len(set(names)) or guard.sidecar not in names:
        raise UsageError(f"{WHERE}: spec.initContainers must keep kiabatch's sidecar and unique names")


def check_fields(fragment: Mapping[str, Any]) -> None:
    """Every field of ``fragment`` exists in the API's PodTemplateSpec (and has the right shape)."""
    from kubernetes import client  # the API's schema, as the client's models know it

    _check_model(fragment, client.V1PodTemplateSpec, "", client)


_LIST = re.compile(r"^(?:List\[|list\[)(.*)\]$")
_DICT = re.compile(r"^(?:Dict\[str, |dict\(str, )(.*)[\])]$")


def _check_model(value: Any, model: Any, path: str, client: Any) -> None:
    if not isinstance(value, Mapping):
        raise UsageError(f"{WHERE}: {path or 'the template'} must be a mapping, not {_kind(value)}")
    by_json = {json_name: python_name for python_name, json_name in model.attribute_map.items()}
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in by_json:
            close = difflib.get_close_matches(str(key), list(by_json), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{WHERE}: {where} is not a field of the Kubernetes API{hint}")
        if item is not None:
            _check_type(item, model.openapi_types[by_json[key]], where, client)


def _check_type(value: Any, kind: str, path: str, client: Any) -> None:
    listed, mapped = _LIST.match(kind), _DICT.match(kind)
    if listed:
        if not isinstance(value, list):
            raise UsageError(f"{WHERE}: {path} must be a list, not {_kind(value)}")
        for number, item in enumerate(value):
            label = item.get("name", number) if isinstance(item, Mapping) else number
            _check_type(item, listed.group(1), f"{path}[{label}]", client)
    elif mapped:
        if not isinstance(value, Mapping):
            raise UsageError(f"{WHERE}: {path} must be a mapping, not {_kind(value)}")
        for key, item in value.items():
            _check_type(item, mapped.group(1), f"{path}[{key}]", client)
    elif kind in ("str", "datetime", "date"):
        if not isinstance(value, str):
            raise UsageError(f"{WHERE}: {path} must be a string, not {_kind(value)}")
    elif kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{WHERE}: {path} must be a number, not {_kind(value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{WHERE}: {path} must be true or false, not {_kind(value)}")
    elif kind != "object" and getattr(client, kind, None) is not None:
        _check_model(value, getattr(client, kind), path, client)


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)
