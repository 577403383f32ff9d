"""Issue 11's objects: Kueue, priorities, placement, GPUs, the pod-template merge and the fan-out limits.

Every new field is rendered, validated in strict mode against the 1.33-1.37
schemas and checked against the restricted profile (by the independent checker in
tests/kube/checks.py); the pod-template merge is a table of fragments that are
allowed (and what they produce) or refused (with the field named).
"""

from __future__ import annotations

import json
import time

import pytest

from kiabatch import limits
from kiabatch.errors import UsageError
from kiabatch.kube.batch_job import KubeOptions, batch_objects, job, resumed_job_name
from kiabatch.kube.pod_security import restricted_violations as production_violations
from kiabatch.model import BatchSpec, WorkerSpec
from kiabatch.submission import cut_tasks
from tests.helpers import kb, one_line_error
from tests.kube.checks import pod_specs, restricted_violations, validate_all_versions


def spec(**changes) -> BatchSpec:
    base = {
        "id": "ex-share", "workload": "exec", "worker": WorkerSpec(command=["echo", "{item}"]),
        "tasks": 4, "parallelism": 2, "chunk": 1, "retries": 2, "total": 4, "created_at": time.time(), "ttl": 600,
    }  # fmt: skip
    base.update(changes)
    return BatchSpec(**base)


def pod(options: KubeOptions, **changes) -> dict:
    return job(spec(**changes), options)["spec"]["template"]


EVERYTHING = KubeOptions(
    namespace="batch", queue_name="team-a", workload_priority_class="nightly", priority_class="low-batch",
    node_selector={"cloud.example.com/pool": "gpu", "kubernetes.io/arch": "amd64"},
    tolerations=("nvidia.com/gpu:NoSchedule", "dedicated=batch:NoExecute"), gpu=2, gpu_resource="nvidia.com/gpu",
    ephemeral_storage="10Gi", resources={"example.com/fpga": "1", "hugepages-2Mi": "1Gi"},
    pod_template={
        "metadata": {"labels": {"team": "data"}, "annotations": {"example.com/cost-center": "42"}},
        "spec": {
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a"]}]}}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "ScheduleAnyway",
                                           "labelSelector": {"matchLabels": {"kiabatch.io/batch": "ex-share"}}}],
            "imagePullSecrets": [{"name": "registry"}],
            "runtimeClassName": "gvisor",
            "hostAliases": [{"ip": "10.0.0.5", "hostnames": ["data.internal"]}],
            "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
            "containers": [{"name": "worker", "volumeMounts": [{"name": "datasets", "mountPath": "/data",
                                                                "readOnly": True}],
                            "env": [{"name": "MODEL", "value": "small"}]}],
            "initContainers": [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always",
                                "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/up"]}},
                                "securityContext": {"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                                                    "seccompProfile": {"type": "RuntimeDefault"}}}],
        },
    },
)  # fmt: skip


def test_every_new_field_is_rendered_where_the_api_reads_it():
    made = job(spec(), EVERYTHING)
    assert made["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert made["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "nightly"
    assert made["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    template = made["spec"]["template"]
    body = template["spec"]
    assert body["priorityClassName"] == "low-batch"
    assert body["nodeSelector"] == {"cloud.example.com/pool": "gpu", "kubernetes.io/arch": "amd64"}
    assert body["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoExecute"},
    ]
    sidecar, proxy = body["initContainers"]
    [worker] = body["containers"]
    extra = {"nvidia.com/gpu": "2", "ephemeral-storage": "10Gi", "example.com/fpga": "1", "hugepages-2Mi": "1Gi"}
    assert worker["resources"] == {"requests": {"cpu": "1", "memory": "1Gi", **extra},
                                   "limits": {"cpu": "1", "memory": "1Gi", **extra}}  # fmt: skip
    assert not set(extra) & set(sidecar["resources"]["limits"])  # GPUs and the rest: the worker's only
    # The template: merged by key, new entries appended, kiabatch's own kept.
    assert template["metadata"]["labels"]["team"] == "data"
    assert template["metadata"]["labels"]["kiabatch.io/batch"] == "ex-share"
    assert template["metadata"]["annotations"] == {"example.com/cost-center": "42"}
    assert [v["name"] for v in body["volumes"]] == ["task", "tmp", "datasets"]
    assert body["volumes"][1] == {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    assert [m["mountPath"] for m in worker["volumeMounts"]] == ["/kiabatch/task", "/tmp", "/data"]
    assert {"name": "MODEL", "value": "small"} in worker["env"] and worker["command"][:2] == ["/bin/sh", "-c"]
    assert proxy["name"] == "proxy" and sidecar["name"] == "kiabatch"
    assert body["runtimeClassName"] == "gvisor" and body["imagePullSecrets"] == [{"name": "registry"}]


def test_without_a_queue_nothing_is_suspended_or_labelled_for_kueue():
    made = job(spec(), KubeOptions(priority_class="high"))
    assert "suspend" not in made["spec"]
    assert not any(key.startswith("kueue.x-k8s.io/") for key in made["metadata"]["labels"])
    assert made["spec"]["template"]["spec"]["priorityClassName"] == "high"


@pytest.mark.parametrize("obj", batch_objects(spec(), EVERYTHING), ids=lambda o: o["kind"])
def test_every_new_field_is_valid_for_kubernetes_1_33_to_1_37_and_restricted(obj):
    validate_all_versions(obj)
    for body in pod_specs(obj):
        assert restricted_violations(body) == []
        assert production_violations(body) == []


def refused(options: KubeOptions, *fragments: str) -> str:
    with pytest.raises(UsageError) as caught:
        job(spec(), options)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
          "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip

ALLOWED = {
    "affinity": ({"spec": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}}},
        lambda t: "podAntiAffinity" in t["spec"]["affinity"]),
    "annotations and labels": ({"metadata": {"annotations": {"a.io/x": "1"}, "labels": {"team": "x"}}},
                               lambda t: t["metadata"]["annotations"] == {"a.io/x": "1"}),
    "a worker volume and mount": (
        {"spec": {"volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                  "containers": [{"name": "worker", "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}]}},
        lambda t: t["spec"]["containers"][0]["volumeMounts"][-1]["mountPath"] == "/cfg"),
    "a worker security tightening": (
        {"spec": {"containers": [{"name": "worker", "securityContext": {"runAsUser": 1000}}]}},
        lambda t: t["spec"]["containers"][0]["securityContext"]["runAsUser"] == 1000
        and t["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False),
    "null removes a key": ({"spec": {"enableServiceLinks": None}}, lambda t: "enableServiceLinks" not in t["spec"]),
    "tolerations replace (no merge key)": (
        {"spec": {"tolerations": [{"operator": "Exists"}]}}, lambda t: t["spec"]["tolerations"] == [
            {"operator": "Exists"}]),
    "a native sidecar with a startup probe": (
        {"spec": {"initContainers": [{"name": "proxy", "image": "p:1", "restartPolicy": "Always",
                                      "securityContext": SECURE}]}},
        lambda t: [c["name"] for c in t["spec"]["initContainers"]] == ["kiabatch", "proxy"]),
    "runtime class, host aliases, image pull secrets": (
        {"spec": {"runtimeClassName": "kata", "hostAliases": [{"ip": "1.2.3.4", "hostnames": ["x"]}],
                  "imagePullSecrets": [{"name": "reg"}]}},
        lambda t: t["spec"]["runtimeClassName"] == "kata"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ALLOWED))
def test_pod_template_fragments_that_are_allowed(name):
    fragment, expect = ALLOWED[name]
    made = job(spec(), KubeOptions(pod_template=fragment))
    assert expect(made["spec"]["template"]), made["spec"]["template"]
    validate_all_versions(made)
    assert restricted_violations(made["spec"]["template"]["spec"]) == []


def worker(**fields) -> dict:
    return {"spec": {"containers": [{"name": "worker", **fields}]}}


REFUSED = {
    "privileged": (worker(securityContext={"privileged": True}),
                   "spec.containers[worker].securityContext.privileged is true"),
    "privilege escalation": (worker(securityContext={"allowPrivilegeEscalation": True}),
                             "spec.containers[worker].securityContext.allowPrivilegeEscalation must be false"),
    "root": (worker(securityContext={"runAsUser": 0}), "spec.containers[worker].securityContext.runAsUser is 0"),
    "a capability": (worker(securityContext={"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}),
                     "capabilities.add has SYS_ADMIN"),
    "seccomp unconfined": (worker(securityContext={"seccompProfile": {"type": "Unconfined"}}),
                           "spec.containers[worker].securityContext.seccompProfile.type must be RuntimeDefault"),
    "a hostPath volume": ({"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
                          "spec.volumes[host] is a hostPath volume"),
    "host network": ({"spec": {"hostNetwork": True}}, "spec.hostNetwork is true"),
    "a host port": (worker(ports=[{"containerPort": 80, "hostPort": 80}]),
                    "spec.containers[worker].ports sets hostPort"),
    "an insecure sidecar": ({"spec": {"initContainers": [{"name": "p", "image": "p:1", "restartPolicy": "Always"}]}},
                            "spec.initContainers[p].securityContext.allowPrivilegeEscalation"),
    "kiabatch's sidecar": ({"spec": {"initContainers": [{"name": "kiabatch", "image": "evil:1"}]}},
                           "spec.initContainers[kiabatch] is kiabatch's sidecar"),
    "the task volume": ({"spec": {"volumes": [{"name": "task", "persistentVolumeClaim": {"claimName": "x"}}]}},
                        "spec.volumes[task] is the task volume"),
    "the task mount": (worker(volumeMounts=[{"name": "x", "mountPath": "/kiabatch/task"}]),
                       "volumeMounts[/kiabatch/task] is the task volume"),
    "the worker's command": (worker(command=["sh", "-c", "true"]), "spec.containers[worker].command cannot be changed"),
    "a second main container": ({"spec": {"containers": [{"name": "extra", "image": "x"}]}},
                                "spec.containers[extra]: the pod's only main container is 'worker'"),
    "a kiabatch label": ({"metadata": {"labels": {"kiabatch.io/batch": "other"}}},
                         "metadata.labels[kiabatch.io/batch] is kiabatch's"),
    "restartPolicy": ({"spec": {"restartPolicy": "OnFailure"}}, "spec.restartPolicy must stay Never"),
    "a KIABATCH_ variable": (worker(env=[{"name": "KIABATCH_TASK_DIR", "value": "/x"}]),
                             "env[KIABATCH_TASK_DIR]: KIABATCH_ variables are kiabatch's"),
    "a misspelt field": ({"spec": {"affinty": {}}}, "spec.affinty is not a field", "did you mean 'affinity'"),
    "a deep misspelt field": (worker(volumeMount=[]), "spec.containers[worker].volumeMount is not a field"),
    "a wrong type": ({"spec": {"hostAliases": {"ip": "1.2.3.4"}}}, "spec.hostAliases must be a list"),
    "a patch directive": ({"spec": {"$patch": "replace"}}, "$patch", "not supported"),
    "metadata.name": ({"metadata": {"name": "x"}}, "metadata.name cannot be set"),
    "a top-level key": ({"kind": "Pod"}, "top-level field 'kind' is not allowed"),
    "an AppArmor annotation": ({"metadata": {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/worker": "unconfined"}}}, "is unconfined"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_pod_template_fragments_that_are_refused_name_the_field(name):
    fragment, *fragments = REFUSED[name]
    refused(KubeOptions(pod_template=fragment), *fragments)


def test_allow_privileged_template_is_the_explicit_way_past_the_restricted_check():
    fragment = worker(securityContext={"privileged": True, "allowPrivilegeEscalation": True})
    refused(KubeOptions(pod_template=fragment), "--allow-privileged-template (a security decision)", "and 1 more")
    made = job(spec(), KubeOptions(pod_template=fragment, allow_privileged_template=True))
    assert made["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] is True
    # ... but never past the guards: kiabatch's sidecar stays kiabatch's.
    sidecar = {"spec": {"initContainers": [{"name": "kiabatch", "image": "evil:1"}]}}
    refused(KubeOptions(pod_template=sidecar, allow_privileged_template=True), "kiabatch's sidecar")


def test_the_production_restricted_check_agrees_with_the_independent_one_on_every_refused_fragment():
    for name, (fragment, *_) in REFUSED.items():
        base = job(spec(), KubeOptions())["spec"]["template"]["spec"]
        merged = json.loads(json.dumps(base))
        merged.update({k: v for k, v in (fragment.get("spec") or {}).items()
                       if k in ("hostNetwork", "volumes") and v is not None})  # fmt: skip
        assert bool(restricted_violations(merged)) == bool(production_violations(merged)), name


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"cpu": "lots"}, "cpu 'lots' is not a Kubernetes quantity"),
        ({"memory": "-1Gi"}, "memory '-1Gi' must be above 0"),
        ({"ephemeral_storage": "0"}, "ephemeral storage '0' must be above 0"),
        ({"queue_name": "Team_A"}, "queue name 'Team_A' is not a valid name"),
        ({"queue_name": "q" * 64}, "at most 63"),
        ({"workload_priority_class": "high"}, "give it with a queue name (--queue-name)"),
        ({"priority_class": "-x"}, "priority class '-x' is not a valid name"),
        ({"node_selector": {"bad key!": "x"}}, "node selector key 'bad key!' is not a valid name"),
        ({"node_selector": {"pool": "x" * 64}}, "node selector value"),
        ({"tolerations": ["gpu"]}, "toleration 'gpu' is not key[=value]:Effect"),
        ({"tolerations": ["gpu:NoRun"]}, "Effect is NoSchedule, PreferNoSchedule, NoExecute"),
        ({"tolerations": [{"key": "x", "operator": "Maybe"}]}, "operator is Equal or Exists"),
        ({"gpu": 0}, "gpu must be an integer from 1 to 1,024"),
        ({"gpu_resource": "gpu"}, "not a resource a container can request"),
        ({"resources": {"cpu": "1"}}, "give CPU and memory with --cpu and --memory"),
        ({"resources": {"example.com/fpga": "0.5"}}, "must be a whole number"),
        ({"resources": {"kubernetes.io/thing": "1"}}, "kubernetes.io domain is reserved"),
        ({"gpu": 1, "resources": {"nvidia.com/gpu": "2"}}, "nvidia.com/gpu is given twice"),
        ({"max_failed_indexes": 100_001}, "max_failed_indexes must be an integer from 1 to 100,000"),
    ],
)
def test_kube_options_refuse_values_the_api_would_refuse(options, fragment):
    with pytest.raises(UsageError) as caught:
        KubeOptions(**options)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("tasks", "parallelism", "max_failed", "name", "fragment"),
    [
        (100_001, 10_001, 10, "ex-a", "at most 10,000 may run at once"),
        (200_000, 20_000, 10, "ex-a", "or give --chunk or --tasks so there are at most 100,000 tasks"),
        (100_001, 10_000, 10_001, "ex-a", "lower --max-failed-indexes"),
        (100_000, 5, 10, "x" * 52, "would name pods with 64 characters"),
    ],
)
def test_fan_out_limits_of_the_api_server_are_refused_with_what_is_allowed(tasks, parallelism, max_failed, name,
                                                                          fragment):  # fmt: skip
    with pytest.raises(UsageError) as caught:
        limits.check_indexed_job(tasks, parallelism, max_failed, name)
    assert fragment in str(caught.value)


def test_fan_out_limits_at_their_edges_pass():
    limits.check_indexed_job(100_000, 100_000, 100_000, "ex-a")  # at most 100,000 completions: no lower limits
    limits.check_indexed_job(10_000_000, 10_000, 10_000, "ex-a")
    limits.check_indexed_job(10_000, 5, 10, "x" * 52)  # 52 + len("-9999-") + 5 = 63


def test_the_job_never_asks_for_more_failed_indexes_than_the_api_allows():
    big = job(spec(tasks=200_000, parallelism=10_000), KubeOptions())["spec"]
    assert big["maxFailedIndexes"] == 10_000 and big["parallelism"] == 10_000
    with pytest.raises(UsageError, match="at most 10,000 may run at once"):
        job(spec(tasks=200_000, parallelism=10_001), KubeOptions())


@pytest.mark.parametrize(
    ("total", "limit", "expected"),
    [(10, 100, (10, 1)), (250_001, 100_000, (83_334, 3)), (10_000_000, 10_000_000, (10_000_000, 1))],
)
def test_a_chunk_is_chosen_when_items_exceed_the_task_limit(total, limit, expected):
    assert cut_tasks(total, tasks=None, chunk=None, limit=limit) == expected


def test_an_explicit_chunk_that_exceeds_the_task_limit_is_refused_with_the_chunk_that_fits():
    with pytest.raises(UsageError, match="more than 100,000; give --chunk 3 or more"):
        cut_tasks(250_001, tasks=None, chunk=1, limit=100_000)


def test_too_many_tasks_asked_by_number_are_refused_naming_tasks():
    """π has no --chunk: its hint must name the option it has (was 'give --chunk 2 or more')."""
    with pytest.raises(UsageError, match="more than 100,000; give --tasks 100000 or fewer"):
        cut_tasks(100_001, tasks=100_001, chunk=None, limit=100_000)


@pytest.mark.parametrize(("batch_id", "generation", "tasks"), [("x" * 52, 1, 10), ("x" * 52, 123, 10_000_000),
                                                               ("pi-abcde", 7, 100)])  # fmt: skip
def test_a_resumed_job_name_keeps_pod_names_within_63_characters(batch_id, generation, tasks):
    name = resumed_job_name(batch_id, generation, tasks)
    assert name.endswith(f"-r{generation}") and name.startswith(batch_id[:5])
    limits.check_indexed_job(tasks, 1, 1, name)


LAUGHS = """
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
spec: {hostAliases: [{ip: 1.2.3.4, hostnames: [*f, *f, *f, *f, *f, *f, *f, *f, *f]}]}
"""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (LAUGHS, "more than 50,000 values (YAML aliases expanded)"),
        ("spec: [unclosed", "is not valid YAML or JSON at line 1"),
        ("- a\n- b\n", "must hold one mapping"),
        ("spec: {}\n---\nspec: {}\n", "must hold one mapping"),
        ("\xff", None),  # written as bytes below: not UTF-8
    ],
)
def test_a_hostile_template_file_is_refused_quickly_with_one_line(tmp_path, text, fragment):
    path = tmp_path / "template.yaml"
    path.write_bytes(b"\xff\xfe" if fragment is None else text.encode())
    started = time.monotonic()
    done = kb("render", "--item", "1", "--pod-template", str(path), "--", "true")
    one_line_error(done, 2, fragment or "is not UTF-8 text")
    assert time.monotonic() - started < 10
