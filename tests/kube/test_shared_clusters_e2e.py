"""Issue 11 end to end, against the fake API server whose Job emulator runs the rendered pods.

The tests play the rest of a shared cluster: Kueue (admitting a Job by setting
``spec.suspend`` to false, preempting it by setting it back, serving a Workload
with its conditions), and a full scheduler (pods stay Pending with a
FailedScheduling message). ``submit --wait`` runs as a real process while they do.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from kiabatch import Batch
from tests.helpers import error_line, kb, kiabatch_cmd, wait_for
from tests.kube.conftest import IMAGE

KUBE = ("--backend", "kubernetes", "-n", "batch")


@pytest.fixture
def secret(cluster, redis_url):
    done = kb("secret", "create", "-n", "batch")
    assert done.exit_code == 0, done.stderr
    return redis_url


def get_job(cluster, name: str) -> dict | None:
    found = [j for j in cluster.store.list("jobs", "batch", None, None) if j["metadata"]["name"] == name]
    return found[0] if found else None


def pods_of(cluster, batch_id: str) -> list[dict]:
    return cluster.store.list("pods", "batch", f"kiabatch.io/batch={batch_id}", None)


def set_suspend(cluster, name: str, value: bool) -> None:
    """What Kueue does: ``False`` admits the Job, ``True`` preempts it."""
    cluster.store.update("jobs", "batch", name, lambda job: job["spec"].update(suspend=value))


def start_submit(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(kiabatch_cmd("submit", *KUBE, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "KIABATCH_REDIS_RETRY_SECONDS": "20"})  # fmt: skip


def status_of(batch_id: str) -> dict:
    done = kb("-o", "json", "status", batch_id)
    assert done.exit_code in (0, 1), done.stderr
    return json.loads(done.stdout)


def workload(job: dict, conditions: list[dict]) -> dict:
    """Kueue's Workload for ``job``, as Kueue names and labels it."""
    return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": f"job-{job['metadata']['name']}-1a2b3",
                         "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
            "spec": {"queueName": "team-a"}, "status": {"conditions": conditions}}  # fmt: skip


NO_QUOTA = "couldn't assign flavors to pod set main: insufficient quota for cpu in flavor default-flavor"


def test_a_queued_batch_waits_for_admission_without_burning_its_grace_then_runs(secret, cluster):
    submit = start_submit("--queue-name", "team-a", "--image-pull-grace", "1", "--batch-id", "ex-queued",
                          "-p", "2", "--item", '"a"', "--item", '"b"', "--", "echo", "{item}")  # fmt: skip
    job = wait_for(lambda: get_job(cluster, "ex-queued"), timeout=30)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # (the batch records its Job a moment after creating it)
    detail = wait_for(lambda: status_of("ex-queued")["detail"].get("admission"), timeout=30)
    assert detail == "waiting for admission in Kueue queue team-a"
    cluster.store.create("workloads", "batch", workload(job, [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": NO_QUOTA}]))  # fmt: skip
    status = status_of("ex-queued")
    assert status["detail"]["admission"] == f"waiting for admission in Kueue queue team-a: {NO_QUOTA}"
    assert "problem" not in status["detail"]
    time.sleep(3)  # three times --image-pull-grace: waiting for admission is not a start problem
    assert submit.poll() is None and pods_of(cluster, "ex-queued") == []
    set_suspend(cluster, "ex-queued", False)
    out, err = submit.communicate(timeout=90)
    assert submit.returncode == 0, err
    assert sorted(out.splitlines()) == ["a\ta", "b\tb"]
    assert "warning" not in err and "error" not in err


def test_a_preempted_batch_is_readmitted_and_nothing_is_counted_as_a_failure_or_lost(secret, cluster):
    items = [f"--item={n}" for n in range(4)]
    done = kb("submit", *KUBE, "--no-wait", "--queue-name", "team-a", "--retries", "0", "-p", "2",
              "--batch-id", "ex-preempt", *items, "--", "sh", "-c", 'sleep 1.5; echo "$1"', "sh", "{item}")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    set_suspend(cluster, "ex-preempt", False)
    batch = Batch("ex-preempt")
    wait_for(lambda: batch.progress().running == 2, timeout=30)  # two tasks claimed and running
    set_suspend(cluster, "ex-preempt", True)  # Kueue preempts the Job: its pods are stopped
    wait_for(lambda: all(p["status"]["phase"] in ("Failed", "Succeeded") for p in pods_of(cluster, "ex-preempt")),
             timeout=30)  # fmt: skip
    stopped = [p for p in pods_of(cluster, "ex-preempt") if p["status"]["phase"] == "Failed"]
    assert stopped, "the preemption stopped no pod"
    for pod in stopped:
        assert {"type": "DisruptionTarget", "status": "True"}.items() <= pod["status"]["conditions"][0].items()
    job = get_job(cluster, "ex-preempt")
    assert not job["status"].get("failedIndexes")
    assert batch.failed() == []
    assert "waiting for admission in Kueue queue team-a" in status_of("ex-preempt")["detail"]["admission"]
    set_suspend(cluster, "ex-preempt", False)  # re-admitted later
    batch.wait(timeout=90)
    assert batch.status().state == "succeeded" and batch.failed() == []
    results = batch.results()
    assert sorted(r.text for r in results) == [f"{n}\n" for n in range(4)]  # every item, once
    assert any(r.attempt == 2 for r in results)  # a preempted one ran again, and was counted once


def test_resume_follows_a_job_waiting_for_admission_and_a_new_job_keeps_the_batch_settings(secret, cluster, client):
    done = kb("submit", *KUBE, "--no-wait", "--queue-name", "team-a", "--priority-class", "low",
              "--node-selector", "pool=batch", "--toleration", "dedicated=batch:NoSchedule",
              "--batch-id", "ex-resq", "--item", '"a"', "--item", '"b"', "--", "echo", "{item}")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    resumed = kb("resume", "ex-resq", "--no-wait")  # the Job is live (suspended): followed, not replaced
    assert resumed.exit_code == 0, resumed.stderr
    assert [j["metadata"]["name"] for j in cluster.store.list("jobs", "batch", None, None)] == ["ex-resq"]
    set_suspend(cluster, "ex-resq", False)
    Batch("ex-resq").wait(timeout=60)
    # Redis loses the last writes of index 1 after the Job completed: resume runs it in a new Job...
    keys = {name: f"kiabatch:{{ex-resq}}:{name}" for name in ("final", "results", "outcomes", "progress", "meta")}
    client.srem(keys["final"], "1")
    client.hdel(keys["results"], "1:0")
    client.hdel(keys["outcomes"], "1:0")
    client.hincrby(keys["progress"], "done", -1)
    client.hset(keys["meta"], "state", "running")
    resume = subprocess.Popen(kiabatch_cmd("resume", "ex-resq"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    new = wait_for(lambda: get_job(cluster, "ex-resq-r1"), timeout=30)
    # ... built as the batch was submitted: queued in Kueue (suspended), with its placement.
    assert new["spec"]["suspend"] is True and new["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = new["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "low" and pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}]
    set_suspend(cluster, "ex-resq-r1", False)
    out, err = resume.communicate(timeout=90)
    assert resume.returncode == 0, err
    assert sorted(out.splitlines()) == ["a\ta", "b\tb"]


def test_scale_changes_a_running_jobs_parallelism_and_status_shows_it(secret, cluster):
    items = [f"--item={n}" for n in range(6)]
    done = kb("submit", *KUBE, "--no-wait", "-p", "1", "--batch-id", "ex-scale", *items, "--", "sleep", "1")
    assert done.exit_code == 0, done.stderr
    wait_for(lambda: Batch("ex-scale").progress().running == 1, timeout=30)
    scaled = kb("scale", "ex-scale", "--parallel", "3")
    assert scaled.exit_code == 0 and "parallelism 3" in scaled.stderr
    assert get_job(cluster, "ex-scale")["spec"]["parallelism"] == 3
    status = status_of("ex-scale")
    assert status["parallelism"] == 3 and status["detail"]["job_parallelism"] == 3
    wait_for(lambda: get_job(cluster, "ex-scale")["status"].get("active") == 3, timeout=30)  # three pods at once
    Batch("ex-scale").wait(timeout=60)
    assert Batch("ex-scale").status().state == "succeeded" and len(Batch("ex-scale").results()) == 6
    error_line(kb("scale", "ex-scale", "--parallel", "2"), 2, "succeeded; there is nothing to scale")


def test_scale_is_refused_where_the_api_server_would_refuse_it(secret, cluster):
    done = kb("submit", *KUBE, "--no-wait", "--queue-name", "team-a", "--batch-id", "ex-scale2", "--item", "1",
              "--", "true")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    cluster.store.update("jobs", "batch", "ex-scale2", lambda job: job["spec"].update(completions=200_000))
    error_line(kb("scale", "ex-scale2", "--parallel", "20000"), 2, "at most 10,000 may run at once")
    assert get_job(cluster, "ex-scale2")["spec"]["parallelism"] == 1


GPU_FULL = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def test_an_unschedulable_pod_is_shown_with_the_schedulers_reason_and_wait_warns_once_then_keeps_waiting(
    secret, cluster
):
    cluster.emulator.unschedulable = GPU_FULL
    submit = start_submit("--gpu", "1", "--image-pull-grace", "1", "--batch-id", "ex-gpu", "--item", '"x"', "--",
                          "echo", "{item}")  # fmt: skip
    [pod] = wait_for(lambda: pods_of(cluster, "ex-gpu"), timeout=30)
    wait_for(lambda: "waiting" in status_of("ex-gpu")["detail"], timeout=30)
    detail = status_of("ex-gpu")["detail"]
    assert detail["waiting"] == f"pod {pod['metadata']['name']} Pending: {GPU_FULL}"
    assert "problem" not in detail  # a full cluster is not a failure: status --watch keeps watching
    events = cluster.store.list("events", "batch", None, None)
    assert any(e["reason"] == "FailedScheduling" and e["involvedObject"]["name"] == pod["metadata"]["name"]
               for e in events)  # fmt: skip
    time.sleep(3)  # three times the grace
    assert submit.poll() is None  # still waiting
    cluster.emulator.unschedulable = None  # a node with a GPU frees up
    out, err = submit.communicate(timeout=90)
    assert submit.returncode == 0, err
    assert out == "x\tx\n"
    warnings = [line for line in err.splitlines() if line.startswith("kiabatch: warning:")]
    assert len(warnings) == 1, err
    assert "no pod of Job ex-gpu has started after 1s" in warnings[0] and GPU_FULL in warnings[0]
    assert "still waiting (a full cluster is not a failure)" in warnings[0]


def test_the_kubelet_starts_the_worker_only_once_every_sidecar_has_started(secret, cluster, tmp_path):
    """The emulator honours sidecar startup: a user's sidecar with a startupProbe holds the worker back."""
    template = tmp_path / "template.yaml"
    template.write_text(json.dumps({"spec": {"initContainers": [{
        "name": "gate", "image": "busybox:1.36", "restartPolicy": "Always",
        "command": ["/bin/sh", "-c", "sleep 1; touch /tmp/gate-up; exec sleep 600"],
        "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/gate-up"]}, "periodSeconds": 1,
                         "failureThreshold": 10},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}]}}))  # fmt: skip
    done = kb("submit", *KUBE, "--pod-template", str(template), "--batch-id", "ex-gate", "--item", '"x"', "--",
              "echo", "{item}")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    [pod] = pods_of(cluster, "ex-gate")
    events = {(container, event): at for container, event, at in cluster.emulator.timeline[pod["metadata"]["name"]]}
    assert events[("kiabatch", "process")] < events[("kiabatch", "started")] <= events[("gate", "process")]
    assert events[("gate", "started")] - events[("gate", "process")] >= 1  # its probe passed after a second
    assert events[("gate", "started")] <= events[("worker", "process")]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["kiabatch", "gate"]


def test_a_schedule_stores_its_pod_template_inline_and_its_runs_queue_in_kueue(cluster, redis_url, tmp_path):
    from kiabatch import Queue
    from kiabatch.schedules import run_batch_id

    assert kb("secret", "create", "-n", "batch").exit_code == 0
    template = tmp_path / "template.yaml"
    template.write_text("metadata:\n  annotations:\n    example.com/owner: data-team\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  hostPID: true\n")
    refused = kb("schedule", "create", "nightly", "--cron", "0 3 * * *", *KUBE, "--pod-template", str(bad),
                 "--from-queue", "nightly", "--command", "echo {item}")  # fmt: skip
    error_line(refused, 2, "spec.hostPID is true")
    assert cluster.store.list("cronjobs", "batch", None, None) == []
    created = kb("schedule", "create", "nightly", "--cron", "0 3 * * *", *KUBE, "--queue-name", "team-a",
                 "--pod-template", str(template), "--from-queue", "nightly", "--command", "echo {item}")  # fmt: skip
    assert created.exit_code == 0, created.stderr
    template.unlink()  # the runs do not need the file: the schedule holds the template
    [cron] = cluster.store.list("cronjobs", "batch", None, None)
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    inline = args[args.index("--pod-template") + 1]
    assert json.loads(inline) == {"metadata": {"annotations": {"example.com/owner": "data-team"}}}
    Queue("nightly").enqueue_many(["n1", "n2"])
    run = kb("schedule", "run-now", "nightly", *KUBE).stdout.strip()
    batch_id = run_batch_id(run)
    job = wait_for(lambda: get_job(cluster, batch_id), timeout=60)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["template"]["metadata"]["annotations"] == {"example.com/owner": "data-team"}
    set_suspend(cluster, batch_id, False)
    wait_for(lambda: Batch(batch_id).store.meta(batch_id).get("job"), timeout=30)  # recorded just after creation
    Batch(batch_id).wait(timeout=90)
    assert sorted(r.text for r in Batch(batch_id).results()) == ["n1\n", "n2\n"]


def test_render_chooses_a_chunk_when_items_exceed_what_a_job_may_have_and_says_so(tmp_path):
    lines = tmp_path / "many.txt"
    lines.write_text("".join(f"{n}\n" for n in range(200_001)))
    done = kb("render", "--lines", str(lines), "-p", "20000", "--", "echo", "{item}")
    assert done.exit_code == 0, done.stderr
    assert "200,001 items are more than the 100,000 tasks a batch may have here: running 3 items per task" in (
        done.stderr
    )
    job = next(doc for doc in yaml.safe_load_all(done.stdout) if doc["kind"] == "Job")
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (66_667, 20_000)
    explicit = kb("render", "--lines", str(lines), "-p", "20000", "--chunk", "1", "--", "echo", "{item}")
    error_line(explicit, 2, "more than 100,000; give --chunk 3 or more")


def test_a_batch_the_api_would_refuse_is_refused_before_anything_is_written(secret, cluster, client):
    long_id = "x" * 52
    items = "".join(f"{n}\n" for n in range(100_000))
    done = kb("submit", *KUBE, "--batch-id", long_id, "--chunk", "1", "--lines", "-", "--", "true", input=items)
    error_line(done, 2, "would name pods with 64 characters", "use a batch id of at most 51 characters")
    assert client.keys("kiabatch:{*") == [] and cluster.store.list("jobs", "batch", None, None) == []
    refused = kb("submit", *KUBE, "--pod-template", '{"spec": {"hostNetwork": true}}', "--item", "1", "--", "true")
    error_line(refused, 2, "spec.hostNetwork is true")
    assert client.keys("kiabatch:{*") == [] and cluster.store.list("jobs", "batch", None, None) == []


def test_the_python_api_takes_the_same_settings_as_kube_options(secret, cluster):
    from kiabatch import KubeOptions, submit

    kube = KubeOptions(namespace="batch", image=IMAGE, queue_name="team-a", gpu=1,
                       tolerations=["nvidia.com/gpu:NoSchedule"],
                       pod_template={"metadata": {"labels": {"team": "ml"}}})  # fmt: skip
    batch = submit(items=["p"], command=["echo", "{item}"], backend="kubernetes", kube=kube, batch_id="ex-api")
    job = get_job(cluster, "ex-api")
    assert job["spec"]["suspend"] is True and job["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    [worker] = job["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    set_suspend(cluster, "ex-api", False)
    assert [r.text for r in batch.wait(timeout=60).results()] == ["p\n"]
