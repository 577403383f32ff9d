"""The ConfigMap's scripts, run for real against Debian's redis-server 7 on 127.0.0.1.

Pod identity is simulated through HOSTNAME, the volumes are temporary
directories, and the primary's address is overridden (no cluster DNS here):
see tests/redis_pods.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import pytest
import redis

from kiabatch.kube.redis_objects import RedisOptions, config_map
from kiabatch.kube.redis_status import parse_probe_log
from tests.helpers import free_port, wait_for
from tests.redis_pods import PASSWORD, Pod, cmdline, extract_config, needs_redis_tools, run_script

pytestmark = needs_redis_tools

SNAPSHOT = re.compile(r"^kiabatch-redis-[0-9]{8}T[0-9]{6}Z\.rdb$")


@pytest.fixture
def config(tmp_path):
    return extract_config(tmp_path / "config")


@pytest.fixture
def pods(tmp_path, config):
    started: list[Pod] = []

    def make(ordinal: int, **kwargs) -> Pod:
        pod = Pod(tmp_path / "pods", config, ordinal, **kwargs)
        started.append(pod)
        return pod

    yield make
    for pod in started:
        pod.stop()


def primary(pods) -> Pod:
    pod = pods(0)
    done = pod.init()
    assert done.returncode == 0, done.stderr
    return pod.start()


def fill(client: redis.Redis) -> dict[bytes, bytes]:
    """Keys of every type kiabatch uses (and more), with binary values; returns DUMP payloads."""
    client.set("kiabatch:{b1}:meta:bin", bytes(range(256)))
    client.hset("kiabatch:{b1}:meta", mapping={"state": "running", "tasks": "3"})
    client.rpush("kiabatch:{b1}:queue", *[f'{{"n": {i}}}' for i in range(500)])
    client.sadd("kiabatch:{b1}:final", 0, 1, 2)
    client.zadd("kiabatch:batches", {"b1": 1.5, "b2": 2.5})
    client.xadd("kiabatch:stream", {"k": "v"})
    client.set("kiabatch:expiring", "x", ex=86400)
    client.execute_command("SELECT", 0)
    return {key: client.dump(key) for key in client.keys("*")}


# -- init.sh: roles -------------------------------------------------------------------------


def test_pod_0_writes_a_primary_config_without_waiting(pods):
    pod = pods(0)
    done = pod.init(KIABATCH_REDIS_PRIMARY_ADDRESS="127.0.0.1:1")  # never asked: pod 0 waits for nobody
    assert done.returncode == 0, done.stderr
    role = (pod.run / "role.conf").read_text()
    assert "replicaof" not in role and "primary" in role
    assert done.stdout.strip() == "kiabatch-redis-init: pod kiabatch-redis-0 is the primary"


def test_pod_1_replicates_pod_0_and_a_key_written_to_pod_0_appears_on_pod_1(pods):
    first = primary(pods)
    second = pods(1)
    done = second.init(primary=first.address)
    assert done.returncode == 0, done.stderr
    role = (second.run / "role.conf").read_text()
    assert f"replicaof 127.0.0.1 {first.port}" in role
    assert PASSWORD not in role  # the password never touches a file
    assert "pod kiabatch-redis-1 replicates the primary" in done.stdout
    second.start()
    first.client().set("written-to-pod-0", "hello")
    assert wait_for(lambda: second.client().get("written-to-pod-0")) == b"hello"
    info = second.client().info("replication")
    assert info["role"] == "slave" and info["master_link_status"] == "up"
    with pytest.raises(redis.ReadOnlyError):  # replicas serve reads only
        second.client().set("x", "y")
    # AOF with fsync every second, from the ConfigMap's redis.conf
    persistence = second.client().config_get("append*")
    assert persistence["appendonly"] == "yes" and persistence["appendfsync"] == "everysec"
    # The password is on no command line, and required by both servers.
    for pod in (first, second):
        assert PASSWORD not in cmdline(pod.process.pid)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=pod.port, password="wrong").ping()


def test_scaling_up_adds_a_replica_with_no_other_change(pods):
    first = primary(pods)
    first.client().set("before", "1")
    replicas = []
    for ordinal in (1, 2):
        pod = pods(ordinal)
        assert pod.init(primary=first.address).returncode == 0
        replicas.append(pod.start())
    assert wait_for(lambda: first.client().info("replication")["connected_slaves"] == 2)
    for pod in replicas:
        assert wait_for(lambda pod=pod: pod.client().get("before")) == b"1"


def test_a_replica_retries_with_one_line_per_try_then_fails_clearly_when_pod_0_is_down(pods):
    dead = free_port()  # nothing listens there: pod 0 is down
    second = pods(1)
    started = time.monotonic()
    done = second.init(primary=f"127.0.0.1:{dead}", KIABATCH_REDIS_WAIT_TRIES="3", KIABATCH_REDIS_WAIT_SECONDS="1")
    assert done.returncode == 1
    assert time.monotonic() - started >= 2  # it waited between tries
    tries = done.stdout.splitlines()
    assert len(tries) == 2
    for number, line in enumerate(tries, 1):
        assert line.startswith(f"kiabatch-redis-init: try {number}/3: primary 127.0.0.1:{dead} does not answer PING")
        assert line.endswith("retrying in 1s")
    [error] = done.stderr.splitlines()
    assert error.startswith(f"kiabatch-redis-init: error: primary 127.0.0.1:{dead} does not answer PING")
    assert "after 3 tries; giving up" in error and "kiabatch-redis-0" in error
    assert not (second.run / "role.conf").exists()


def test_an_unresolvable_primary_is_reported_as_not_resolving(pods):
    second = pods(1)
    done = second.init(primary="kiabatch-redis-0.nowhere.invalid:6379", KIABATCH_REDIS_WAIT_TRIES="2",
                       KIABATCH_REDIS_WAIT_SECONDS="1")  # fmt: skip
    assert done.returncode == 1
    assert "try 1/2: primary kiabatch-redis-0.nowhere.invalid:6379 does not resolve yet" in done.stdout
    assert "does not resolve yet after 2 tries; giving up" in done.stderr


def test_without_an_override_the_primary_is_pod_0s_stable_dns_name(pods):
    second = pods(1)
    done = second.init(KIABATCH_REDIS_WAIT_TRIES="1", KIABATCH_REDIS_NAMESPACE="batch",
                       KIABATCH_REDIS_CLUSTER_DOMAIN="cluster.example")  # fmt: skip
    assert done.returncode == 1
    assert "primary kiabatch-redis-0.kiabatch-redis.batch.svc.cluster.example:6379" in done.stderr


def test_a_replica_waits_until_pod_0_answers(pods):
    first = pods(0)
    assert first.init().returncode == 0
    second = pods(1)
    result = {}
    waiting = threading.Thread(target=lambda: result.update(done=second.init(
        primary=first.address, KIABATCH_REDIS_WAIT_TRIES="30", KIABATCH_REDIS_WAIT_SECONDS="1")))  # fmt: skip
    waiting.start()
    time.sleep(2.5)
    first.start()
    waiting.join(timeout=60)
    done = result["done"]
    assert done.returncode == 0, done.stderr
    assert "try 1/30" in done.stdout and "replicates the primary" in done.stdout
    assert f"replicaof 127.0.0.1 {first.port}" in (second.run / "role.conf").read_text()


def test_a_primary_answering_a_different_password_is_not_accepted(pods):
    first = primary(pods)
    second = pods(1, password="another-password")
    done = second.init(primary=first.address, KIABATCH_REDIS_WAIT_TRIES="1")
    assert done.returncode == 1
    assert "does not answer PING with the password" in done.stderr
    assert "another-password" not in done.stdout + done.stderr


def test_a_pod_name_without_an_ordinal_is_refused(pods, config, tmp_path):
    done = run_script(config, "init.sh", HOSTNAME="redis", KIABATCH_REDIS_RUN=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "kiabatch-redis-init: error: cannot read a StatefulSet ordinal from the pod name 'redis'"
    )


# -- start.sh and the probes ------------------------------------------------------------------


def test_start_needs_the_role_and_refuses_a_password_that_could_inject_configuration(config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    missing = run_script(config, "start.sh", KIABATCH_REDIS_RUN=str(run), REDIS_PASSWORD=PASSWORD)
    assert missing.returncode == 1 and "the init container (init.sh) did not run" in missing.stderr
    (run / "role.conf").write_text("# role: primary\n")
    hostile = run_script(config, "start.sh", KIABATCH_REDIS_RUN=str(run), REDIS_PASSWORD="x\nreplicaof evil 6379")
    assert hostile.returncode == 1
    assert hostile.stderr.strip() == (
        "kiabatch-redis-start: error: the password may only contain letters, digits and . _ ~ + / = -"
    )
    empty = run_script(config, "start.sh", KIABATCH_REDIS_RUN=str(run), REDIS_PASSWORD="")
    assert empty.returncode == 1 and "REDIS_PASSWORD" in empty.stderr


def test_the_probes_follow_the_server(pods, config):
    pod = primary(pods)
    probe = {"KIABATCH_REDIS_PORT": str(pod.port), "REDISCLI_AUTH": PASSWORD}
    assert run_script(config, "probe.sh", "ready", **probe).returncode == 0
    assert run_script(config, "probe.sh", "live", **probe).returncode == 0
    wrong = run_script(config, "probe.sh", "ready", **{**probe, "REDISCLI_AUTH": "wrong"})
    assert wrong.returncode == 1 and "kiabatch-redis-probe: ready:" in wrong.stderr
    pod.stop()
    down = run_script(config, "probe.sh", "live", **probe)
    assert down.returncode == 1 and "Could not connect" in down.stderr


def test_the_config_map_sets_no_password():
    settings = [line.split()[0] for line in config_map(RedisOptions())["data"]["redis.conf"].splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    assert "requirepass" not in settings and "masterauth" not in settings and "dir" not in settings
    assert {"appendonly", "appendfsync", "maxmemory-policy", "replica-read-only"} <= set(settings)


# -- backup.sh and restore.sh -------------------------------------------------------------------


def backup_env(pod: Pod, backups, keep: int = 7) -> dict[str, str]:
    return {"KIABATCH_REDIS_PRIMARY_ADDRESS": pod.address, "REDISCLI_AUTH": PASSWORD,
            "KIABATCH_BACKUP_DIR": str(backups), "KIABATCH_BACKUP_KEEP": str(keep)}  # fmt: skip


def take(config, pod, backups, keep=7):
    done = run_script(config, "backup.sh", "take", **backup_env(pod, backups, keep))
    assert done.returncode == 0, done.stderr
    [snapshot] = [line.split()[2] for line in done.stdout.splitlines() if " stored " in line]
    return snapshot, done


def test_a_backup_is_verified_and_restored_into_a_fresh_server_holds_every_key(pods, config, tmp_path):
    source = primary(pods)
    dumps = fill(source.client())
    backups = tmp_path / "backups"
    backups.mkdir()
    snapshot, done = take(config, source, backups)
    assert SNAPSHOT.match(snapshot)
    assert "verified .partial-" in done.stdout and f"({len(dumps)} keys)" in done.stdout
    assert sorted(p.name for p in backups.iterdir()) == [snapshot]  # no partial file left behind
    check = subprocess.run(["/usr/bin/redis-check-rdb", str(backups / snapshot)], capture_output=True, text=True)
    assert check.returncode == 0 and "RDB looks OK" in check.stdout
    # Restore into a fresh pod 0 (an empty data volume), started the way the StatefulSet starts it.
    fresh = Pod(tmp_path / "fresh", config, 0)
    run = tmp_path / "restore-run"
    run.mkdir()
    restored = run_script(config, "restore.sh", snapshot, KIABATCH_BACKUP_DIR=str(backups),
                          KIABATCH_REDIS_DATA=str(fresh.data), KIABATCH_REDIS_RUN=str(run))  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert f"restored {snapshot} into {fresh.data} ({len(dumps)} keys)" in restored.stdout
    assert (fresh.data / "appendonlydir").is_dir() and not (fresh.data / ".kiabatch-restore").exists()
    assert fresh.init().returncode == 0
    fresh.start()
    try:
        client = fresh.client()
        assert {key: client.dump(key) for key in client.keys("*")} == dumps
        assert 0 < client.ttl("kiabatch:expiring") <= 86400
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        fresh.stop()


def test_restore_replaces_the_data_and_keeps_the_old_files_aside(pods, config, tmp_path):
    pod = primary(pods)
    pod.client().set("in-the-snapshot", "1")
    backups = tmp_path / "backups"
    backups.mkdir()
    snapshot, _ = take(config, pod, backups)
    pod.client().set("written-after-the-snapshot", "2")
    pod.stop()  # the StatefulSet is down while restore runs
    old = sorted(p.name for p in (pod.data / "appendonlydir").iterdir())
    run = tmp_path / "restore-run"
    run.mkdir()
    done = run_script(config, "restore.sh", snapshot, KIABATCH_BACKUP_DIR=str(backups),
                      KIABATCH_REDIS_DATA=str(pod.data), KIABATCH_REDIS_RUN=str(run))  # fmt: skip
    assert done.returncode == 0, done.stderr
    [aside] = [p for p in pod.data.iterdir() if p.name.startswith("pre-restore-")]
    assert sorted(p.name for p in (aside / "appendonlydir").iterdir()) == old
    pod.start()
    assert pod.client().get("in-the-snapshot") == b"1"
    assert pod.client().get("written-after-the-snapshot") is None


def test_backups_keep_only_the_newest_n(pods, config, tmp_path):
    pod = primary(pods)
    pod.client().set("k", "v")
    backups = tmp_path / "backups"
    backups.mkdir()
    first, _ = take(config, pod, backups)
    older = [f"kiabatch-redis-2020010{day}T000000Z.rdb" for day in (1, 2, 3)]
    for name in older:
        shutil.copy(backups / first, backups / name)
    time.sleep(1.1)  # snapshot names have one-second resolution
    newest, done = take(config, pod, backups, keep=2)
    assert sorted(p.name for p in backups.iterdir()) == sorted([first, newest])
    for name in older:
        assert f"removed {name} (keeping the newest 2)" in done.stdout
    listing = run_script(config, "backup.sh", "list", KIABATCH_BACKUP_DIR=str(backups))
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    assert [name for name, _ in rows] == [first, newest]  # oldest first
    assert all(int(size) == (backups / name).stat().st_size for name, size in rows)


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_a_corrupted_snapshot_is_rejected_by_verification_and_never_restored(pods, config, tmp_path, damage):
    pod = primary(pods)
    fill(pod.client())
    backups = tmp_path / "backups"
    backups.mkdir()
    snapshot, _ = take(config, pod, backups)
    data = bytearray((backups / snapshot).read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x40
    (backups / snapshot).write_bytes(bytes(data))
    verify = run_script(config, "backup.sh", "verify", str(backups / snapshot))
    assert verify.returncode == 1
    assert f"kiabatch-redis-backup: error: {snapshot} is corrupt: redis-check-rdb rejected it" in verify.stderr
    # restore.sh verifies first and leaves the data volume alone.
    pod.stop()
    before = {p.relative_to(pod.data): p.read_bytes() for p in pod.data.rglob("*") if p.is_file()}
    run = tmp_path / "restore-run"
    run.mkdir()
    done = run_script(config, "restore.sh", snapshot, KIABATCH_BACKUP_DIR=str(backups),
                      KIABATCH_REDIS_DATA=str(pod.data), KIABATCH_REDIS_RUN=str(run))  # fmt: skip
    assert done.returncode == 1
    assert "failed verification; the data volume is unchanged" in done.stderr
    assert {p.relative_to(pod.data): p.read_bytes() for p in pod.data.rglob("*") if p.is_file()} == before


def test_a_backup_of_an_unreachable_primary_fails_clearly_and_leaves_nothing(config, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    dead = free_port()
    done = run_script(config, "backup.sh", "take", KIABATCH_REDIS_PRIMARY_ADDRESS=f"127.0.0.1:{dead}",
                      REDISCLI_AUTH=PASSWORD, KIABATCH_BACKUP_DIR=str(backups))  # fmt: skip
    assert done.returncode == 1
    assert f"kiabatch-redis-backup: error: cannot take a snapshot from 127.0.0.1:{dead}" in done.stderr
    assert list(backups.iterdir()) == []


@pytest.mark.parametrize("name", ["../etc/passwd", "dump.rdb", "kiabatch-redis-1.rdb; rm -rf /"])
def test_restore_takes_only_snapshot_names(config, tmp_path, name):
    done = run_script(config, "restore.sh", name, KIABATCH_BACKUP_DIR=str(tmp_path), KIABATCH_REDIS_DATA=str(tmp_path))
    assert done.returncode == 1 and "is not a snapshot name" in done.stderr


# -- info.sh (kiabatch redis status) -----------------------------------------------------------


def test_the_status_probe_reports_every_pod_and_says_which_cannot_be_read(pods, config):
    first = primary(pods)
    second = pods(1)
    assert second.init(primary=first.address).returncode == 0
    second.start()
    first.client().set("k", "v")
    wait_for(lambda: second.client().get("k"))
    dead = free_port()
    done = run_script(config, "info.sh", REDISCLI_AUTH=PASSWORD,
                      KIABATCH_REDIS_PODS=f"{first.address} {second.address} 127.0.0.1:{dead}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = parse_probe_log(done.stdout)
    assert found[0]["role"] == "master" and found[0]["connected_slaves"] == "1"
    assert found[1]["role"] == "slave" and found[1]["master_link_status"] == "up"
    assert "used_memory_human" in found[1] and "aof_enabled" in found[1]
    assert isinstance(found[2], str) and "Could not connect" in found[2]
