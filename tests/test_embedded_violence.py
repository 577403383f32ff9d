"""The embedded Redis under hostile conditions: exactly one server per home, ever.

Every test uses real processes (supervisor, redis-server, kiabatch CLI runs) and
checks, with a census taken every few milliseconds, that no second server or
supervisor ever ran on the home's data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import redis

from kiabatch import embedded
from kiabatch.batch import Batch
from kiabatch.connection import connect
from kiabatch.errors import UnreachableError
from kiabatch.queue import Queue
from tests.helpers import kiabatch_cmd, one_line_error, run_cli, wait_for


def record(home: Path) -> dict:
    return json.loads((home / "redis" / "server.json").read_text())


def embedded_processes(home: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervisors, redis-servers) of ``home``'s data directory, live or deleted."""
    directory = str(home / "redis")
    supervisors, servers = [], []
    for process in psutil.process_iter():  # no attrs: ``info`` is shared between threads
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = process.cmdline()
            if "kiabatch._supervisor" in cmdline and directory in cmdline:
                supervisors.append(process)
            elif process.name() == "redis-server" and process.cwd().removesuffix(" (deleted)") == directory:
                servers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    # A supervisor forks the real one and exits at once: count the pair as one.
    parents = set()
    for process in supervisors:
        with contextlib.suppress(psutil.Error):
            parents.add(process.ppid())
    return [p for p in supervisors if p.pid not in parents], servers


def server_pids(home: Path) -> list[int]:
    return [p.pid for p in embedded_processes(home)[1]]


class Census:
    """Counts the home's supervisors and servers in the background; remembers the most seen at once."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.most_supervisors = 0
        self.most_servers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            supervisors, servers = embedded_processes(self.home)
            self.most_supervisors = max(self.most_supervisors, len(supervisors))
            self.most_servers = max(self.most_servers, len(servers))
            self._stop.wait(0.03)

    def __enter__(self) -> Census:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def assert_never_two(self) -> None:
        assert self.most_servers <= 1, f"{self.most_servers} redis-servers ran at once on one home"
        assert self.most_supervisors <= 1, f"{self.most_supervisors} supervisors ran at once on one home"


def assert_one_server(home: Path) -> None:
    """Exactly one supervisor and one redis-server serve ``home`` (after transients settle)."""
    assert wait_for(lambda: [len(x) for x in embedded_processes(home)] == [1, 1], timeout=10), embedded_processes(home)


@pytest.fixture
def embedded_home(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.setenv("KIABATCH_EMBEDDED_IDLE_TIMEOUT", "30")
    monkeypatch.setenv("KIABATCH_REDIS_RETRY_SECONDS", "20")
    yield home
    for process in embedded_processes(home)[1]:
        with contextlib.suppress(psutil.Error):
            process.resume()  # never leave a SIGSTOPped server behind
    embedded.stop(home)
    supervisors, servers = embedded_processes(home)
    for process in supervisors + servers:
        with contextlib.suppress(psutil.Error):
            process.kill()


def start_server(home: Path) -> dict:
    client = connect()
    client.ping()
    client.close()
    return record(home)


def queue_length(name: str) -> int:
    client = connect()
    try:
        return int(client.llen(f"kiabatch:queue:{{{name}}}"))
    finally:
        client.close()


def test_a_frozen_server_makes_clients_wait_then_fail_with_one_line_never_start_another(embedded_home):
    info = start_server(embedded_home)
    os.kill(info["server_pid"], signal.SIGSTOP)
    try:
        with Census(embedded_home) as census:
            started = time.monotonic()
            result = run_cli("queue", "list", env={"KIABATCH_EMBEDDED_WAIT": "2"})
            elapsed = time.monotonic() - started
            one_line_error(result, 3, f"pid {info['server_pid']}", "not answering after 2s")
            assert elapsed < 15
            # The API raises UnreachableError (exit code 3), never a redis-py exception.
            os.environ["KIABATCH_EMBEDDED_WAIT"] = "1"
            try:
                with pytest.raises(UnreachableError, match="not answering"):
                    connect()
            finally:
                del os.environ["KIABATCH_EMBEDDED_WAIT"]
        census.assert_never_two()
        assert server_pids(embedded_home) == [info["server_pid"]]
    finally:
        os.kill(info["server_pid"], signal.SIGCONT)
    after = run_cli("queue", "enqueue", "thawed", "1")
    assert after.returncode == 0, after.stderr
    assert record(embedded_home)["server_pid"] == info["server_pid"]
    assert_one_server(embedded_home)


def test_clients_racing_a_crashed_server_never_start_a_second_one(embedded_home):
    info = start_server(embedded_home)
    with Census(embedded_home) as census:
        os.kill(info["server_pid"], signal.SIGKILL)
        processes = [
            subprocess.Popen(kiabatch_cmd("queue", "enqueue", "race", f"{i}"), stderr=subprocess.PIPE, text=True)
            for i in range(5)
        ]

        def one(i: int) -> None:
            Queue("race").enqueue(100 + i)

        with ThreadPoolExecutor(5) as pool:
            list(pool.map(one, range(5)))
        for process in processes:
            assert process.wait(timeout=60) == 0, process.stderr.read()
            process.stderr.close()
    census.assert_never_two()
    client = connect()
    assert sorted(json.loads(x) for x in client.lrange("kiabatch:queue:{race}", 0, -1)) == [
        *range(5),
        *range(100, 105),
    ]
    client.close()
    assert_one_server(embedded_home)
    assert record(embedded_home)["supervisor_pid"] == info["supervisor_pid"]  # restarted by its supervisor


def test_a_deleted_home_gets_a_fresh_server_and_the_orphan_stops(embedded_home):
    info = start_server(embedded_home)  # idle: no client connected
    shutil.rmtree(embedded_home)
    values = list(range(1000))
    files = []
    for n in range(3):
        path = Path(tempfile.mkstemp(prefix="kbitems")[1])
        path.write_text("".join(f"{v}\n" for v in values[n * 200 : (n + 1) * 200]))
        files.append(path)
    try:
        processes = [subprocess.Popen(kiabatch_cmd("queue", "enqueue", "fresh", "--items", str(f))) for f in files]
        assert Queue("fresh").enqueue_many(values[600:]) == 400
        assert all(p.wait(timeout=60) == 0 for p in processes)
    finally:
        for path in files:
            path.unlink()
    assert queue_length("fresh") == 1000
    assert wait_for(lambda: not psutil.pid_exists(info["server_pid"]), timeout=5)
    assert wait_for(lambda: not psutil.pid_exists(info["supervisor_pid"]), timeout=5)
    assert record(embedded_home)["server_pid"] != info["server_pid"]
    assert_one_server(embedded_home)


def test_a_replaced_lock_file_never_lets_two_servers_share_the_data(embedded_home):
    client = connect()
    client.set("kept", "yes")
    client.close()
    info = record(embedded_home)
    with Census(embedded_home) as census:
        (embedded_home / "redis" / "server.lock").unlink()
        again = connect()
        assert again.get("kept") == b"yes"  # the old server flushed before the new one loaded
        again.close()
    census.assert_never_two()
    assert wait_for(lambda: not psutil.pid_exists(info["supervisor_pid"]), timeout=5)
    assert_one_server(embedded_home)


def progress_done(home: Path, batch_id: str) -> int:
    try:
        client = redis.Redis(unix_socket_path=record(home)["socket"], socket_timeout=2)
        try:
            return int(client.hget(f"kiabatch:{{{batch_id}}}:progress", "done") or 0)
        finally:
            client.close()
    except (OSError, ValueError, KeyError, redis.RedisError):
        return -1


def submit_cmd(batch_id: str, count: int, sleep: str = "0.2") -> list[str]:
    items = [arg for i in range(count) for arg in ("--item", str(i))]
    return kiabatch_cmd(
        "submit", "-q", "--batch-id", batch_id, *items, "-p", "2", "--", "sh", "-c", f"sleep {sleep}; echo {{item}}"
    )


def assert_results_exactly_once(batch_id: str, count: int) -> None:
    batch = Batch(batch_id)
    results = batch.results()
    assert sorted(r.item for r in results) == list(range(count))  # each item exactly once
    assert all(r.text == f"{r.item}\n" for r in results)
    assert batch.failed() == []
    status = batch.status()
    assert status.state == "succeeded" and status.progress.done == count and status.progress.running == 0
    batch.store.redis.close()


def test_a_batch_survives_its_supervisor_being_killed(embedded_home):
    start_server(embedded_home)
    with Census(embedded_home) as census:
        submit = subprocess.Popen(
            submit_cmd("sup-killed", 30), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert wait_for(lambda: progress_done(embedded_home, "sup-killed") >= 6, timeout=60)
        os.kill(record(embedded_home)["supervisor_pid"], signal.SIGKILL)
        _out, err = submit.communicate(timeout=120)
    assert submit.returncode == 0, err
    assert "Traceback" not in err
    census.assert_never_two()
    assert_results_exactly_once("sup-killed", 30)
    assert_one_server(embedded_home)


def test_a_flapping_server_never_produces_a_traceback_and_loses_no_item(embedded_home):
    start_server(embedded_home)
    killed = []
    with Census(embedded_home) as census:
        submit = subprocess.Popen(submit_cmd("flap", 50), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: progress_done(embedded_home, "flap") >= 2, timeout=60)
        while len(killed) < 6:
            pids = [p for p in server_pids(embedded_home) if p not in killed]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                time.sleep(1.0)
            else:
                time.sleep(0.02)
        assert submit.poll() is None, "the batch ended before the server stopped flapping: make it longer"
        out, err = submit.communicate(timeout=120)
    assert "Traceback" not in err
    if submit.returncode != 0:
        one_line_error(subprocess.CompletedProcess([], submit.returncode, out, err), 3, "resume")
        resumed = run_cli("resume", "flap")
        assert resumed.returncode == 0, resumed.stderr
    census.assert_never_two()
    assert_results_exactly_once("flap", 50)
    assert_one_server(embedded_home)


def test_the_home_and_every_file_of_the_server_are_private(embedded_home):
    start_server(embedded_home)
    directory = embedded_home / "redis"
    assert stat.S_IMODE(embedded_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = {p.name for p in directory.iterdir()}
    assert {"server.lock", "join.lock", "server.json", "server.log", "appendonly.aof"} <= names
    for path in directory.iterdir():
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_socket():
            assert mode == 0o700, path
        else:
            assert mode == 0o600, (path, oct(mode))


@pytest.fixture
def deep_home(monkeypatch: pytest.MonkeyPatch):
    """A KIABATCH_HOME too deep for a socket, and a short private XDG_RUNTIME_DIR."""
    root = Path(tempfile.mkdtemp(prefix="kbd"))
    runtime = Path(tempfile.mkdtemp(prefix="kbr"))
    deep = root / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("KIABATCH_HOME", str(deep))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    yield deep, runtime
    embedded.stop(deep)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(runtime, ignore_errors=True)


def test_a_deep_home_puts_its_socket_in_a_private_runtime_directory(deep_home):
    deep, runtime = deep_home
    client = connect()
    assert client.ping()
    socket_path = Path(record(deep)["socket"])
    assert socket_path.parent == runtime / "kiabatch"
    assert stat.S_IMODE((runtime / "kiabatch").lstat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.lstat().st_mode) == 0o700
    client.close()


def test_a_server_whose_socket_was_deleted_stops_and_the_next_client_starts_a_fresh_one(deep_home):
    deep, runtime = deep_home
    holder = connect()
    holder.set("kept", "yes")
    info = record(deep)
    shutil.rmtree(runtime / "kiabatch")  # e.g. the runtime directory cleaned at logout
    assert wait_for(lambda: not psutil.pid_exists(info["server_pid"]), timeout=10), (
        deep / "redis" / "server.log"
    ).read_text()[-2000:]
    assert holder.get("kept") == b"yes"  # the connected client reconnects to the fresh server
    assert record(deep)["socket"] != info["socket"]
    holder.close()
    assert_one_server(deep)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another user")
def test_a_runtime_directory_owned_by_another_user_is_a_one_line_error(deep_home):
    deep, runtime = deep_home
    taken = runtime / "kiabatch"
    taken.mkdir(mode=0o700)
    os.chown(taken, 65534, 65534)
    result = run_cli("queue", "list")
    one_line_error(result, 2, str(taken), "uid 65534")
    assert embedded_processes(deep) == ([], [])
    taken.rmdir()
    taken.symlink_to(tempfile.mkdtemp(prefix="kbs"))
    result = run_cli("queue", "list")
    one_line_error(result, 2, str(taken), "symlink")


def test_server_stop_never_signals_a_process_that_does_not_hold_the_lock(embedded_home):
    start_server(embedded_home)
    assert embedded.stop(embedded_home)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        fake = {"supervisor_pid": bystander.pid, "server_pid": bystander.pid, "socket": "/nonexistent.sock"}
        (embedded_home / "redis" / "server.json").write_text(json.dumps(fake))
        stopped = run_cli("server", "stop")
        assert stopped.returncode == 0 and "not running" in stopped.stderr
        assert bystander.poll() is None
        status = run_cli("server", "status")
        assert "not running" in status.stdout
    finally:
        bystander.kill()
        bystander.wait()


def fake_redis_server(tmp_path: Path, script: str) -> Path:
    """A ``redis-server`` wrapper around the real binary (named so, to be found like it)."""
    path = tmp_path / "bin" / "redis-server"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\n{script}\nexec {embedded.redis_server_binary()} "$@"\n')
    path.chmod(0o755)
    return path


def test_a_server_killed_while_it_starts_is_restarted_not_given_up(embedded_home, tmp_path, monkeypatch):
    # The first redis-server dies by SIGKILL before answering; its supervisor must restart it.
    flag = tmp_path / "killed-once"
    binary = fake_redis_server(tmp_path, f"[ -e {flag} ] || {{ touch {flag}; kill -9 $$; }}")
    monkeypatch.setenv("KIABATCH_REDIS_SERVER", str(binary))
    client = connect()
    assert client.ping()
    client.close()
    assert flag.exists()
    assert "restarting" in (embedded_home / "redis" / "server.log").read_text()
    assert_one_server(embedded_home)


def test_a_server_that_cannot_start_is_a_one_line_error_with_its_log(embedded_home, tmp_path, monkeypatch):
    binary = fake_redis_server(tmp_path, "echo 'cannot load the append only file' >&2; exit 1")
    monkeypatch.setenv("KIABATCH_REDIS_SERVER", str(binary))
    result = run_cli("queue", "list")
    one_line_error(result, 3, "did not start", "cannot load the append only file")
    assert embedded_processes(embedded_home) == ([], [])


def test_a_server_started_from_a_local_worker_does_not_carry_the_worker_mark(embedded_home):
    # The local runner kills processes carrying its worker mark; the server must not be one.
    result = run_cli("queue", "enqueue", "marked", "1", env={"KIABATCH_LOCAL_WORKER_OF": "some-batch"})
    assert result.returncode == 0, result.stderr
    info = record(embedded_home)
    for pid in (info["supervisor_pid"], info["server_pid"]):
        environ = psutil.Process(pid).environ()
        assert "KIABATCH_LOCAL_WORKER_OF" not in environ
