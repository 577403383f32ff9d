"""The local backend behaves like an Indexed Job, and survives violence without losing or doubling items."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from kiabatch import Batch, InterruptedBatchError, submit
from kiabatch.store import Store
from tests.helpers import kiabatch_cmd, run_cli, wait_for

WORKER = str(Path(__file__).parent / "programs" / "worker.py")


def worker(*flags: str) -> list[str]:
    return [sys.executable, WORKER, "{item}", *flags]


def read_log(path: Path) -> list[tuple[float, str, str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


def max_overlap(events) -> int:
    level = best = 0
    for _, kind, *_ in sorted(events, key=lambda e: float(e[0])):
        level += 1 if kind == "start" else -1
        best = max(best, level)
    return best


def outputs(batch: Batch) -> list[str]:
    return sorted(r.text.strip() for r in batch.results())


def test_at_most_parallelism_workers_run_at_once(redis_url, home, tmp_path):
    log = tmp_path / "log"
    items = [str(i) for i in range(8)]
    batch = submit(items=items, command=worker("--sleep", "0.3", "--log", str(log)), parallel=3, wait=True, home=home)
    assert outputs(batch) == sorted(f"done {i}" for i in items)
    assert max_overlap(read_log(log)) == 3


def test_each_task_sees_its_completion_index(redis_url, home):
    batch = submit(
        items=list(range(5)),
        command=["sh", "-c", 'echo "$JOB_COMPLETION_INDEX $KIABATCH_BATCH"'],
        parallel=2,
        wait=True,
        home=home,
    )
    assert [r.text.split() for r in batch.results()] == [[str(r.index), batch.id] for r in batch.results()]
    assert sorted(r.index for r in batch.results()) == list(range(5))


def test_failed_attempts_are_retried_up_to_the_limit(redis_url, home, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    batch = submit(
        items=["a", "b"],
        command=worker("--fail-times", "2", "--state", str(state)),
        retries=2,
        wait=True,
        home=home,
    )
    assert outputs(batch) == ["done a", "done b"]
    assert {r.attempt for r in batch.results()} == {3}
    assert batch.failed() == []
    logs = batch.logs(0)
    assert [attempt for _, attempt, _ in logs] == [1, 2]
    assert b"fails on purpose" in logs[0][2]


def test_a_poison_item_is_dead_lettered_and_the_rest_succeed(redis_url, home):
    batch = submit(
        items=["ok1", "bad", "ok2"],
        command=worker("--poison", "bad", "--exit", "9"),
        retries=1,
        parallel=2,
        wait=True,
        home=home,
    )
    assert outputs(batch) == ["done ok1", "done ok2"]
    [dead] = batch.failed()
    assert (dead.item, dead.exit_code, dead.attempts) == ("bad", 9, 2)
    assert "poison item bad" in dead.stderr
    assert batch.status().state == "failed"


def test_a_non_retriable_exit_code_fails_the_item_on_the_first_attempt(redis_url, home):
    batch = submit(
        items=["bad"],
        command=worker("--poison", "bad", "--exit", "42"),
        retries=5,
        non_retriable_exit_codes=[42],
        wait=True,
        home=home,
    )
    [dead] = batch.failed()
    assert (dead.exit_code, dead.attempts) == (42, 1)


def test_chunks_run_several_items_per_task(redis_url, home):
    batch = submit(items=list(range(10)), command=["echo", "{item}"], chunk=3, parallel=2, wait=True, home=home)
    status = batch.status()
    assert status.tasks == 4 and status.progress.done == 10
    assert [(r.index, r.position) for r in batch.results()].count((3, 0)) == 1
    assert sorted(int(r.text) for r in batch.results()) == list(range(10))


def test_items_reach_the_worker_on_stdin_and_as_an_input_file(redis_url, home):
    via_stdin = submit(items=[{"n": 1}, "text"], command=["cat"], stdin=True, wait=True, home=home)
    assert sorted(r.text for r in via_stdin.results()) == ["text", '{"n":1}']
    via_file = submit(items=[{"n": 2}], command=["cat", "{input}"], wait=True, home=home)
    assert [r.text for r in via_file.results()] == ['{"n":2}']


def test_a_declared_output_file_is_the_result(redis_url, home):
    batch = submit(
        items=["x"],
        command=["sh", "-c", 'printf "from file" > "$1"; echo stdout', "sh", "{output}"],
        wait=True,
        home=home,
    )
    assert [r.result for r in batch.results()] == [b"from file"]
    missing = submit(items=["x"], command=["true", "{output}"], retries=0, wait=True, home=home)
    assert "did not write its {output} file" in missing.failed()[0].reason


def test_the_batch_deadline_stops_everything_and_dead_letters_the_rest(redis_url, home):
    started = time.monotonic()
    batch = submit(items=list(range(6)), command=worker("--sleep", "30"), parallel=2, timeout=1, wait=True, home=home)
    assert time.monotonic() - started < 15
    status = batch.status()
    assert status.state == "failed" and status.progress.failed == 6
    assert all("DeadlineExceeded" in f.reason or "deadline" in f.reason for f in batch.failed())


def test_a_task_over_its_time_limit_is_stopped_and_retried(redis_url, home):
    batch = submit(items=["slow"], command=worker("--sleep", "30"), task_timeout=0.5, retries=1, wait=True, home=home)
    [dead] = batch.failed()
    assert dead.attempts == 2 and "timed out after 0.5s" in dead.reason


def test_a_worker_killed_with_sigkill_is_retried_and_every_item_counts_once(redis_url, home, tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed: list[int] = []

    def assassin() -> None:
        target = pid_dir / "3.pid"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not target.exists():
            time.sleep(0.01)
        time.sleep(0.1)
        pid = int(target.read_text())
        target.unlink()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=assassin)
    thread.start()
    items = [str(i) for i in range(6)]
    batch = submit(
        items=items,
        command=worker("--sleep", "1", "--pid-dir", str(pid_dir)),
        parallel=2,
        retries=2,
        wait=True,
        home=home,
    )
    thread.join()
    assert killed
    assert outputs(batch) == sorted(f"done {i}" for i in items)
    by_item = {r.item: r for r in batch.results()}
    assert by_item["3"].attempt == 2
    assert b"".join(f.stderr.encode() for f in batch.failed()) == b""


def _wait_for_lines(path: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_log(path)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines")


def _workers_alive(marker: str) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                alive.append(process)
        except psutil.Error:
            pass
    return alive


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_the_submitting_process_dies_mid_batch_and_resume_finishes_exactly_once(redis_url, home, tmp_path, how):
    log = tmp_path / "log"
    items = [str(i) for i in range(16)]
    item_file = tmp_path / "items.txt"
    item_file.write_text("\n".join(items))
    marker = f"--log {log}"
    process = subprocess.Popen(
        kiabatch_cmd(
            "submit",
            "--batch-id",
            "violent-batch",
            "--lines",
            str(item_file),
            "-p",
            "3",
            "--",
            *worker("--sleep", "0.4", "--log", str(log)),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_lines(log, 6)
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    if how == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, err
        assert "kiabatch resume violent-batch" in err
        # A graceful stop leaves no worker behind.
        assert _workers_alive(marker) == []
        assert Batch("violent-batch").status().state == "interrupted"
        assert Batch("violent-batch").progress().running == 0
    resumed = run_cli("resume", "violent-batch", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _workers_alive(marker) == []  # orphans of a SIGKILLed runner were stopped
    batch = Batch("violent-batch")
    results = batch.results()
    assert sorted(r.item for r in results) == sorted(items)  # every item exactly once
    assert len({(r.index, r.position) for r in results}) == len(items)
    assert batch.failed() == []
    assert sorted(resumed.stdout.split("\n")[:-1]) == sorted(f"{i}\tdone {i}" for i in items)


def test_a_detached_batch_runs_in_the_background_and_can_be_waited_for(redis_url, home):
    batch = submit(items=["a", "b"], command=["echo", "{item}"], parallel=2, wait=False, home=home)
    assert batch.wait(timeout=60).status().state == "succeeded"
    assert outputs(batch) == ["a", "b"]


def test_waiting_on_a_batch_whose_runner_died_says_how_to_resume(redis_url, home, tmp_path):
    batch = submit(items=[str(i) for i in range(4)], command=worker("--sleep", "1"), parallel=2, wait=False, home=home)
    runner = Store(batch.store.redis).meta(batch.id)["runner"].split()[1]
    os.kill(int(runner), signal.SIGKILL)
    with pytest.raises(InterruptedBatchError, match=f"kiabatch resume {batch.id}"):
        batch.wait(timeout=30)
    batch.resume(wait=True)
    assert batch.status().state == "succeeded"
    assert sorted(r.item for r in batch.results()) == ["0", "1", "2", "3"]


def test_two_runners_never_run_the_same_batch(redis_url, home):
    batch = submit(items=["a"], command=worker("--sleep", "3"), wait=False, home=home)
    with pytest.raises(Exception, match="already being run"):
        batch.resume(wait=True)
    batch.wait(timeout=30)


def running_levels(events) -> list[tuple[float, int]]:
    level, levels = 0, []
    for at, kind, *_ in sorted(events, key=lambda e: float(e[0])):
        level += 1 if kind == "start" else -1
        levels.append((float(at), level))
    return levels


def test_scale_raises_and_lowers_the_running_slots_of_a_local_batch(redis_url, home, tmp_path):
    """`kiabatch scale` on a running local batch: more slots within a moment, and fewer once tasks end."""
    log = tmp_path / "log"
    items = [str(i) for i in range(24)]
    batch = submit(items=items, command=worker("--sleep", "0.4", "--log", str(log)), parallel=1, home=home)
    wait_for(lambda: read_log(log), timeout=30)
    raised = time.time()
    assert run_cli("scale", batch.id, "--parallel", "4").returncode == 0
    wait_for(lambda: len([e for e in read_log(log) if e[1] == "start"]) >= 12, timeout=60)
    lowered = time.time()
    assert run_cli("scale", batch.id, "--parallel", "1").returncode == 0
    batch.wait(timeout=120)
    assert outputs(batch) == sorted(f"done {i}" for i in items)
    levels = running_levels(read_log(log))  # (time, workers running just after it)

    def most(start: float, end: float) -> int:
        return max(level for at, level in levels if start <= at < end)

    assert most(0, raised) == 1
    assert most(raised + 1.0, lowered) == 4
    assert most(lowered + 1.5, float("inf")) == 1  # the runner saw it, and the tasks running then have ended
    assert batch.status().parallelism == 1
