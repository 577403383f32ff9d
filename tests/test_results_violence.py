"""Violence against the results store: kill -9 between upload and report, an S3 server killed mid-upload.

After each: every item exactly once in the results, every referenced object present
and matching its sha256, no object referenced twice, and gc leaves exactly the
referenced objects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from kiabatch import Batch
from kiabatch.keys import batch_keys
from kiabatch.results_store import ResultsStore
from tests.helpers import S3Process, kb, kiabatch_cmd, wait_for
from tests.test_results_store import objects

pytestmark = pytest.mark.slow


def assert_each_item_once_and_every_reference_sound(batch_id: str, items: list[str], results_url: str, s3_server):
    results = Batch(batch_id).results()
    assert sorted(r.item for r in results) == sorted(items)
    keys = [r.ref.key for r in results]
    assert len(set(keys)) == len(keys)  # no object referenced twice
    for r in results:
        assert r.read() == r.item[0].encode() * r.ref.size  # present and matching its sha256
    assert Batch(batch_id).failed() == []
    assert kb("gc", "--results-to", results_url).exit_code == 0
    assert set(objects(s3_server, results_url)) == set(keys)  # only what is referenced is left


def test_a_runner_killed_after_its_uploads_but_before_its_reports_loses_nothing_and_counts_once(
    redis_url, client, home, s3, s3_server, tmp_path
):
    items = [f"{chr(ord('a') + i)}{i}" for i in range(4)]
    go = tmp_path / "GO"
    worker = f'while [ ! -e {go} ]; do sleep 0.05; done; head -c 150000 /dev/zero | tr "\\0" "$1"'
    runner = subprocess.Popen(
        kiabatch_cmd("submit", "--batch-id", "killed", "-p", "4", "--results-to", s3, "--inline-limit", "0",
                     "--lines", "-", "--", "sh", "-c", worker, "sh", "{item}"),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    runner.stdin.write("\n".join(items).encode())
    runner.stdin.close()
    running = batch_keys("killed").running
    wait_for(lambda: client.exists(running) and client.hlen(running) == 4)  # every index claimed
    client.client_pause(30_000, all=False)  # writes wait: the reports will hang after their uploads
    try:
        go.touch()
        wait_for(lambda: len(objects(s3_server, s3)) == 4, timeout=60)
        time.sleep(0.3)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    finally:
        client.client_unpause()
    assert Batch("killed").results() == []  # nothing was reported
    resumed = kb("resume", "killed")
    assert resumed.exit_code == 0, resumed.stderr
    assert_each_item_once_and_every_reference_sound("killed", items, s3, s3_server)
    assert {r.attempt for r in Batch("killed").results()} == {2}


def test_an_s3_server_killed_mid_upload_and_restarted_loses_nothing_and_duplicates_nothing(
    redis_url, home, tmp_path, monkeypatch
):
    server = S3Process(tmp_path / "weed").start()
    submit = None
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = "s3://kbt-violence/results"
        items = [f"{chr(ord('a') + i % 26)}{i}" for i in range(16)]
        worker = 'head -c 3000000 /dev/zero | tr "\\0" "$1" > "$2"'
        lines = tmp_path / "items.txt"
        lines.write_text("\n".join(items))
        submit = subprocess.Popen(
            kiabatch_cmd("submit", "--batch-id", "storm", "-p", "2", "--retries", "5", "--results-to", url,
                         "--lines", str(lines), "--", "sh", "-c", worker, "sh", "{item}", "{output}"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: len(objects(server, url)) >= 3, timeout=120)
        server.stop(signal.SIGKILL)  # in the middle of the next uploads
        time.sleep(2)
        server.start()
        _, err = submit.communicate(timeout=240)
        assert submit.returncode == 0, err.decode()
        results = Batch("storm").results()
        assert Counter(r.item for r in results) == Counter(items)
        assert_each_item_once_and_every_reference_sound("storm", items, url, server)
        ResultsStore(url, endpoint=server.endpoint).delete(r.ref.key for r in results)
    finally:
        if submit is not None and submit.poll() is None:
            submit.kill()
            submit.wait()
        server.stop(signal.SIGKILL)
