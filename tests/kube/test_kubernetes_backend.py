"""The Kubernetes backend end to end against a fake API server whose Jobs run their rendered pods locally."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from kiabatch import Batch
from kiabatch.kube.objects import from_yaml
from tests.helpers import HOSTILE, error_line, kb, truth
from tests.kube.conftest import IMAGE


def assert_ran_twice_counted_once(cluster, batch_id: str, text: str) -> None:
    """The index's first pod failed, a second one ran it, and Redis holds one result from attempt 2."""
    [result] = Batch(batch_id).results()
    assert result.text == text and result.attempt == 2
    pods = cluster.store.list("pods", "batch", f"kiabatch.io/batch={batch_id}", None)
    assert sorted(p["status"]["phase"] for p in pods) == ["Failed", "Succeeded"]


@pytest.fixture
def secret(cluster, redis_url):
    done = kb("secret", "create", "-n", "batch")
    assert done.exit_code == 0, done.stderr
    return redis_url


def jobs(api, namespace="batch"):
    return api.store.list("jobs", namespace, None, None)


def test_secret_create_stores_the_url_and_never_prints_it(api, monkeypatch):
    monkeypatch.setenv("KIABATCH_REDIS_URL", "redis://:s3cret@kiabatch-redis-primary:6379/0")
    done = kb("secret", "create", "-n", "batch")
    assert done.exit_code == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr and ":***@" in done.stderr
    stored = api.store.get("secrets", "batch", "kiabatch-redis")
    assert stored["stringData"] == {"url": "redis://:s3cret@kiabatch-redis-primary:6379/0"}
    again = kb("secret", "create", "-n", "batch", "--url-stdin", input="redis://:other@h:6379/1\n")
    assert again.exit_code == 0
    assert api.store.get("secrets", "batch", "kiabatch-redis")["stringData"]["url"] == "redis://:other@h:6379/1"


def test_pi_on_kubernetes_prints_the_same_digits_as_locally(secret, cluster):
    done = kb(
        "submit",
        "pi",
        "--digits",
        "300",
        "--parallel",
        "3",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "pi-kube1",
    )
    assert done.exit_code == 0, done.stderr
    assert done.stdout == truth(300) + "\n"
    [job] = jobs(cluster)
    assert job["metadata"]["name"] == "pi-kube1" and job["spec"]["completions"] == 3
    assert job["spec"]["template"]["spec"]["initContainers"][0]["image"] == IMAGE
    assert [c["type"] for c in job["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    local = kb("submit", "pi", "--digits", "300", "--parallel", "3")
    assert local.stdout == done.stdout


def test_status_merges_the_job_with_redis_and_logs_are_labelled(secret, cluster):
    kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "ex-kube2",
        "--item",
        '"a"',
        "--item",
        '"b"',
        "--",
        "sh",
        "-c",
        'echo "to stderr $1" >&2; echo "out $1"',
        "sh",
        "{item}",
    )
    status = json.loads(kb("-o", "json", "status", "ex-kube2").stdout)
    assert status["state"] == "succeeded" and status["progress"]["done"] == 2
    assert status["detail"]["job"] == "batch/ex-kube2"
    assert "Complete" in status["detail"]["job_conditions"]
    assert "succeeded 2" in status["detail"]["job_pods"]
    logs = kb("logs", "ex-kube2", "--index", "1").stdout.splitlines()
    assert any(line.startswith("[index 1 ex-kube2-1-") and " kiabatch] claimed index 1" in line for line in logs)
    assert any(" kiabatch] reported" in line for line in logs)
    assert not any("index 0" in line for line in logs)
    assert kb("results", "ex-kube2").stdout.splitlines() == ["a\tout a", "b\tout b"]


def test_delete_removes_the_job_its_pods_and_the_redis_keys(secret, cluster, client):
    kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "ex-kube3",
        "--item",
        "1",
        "--",
        "true",
    )
    assert cluster.store.list("pods", "batch", "kiabatch.io/batch=ex-kube3", None)
    done = kb("delete", "ex-kube3")
    assert done.exit_code == 0
    assert jobs(cluster) == []
    assert cluster.store.list("pods", "batch", "kiabatch.io/batch=ex-kube3", None) == []
    assert client.keys("kiabatch:{ex-kube3}*") == []
    assert ("DELETE", "/apis/batch/v1/namespaces/batch/jobs/ex-kube3") in cluster.requests


def test_delete_keep_results_keeps_what_results_reads(secret, cluster):
    kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "ex-kube4",
        "--item",
        "1",
        "--",
        "echo",
        "x",
    )
    assert kb("delete", "ex-kube4", "--keep-results").exit_code == 0
    assert jobs(cluster) == []
    assert kb("results", "ex-kube4").stdout == "1\tx\n"


def test_a_poison_item_fails_its_index_not_the_batch_and_exits_one(secret, cluster):
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--retries",
        "1",
        "-p",
        "3",
        "--batch-id",
        "ex-poison",
        "--lines",
        "-",
        "--",
        "sh",
        "-c",
        'test "$1" != bad || exit 5; echo "$1"',
        "sh",
        "{item}",
        input="good1\nbad\ngood2\n",
    )
    assert done.exit_code == 1, done.stderr
    assert "FAILED bad: exited with status 5 (exit 5, attempts 2)" in done.stderr
    batch = Batch("ex-poison")
    assert sorted(r.item for r in batch.results()) == ["good1", "good2"]
    [job] = jobs(cluster)
    assert job["status"]["failedIndexes"] is not None


def test_a_non_retriable_exit_code_fails_the_index_on_the_first_attempt(secret, cluster):
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--retries",
        "4",
        "--non-retriable-exit-code",
        "42",
        "--batch-id",
        "ex-fatal",
        "--item",
        "1",
        "--",
        "sh",
        "-c",
        "exit 42",
    )
    assert done.exit_code == 1
    [dead] = Batch("ex-fatal").failed()
    assert (dead.exit_code, dead.attempts) == (42, 1)
    assert len(cluster.store.list("pods", "batch", "kiabatch.io/batch=ex-fatal", None)) == 1


def test_an_evicted_pod_does_not_burn_a_retry_and_its_item_counts_once(secret, cluster):
    cluster.emulator.evict.add(("ex-evict", 0))
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--retries",
        "0",
        "--batch-id",
        "ex-evict",
        "--item",
        '"only"',
        "--",
        "sh",
        "-c",
        'sleep 1; echo "done $1"',
        "sh",
        "{item}",
    )
    assert done.exit_code == 0, done.stderr
    assert_ran_twice_counted_once(cluster, "ex-evict", "done only\n")


def test_hostile_items_pass_verbatim_through_the_pods(secret, cluster, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(h) + "\n" for h in HOSTILE))
    done = kb(
        "-o",
        "json",
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "-p",
        "4",
        "--items",
        str(items),
        "--",
        "printf",
        "%s",
        "{item}",
    )
    assert done.exit_code == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["item"]: r["result"] for r in rows} == {h: h for h in HOSTILE}
    assert not any(p.name.startswith("pwned") for p in cluster.emulator.root.rglob("*"))


def test_no_wait_returns_the_id_and_status_watch_follows_the_job(secret, cluster):
    done = kb(
        "submit",
        "--no-wait",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "ex-bg",
        "--item",
        "1",
        "--",
        "sh",
        "-c",
        "sleep 1; echo ok",
    )
    assert done.exit_code == 0 and done.stdout == "ex-bg\n"
    watched = kb("status", "--watch", "--interval", "0.2", "ex-bg")
    assert watched.exit_code == 0 and "succeeded" in watched.stdout
    assert Batch("ex-bg").wait(timeout=30).status().state == "succeeded"


def test_logs_follow_streams_a_running_worker(secret, cluster):
    kb(
        "submit",
        "--no-wait",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--batch-id",
        "ex-follow",
        "--item",
        "1",
        "--",
        "sh",
        "-c",
        "echo first >&2; sleep 1; echo second >&2",
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not cluster.store.list("pods", "batch", "kiabatch.io/batch=ex-follow", None):
        time.sleep(0.05)
    time.sleep(0.5)
    followed = kb("logs", "ex-follow", "--follow", "--index", "0").stdout
    worker_lines = [
        line for line in followed.splitlines() if line.endswith((" first", " second")) and "worker]" in line
    ]
    assert [line.rsplit(" ", 1)[1] for line in worker_lines] == ["first", "second"]


def test_an_image_that_cannot_be_pulled_is_reported_and_fails_wait(secret, cluster):
    started = time.monotonic()
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--image",
        "registry.example/doesnotexist:1",
        "--image-pull-grace",
        "1",
        "--batch-id",
        "ex-pull",
        "--item",
        "1",
        "--",
        "true",
    )
    error_line(done, 3, "cannot start its pods", "ImagePullBackOff", "doesnotexist")
    assert time.monotonic() - started < 30
    status = json.loads(kb("-o", "json", "status", "ex-pull").stdout)
    assert "ImagePullBackOff" in status["detail"]["problem"]


def test_a_missing_secret_is_refused_before_anything_is_written(cluster, redis_url, client):
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--item", "1", "--", "true")
    error_line(done, 3, "Secret 'kiabatch-redis'", "kiabatch secret create -n batch")
    assert client.dbsize() == 0 and jobs(cluster) == []


def test_an_old_cluster_is_refused(cluster, secret, client):
    cluster.version = "v1.32.4"
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--item", "1", "--", "true")
    error_line(done, 3, "runs Kubernetes 1.32", "needs 1.33 or newer")
    assert client.keys("kiabatch:{*") == []


def test_a_missing_namespace_is_reported(cluster, secret):
    done = kb("submit", "--backend", "kubernetes", "-n", "nowhere", "--item", "1", "--", "true")
    error_line(done, 3, "namespace 'nowhere' does not exist")


@pytest.mark.parametrize(
    ("denial", "fragment"),
    [
        (
            (
                403,
                "Forbidden",
                'jobs.batch is forbidden: User "dev" cannot create resource "jobs" in API group '
                '"batch" in the namespace "batch"',
            ),
            "forbidden by RBAC",
        ),
        (
            (
                403,
                "Forbidden",
                'jobs.batch "x" is forbidden: exceeded quota: compute, requested: count/jobs.batch=1',
            ),
            "quota exceeded",
        ),
    ],
)
def test_rbac_and_quota_refusals_exit_three_and_leave_no_batch_behind(cluster, secret, client, denial, fragment):
    cluster.deny[("POST", "jobs")] = denial
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--item", "1", "--", "true")
    error_line(done, 3, fragment)
    assert client.keys("kiabatch:{*") == []


def test_no_kubeconfig_and_an_unreachable_server_exit_three(redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")
    error_line(kb("submit", "--backend", "kubernetes", "--item", "1", "--", "true"), 3, "no Kubernetes configuration")
    from tests.kube.fake_cluster import FakeApiServer

    dead = FakeApiServer()
    config = dead.kubeconfig(tmp_path / "dead")
    dead.http.server_close()
    monkeypatch.setenv("KUBECONFIG", str(config))
    error_line(
        kb("submit", "--backend", "kubernetes", "--item", "1", "--", "true"),
        3,
        "cannot reach the Kubernetes API server",
    )


def test_the_default_backend_stays_local_even_with_a_kubeconfig(cluster, redis_url, monkeypatch):
    monkeypatch.delenv("KIABATCH_BACKEND", raising=False)
    done = kb("submit", "--item", "1", "--", "echo", "local")
    assert done.exit_code == 0 and done.stdout == "1\tlocal\n"
    assert cluster.requests == []


def test_the_kubernetes_backend_needs_a_redis_the_cluster_can_reach(cluster, home, monkeypatch):
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    error_line(
        kb("submit", "--backend", "kubernetes", "--item", "1", "--", "true"),
        2,
        "needs a Redis the cluster can reach",
    )


def test_dry_run_prints_what_render_prints_and_touches_nothing(cluster, redis_url, client):
    args = ["pi", "--digits", "500", "-p", "2", "-n", "batch", "--batch-id", "pi-render"]
    rendered = kb("render", *args)
    dry = kb("submit", *args, "--backend", "kubernetes", "--dry-run")
    assert rendered.exit_code == dry.exit_code == 0
    assert rendered.stdout == dry.stdout

    assert [o["kind"] for o in from_yaml(rendered.stdout)] == ["ServiceAccount", "Job"]
    assert client.dbsize() == 0 and cluster.requests == []


def test_the_job_submit_creates_is_exactly_the_one_render_prints(secret, cluster):
    args = ["pi", "--digits", "200", "-p", "2", "-n", "batch", "--batch-id", "pi-same"]
    rendered = {o["kind"]: o for o in from_yaml(kb("render", *args).stdout)}
    assert kb("submit", *args, "--backend", "kubernetes").exit_code == 0
    created = cluster.store.get("jobs", "batch", "pi-same")
    for key in ("spec",):
        assert created[key]["template"] == rendered["Job"][key]["template"]
        assert {k: v for k, v in created[key].items() if k != "template"} == {
            k: v for k, v in rendered["Job"][key].items() if k != "template"
        }
    assert created["metadata"]["labels"] == rendered["Job"]["metadata"]["labels"]


def test_a_pod_killed_after_its_worker_exits_but_before_the_upload_loses_nothing(secret, cluster):
    """The node dies after run.sh finished but before the reporter uploaded: the index reruns, counted once."""
    cluster.emulator.kill_before_upload.add(("ex-lost", 0))
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--retries",
        "0",
        "--batch-id",
        "ex-lost",
        "--item",
        '"x"',
        "--",
        "echo",
        "{item}",
    )
    assert done.exit_code == 0, done.stderr
    assert_ran_twice_counted_once(cluster, "ex-lost", "x\n")


def test_a_reporter_that_never_confirms_fails_the_pod_and_the_index_reruns(secret, cluster, monkeypatch):
    original = cluster.emulator._start
    killed = threading.Event()

    def start(namespace, pod, container, volumes, index):
        process = original(namespace, pod, container, volumes, index)
        if container["name"] == "kiabatch" and not killed.is_set():
            killed.set()

            def kill_once_claimed():  # after the claim, before the upload; this emulator does not restart it
                while not (volumes["task"] / "ready").exists():
                    time.sleep(0.005)
                os.killpg(process.pid, 9)

            threading.Thread(target=kill_once_claimed, daemon=True).start()
        return process

    monkeypatch.setattr(cluster.emulator, "_start", start)
    done = kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "--retries",
        "2",
        "--report-timeout",
        "2",
        "--batch-id",
        "ex-mute",
        "--item",
        '"y"',
        "--",
        "echo",
        "{item}",
    )
    assert done.exit_code == 0, done.stderr
    assert_ran_twice_counted_once(cluster, "ex-mute", "y\n")


def test_list_joins_batches_with_their_jobs(secret, cluster):
    kb("submit", "--backend", "kubernetes", "-n", "batch", "--batch-id", "ex-list", "--item", "1", "--", "true")
    kb("submit", "--batch-id", "ex-local", "--item", "1", "--", "true")
    listed = {row["id"]: row for row in json.loads(kb("-o", "json", "list").stdout)}
    assert listed["ex-list"]["detail"]["job_state"] == "ex-list: Complete"
    assert "job_state" not in listed["ex-local"]["detail"]
    table = kb("list").stdout.splitlines()
    assert table[0].split()[-1] == "JOB"
    cluster.store.delete("jobs", "batch", "ex-list")  # removed after ttlSecondsAfterFinished
    assert json.loads(kb("-o", "json", "list").stdout)[1]["detail"]["job_state"] == "ex-list: gone"


def test_resume_reruns_in_a_new_job_only_what_redis_is_missing(secret, cluster, client):
    kb(
        "submit",
        "--backend",
        "kubernetes",
        "-n",
        "batch",
        "-p",
        "2",
        "--batch-id",
        "ex-resume",
        "--item",
        '"a"',
        "--item",
        '"b"',
        "--",
        "echo",
        "{item}",
    )
    # Simulate a Redis that lost the last writes of index 1 after the Job completed.
    keys = {name: f"kiabatch:{{ex-resume}}:{name}" for name in ("final", "results", "outcomes", "progress", "meta")}
    client.srem(keys["final"], "1")
    client.hdel(keys["results"], "1:0")
    client.hdel(keys["outcomes"], "1:0")
    client.hincrby(keys["progress"], "done", -1)
    client.hset(keys["meta"], "state", "running")
    waited = kb("status", "--watch", "--interval", "0.2", "ex-resume")
    assert "run them again with: kiabatch resume ex-resume" in waited.stdout  # and it does not hang
    resumed = kb("resume", "ex-resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert sorted(resumed.stdout.splitlines()) == ["a\ta", "b\tb"]
    assert {j["metadata"]["name"] for j in jobs(cluster)} == {"ex-resume-r1"}  # the old Job was deleted
    new_pods = cluster.store.list("pods", "batch", "batch.kubernetes.io/job-name=ex-resume-r1", None)
    assert len(new_pods) == 2  # both indexes ran; index 0 found its outcome settled and exited at once
    assert Batch("ex-resume").status().progress.done == 2


def store_secret(cluster, name: str, **values: str) -> None:
    cluster.store.create("secrets", "batch", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                                              "type": "Opaque", "stringData": values})  # fmt: skip


def test_the_pods_reporter_uploads_results_with_credentials_from_a_secret_and_redis_keeps_references(
    secret, cluster, s3, s3_server, client
):
    from tests.helpers import S3_ACCESS_KEY, S3_SECRET_KEY

    store_secret(cluster, "store-creds", AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "-p", "2", "--batch-id", "thumbs",
              "--results-to", s3, "--results-secret", "store-creds", "--item", '"a"', "--item", '"b"', "--",
              "sh", "-c", 'head -c 300000 /dev/zero | tr "\\0" "$1" > "$2"', "sh", "{item}", "{output}")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    results = Batch("thumbs").results()
    # Pods claim in the order they start: which index holds which item is not fixed.
    assert sorted((r.item, r.read()) for r in results) == [("a", b"a" * 300_000), ("b", b"b" * 300_000)]
    assert all(r.url.startswith(f"{s3}/thumbs/") for r in results)
    logs = b"".join(cluster.store.logs.values()).decode("utf-8", "replace")
    assert S3_SECRET_KEY not in logs + done.stdout + done.stderr
    job = jobs(cluster)[0]
    assert S3_SECRET_KEY not in json.dumps(job) and S3_SECRET_KEY not in repr(client.hgetall("kiabatch:{thumbs}:meta"))


def test_a_store_refusing_the_pods_credentials_fails_the_items_with_its_reason_and_never_shows_them(
    secret, cluster, s3, s3_server
):
    store_secret(cluster, "bad-creds", AWS_ACCESS_KEY_ID="AKIAWRONGKEY", AWS_SECRET_ACCESS_KEY="WRONG-SECRET-VALUE")
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--retries", "0", "--batch-id", "denied",
              "--results-to", s3, "--inline-limit", "0", "--results-secret", "bad-creds", "--item", '"a"', "--",
              "echo", "{item}")  # fmt: skip
    assert done.exit_code == 1
    [failed] = Batch("denied").failed()
    assert "cannot store the result" in failed.reason
    logs = b"".join(cluster.store.logs.values()).decode("utf-8", "replace")
    assert "WRONG-SECRET-VALUE" not in logs + done.stdout + done.stderr + failed.reason


def test_a_missing_results_secret_is_refused_before_anything_is_written(secret, cluster, s3, client):
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--results-to", s3, "--results-secret", "nope",
              "--item", '"a"', "--", "echo", "{item}")  # fmt: skip
    error_line(done, 3, "Secret 'nope'", "results store's credentials")
    assert client.keys("kiabatch:{*") == [] and jobs(cluster) == []
