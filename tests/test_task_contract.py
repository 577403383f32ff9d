"""The task directory contract the Kubernetes pod runs: claim -> sh run.sh -> report, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kiabatch import Batch, submit
from kiabatch.kube.batch_job import WORKER_SCRIPT
from kiabatch.store import Store
from kiabatch.task import TaskInfo, claim_into, done_status, report_from
from tests.helpers import HOSTILE, kiabatch_cmd, run_cli


def create(home: Path, **options) -> Batch:
    """A batch written to Redis but not started: its tasks are run by hand below."""
    return submit(home=home, start=False, **options)


def run_task(store: Store, batch: Batch, index: int, directory: Path, env: dict | None = None):
    info = claim_into(store, batch.id, index, directory)
    done = subprocess.run(
        ["/bin/sh", str(directory / "run.sh")],
        env={
            **os.environ,
            **(env or {}),
            "KIABATCH_TASK_DIR": str(directory),
            "JOB_COMPLETION_INDEX": str(index),
        },
    )
    return info, done.returncode, report_from(store, directory)


def test_run_sh_passes_hostile_items_verbatim(redis_url, home, tmp_path, client):
    batch = create(home, items=HOSTILE, command=["printf", "%s", "{item}"])
    store = Store(client)
    for index in range(len(HOSTILE)):
        _, code, result = run_task(store, batch, index, tmp_path / f"t{index}")
        assert (code, result.status) == (0, "done")
    assert {r.item: r.text for r in batch.results()} == {h: h for h in HOSTILE}
    assert list(tmp_path.rglob("pwned*")) == []


def test_run_sh_feeds_stdin_and_input_files_and_reads_declared_output(redis_url, home, tmp_path, client):
    store = Store(client)
    via_stdin = create(home, items=[{"a": 1}], command=["cat"], stdin=True)
    run_task(store, via_stdin, 0, tmp_path / "s")
    assert [r.text for r in via_stdin.results()] == ['{"a":1}']
    via_output = create(home, items=["x"], command=["sh", "-c", 'cp "$1" "$2"', "sh", "{input}", "{output}"])
    run_task(store, via_output, 0, tmp_path / "o")
    assert [r.result for r in via_output.results()] == [b'"x"']


def test_run_sh_runs_every_item_of_a_chunk_and_exits_with_the_first_failure(redis_url, home, tmp_path, client):
    store = Store(client)
    batch = create(
        home,
        items=["ok", "bad", "ok2"],
        chunk=3,
        retries=0,
        command=["sh", "-c", 'test "$1" != bad || exit 7; echo "$1"', "sh", "{item}"],
    )
    info, code, result = run_task(store, batch, 0, tmp_path / "c")
    assert info.items == 3 and code == 7 and done_status(tmp_path / "c") == 7
    assert result.status == "failed"
    assert sorted(r.item for r in batch.results()) == ["ok", "ok2"]
    assert [(f.item, f.exit_code) for f in batch.failed()] == [("bad", 7)]


def test_an_item_missing_a_field_is_skipped_by_run_sh_and_failed_without_retry(redis_url, home, tmp_path, client):
    from kiabatch import Queue

    Queue("mixed").enqueue_many([{"url": "u"}, {"uri": "v"}])
    batch = Queue("mixed").submit(command=["echo", "{url}"], retries=5, home=home, start=False)
    store = Store(client)
    outcomes = [run_task(store, batch, index, tmp_path / f"m{index}") for index in (0, 1)]
    assert [code for _, code, _ in outcomes] == [0, 0]  # run.sh skipped the item it could not run
    assert [r.item for r in batch.results()] == [{"url": "u"}]
    [dead] = batch.failed()
    assert dead.item == {"uri": "v"} and "has no field 'url'" in dead.reason and dead.attempts == 1


def test_a_retry_of_an_index_reruns_the_same_items(redis_url, home, tmp_path, client):
    store = Store(client)
    batch = create(home, items=["a", "b"], command=["sh", "-c", "exit 3"], retries=1)
    first, _, r1 = run_task(store, batch, 1, tmp_path / "r1")
    second, _, r2 = run_task(store, batch, 1, tmp_path / "r2")
    assert (r1.status, r2.status) == ("retry", "failed")
    assert json.loads((tmp_path / "r1/items/00000/item.json").read_text()) == json.loads(
        (tmp_path / "r2/items/00000/item.json").read_text()
    )
    assert (first.attempt, second.attempt) == (1, 2)


def test_the_sidecar_claims_then_reports_and_the_worker_waits_for_it(redis_url, home, tmp_path):
    """The pod's two processes: the worker exits only once the sidecar confirmed; the sidecar idles after."""
    batch = create(home, items=["x"], command=["sh", "-c", "sleep 0.5; echo hi"])
    directory = tmp_path / "pod"
    sidecar = subprocess.Popen(kiabatch_cmd("task", "sidecar", "--batch", batch.id, "--dir", str(directory)),
                               env={**os.environ, "JOB_COMPLETION_INDEX": "0"})  # fmt: skip
    worker = subprocess.Popen(
        ["/bin/sh", "-c", WORKER_SCRIPT],
        env={**os.environ, "KIABATCH_TASK_DIR": str(directory), "KIABATCH_AWAIT_REPORT": "1"},
    )
    assert worker.wait(timeout=30) == 0
    assert (directory / "reported").exists()
    assert [r.text for r in batch.results()] == ["hi\n"]
    time.sleep(0.3)
    assert sidecar.poll() is None  # a native sidecar keeps running until the pod ends
    sidecar.terminate()
    assert sidecar.wait(timeout=10) == 0


def test_the_worker_fails_when_the_reporter_never_confirms(redis_url, home, tmp_path):
    batch = create(home, items=["x"], command=["true"])
    directory = tmp_path / "pod"
    assert run_cli("task", "claim", "--batch", batch.id, "--index", "0", "--dir", str(directory)).returncode == 0
    worker = subprocess.run(
        ["/bin/sh", str(directory / "run.sh")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KIABATCH_TASK_DIR": str(directory),
            "KIABATCH_AWAIT_REPORT": "1",
            "KIABATCH_REPORT_TIMEOUT": "1",
        },
    )
    assert worker.returncode == 75 and "did not confirm" in worker.stderr
    assert TaskInfo.load(directory).attempt == 1


@pytest.mark.parametrize("args", [["--index", "0"], []])
def test_claim_reads_the_index_from_job_completion_index(redis_url, home, tmp_path, args):
    batch = create(home, items=["x", "y"], command=["true"])
    env = {} if args else {"JOB_COMPLETION_INDEX": "1"}
    done = run_cli("task", "claim", "--batch", batch.id, "--dir", str(tmp_path / "d"), *args, env=env)
    assert done.returncode == 0, done.stderr
    assert TaskInfo.load(tmp_path / "d").index == (0 if args else 1)
