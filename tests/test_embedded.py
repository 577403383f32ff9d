"""The embedded Redis: started on demand, shared, persistent, and never left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from kiabatch import embedded
from kiabatch.connection import connect
from tests.helpers import run_cli, wait_for


@pytest.fixture
def embedded_home(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.setenv("KIABATCH_EMBEDDED_IDLE_TIMEOUT", "1")
    yield home
    embedded.stop(home)


def record(home: Path) -> dict:
    """The supervisor's server.json ({} while a restart rewrites it)."""
    try:
        return json.loads((home / "redis" / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_the_server_listens_on_a_unix_socket_only_and_persists_with_aof(embedded_home):
    client = connect()
    info = record(embedded_home)
    assert Path(info["socket"]).is_socket()
    server = psutil.Process(info["server_pid"])
    assert [c for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
    config = client.config_get("append*")
    assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
    assert client.config_get("dir")["dir"] == str(embedded_home / "redis")
    client.close()


def test_a_later_invocation_sees_earlier_batches_even_after_the_server_stopped(embedded_home):
    first = run_cli("submit", "--command", "echo {item}", "--item", "1", "--batch-id", "kept-one")
    assert first.returncode == 0, first.stderr
    assert embedded.stop(embedded_home)
    assert not embedded.status(embedded_home)["running"]
    listed = run_cli("-o", "json", "list")
    assert [b["id"] for b in json.loads(listed.stdout)] == ["kept-one"]
    results = run_cli("results", "kept-one")
    assert results.stdout == "1\t1\n"


def test_concurrent_invocations_share_one_server(embedded_home):
    def open_one(_: int) -> int:
        client = connect()
        pid = client.info("server")["process_id"]
        client.close()
        return pid

    with ThreadPoolExecutor(6) as pool:
        pids = set(pool.map(open_one, range(12)))
    assert len(pids) == 1
    processes = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "kiabatch._supervisor" in " ".join(p.info["cmdline"] or [])
        and str(embedded_home) in " ".join(p.info["cmdline"] or [])
    ]
    assert len(processes) == 1


def test_concurrent_cli_processes_share_one_server(embedded_home):
    commands = [[sys.executable, "-m", "kiabatch", "queue", "enqueue", "q", str(i)] for i in range(5)]
    processes = [subprocess.Popen(c, stderr=subprocess.PIPE) for c in commands]
    assert all(p.wait(timeout=60) == 0 for p in processes)
    client = connect()
    assert client.llen("kiabatch:queue:{q}") == 5
    assert client.info("server")["process_id"] == record(embedded_home)["server_pid"]
    client.close()


def test_the_server_stops_itself_once_the_last_client_is_gone(embedded_home):
    client = connect()
    info = record(embedded_home)
    time.sleep(2.0)  # longer than the idle timeout, but a client is connected
    assert psutil.pid_exists(info["server_pid"])
    client.close()
    assert wait_for(lambda: not psutil.pid_exists(info["server_pid"]))
    assert wait_for(lambda: not psutil.pid_exists(info["supervisor_pid"]))
    assert not (embedded_home / "redis" / "server.json").exists()


def test_a_client_killed_with_sigkill_does_not_keep_the_server_alive(embedded_home):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom kiabatch import connect\nc = connect()\n"
            "c.ping()\nprint('ready', flush=True)\ntime.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    info = record(embedded_home)
    holder.kill()
    holder.wait()
    assert wait_for(lambda: not psutil.pid_exists(info["server_pid"]))


def test_killing_the_supervisor_with_sigkill_takes_the_server_down_too(embedded_home):
    client = connect()
    info = record(embedded_home)
    os.kill(info["supervisor_pid"], signal.SIGKILL)
    assert wait_for(lambda: not psutil.pid_exists(info["server_pid"]))
    client.close()
    # The next invocation starts a fresh server on the same data.
    again = connect()
    assert again.ping()
    assert record(embedded_home)["server_pid"] != info["server_pid"]
    again.close()


def test_a_crashed_server_is_restarted_with_its_data(embedded_home):
    client = connect()
    client.set("survivor", "yes")
    time.sleep(1.5)  # appendfsync everysec
    info = record(embedded_home)
    os.kill(info["server_pid"], signal.SIGKILL)
    assert wait_for(lambda: record(embedded_home).get("server_pid") not in (None, info["server_pid"]))
    fresh = connect()
    assert fresh.get("survivor") == b"yes"
    fresh.close()
    client.close()


def test_server_status_and_stop_commands(embedded_home):
    assert "not running" in run_cli("server", "status").stdout
    client = connect()
    status = json.loads(run_cli("-o", "json", "server", "status").stdout)
    assert status["running"] and status["clients"] == 1
    refused = run_cli("server", "stop")
    assert refused.returncode == 2 and "use --force" in refused.stderr
    client.close()
    stopped = run_cli("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    assert not embedded.status(embedded_home)["running"]


def test_a_deep_state_directory_gets_a_short_socket_path(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("KIABATCH_HOME", str(deep))
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    try:
        client = connect()
        assert client.ping()
        socket = Path(record(deep)["socket"])
        assert len(str(socket)) <= 107
        assert socket.parent == Path(f"/tmp/kiabatch-{os.getuid()}")  # private: verified 0700 and ours
        client.close()
    finally:
        embedded.stop(deep)
