"""``kiabatch redis`` against the fake API server, with the Jobs' scripts run for real.

The emulator runs the backup, listing, restore and status Jobs exactly as
rendered (the ConfigMap mounted as files, PVCs as directories that outlive pods,
the password from the stored Secret); the Redis pods themselves are real
redis-server processes started with the ConfigMap's init.sh and start.sh
(tests/redis_pods.py), which the emulator's DNS stand-in points the Jobs at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from kiabatch.kube.objects import from_yaml
from kiabatch.kube.redis_manifests import redis_deployment_objects
from kiabatch.kube.redis_objects import RedisOptions, statefulset
from tests.helpers import error_line, free_port, kb, wait_for
from tests.redis_pods import PATH, Pod, needs_redis_tools

NS = "batch"
PLURALS = {"ConfigMap": "configmaps", "Service": "services", "StatefulSet": "statefulsets",
           "PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies",
           "PersistentVolumeClaim": "persistentvolumeclaims", "CronJob": "cronjobs"}  # fmt: skip


def stored(api, plural: str, name: str) -> dict:
    return api.store.get(plural, NS, name)


def password_of(api) -> str:
    return stored(api, "secrets", "kiabatch-redis-auth")["stringData"]["password"]


@pytest.fixture
def deployed(api):
    done = kb("redis", "deploy", "-n", NS)
    assert done.exit_code == 0, done.stderr
    return api


# -- render and deploy ----------------------------------------------------------------------


def test_render_prints_the_builders_objects_and_no_secret():
    done = kb("redis", "render", "-n", NS, "--replicas", "5", "--storage-class", "fast", "--backup-keep", "3")
    assert done.exit_code == 0, done.stderr
    options = RedisOptions(namespace=NS, replicas=5, storage_class="fast", backup_keep=3)
    assert from_yaml(done.stdout) == redis_deployment_objects(options)
    assert "kind: Secret" not in done.stdout
    assert "not rendered: Secret 'kiabatch-redis-auth'" in done.stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (["--replicas", "0"], "--replicas"),
    (["--storage-size", "lots"], "bad quantity 'lots'"),
    (["--pvc-when-deleted", "Keep"], "--pvc-when-deleted"),
    (["-n", "Not_A_Namespace"], "bad namespace"),
    (["--backup-schedule", "hourly"], "--backup-schedule"),
])  # fmt: skip
def test_render_refuses_bad_input_in_one_line(args, fragment):
    error_line(kb("redis", "render", *args), 2, fragment)


def test_deploy_generates_the_password_applies_every_object_and_prints_no_secret(api):
    done = kb("redis", "deploy", "-n", NS)
    assert done.exit_code == 0, done.stderr
    password = password_of(api)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", password)  # secrets.token_urlsafe(32)
    assert password not in done.stdout + done.stderr
    url = stored(api, "secrets", "kiabatch-redis")["stringData"]["url"]
    assert url == f"redis://:{password}@kiabatch-redis-primary:6379/0"  # what batch pods use
    assert "redis://:***@kiabatch-redis-primary:6379/0" in done.stderr
    for obj in redis_deployment_objects(RedisOptions(namespace=NS)):
        live = stored(api, PLURALS[obj["kind"]], obj["metadata"]["name"])
        assert {k: v for k, v in live.items() if k not in ("metadata", "status")} == {
            k: v for k, v in obj.items() if k != "metadata"
        }
        # created through server-side apply (a plain PATCH of a missing object is a 404)
        path_kind = PLURALS[obj["kind"]]
        assert any(m == "PATCH" and p.endswith(f"/{path_kind}/{obj['metadata']['name']}") for m, p in api.requests)
    again = kb("redis", "deploy", "-n", NS, "--replicas", "5")
    assert again.exit_code == 0, again.stderr
    assert password_of(api) == password  # never regenerated
    assert "kept the existing Secret 'kiabatch-redis-auth'" in again.stderr
    assert stored(api, "statefulsets", "kiabatch-redis")["spec"]["replicas"] == 5


def test_deploy_keeps_a_url_secret_the_user_made(api, monkeypatch):
    monkeypatch.setenv("KIABATCH_REDIS_URL", "redis://:mine@my-redis:6379/0")
    assert kb("secret", "create", "-n", NS).exit_code == 0
    done = kb("redis", "deploy", "-n", NS)
    assert done.exit_code == 0, done.stderr
    assert stored(api, "secrets", "kiabatch-redis")["stringData"]["url"] == "redis://:mine@my-redis:6379/0"
    assert "kept the existing Secret 'kiabatch-redis'" in done.stderr


def test_deploy_failures_are_one_line_with_exit_code_3(api):
    error_line(kb("redis", "deploy", "-n", "nowhere"), 3, "namespace 'nowhere' does not exist")
    api.deny[("PATCH", "statefulsets")] = (403, "Forbidden", 'statefulsets.apps "kiabatch-redis" is forbidden')
    error_line(kb("redis", "deploy", "-n", NS), 3, "StatefulSet 'kiabatch-redis'", "forbidden by RBAC")


# -- the Redis "pods": real servers started by the ConfigMap's scripts ---------------------------------


@pytest.fixture
def redis_pods(deployed, cluster, tmp_path, monkeypatch):
    """Start simulated StatefulSet pods on the deployed ConfigMap; register them with the fake API."""
    monkeypatch.setenv("PATH", f"{PATH}:{os.environ['PATH']}")  # Debian's Redis 7 tools for the Jobs
    config = tmp_path / "config"
    config.mkdir()
    for name, text in stored(deployed, "configmaps", "kiabatch-redis-config")["data"].items():
        (config / name).write_text(text)
    owner = stored(deployed, "statefulsets", "kiabatch-redis")
    pods: list[Pod] = []

    def start(ordinal: int, *, run: bool = True, data=None) -> Pod:
        pod = Pod(tmp_path / "pods", config, ordinal, password=password_of(deployed), data=data)
        ip = f"10.0.0.{10 + ordinal}"
        if run:
            primary = None if ordinal == 0 else pods[0].address
            assert pod.init(primary=primary).returncode == 0
            pod.start("--replica-announce-ip", ip)
        pods.append(pod)
        cluster.emulator.dns[f"kiabatch-redis-{ordinal}.kiabatch-redis:6379"] = (
            pod.address if run else f"127.0.0.1:{free_port()}"
        )
        if ordinal == 0:
            cluster.emulator.dns["kiabatch-redis-primary:6379"] = pod.address
        labels = owner["spec"]["template"]["metadata"]["labels"]
        cluster.store.create("pods", NS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "labels": {**labels, "statefulset.kubernetes.io/pod-name": pod.name},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                              "name": "kiabatch-redis", "uid": owner["metadata"]["uid"],
                                              "controller": True}]},
            "spec": owner["spec"]["template"]["spec"],
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if run else "False"}],
                       "containerStatuses": [{"name": "redis", "restartCount": 0 if run else 4}]},
        })  # fmt: skip
        cluster.store.create("persistentvolumeclaims", NS, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"data-{pod.name}", "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}}},
            "status": {"phase": "Bound", "capacity": {"storage": "8Gi"}},
        })  # fmt: skip
        return pod

    yield start
    for pod in pods:
        pod.stop()


def jobs(api) -> list[dict]:
    return api.store.list("jobs", NS, None, None)


# -- backups -----------------------------------------------------------------------------------


@needs_redis_tools
def test_backup_now_runs_the_cronjobs_template_and_stores_a_verified_snapshot(redis_pods, cluster):
    primary = redis_pods(0)
    client = primary.client()
    client.set("kiabatch:{b1}:meta:state", "running")
    client.rpush("kiabatch:{b1}:queue", *range(100))
    done = kb("redis", "backup", "--now", "-n", NS)
    assert done.exit_code == 0, (done.stdout, done.stderr)
    [snapshot] = re.findall(r"stored (kiabatch-redis-\d{8}T\d{6}Z\.rdb)", done.stdout)
    assert "verified" in done.stdout and "(2 keys)" in done.stdout
    [job] = jobs(cluster)
    cronjob = stored(cluster, "cronjobs", "kiabatch-redis-backup")
    assert job["metadata"]["name"].startswith("kiabatch-redis-backup-manual-")
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "CronJob",
        "name": "kiabatch-redis-backup", "uid": cronjob["metadata"]["uid"], "controller": True}]  # fmt: skip
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    assert job["spec"] == cronjob["spec"]["jobTemplate"]["spec"]
    volume = cluster.emulator.claim_dir(NS, "kiabatch-redis-backups")
    assert [p.name for p in volume.iterdir()] == [snapshot]
    check = subprocess.run(["/usr/bin/redis-check-rdb", str(volume / snapshot)], capture_output=True, text=True)
    assert check.returncode == 0 and "2 keys read" in check.stdout

    listed = kb("redis", "backups", "-n", NS)
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["NAME", "BYTES", "CREATED"]
    assert listed.stdout.splitlines()[1].split()[:2] == [snapshot, str((volume / snapshot).stat().st_size)]
    as_json = json.loads(kb("-o", "json", "redis", "backups", "-n", NS).stdout)
    assert [s["name"] for s in as_json] == [snapshot]
    assert as_json[0]["created"].startswith(f"{snapshot[15:19]}-{snapshot[19:21]}-{snapshot[21:23]}T")
    # the listing Jobs were removed once read; the backup Job stays, owned by the CronJob
    assert [j["metadata"]["name"] for j in jobs(cluster)] == [job["metadata"]["name"]]

    schedule = kb("redis", "backup", "-n", NS)
    assert schedule.exit_code == 0 and "17 3 * * *" in schedule.stdout and "Etc/UTC" in schedule.stdout


@needs_redis_tools
def test_a_failed_backup_is_one_line_with_exit_code_3(redis_pods, cluster):
    redis_pods(0, run=False)
    cluster.emulator.dns["kiabatch-redis-primary:6379"] = f"127.0.0.1:{free_port()}"
    done = kb("redis", "backup", "--now", "-n", NS)
    error_line(done, 3, "backup Job 'kiabatch-redis-backup-manual-", "cannot take a snapshot")
    assert list(cluster.emulator.claim_dir(NS, "kiabatch-redis-backups").iterdir()) == []


def test_backup_and_status_need_a_deployment(api):
    error_line(kb("redis", "backup", "--now", "-n", NS), 3, "no CronJob 'kiabatch-redis-backup'")
    error_line(kb("redis", "status", "-n", NS), 3, "no StatefulSet 'kiabatch-redis'", "kiabatch redis deploy")


# -- status -----------------------------------------------------------------------------------


@needs_redis_tools
def test_status_shows_role_offset_lag_memory_and_persistence_of_every_pod(redis_pods, cluster):
    primary = redis_pods(0)
    replica = redis_pods(1)
    redis_pods(2, run=False)  # pod 2 is down
    primary.client().set("k", "v" * 1000)
    wait_for(lambda: replica.client().get("k"))
    done = kb("-o", "json", "redis", "status", "-n", NS)
    error_line(done, 3, "could not read INFO of kiabatch-redis-2")
    report = json.loads(done.stdout)
    assert report["source"] == "probe"
    first, second, third = report["pods"]
    assert first["role"] == "primary" and first["connected_replicas"] == 1 and first["offset"] > 0
    assert first["persistence"] == "aof ok" and first["used_memory"] and first["maxmemory"]
    assert first["volume"] == "Bound 8Gi" and first["ready"] is True and first["ip"] == "10.0.0.10"
    assert second["role"] == "replica" and second["link"] == "up"
    assert second["offset"] > 0 and 0 <= second["lag_bytes"] <= first["offset"]
    assert second["lag_seconds"] is not None  # from the primary's view of 10.0.0.11
    assert second["persistence"] == "aof ok"
    assert third["role"] is None and "Could not connect" in third["error"]
    assert third["ready"] is False and third["restarts"] == 4
    assert jobs(cluster) == []  # the probe Job was removed once read

    table = kb("redis", "status", "-n", NS)
    lines = table.stdout.splitlines()
    assert lines[0].startswith("StatefulSet kiabatch-redis in batch:")
    assert lines[1].split()[:3] == ["POD", "STATUS", "ROLE"]
    assert lines[2].startswith("kiabatch-redis-0") and "primary, 1 replicas" in lines[2] and "aof ok" in lines[2]
    assert "replica, link up" in lines[3]
    assert "INFO failed" in lines[4]


@needs_redis_tools
def test_status_exits_0_when_every_pod_answers(redis_pods):
    primary = redis_pods(0)
    replica = redis_pods(1)
    primary.client().set("k", "v")
    wait_for(lambda: replica.client().get("k"))
    kb("redis", "deploy", "-n", NS, "--replicas", "2")
    done = kb("redis", "status", "-n", NS)
    assert done.exit_code == 0, (done.stdout, done.stderr)
    assert len(done.stdout.splitlines()) == 4


@needs_redis_tools
def test_status_without_the_probe_reads_the_primary_through_redis_url(redis_pods, cluster):
    primary = redis_pods(0)
    replica = redis_pods(1)
    primary.client().set("k", "v")
    wait_for(lambda: replica.client().get("k"))
    wait_for(lambda: primary.client().info("replication")["slave0"]["offset"] > 0)  # the replica's next ACK
    url = f"redis://:{primary.password}@127.0.0.1:{primary.port}/0"
    done = kb("--redis-url", url, "-o", "json", "redis", "status", "--no-probe", "-n", NS)
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["source"] == "redis-url"
    first, second, third = report["pods"]
    assert first["role"] == "primary" and first["persistence"] == "aof ok"
    assert second["role"] == "replica" and second["link"] == "online" and second["offset"] > 0  # primary's view
    assert third["phase"] == "missing" and third["role"] is None  # pod 2 of the 3 desired does not exist
    assert primary.password not in done.stdout + done.stderr
    assert jobs(cluster) == []  # no Job with --no-probe


@needs_redis_tools
def test_status_warns_when_the_primary_is_past_half_its_maxmemory(redis_pods, cluster):
    primary = redis_pods(0)
    redis_pods(1, run=False)
    client = primary.client()
    client.set("big", "x" * 2_000_000)
    url = f"redis://:{primary.password}@127.0.0.1:{primary.port}/0"
    quiet = kb("--redis-url", url, "redis", "status", "--no-probe", "-n", NS)
    assert "warning" not in quiet.stderr
    client.config_set("maxmemory", 5_000_000)  # the 2 MB value and Redis's own ~1 MB: over half of it
    done = kb("--redis-url", url, "redis", "status", "--no-probe", "-n", NS)
    [warning] = [line for line in done.stderr.splitlines() if "warning" in line]
    assert "kiabatch-redis-0 uses " in warning and "% of its maxmemory" in warning and "--results-to" in warning


# -- restore ------------------------------------------------------------------------------------


def test_restore_needs_a_snapshot_name_and_confirmation(api):
    error_line(kb("redis", "restore", "../../etc/passwd", "-n", NS, "--yes"), 2, "bad snapshot name")
    error_line(kb("redis", "restore", "kiabatch-redis-20260314T031700Z.rdb", "-n", NS), 2, "--yes")
    assert api.requests == []  # refused before the cluster was asked anything


@needs_redis_tools
def test_restore_loads_the_snapshot_into_a_fresh_statefulset(redis_pods, cluster):
    data0 = cluster.emulator.claim_dir(NS, "data-kiabatch-redis-0")
    primary = redis_pods(0, data=data0)
    replica = redis_pods(1)
    primary.client().set("in-the-snapshot", "1")
    assert kb("redis", "backup", "--now", "-n", NS).exit_code == 0
    primary.client().set("written-after-the-snapshot", "2")
    before = stored(cluster, "statefulsets", "kiabatch-redis")
    primary.stop()  # the pods end when the StatefulSet is deleted
    replica.stop()
    cluster.store.delete("persistentvolumeclaims", NS, "data-kiabatch-redis-0")  # pod 0's claim is gone, too
    cluster.requests.clear()

    done = kb("redis", "restore", "latest", "-n", NS, "--yes")
    assert done.exit_code == 0, (done.stdout, done.stderr)
    assert re.search(r"restored kiabatch-redis-\d{8}T\d{6}Z\.rdb into .* \(1 keys\)", done.stdout)
    after = stored(cluster, "statefulsets", "kiabatch-redis")
    assert after["spec"] == before["spec"] and after["metadata"]["uid"] != before["metadata"]["uid"]
    assert cluster.store.list("pods", NS, "app.kubernetes.io/component=redis", None) == []
    claim = stored(cluster, "persistentvolumeclaims", "data-kiabatch-redis-0")
    assert claim["spec"] == statefulset(RedisOptions())["spec"]["volumeClaimTemplates"][0]["spec"]
    steps = [(m, p.split("/")[-1]) for m, p in cluster.requests
             if m in ("DELETE", "POST") or (m == "PATCH" and "statefulsets" in p)]  # fmt: skip
    last_job = len(steps) - 1 - steps[::-1].index(("POST", "jobs"))  # the restore Job (after the listing)
    assert steps.index(("DELETE", "kiabatch-redis")) < last_job < steps.index(("PATCH", "kiabatch-redis"))
    assert ("POST", "persistentvolumeclaims") in steps[:last_job]
    assert not [j for j in jobs(cluster) if "restore" in j["metadata"]["name"]]  # removed after success
    assert [p.name for p in data0.iterdir() if p.name.startswith("pre-restore-")]
    restarted = Pod(primary.run.parent.parent / "again", primary.config, 0, password=primary.password, data=data0)
    assert restarted.init().returncode == 0
    restarted.start()
    try:
        assert restarted.client().get("in-the-snapshot") == b"1"
        assert restarted.client().get("written-after-the-snapshot") is None
    finally:
        restarted.stop()


@needs_redis_tools
def test_restoring_a_corrupted_snapshot_changes_nothing_and_exits_3(redis_pods, cluster):
    data0 = cluster.emulator.claim_dir(NS, "data-kiabatch-redis-0")
    primary = redis_pods(0, data=data0)
    primary.client().set("in-the-snapshot", "1")
    backup = kb("redis", "backup", "--now", "-n", NS)
    [snapshot] = re.findall(r"stored (kiabatch-redis-\S+\.rdb)", backup.stdout)
    primary.client().set("written-after-the-snapshot", "2")
    primary.stop()
    path = cluster.emulator.claim_dir(NS, "kiabatch-redis-backups") / snapshot
    path.write_bytes(path.read_bytes()[:-10])
    done = kb("redis", "restore", snapshot, "-n", NS, "--yes")
    error_line(done, 3, "restore Job", "failed verification", "back with its previous data")
    assert stored(cluster, "statefulsets", "kiabatch-redis")["spec"]["replicas"] == 3  # recreated
    again = Pod(primary.run.parent.parent / "again", primary.config, 0, password=primary.password, data=data0)
    assert again.init().returncode == 0
    again.start()
    try:
        assert again.client().get("written-after-the-snapshot") == b"2"
    finally:
        again.stop()


def test_a_restore_that_cannot_proceed_puts_the_statefulset_back(deployed):
    owner = stored(deployed, "statefulsets", "kiabatch-redis")
    labels = owner["spec"]["template"]["metadata"]["labels"]
    deployed.store.create("pods", NS, {"apiVersion": "v1", "kind": "Pod",  # a pod that never ends
                                       "metadata": {"name": "kiabatch-redis-0", "labels": labels},
                                       "spec": owner["spec"]["template"]["spec"]})  # fmt: skip
    done = kb("redis", "restore", "kiabatch-redis-20260314T031700Z.rdb", "-n", NS, "--yes", "--timeout", "2s")
    error_line(done, 3, "timed out after 2s waiting for the Redis pods to end", "created again")
    again = stored(deployed, "statefulsets", "kiabatch-redis")
    assert again["spec"] == owner["spec"] and again["metadata"]["uid"] != owner["metadata"]["uid"]
    assert jobs(deployed) == []  # no restore Job was started


def test_deploy_wait_ends_when_every_pod_is_ready_or_fails_after_the_timeout(deployed):
    def ready(count):
        deployed.store.update("statefulsets", NS, "kiabatch-redis", lambda o: o["status"].update(readyReplicas=count))

    ready(1)
    slow = kb("redis", "deploy", "-n", NS, "--wait", "--timeout", "1s")
    error_line(slow, 3, "only 1/3 pods of kiabatch-redis ready after 1s")
    ready(3)
    done = kb("redis", "deploy", "-n", NS, "--wait")
    assert done.exit_code == 0, done.stderr
    assert "3/3 pods ready" in done.stderr
