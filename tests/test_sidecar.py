"""The lean pod's two processes, for real: ``kiabatch task sidecar`` and the worker's command (issue 10 §2).

The sidecar claims, lays the task out, writes ``ready``, waits for run.sh and
reports; the worker waits for ``ready`` and exits only after ``reported``. These
tests run both exactly as the pod does (the command line the Job renders, the
worker script it renders) against real Redis servers, and attack the moments in
between: a deleted batch, a settled index, Redis away at start, a sidecar killed
with SIGKILL and restarted, SIGTERM at any moment, an image whose ``sleep`` takes
no fractions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kiabatch import Batch, submit
from kiabatch.kube.batch_job import WORKER_SCRIPT, job
from kiabatch.kube.options import KubeOptions
from kiabatch.submission import plan_batch
from tests.helpers import RedisProcess, free_port, kiabatch_cmd, wait_for


def create(home: Path, **options) -> Batch:
    return submit(home=home, start=False, **options)


def start_sidecar(batch_id: str, directory: Path, index: int = 0, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        kiabatch_cmd("task", "sidecar", "--batch", batch_id, "--dir", str(directory)),
        env={**os.environ, "JOB_COMPLETION_INDEX": str(index), **env},
        stderr=subprocess.PIPE,
        text=True,
    )


def run_worker(directory: Path, timeout: float = 60, path: str | None = None, **env: str):
    return subprocess.run(
        ["/bin/sh", "-c", WORKER_SCRIPT],
        env={**os.environ, "KIABATCH_TASK_DIR": str(directory), "KIABATCH_AWAIT_REPORT": "1",
             "PATH": path or os.environ["PATH"], **env},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def stop(sidecar: subprocess.Popen[str]) -> tuple[int, str, float]:
    """SIGTERM (as the kubelet sends once the worker exited): exit code, stderr, seconds it took."""
    started = time.monotonic()
    sidecar.send_signal(signal.SIGTERM)
    code = sidecar.wait(timeout=10)
    return code, sidecar.stderr.read(), time.monotonic() - started


def test_the_rendered_pod_runs_the_sidecar_command_these_tests_run():
    spec = plan_batch("exec", items=["a"], command=["true"], backend="kubernetes", batch_id="ex-side").counted()
    pod = job(spec, KubeOptions())["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["args"][:2] == ["task", "sidecar"]
    assert pod["containers"][0]["command"] == ["/bin/sh", "-c", WORKER_SCRIPT]


def test_one_pod_claims_runs_reports_and_ends_at_once_on_sigterm(redis_url, home, tmp_path, client):
    batch = create(home, items=["x"], command=["echo", "{item}"])
    directory = tmp_path / "pod"
    sidecar = start_sidecar(batch.id, directory)
    worker = run_worker(directory)
    assert worker.returncode == 0, worker.stderr
    assert [r.text for r in batch.results()] == ["x\n"]
    assert sidecar.poll() is None  # idles until the pod ends
    code, log, took = stop(sidecar)
    assert code == 0 and took < 2
    assert "claimed index 0" in log and "reported" in log
    assert client.hget(f"kiabatch:{{{batch.id}}}:attempts", "0") == b"1"


def test_a_deleted_batch_fails_the_pod_with_the_reason_and_the_sidecar_does_not_crash_loop(
    redis_url, home, tmp_path, client
):
    batch = create(home, items=["x"], command=["true"])
    batch.delete()
    directory = tmp_path / "pod"
    sidecar = start_sidecar(batch.id, directory)
    worker = run_worker(directory)
    assert worker.returncode == 75
    assert f"no batch '{batch.id}'" in worker.stderr and "failing so the index is retried" in worker.stderr
    time.sleep(0.5)
    assert sidecar.poll() is None  # it never exits by itself, so the kubelet has nothing to restart
    code, log, _ = stop(sidecar)
    assert code == 0 and log.count("kiabatch: error:") == 1 and "cannot claim index 0" in log
    assert client.keys("kiabatch:{*") == []  # a claim for a missing batch writes nothing


def test_a_settled_index_lays_out_nothing_and_its_pod_succeeds_at_once(redis_url, home, tmp_path):
    batch = create(home, items=["x"], command=["sh", "-c", 'echo ran >> "$0"', str(tmp_path / "runs")])
    first = start_sidecar(batch.id, tmp_path / "first")
    assert run_worker(tmp_path / "first").returncode == 0
    stop(first)
    again = start_sidecar(batch.id, tmp_path / "again")  # a pod of the same index, e.g. after a resume
    started = time.monotonic()
    worker = run_worker(tmp_path / "again")
    assert worker.returncode == 0 and time.monotonic() - started < 10
    assert (tmp_path / "runs").read_text() == "ran\n"
    _, log, _ = stop(again)
    assert "already settled; nothing to run" in log
    assert [r.attempt for r in batch.results()] == [1]


def test_a_sidecar_killed_and_restarted_mid_task_never_claims_twice_and_reports_once(redis_url, home, tmp_path, client):
    batch = create(home, items=["x"], command=["sh", "-c", "sleep 1; echo late"])
    directory = tmp_path / "pod"
    first = start_sidecar(batch.id, directory)
    worker = subprocess.Popen(["/bin/sh", "-c", WORKER_SCRIPT], env={
        **os.environ, "KIABATCH_TASK_DIR": str(directory), "KIABATCH_AWAIT_REPORT": "1"})  # fmt: skip
    wait_for(lambda: (directory / "ready").exists(), timeout=30)
    first.kill()  # OOM-killed or crashed while the worker runs; the kubelet restarts it
    first.wait()
    second = start_sidecar(batch.id, directory)
    assert worker.wait(timeout=60) == 0
    assert [(r.text, r.attempt) for r in batch.results()] == [("late\n", 1)]
    assert client.hget(f"kiabatch:{{{batch.id}}}:attempts", "0") == b"1"
    _, log, _ = stop(second)
    assert "claimed" not in log and "reported" in log


def test_a_sidecar_restarted_after_the_upload_does_not_report_again(redis_url, home, tmp_path, client):
    batch = create(home, items=["x"], command=["echo", "once"])
    directory = tmp_path / "pod"
    first = start_sidecar(batch.id, directory)
    assert run_worker(directory).returncode == 0
    first.kill()
    first.wait()
    second = start_sidecar(batch.id, directory)
    time.sleep(1)
    _, log, _ = stop(second)
    assert "reported" in log and "nothing to report" in log
    assert client.scard(f"kiabatch:{{{batch.id}}}:reported") == 1


def test_redis_away_when_the_pod_starts_is_waited_for_within_the_retry_window(home, tmp_path):
    port = free_port()
    server = RedisProcess(tmp_path / "redis", port=port)
    url = f"redis://127.0.0.1:{port}/0"
    directory = tmp_path / "pod"
    server.start()
    batch = create(home, items=["x"], command=["echo", "{item}"], redis=url)
    server.stop()
    sidecar = start_sidecar(batch.id, directory, KIABATCH_REDIS_URL=url, KIABATCH_REDIS_RETRY_SECONDS="30")
    time.sleep(1.5)
    assert not (directory / "ready").exists()  # still trying
    server.start()  # appendfsync always: the batch is still there
    try:
        worker = run_worker(directory)
        assert worker.returncode == 0, worker.stderr
        assert [r.text for r in Batch(batch.id, url).results()] == ["x\n"]
        stop(sidecar)
    finally:
        server.stop()


def test_redis_away_longer_than_the_retry_window_fails_the_pod_instead_of_waiting_forever(home, tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    directory = tmp_path / "pod"
    sidecar = start_sidecar("ex-gone1", directory, KIABATCH_REDIS_URL=url, KIABATCH_REDIS_RETRY_SECONDS="1")
    worker = run_worker(directory)
    assert worker.returncode == 75 and "cannot reach" in worker.stderr
    assert sidecar.poll() is None
    stop(sidecar)


@pytest.mark.parametrize("phase", ["claiming", "waiting for the worker"])
def test_sigterm_ends_the_sidecar_at_once_in_every_phase(redis_url, home, tmp_path, phase):
    directory = tmp_path / "pod"
    if phase == "claiming":  # Redis does not answer: the sidecar is retrying its connection
        sidecar = start_sidecar("ex-term1", directory, KIABATCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                                KIABATCH_REDIS_RETRY_SECONDS="60")  # fmt: skip
        time.sleep(1.5)
    else:
        batch = create(home, items=["x"], command=["true"])
        sidecar = start_sidecar(batch.id, directory)
        wait_for(lambda: (directory / "ready").exists(), timeout=30)
    assert sidecar.poll() is None
    code, _, took = stop(sidecar)
    assert code == 0 and took < 2


def test_an_image_whose_sleep_takes_no_fractions_still_runs_the_task(redis_url, home, tmp_path):
    """POSIX only promises whole seconds: the worker's loops fall back to polling once a second."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    strict = bin_dir / "sleep"
    strict.write_text('#!/bin/sh\ncase "$1" in *.*) echo "sleep: invalid time interval" >&2; exit 1;; esac\n'
                      'exec /bin/sleep "$@"\n')  # fmt: skip
    strict.chmod(0o755)
    batch = create(home, items=["x"], command=["echo", "{item}"])
    directory = tmp_path / "pod"
    sidecar = start_sidecar(batch.id, directory)
    worker = run_worker(directory, path=f"{bin_dir}:{os.environ['PATH']}")
    assert worker.returncode == 0 and worker.stderr == ""  # no complaint from the strict sleep leaks out
    assert [r.text for r in batch.results()] == ["x\n"]
    stop(sidecar)


def test_the_worker_gives_up_when_no_sidecar_ever_lays_the_task_out(tmp_path):
    worker = run_worker(tmp_path / "empty", KIABATCH_REPORT_TIMEOUT="1")
    assert worker.returncode == 75 and "was not laid out within 1s" in worker.stderr


def test_the_sidecar_needs_an_index(redis_url, home, tmp_path):
    done = subprocess.run(kiabatch_cmd("task", "sidecar", "--batch", "ex-x", "--dir", str(tmp_path / "d")),
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"})  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("kiabatch: error: no --index given")
