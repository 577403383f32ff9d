"""The batch's Job, built by pure functions: every field the issue asks for, valid for 1.33-1.37, restricted."""

from __future__ import annotations

import time

import pytest

from kiabatch.kube.batch_job import (
    KubeOptions,
    batch_objects,
    default_max_failed_indexes,
    job,
    redis_secret,
    worker_service_account,
)
from kiabatch.kube.objects import from_yaml, prune, to_yaml
from kiabatch.model import BatchSpec, WorkerSpec
from kiabatch.submission import plan_batch
from tests.kube.checks import pod_specs, restricted_violations, validate_all_versions


def spec(**changes) -> BatchSpec:
    base = {
        "id": "pi-x7k2p", "workload": "pi", "worker": WorkerSpec(command=["python3", "/w/pi", "{a}"]),
        "tasks": 5, "parallelism": 3, "chunk": 1, "retries": 2, "total": 5, "created_at": time.time(),
        "ttl": 600,
    }  # fmt: skip
    base.update(changes)
    return BatchSpec(**base)


def test_the_job_is_indexed_with_completions_parallelism_and_per_index_retries():
    body = job(spec(), KubeOptions(namespace="batch"))["spec"]
    assert body["completionMode"] == "Indexed"
    assert (body["completions"], body["parallelism"], body["backoffLimitPerIndex"]) == (5, 3, 2)
    assert body["podReplacementPolicy"] == "Failed"
    assert body["ttlSecondsAfterFinished"] == 86400
    assert "activeDeadlineSeconds" not in body
    assert body["maxFailedIndexes"] == 5
    assert body["template"]["spec"]["restartPolicy"] == "Never"


def test_parallelism_never_exceeds_completions_and_deadlines_map_to_active_deadline_seconds():
    body = job(spec(parallelism=50, deadline=90.5, task_timeout=30), KubeOptions())["spec"]
    assert body["parallelism"] == 5
    assert body["activeDeadlineSeconds"] == 91
    assert body["template"]["spec"]["activeDeadlineSeconds"] == 30


@pytest.mark.parametrize(("tasks", "expected"), [(1, 1), (10, 10), (50, 10), (1000, 100), (200_000, 10_000)])
def test_max_failed_indexes_tolerates_poison_items_but_stops_a_flood(tasks, expected):
    assert default_max_failed_indexes(tasks) == expected
    # Never above completions: the API server refuses it (and it would mean the same).
    assert job(spec(tasks=tasks), KubeOptions(max_failed_indexes=3))["spec"]["maxFailedIndexes"] == min(3, tasks)


def test_the_pod_failure_policy_ignores_disruptions_and_fails_declared_exit_codes():
    plain = job(spec(), KubeOptions())["spec"]["podFailurePolicy"]["rules"]
    assert plain == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    worker = WorkerSpec(command=["x"], non_retriable_exit_codes=(42, 7))
    rules = job(spec(worker=worker), KubeOptions())["spec"]["podFailurePolicy"]["rules"]
    assert rules[1] == {
        "action": "FailIndex",
        "onExitCodes": {"containerName": "worker", "operator": "In", "values": [7, 42]},
    }


def test_labels_and_version_annotation():
    from kiabatch import __version__

    made = job(spec(), KubeOptions())
    expected = {
        "app.kubernetes.io/name": "kiabatch",
        "app.kubernetes.io/managed-by": "kiabatch",
        "kiabatch.io/batch": "pi-x7k2p",
        "kiabatch.io/workload": "pi",
    }
    assert expected.items() <= made["metadata"]["labels"].items()
    assert expected.items() <= made["spec"]["template"]["metadata"]["labels"].items()
    assert made["metadata"]["annotations"]["kiabatch.io/version"] == __version__


def test_one_native_sidecar_claims_and_reports_and_the_worker_waits_for_its_ready_file():
    pod = job(spec(), KubeOptions(image="reg.example/kiabatch:1"))["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [worker] = pod["containers"]
    assert sidecar["name"] == "kiabatch" and sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["task", "sidecar", "--batch", "pi-x7k2p", "--dir", "/kiabatch/task"]
    # Started as soon as the sidecar runs: no startupProbe or postStart hook holds the worker back.
    assert "startupProbe" not in sidecar and "lifecycle" not in sidecar
    assert worker["command"][:2] == ["/bin/sh", "-c"]
    assert '"$d/ready"' in worker["command"][2] and worker["command"][2].rstrip().endswith('exec /bin/sh "$d/run.sh"')
    assert sidecar["image"] == worker["image"] == "reg.example/kiabatch:1"
    for container in (sidecar, worker):
        assert {"name": "task", "mountPath": "/kiabatch/task"} in container["volumeMounts"]
    assert {"name": "task", "emptyDir": {}} in pod["volumes"]


@pytest.mark.parametrize(("cpu", "limit"), [("100m", "1"), ("500m", "1"), ("1", "1"), ("2", "2"), ("2500m", "2500m")])
def test_the_sidecar_requests_little_and_is_never_throttled_below_the_worker_or_one_core(cpu, limit):
    [sidecar] = job(spec(), KubeOptions(cpu=cpu))["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"},
                                    "limits": {"cpu": limit, "memory": "512Mi"}}  # fmt: skip


def test_a_workload_image_runs_only_the_worker():
    pod = job(spec(worker=WorkerSpec(command=["convert"], image="me/imagemagick:7")), KubeOptions())
    containers = pod["spec"]["template"]["spec"]
    assert containers["containers"][0]["image"] == "me/imagemagick:7"
    assert all(c["image"].startswith("ghcr.io/kiabatch/kiabatch:") for c in containers["initContainers"])


def test_the_redis_url_comes_only_from_a_secret_and_never_reaches_the_worker():
    pod = job(spec(), KubeOptions(redis_secret="my-redis"))["spec"]["template"]["spec"]
    for container in pod["initContainers"]:
        [url] = [e for e in container["env"] if e["name"] == "KIABATCH_REDIS_URL"]
        assert url == {
            "name": "KIABATCH_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "my-redis", "key": "url"}},
        }
    assert all(e["name"] != "KIABATCH_REDIS_URL" for e in pod["containers"][0]["env"])
    assert "redis://" not in to_yaml(batch_objects(spec(), KubeOptions()))


def test_workers_run_under_their_own_account_without_a_token_and_with_resources():
    objects = batch_objects(spec(), KubeOptions(cpu="2", memory="3Gi"))
    account, made = objects
    assert account["kind"] == "ServiceAccount" and account["automountServiceAccountToken"] is False
    pod = made["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi"},
        "limits": {"cpu": "2", "memory": "3Gi"},
    }
    assert all(c["resources"]["limits"]["memory"] for c in pod["initContainers"])


def test_read_only_root_filesystems_with_a_writable_tmp():
    pod = job(spec(), KubeOptions())["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    writable = job(spec(), KubeOptions(read_only_root=False))["spec"]["template"]["spec"]["containers"][0]
    assert writable["securityContext"]["readOnlyRootFilesystem"] is False


def every_rendered_object() -> list[dict]:
    pi = plan_batch("pi", digits=1000, parallel=3, backend="kubernetes", batch_id="pi-abcde").counted()
    exec_spec = plan_batch(
        "exec", items=["a", "b"], command=["convert", "{item}"], backend="kubernetes", batch_id="ex-abcde",
        non_retriable_exit_codes=[3], image="me/tool:1", env={"MODE": "fast"}, timeout=60, task_timeout=10,
    ).counted()  # fmt: skip
    to_s3 = plan_batch(
        "exec",
        items=["a"],
        command=["convert", "{item}", "{output}"],
        backend="kubernetes",
        batch_id="s3-abcde",
        results_to="s3://thumbs/out",
        s3_endpoint="http://minio:9000",
    ).counted()
    to_pvc = plan_batch("exec", items=["a"], command=["convert", "{item}", "{output}"], backend="kubernetes",
                        batch_id="pvc-abcde", results_to="file:///results").counted()  # fmt: skip
    return [
        *batch_objects(to_s3, KubeOptions(namespace="batch", results_secret="store-creds")),
        *batch_objects(to_pvc, KubeOptions(namespace="batch", results_volume="shared-results")),
        *batch_objects(pi, KubeOptions(namespace="batch")),
        *batch_objects(exec_spec, KubeOptions(namespace="batch", image_pull_policy="Always", read_only_root=False)),
        redis_secret("redis://:pw@kiabatch-redis-primary:6379/0", "batch"),
        worker_service_account("batch"),
    ]


@pytest.mark.parametrize("obj", every_rendered_object(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_rendered_object_is_valid_for_kubernetes_1_33_to_1_37_in_strict_mode(obj):
    validate_all_versions(obj)


@pytest.mark.parametrize("obj", every_rendered_object(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_rendered_pod_meets_the_restricted_pod_security_standard(obj):
    for pod in pod_specs(obj):
        assert restricted_violations(pod) == []


def test_the_restricted_check_catches_violations():
    pod = job(spec(), KubeOptions())["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["initContainers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["containers"][0]["securityContext"]["runAsNonRoot"] = False
    problems = restricted_violations(pod)
    assert any("allowPrivilegeEscalation" in p for p in problems)
    assert any("capabilities" in p for p in problems)
    assert any("hostPath" in p for p in problems)
    assert any("may run as root" in p for p in problems)


def test_yaml_round_trips_as_a_multi_document_stream():
    objects = batch_objects(spec(), KubeOptions(namespace="batch"))
    text = to_yaml(objects)
    assert text.startswith("---\n") and text.count("\n---\n") == 1
    assert from_yaml(text) == objects


def test_prune_drops_none_recursively():
    assert prune({"a": None, "b": {"c": None, "d": 1}, "e": [None, {"f": None}]}) == {
        "b": {"d": 1},
        "e": [{}],
    }


def test_only_the_reporter_gets_the_results_stores_credentials_and_only_through_secret_key_refs():
    to_s3 = spec(results_to="s3://thumbs/out", s3_endpoint="http://minio:9000")
    pod = job(to_s3, KubeOptions(results_secret="store-creds"))["spec"]["template"]["spec"]
    [reporter] = pod["initContainers"]  # the task sidecar: it claims and reports
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in reporter["env"] if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "store-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "store-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert refs["AWS_SESSION_TOKEN"]["optional"] is True
    assert not any(e["name"].startswith("AWS_") for e in pod["containers"][0]["env"])  # the worker: none
    # Without a Secret the pod's own identity signs (IRSA, Workload Identity): nothing is added.
    plain = job(to_s3, KubeOptions())["spec"]["template"]["spec"]["initContainers"][0]
    assert not any(e["name"].startswith("AWS_") for e in plain["env"])


def test_a_file_results_store_mounts_its_claim_in_the_reporter_only():
    pod = job(spec(results_to="file:///results"), KubeOptions(results_volume="shared"))["spec"]["template"]["spec"]
    assert {"name": "results", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    [reporter] = pod["initContainers"]
    assert {"name": "results", "mountPath": "/results"} in reporter["volumeMounts"]
    assert all(m["name"] != "results" for m in pod["containers"][0]["volumeMounts"])


@pytest.mark.parametrize(
    ("results_to", "options", "fragment"),
    [
        ("file:///r", KubeOptions(), "needs --results-volume"),
        ("file:///r", KubeOptions(results_volume="v", results_secret="s"), "--results-secret is for s3://"),
        ("s3://bkt/p", KubeOptions(results_volume="v"), "--results-volume is for a file://"),
        ("", KubeOptions(results_secret="s"), "need --results-to"),
        ("s3://bkt/p", KubeOptions(results_secret="Bad_Name"), "bad Kubernetes object name"),
    ],
)
def test_results_store_options_that_do_not_fit_are_refused(results_to, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        job(spec(results_to=results_to), options)
