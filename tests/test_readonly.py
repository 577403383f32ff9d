"""``status --read-only`` and ``results --read-only`` read a replica and never write.

The primary and its replica are real redis-server 7 processes started by the
Redis-on-Kubernetes scripts (tests/redis_pods.py), replicating over 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest
import redis

from kiabatch.readonly import WriteRefusedError, read_only_client, replica_url
from tests.helpers import kb, wait_for
from tests.redis_pods import Pod, extract_config, needs_redis_tools


@pytest.mark.parametrize(
    ("redis_url", "explicit", "expected"),
    [
        ("redis://:pw@kiabatch-redis-primary:6379/0", None, "redis://:pw@kiabatch-redis-replicas:6379/0"),
        ("redis://:pw@kiabatch-redis-primary.batch.svc.cluster.local:6379/2", None,
         "redis://:pw@kiabatch-redis-replicas.batch.svc.cluster.local:6379/2"),
        ("rediss://kiabatch-redis-primary", None, "rediss://kiabatch-redis-replicas"),
        ("redis://:kiabatch-redis-primary@my-redis:6379/0", None, "redis://:kiabatch-redis-primary@my-redis:6379/0"),
        ("redis://my-redis:6379/0", None, "redis://my-redis:6379/0"),
        ("redis://kiabatch-redis-primary-old:6379/0", None, "redis://kiabatch-redis-primary-old:6379/0"),
        ("redis://kiabatch-redis-primary:6379/0", "redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0"),
        (None, None, None),
    ],
)  # fmt: skip
def test_where_read_only_commands_read(redis_url, explicit, expected):
    assert replica_url(redis_url, explicit) == expected


def test_the_read_only_client_refuses_writes_before_sending_them(redis_server, client):
    guarded = read_only_client(redis_server.url)
    client.set("present", "1")
    client.hset("h", "f", "v")
    assert guarded.get("present") == b"1"
    with guarded.pipeline(transaction=True) as pipe:
        pipe.get("present")
        pipe.hgetall("h")
        assert pipe.execute() == [b"1", {b"f": b"v"}]
    with pytest.raises(WriteRefusedError, match="refusing SET"):
        guarded.set("written", "1")
    with pytest.raises(WriteRefusedError, match="refusing ZREM"):
        guarded.zrem("kiabatch:batches", "x")
    with pytest.raises(WriteRefusedError, match="refusing EVAL"):
        guarded.eval("return 1", 0)
    with pytest.raises(WriteRefusedError, match="refusing HSET"), guarded.pipeline() as pipe:
        pipe.get("present")
        pipe.hset("h", "f", "changed")
    assert client.get("written") is None and client.hget("h", "f") == b"v"


@pytest.fixture
def replicated(tmp_path, home, monkeypatch):
    """A primary and its replica (pods 0 and 1), and their URLs."""
    config = extract_config(tmp_path / "config")
    primary = Pod(tmp_path / "pods", config, 0)
    assert primary.init().returncode == 0
    primary.start()
    replica = Pod(tmp_path / "pods", config, 1)
    assert replica.init(primary=primary.address).returncode == 0
    replica.start()
    urls = {pod: f"redis://:{pod.password}@127.0.0.1:{pod.port}/0" for pod in (primary, replica)}
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.delenv("KIABATCH_REDIS_REPLICA_URL", raising=False)
    yield primary, replica, urls[primary], urls[replica]
    replica.stop()
    primary.stop()


@needs_redis_tools
def test_status_and_results_read_the_replica_while_the_primary_is_down(replicated):
    primary, replica, primary_url, replica_url_ = replicated
    done = kb("--redis-url", primary_url, "submit", "--batch-id", "ro-1", "--item", '"a"', "--item", '"b"',
              "--", "echo", "{item}")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    wait_for(lambda: replica.client().hget("kiabatch:{ro-1}:progress", "done") == b"2")
    primary.stop()  # being repaired
    down = kb("--redis-url", primary_url, "status", "ro-1")
    assert down.exit_code == 3 and "cannot reach Redis" in down.stderr
    status = kb("--redis-url", primary_url, "-o", "json", "status", "ro-1", "--read-only",
                "--replica-url", replica_url_)  # fmt: skip
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["progress"]["done"] == 2
    results = kb("--redis-url", primary_url, "results", "ro-1", "--read-only", "--replica-url", replica_url_)
    assert results.exit_code == 0, results.stderr
    assert results.stdout.splitlines() == ["a\ta", "b\tb"]
    listing = kb("--redis-url", primary_url, "status", "--read-only", "--replica-url", replica_url_)
    assert listing.exit_code == 0 and listing.stdout.strip() == "no unfinished batches"
    assert replica.password not in status.stdout + status.stderr + results.stderr


@needs_redis_tools
def test_the_replica_url_can_come_from_the_environment(replicated, monkeypatch):
    primary, replica, primary_url, replica_url_ = replicated
    assert kb("--redis-url", primary_url, "submit", "--batch-id", "ro-2", "--item", "1", "--", "true").exit_code == 0
    wait_for(lambda: replica.client().hget("kiabatch:{ro-2}:progress", "done") == b"1")
    monkeypatch.setenv("KIABATCH_REDIS_REPLICA_URL", replica_url_)
    primary.stop()
    done = kb("--redis-url", primary_url, "status", "ro-2", "--read-only")
    assert done.exit_code == 0, done.stderr
    assert "1/1 done" in done.stdout


@needs_redis_tools
def test_read_only_listing_leaves_expired_ids_to_a_writable_client(replicated):
    primary, replica, primary_url, replica_url_ = replicated
    primary.client().zadd("kiabatch:batches", {"gone-1": 1.0})  # its keys expired
    wait_for(lambda: replica.client().zscore("kiabatch:batches", "gone-1") is not None)
    listing = kb("--redis-url", primary_url, "status", "--read-only", "--replica-url", replica_url_)
    assert listing.exit_code == 0, listing.stderr
    assert primary.client().zscore("kiabatch:batches", "gone-1") == 1.0
    assert kb("--redis-url", primary_url, "status").exit_code == 0
    assert primary.client().zscore("kiabatch:batches", "gone-1") is None  # a writable status prunes it
    with pytest.raises(redis.ReadOnlyError):
        replica.client().zadd("kiabatch:batches", {"x": 1})  # and the replica refuses writes anyway


def test_read_only_names_the_replicas_service_it_tried(home):
    done = kb("--redis-url", "redis://:pw@kiabatch-redis-primary.invalid:6379/0", "status", "x-1", "--read-only")
    assert done.exit_code == 3
    [line] = done.stderr.splitlines()
    assert line.startswith("kiabatch: error: cannot reach Redis at redis://:***@kiabatch-redis-replicas.invalid:6379/0")
