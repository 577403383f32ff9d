"""Schedules on Kubernetes: the CronJob, the launcher's least-privilege RBAC, and runs end to end."""

from __future__ import annotations

import json

import pytest

from kiabatch import Batch, Queue
from kiabatch.kube.batch_job import KubeOptions
from kiabatch.kube.schedule_objects import LAUNCHER_RULES, cron_job, job_from_cron_job, schedule_objects
from kiabatch.schedules import Schedule, run_batch_id
from tests.helpers import kb, wait_for
from tests.kube.checks import pod_specs, restricted_violations, validate_all_versions
from tests.kube.conftest import IMAGE


def sample(**changes) -> Schedule:
    base = {"name": "thumbs", "cron": "*/10 * * * *", "submit_args": ["--from-queue", "thumbs", "--command",
            "python thumb.py {input}"], "time_zone": "Europe/Berlin"}  # fmt: skip
    return Schedule(**{**base, **changes})


@pytest.mark.parametrize("obj", schedule_objects(sample(), KubeOptions(namespace="batch")),
                         ids=lambda o: o["kind"])  # fmt: skip
def test_every_schedule_object_is_valid_for_1_33_to_1_37_and_restricted(obj):
    validate_all_versions(obj)
    for pod in pod_specs(obj):
        assert restricted_violations(pod) == []


def test_the_launcher_role_grants_exactly_the_verbs_it_needs_and_nothing_cluster_wide():
    objects = {o["kind"]: o for o in schedule_objects(sample(), KubeOptions(namespace="batch"))}
    granted = {(group, resource, verb) for rule in objects["Role"]["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
    expected = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    expected |= {("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get")}
    assert granted == expected
    assert objects["Role"]["rules"] == LAUNCHER_RULES
    assert "ClusterRole" not in objects and "ClusterRoleBinding" not in objects
    binding = objects["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kiabatch-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kiabatch-launcher", "namespace": "batch"}]
    accounts = {o["metadata"]["name"]: o for o in schedule_objects(sample(), KubeOptions(namespace="batch"))
                if o["kind"] == "ServiceAccount"}  # fmt: skip
    assert accounts["kiabatch-worker"]["automountServiceAccountToken"] is False
    assert accounts["kiabatch-launcher"]["automountServiceAccountToken"] is True


def test_the_cron_job_fields():
    made = cron_job(
        sample(concurrency="replace", suspend=True, starting_deadline=120),
        KubeOptions(namespace="batch", image="reg/kiabatch:1", ttl_after_finished=3600),
    )
    spec = made["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["concurrencyPolicy"]) == (
        "*/10 * * * *",
        "Europe/Berlin",
        "Replace",
    )
    assert (spec["startingDeadlineSeconds"], spec["suspend"]) == (120, True)
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    job = spec["jobTemplate"]["spec"]
    assert job["ttlSecondsAfterFinished"] == 3600 and job["podReplacementPolicy"] == "Failed"
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == "kiabatch-launcher" and pod["automountServiceAccountToken"] is True
    [launcher] = pod["containers"]
    assert launcher["image"] == "reg/kiabatch:1"
    assert launcher["args"] == [
        "submit",
        "--backend",
        "kubernetes",
        "--wait",
        "--quiet",
        "--from-queue",
        "thumbs",
        "--command",
        "python thumb.py {input}",
    ]
    env = {e["name"]: e for e in launcher["env"]}
    assert (
        env["KIABATCH_RUN"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    )
    assert env["KIABATCH_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "kiabatch-redis"
    assert cron_job(sample(), KubeOptions())["spec"]["concurrencyPolicy"] == "Forbid"  # the default
    workload_first = cron_job(sample(submit_args=["pi", "--digits", "9"]), KubeOptions())
    assert workload_first["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][:3] == [
        "submit",
        "pi",
        "--backend",
    ]


def test_run_now_builds_a_job_owned_by_the_cron_job():
    made = cron_job(sample(), KubeOptions(namespace="batch"))
    made["metadata"]["uid"] = "u-1"
    job = job_from_cron_job(made, "abcde")
    assert job["metadata"]["name"] == "thumbs-manual-abcde"
    assert job["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "name": "thumbs",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["spec"] == made["spec"]["jobTemplate"]["spec"]
    validate_all_versions(job)


@pytest.fixture
def scheduled(cluster, redis_url):
    assert kb("secret", "create", "-n", "batch").exit_code == 0
    created = kb(
        "schedule",
        "create",
        "thumbs",
        "--cron",
        "*/10 * * * *",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--from-queue",
        "thumbs",
        "--command",
        "echo done {item}",
    )
    assert created.exit_code == 0, created.stderr
    return cluster


def launcher_jobs(cluster):
    return [j for j in cluster.store.list("jobs", "batch", None, None) if j["metadata"]["name"].startswith("thumbs-")]


def test_create_list_show_suspend_resume(scheduled):
    kinds = {(o["kind"], o["metadata"]["name"]) for plural in ("serviceaccounts", "roles", "rolebindings", "cronjobs")
             for o in scheduled.store.list(plural, "batch", None, None)}  # fmt: skip
    assert kinds == {
        ("ServiceAccount", "kiabatch-worker"),
        ("ServiceAccount", "kiabatch-launcher"),
        ("Role", "kiabatch-launcher"),
        ("RoleBinding", "kiabatch-launcher"),
        ("CronJob", "thumbs"),
    }
    listed = kb("-o", "json", "schedule", "list", "--backend", "kubernetes", "-n", "batch")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["thumbs"]
    shown = json.loads(kb("-o", "json", "schedule", "show", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout)
    assert shown["submit_args"] == ["--from-queue", "thumbs", "--command", "echo done {item}"]
    assert kb("schedule", "suspend", "thumbs", "--backend", "kubernetes", "-n", "batch").exit_code == 0
    assert scheduled.store.get("cronjobs", "batch", "thumbs")["spec"]["suspend"] is True
    assert kb("schedule", "resume", "thumbs", "--backend", "kubernetes", "-n", "batch").exit_code == 0
    assert scheduled.store.get("cronjobs", "batch", "thumbs")["spec"]["suspend"] is False
    again = kb("schedule", "create", "thumbs", "--cron", "@daily", "--backend", "kubernetes", "-n", "batch", "pi")
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_run_now_drains_the_queue_through_a_launcher_with_least_privilege(scheduled):
    Queue("thumbs").enqueue_many(["a.png", "b.png", "c.png"])
    started = kb("schedule", "run-now", "thumbs", "--backend", "kubernetes", "-n", "batch")
    assert started.exit_code == 0, started.stderr
    run = started.stdout.strip()
    wait_for(
        lambda: any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in scheduled.store.get("jobs", "batch", run)["status"].get("conditions") or []
        )
    )
    batch = Batch(run_batch_id(run))
    assert sorted(r.text for r in batch.results()) == ["done a.png\n", "done b.png\n", "done c.png\n"]
    assert batch.store.spec(batch.id).schedule == "thumbs"
    history = json.loads(
        kb("-o", "json", "schedule", "history", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout
    )
    assert history[0]["run"] == run and history[0]["state"] == "Complete"
    assert history[0]["batches"] == [batch.id] and (history[0]["done"], history[0]["failed"]) == (3, 0)
    # The batch shows up like any other.
    assert batch.id in kb("list").stdout


def test_a_run_with_an_empty_queue_ends_without_a_batch(scheduled):
    run = kb("schedule", "run-now", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout.strip()
    wait_for(lambda: scheduled.store.get("jobs", "batch", run)["status"].get("conditions"))
    job = scheduled.store.get("jobs", "batch", run)
    assert [c["type"] for c in job["status"]["conditions"]][-1] == "Complete"
    assert [j for j in scheduled.store.list("jobs", "batch", "kiabatch.io/run=" + run, None)] == []
    log = b"".join(v for (ns, pod, c), v in scheduled.store.logs.items() if pod.startswith(run))
    assert b"is empty: nothing to run" in log


def test_a_launcher_killed_mid_run_is_replaced_and_attaches_to_its_batch(scheduled):
    Queue("thumbs").enqueue_many([f"{i}.png" for i in range(4)])
    cron = scheduled.store.get("cronjobs", "batch", "thumbs")
    job = job_from_cron_job(cron, "kill1")
    batch_id = run_batch_id(job["metadata"]["name"])
    scheduled.emulator.kill_when[(job["metadata"]["name"], 0)] = lambda: bool(
        scheduled.store.list("jobs", "batch", f"kiabatch.io/batch={batch_id}", None)
    )
    scheduled.store.create("jobs", "batch", job)
    wait_for(
        lambda: any(
            c["type"] == "Complete"
            for c in scheduled.store.get("jobs", "batch", "thumbs-manual-kill1")["status"].get("conditions") or []
        )
    )
    launcher_pods = scheduled.store.list("pods", "batch", "batch.kubernetes.io/job-name=thumbs-manual-kill1", None)
    assert sorted(p["status"]["phase"] for p in launcher_pods) == ["Failed", "Succeeded"]
    assert len(scheduled.store.list("jobs", "batch", f"kiabatch.io/batch={batch_id}", None)) == 1  # one snapshot
    assert sorted(r.item for r in Batch(batch_id).results()) == [f"{i}.png" for i in range(4)]
    assert len(Queue("thumbs")) == 0


def test_the_launcher_is_refused_what_its_role_does_not_grant_and_the_items_go_back(scheduled, client):
    """The fake API server enforces RBAC for service accounts: without `create jobs` no run can start,
    and every launcher attempt returns the items it took to the queue."""
    scheduled.store.update(
        "roles",
        "batch",
        "kiabatch-launcher",
        lambda role: role["rules"][0].update(verbs=["get", "list", "watch", "delete"]),
    )
    Queue("thumbs").enqueue_many(["x.png", "y.png"])
    run = kb("schedule", "run-now", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout.strip()
    wait_for(lambda: scheduled.store.get("jobs", "batch", run)["status"].get("conditions"), timeout=120)
    assert [c["type"] for c in scheduled.store.get("jobs", "batch", run)["status"]["conditions"]][-1] == "Failed"
    log = b"".join(v for (ns, pod, c), v in scheduled.store.logs.items() if pod.startswith(run))
    assert b'cannot create resource "jobs"' in log
    assert Queue("thumbs").peek() == ["x.png", "y.png"]  # nothing lost, order kept
    assert client.keys("kiabatch:{thumbs-manual*") == []


def test_delete_keeps_runs_unless_cascade_which_removes_jobs_and_batches(scheduled, client):
    Queue("thumbs").enqueue("y.png")
    run = kb("schedule", "run-now", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout.strip()
    wait_for(
        lambda: any(
            c["type"] == "Complete" for c in scheduled.store.get("jobs", "batch", run)["status"].get("conditions") or []
        )
    )
    batch_id = run_batch_id(run)
    done = kb("schedule", "delete", "thumbs", "--cascade", "--backend", "kubernetes", "-n", "batch")
    assert done.exit_code == 0, done.stderr
    assert scheduled.store.list("cronjobs", "batch", None, None) == []
    assert scheduled.store.list("jobs", "batch", None, None) == []
    assert client.keys(f"kiabatch:{{{batch_id}}}*") == []


def test_delete_without_cascade_orphans_the_runs(scheduled):
    Queue("thumbs").enqueue("z.png")
    run = kb("schedule", "run-now", "thumbs", "--backend", "kubernetes", "-n", "batch").stdout.strip()
    wait_for(lambda: scheduled.store.get("jobs", "batch", run)["status"].get("conditions"))
    assert kb("schedule", "delete", "thumbs", "--backend", "kubernetes", "-n", "batch").exit_code == 0
    assert scheduled.store.list("cronjobs", "batch", None, None) == []
    assert [
        j["metadata"]["name"] for j in scheduled.store.list("jobs", "batch", None, None) if j["metadata"]["name"] == run
    ]
    assert Batch(run_batch_id(run)).status().state == "succeeded"


def test_bad_schedules_are_refused_with_one_line(cluster, redis_url):
    done = kb("schedule", "create", "x", "--cron", "0 25 * * *", "--backend", "kubernetes", "-n", "batch", "pi")
    assert done.exit_code == 2 and "the hour field '25'" in done.stderr
    assert cluster.store.list("cronjobs", "batch", None, None) == []
    assert IMAGE  # the fixture's image is what launchers and batches use
