"""Redis never fills up silently: an embedded Redis with a tiny maxmemory, results that exceed it."""

from __future__ import annotations

import os
import subprocess

import pytest
import redis

from kiabatch import Batch, submit
from kiabatch.connection import connect
from tests.helpers import kb, one_line_error, run_cli

ITEMS = 30
#: Each result is 200 KB: 30 of them are twice the 3 MiB Redis below may hold.
WORKER = ["sh", "-c", 'head -c 200000 /dev/zero | tr "\\0" "$1"', "sh", "{item}"]


@pytest.fixture
def tiny_embedded(home, monkeypatch):
    """The embedded Redis, started with a 3 MiB maxmemory."""
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.setenv("KIABATCH_EMBEDDED_MAXMEMORY", "3MiB")
    monkeypatch.setenv("KIABATCH_REDIS_RETRY_SECONDS", "5")
    client = connect()
    yield client
    client.close()
    kb("server", "stop", "--force")


def letters(count: int) -> list[str]:
    return [chr(ord("a") + i % 26) + str(i) for i in range(count)]


def test_results_that_overflow_redis_fail_with_a_clear_reason_lose_nothing_and_results_to_completes_them(
    tiny_embedded, s3, s3_server
):
    assert tiny_embedded.config_get("maxmemory")["maxmemory"] == str(3 * 1024 * 1024)
    assert tiny_embedded.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    items = letters(ITEMS)
    first = kb("submit", "--batch-id", "full", "--retries", "1", "--lines", "-", "--", *WORKER, input="\n".join(items))
    assert first.exit_code == 1, first.stderr
    assert "Redis is full (used " in first.stderr and "use --results-to" in first.stderr
    batch = Batch("full")
    failed = batch.failed()
    assert failed and all(f.reason.startswith("Redis is full (used ") and " of 3.0 MiB" in f.reason for f in failed)
    assert all(f.attempts == 2 for f in failed)  # retried by the usual rules first
    done = {r.item for r in batch.results()}
    assert done and len(done) + len(failed) == ITEMS and not done & {f.item for f in failed}
    shown = kb("status", "full").stdout
    assert "redis full" in shown and "Redis is full (used" in shown and "redis memory" in shown
    assert "warning" in shown and "over half full" in shown
    # The same batch, now with a results store: the items that had no room run again, their results go there.
    resumed = kb("resume", "full", "--results-to", s3, "--inline-limit", "0")
    assert resumed.exit_code == 0, resumed.stderr
    results = Batch("full").results()
    assert sorted(r.item for r in results) == sorted(items)  # every item exactly once
    assert all(r.result == r.item[0].encode() * 200_000 for r in results)
    assert {r.item for r in results if r.ref is not None} == {f.item for f in failed}
    assert Batch("full").failed() == [] and Batch("full").status().state == "succeeded"


def test_a_report_redis_refuses_as_out_of_memory_is_one_error_and_is_counted_once_when_there_is_room(
    redis_url, client, home, tmp_path
):
    batch = submit(items=["x"], command=["echo", "{item}"], start=False, home=home)
    directory = tmp_path / "task"
    assert run_cli("task", "claim", "--batch", batch.id, "--index", "0", "--dir", str(directory)).returncode == 0
    assert subprocess.run(["/bin/sh", str(directory / "run.sh")], env={**os.environ, "JOB_COMPLETION_INDEX": "0",
                          "KIABATCH_TASK_DIR": str(directory)}).returncode == 0  # fmt: skip
    # Other writers filled Redis past its maxmemory: every write is refused from now on.
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 256 * 1024)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for filler in range(10_000):
                client.set(f"filler:{filler}", b"x" * 16384)
        before = {key: client.dump(key) for key in client.keys(f"*{batch.id}*")}
        refused = run_cli("task", "report", "--dir", str(directory))
        line = one_line_error(refused, 3, "Redis is full (used ", "a report was refused", "no item is lost")
        assert "Traceback" not in refused.stderr and line
        assert {key: client.dump(key) for key in client.keys(f"*{batch.id}*")} == before  # nothing written
    finally:
        client.delete(*client.keys("filler:*"))
        client.config_set("maxmemory", 0)
    assert run_cli("task", "report", "--dir", str(directory)).returncode == 0
    assert [(r.item, r.text, r.attempt) for r in batch.results()] == [("x", "x\n", 1)]
    assert batch.status().state == "succeeded"


def test_the_embedded_servers_maxmemory_is_shown_and_a_bad_setting_is_one_error_line(tiny_embedded, monkeypatch):
    shown = kb("server", "status")
    assert shown.exit_code == 0 and "maxmemory human" in shown.stdout and "3.00M" in shown.stdout
    kb("server", "stop", "--force")
    monkeypatch.setenv("KIABATCH_EMBEDDED_MAXMEMORY", "lots")
    one_line_error(kb("list"), 2, "KIABATCH_EMBEDDED_MAXMEMORY", "is not a size")
    for small in ("10", "100KiB", str(1024 * 1024 - 1)):  # was silently raised to 1 MiB
        monkeypatch.setenv("KIABATCH_EMBEDDED_MAXMEMORY", small)
        one_line_error(kb("list"), 2, "KIABATCH_EMBEDDED_MAXMEMORY", "too small; use at least 1MiB")
