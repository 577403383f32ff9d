"""Defects found by hostile testing (issue 8): each reproduction, now a test.

Batch state that tells the truth, one error line for any input (and nothing
written), secrets never printed or inherited, files private to their user.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from kiabatch import Batch, submit
from kiabatch.connection import redact
from tests.helpers import RedisProcess, kb, kiabatch_cmd, one_line_error, run_cli, terminal_stderr


def keyspace(client: redis.Redis) -> list[bytes]:
    return sorted(client.keys("*"))


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); print(sys.argv[1])", "{item}"]


# -- batch state that lies --------------------------------------------------------------


def test_a_batch_whose_runner_was_killed_is_interrupted_everywhere(redis_url, home):
    batch = submit(items=[str(i) for i in range(6)], command=sleeper(30), parallel=2, wait=False, home=home)
    deadline = time.monotonic() + 30
    while batch.progress().running < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner = int(batch.store.meta(batch.id)["runner"].split()[1])
    os.kill(runner, signal.SIGKILL)
    while time.monotonic() < deadline:  # the lock goes with the process
        if batch.status().state == "interrupted":
            break
        time.sleep(0.05)
    status = batch.status()
    assert status.state == "interrupted" and status.progress.running == 0
    assert status.detail["next_step"] == f"kiabatch resume {batch.id}"
    shown = kb("status", batch.id)
    assert shown.exit_code == 130 and "interrupted" in shown.stdout and f"kiabatch resume {batch.id}" in shown.stdout
    listed = json.loads(kb("-o", "json", "list").stdout)
    assert [(b["id"], b["state"], b["progress"]["running"]) for b in listed] == [(batch.id, "interrupted", 0)]
    unfinished = kb("status")
    assert "interrupted" in unfinished.stdout and "running" not in unfinished.stdout.split("\n", 1)[1]
    watched = kb("status", "--watch", "--interval", "0.1", batch.id)
    assert watched.exit_code == 130  # documented: interrupted, resume finishes it
    for process in _workers_of(batch.id):  # the SIGKILLed runner's sleepers; resume would kill them too
        process.kill()


def _workers_of(batch_id: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("KIABATCH_LOCAL_WORKER_OF", "").split("@")[0] == batch_id:
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_running_counts_what_is_claimed_and_not_settled_while_it_runs(redis_url, home):
    batch = submit(items=[str(i) for i in range(4)], command=sleeper(1.0), parallel=2, wait=False, home=home)
    seen = set()
    deadline = time.monotonic() + 30
    while not batch.status().finished and time.monotonic() < deadline:
        seen.add(batch.progress().running)
        time.sleep(0.05)
    assert 2 in seen  # both slots' claims counted while their workers ran
    assert batch.progress().running == 0


def test_the_live_progress_line_shows_running_tasks(redis_url):
    assert "2 running" in terminal_stderr("submit", "--item", "1", "--item", "2", "-p", "2", "--", *sleeper(1.5))


def test_every_result_is_shown_with_the_failed_ones_marked(redis_url):
    fail_odd = [
        "sh",
        "-c",
        'test $(($1 % 2)) -eq 0 || {{ echo "odd $1" >&2; exit 3; }}; echo "even $1"',
        "sh",
        "{item}",
    ]
    submitted = kb("submit", "--retries", "0", "--batch-id", "mixed-bag", *[f"--item={i}" for i in range(4)],
                       "--", *fail_odd)  # fmt: skip
    assert submitted.exit_code == 1
    expected = ["0\teven 0", "1\tFAILED (exit 3, attempts 1): exited with status 3", "2\teven 2",
                "3\tFAILED (exit 3, attempts 1): exited with status 3"]  # fmt: skip
    assert submitted.stdout.splitlines() == expected
    assert "FAILED 1: exited with status 3" in submitted.stderr  # and listed on stderr
    results = kb("results", "mixed-bag")
    assert results.exit_code == 1 and results.stdout.splitlines() == expected
    rows = [json.loads(line) for line in kb("-o", "json", "results", "mixed-bag").stdout.splitlines()]
    assert [(r["item"], r["failed"], r.get("result"), r.get("reason")) for r in rows] == [
        (0, False, "even 0\n", None), (1, True, None, "exited with status 3"),
        (2, False, "even 2\n", None), (3, True, None, "exited with status 3"),
    ]  # fmt: skip


def test_a_submit_that_loses_redis_for_good_exits_three_and_resume_finishes(tmp_path, home, monkeypatch):
    server = RedisProcess(tmp_path / "r").start()
    monkeypatch.setenv("KIABATCH_REDIS_URL", server.url)
    monkeypatch.setenv("KIABATCH_REDIS_RETRY_SECONDS", "2")
    items = [str(i) for i in range(8)]
    argv = kiabatch_cmd("submit", "--batch-id", "lost-redis", "-p", "2", *[f"--item={i}" for i in items], "--")
    process = subprocess.Popen([*argv, *sleeper(0.5)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = server.client()
    deadline = time.monotonic() + 30
    while not client.exists("kiabatch:{lost-redis}:meta") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)
    server.stop(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3 and "Traceback" not in err, err
    *notes, line = err.strip().splitlines()
    assert line.startswith("kiabatch: error: cannot reach Redis") and "`kiabatch resume lost-redis`" in line
    assert all(not n.startswith("kiabatch: error") for n in notes)
    server.start()
    resumed = run_cli("resume", "lost-redis", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    results = Batch("lost-redis").results()
    assert sorted(str(r.item) for r in results) == items and len(results) == len(items)
    server.stop()


# -- no traceback, whatever the input ------------------------------------------------------

HUGE = "999999999999999999999999999999"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["submit", "--chunk", HUGE, "--item", "1", "--", "true"], "--chunk"),
        (["submit", "--task-timeout", HUGE, "--item", "1", "--", "true"], "--task-timeout"),
        (["submit", "--task-timeout", "99999999999d", "--item", "1", "--", "true"], "--task-timeout"),
        (["submit", "--ttl", HUGE, "--item", "1", "--", "true"], "--ttl"),
        (["submit", "--timeout", "0.0000000001", "--item", "1", "--", "true"], "--timeout"),
        (["submit", "--timeout", "0.001", "--item", "1", "--", "true"], None),
        (["submit", "--tasks", HUGE, "--item", "1", "--", "true"], "--tasks"),
        (["submit", "--parallel", "100001", "--item", "1", "--", "true"], "--parallel"),
        (["submit", "--retries", HUGE, "--item", "1", "--", "true"], "--retries"),
        (["submit", "pi", "--digits", HUGE], "--digits"),
        (["list", "--limit", HUGE], "--limit"),
        (["queue", "list", "--limit", HUGE], "--limit"),
        (["status", "x-abcde", "--watch", "--interval", "nan"], "--interval"),
        (["status", "x-abcde", "--watch", "--interval", "inf"], "--interval"),
        (["status", "x-abcde", "--watch", "--interval", "1e308"], "--interval"),
        (["scheduler", "--poll", "nan"], "--poll"),
        (["logs", "x-abcde", "--index", HUGE], "--index"),
    ],
)
def test_numbers_out_of_range_are_refused_before_anything_is_written(redis_url, client, args, fragment):
    before = keyspace(client)
    result = kb(*args)
    if fragment is None:  # a tiny but positive deadline is allowed: the batch may just fail
        assert result.exit_code in (0, 1), result.stderr
        return
    one_line_error(result, 2, fragment)
    assert keyspace(client) == before


def test_text_that_is_not_valid_unicode_is_refused(redis_url, client, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b'"fine"\n\xff\xfeoops\n')
    one_line_error(kb("submit", "--item", '"\\ud800"', "--", "echo", "{item}"), 2, "not valid Unicode")
    one_line_error(kb("submit", "--lines", str(bad), "--", "echo", "{item}"), 2, "line 2 is not valid UTF-8")
    one_line_error(kb("submit", "--items", str(bad), "--", "echo", "{item}"), 2, "line 2 is not valid UTF-8")
    one_line_error(kb("submit", "--lines", "-", "--", "echo", "{item}", input=b"ok\n\xc3(\n"), 2, "UTF-8")
    one_line_error(kb("queue", "enqueue", "q", '"\\udcff"'), 2, "not valid Unicode")
    one_line_error(kb("queue", "enqueue", "q", "--lines", str(bad)), 2, "UTF-8")
    # A command-line argument that Linux handed over as undecodable bytes (surrogate escapes).
    one_line_error(kb("queue", "enqueue", "q", '"\udcff"'), 2, "not valid Unicode")
    assert keyspace(client) == []


def test_a_nul_byte_is_refused_at_the_door_where_argv_would_carry_it(redis_url, client, tmp_path):
    one_line_error(kb("submit", "--item", '"a\\u0000b"', "--", "echo", "{item}"), 2, "NUL byte", "{input}")
    lines = tmp_path / "nul.txt"
    lines.write_bytes(b"ok\na\x00b\n")
    one_line_error(kb("submit", "--lines", str(lines), "--", "echo", "{item}"), 2, "item 2", "NUL byte")
    assert keyspace(client) == []
    # Carried safely as data through {input} and stdin.
    via_input = kb("-o", "json", "submit", "--item", '"a\\u0000b"', "--", "cat", "{input}")
    assert via_input.exit_code == 0 and json.loads(json.loads(via_input.stdout)["result"]) == "a\x00b"
    via_stdin = kb("-o", "json", "submit", "--stdin", "--item", '"a\\u0000b"', "--", "cat")
    assert via_stdin.exit_code == 0 and json.loads(via_stdin.stdout)["result"] == "a\x00b"


def test_an_item_from_a_queue_that_cannot_be_run_is_dead_lettered_and_never_wedges_the_batch(redis_url, client):
    assert kb("queue", "enqueue", "q", '"ok1"', '"a\\u0000b"', '"ok2"').exit_code == 0
    done = kb("submit", "--from-queue", "q", "--retries", "3", "--batch-id", "nul-q", "--", "echo", "{item}")
    assert done.exit_code == 1
    batch = Batch("nul-q")
    assert batch.status().state == "failed"
    assert sorted(r.item for r in batch.results()) == ["ok1", "ok2"]
    [dead] = batch.failed()
    assert dead.item == "a\x00b" and "NUL byte" in dead.reason and dead.attempts == 1  # not retried


def test_deeply_nested_items_are_refused(redis_url, client):
    one_line_error(kb("submit", "--item", "[" * 5000, "--", "echo", "{item}"), 2, "levels deep")
    one_line_error(kb("submit", "--item", "[" * 70 + "]" * 70, "--", "echo", "{item}"), 2, "levels deep")
    assert keyspace(client) == []


@pytest.mark.parametrize("scratch", ["/proc/nope", "/dev/null/x"])
def test_an_unusable_scratch_directory_is_one_line_and_writes_nothing(redis_url, client, monkeypatch, scratch):
    monkeypatch.setenv("KIABATCH_SCRATCH", scratch)
    one_line_error(kb("submit", "--item", "1", "--", "echo", "{item}"), 2, "KIABATCH_SCRATCH", scratch)
    assert keyspace(client) == []


def test_an_unusable_state_directory_is_one_line_and_writes_nothing(redis_url, client, monkeypatch, tmp_path):
    regular = tmp_path / "a-file"
    regular.write_text("x")
    for home in (str(regular), "/proc/x"):
        monkeypatch.setenv("KIABATCH_HOME", home)
        one_line_error(kb("submit", "--item", "1", "--", "echo", "{item}"), 2, home)
    assert keyspace(client) == []


def test_urls_that_do_not_parse_or_do_not_speak_redis(home, monkeypatch):
    import http.server
    import threading

    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    one_line_error(kb("--redis-url", "redis://[::1", "list"), 2, "bad Redis URL")

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        one_line_error(kb("--redis-url", f"redis://127.0.0.1:{server.server_port}/0", "list"), 3,
                       "does not speak the Redis protocol")  # fmt: skip
    finally:
        server.shutdown()


def test_a_cron_expression_that_never_fires_is_refused(redis_url, client):
    one_line_error(kb("schedule", "create", "never", "--cron", "0 0 31 2 *", "pi"), 2, "never fires")
    assert keyspace(client) == []


def test_a_stored_schedule_that_cannot_be_evaluated_does_not_break_the_others(redis_url, client, home):
    assert kb("schedule", "create", "good", "--cron", "@hourly", "pi", "--digits", "10").exit_code == 0
    bad = json.loads(client.hget("kiabatch:schedules", "good"))
    client.hset("kiabatch:schedules", "broken", json.dumps({**bad, "name": "broken", "cron": "0 0 31 2 *"}))
    listed = kb("schedule", "list")
    assert listed.exit_code == 0 and "good" in listed.stdout and "INVALID" in listed.stdout
    once = kb("scheduler", "--once")
    assert once.exit_code == 0 and "broken: invalid" in once.stderr
    assert kb("schedule", "delete", "broken").exit_code == 0
    assert "broken" not in kb("schedule", "list").stdout


def test_a_schedule_is_checked_exactly_as_submit_would_check_it(redis_url, client):
    one_line_error(kb("schedule", "create", "s1", "--cron", "@daily", "--", "--item", "{", "--command", "echo"),
                   2, "malformed item JSON")  # fmt: skip
    one_line_error(kb("schedule", "create", "s2", "--cron", "@daily", "--", "--chunk", "0", "-c", "x"), 2, "--chunk")
    one_line_error(kb("schedule", "create", "s3", "--cron", "@daily", "pi", "--digits", "-5"), 2, "--digits")
    one_line_error(
        kb("schedule", "create", "s4", "--cron", "@daily", "--", "--lines", "-", "-c", "x"), 2, "standard input"
    )
    assert keyspace(client) == []


# -- secrets and other users ---------------------------------------------------------------

SECRET = "Sup3r-s3cret"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:1/0",
        f"redis://user:{SECRET}@127.0.0.1:1/0",
        f"redis://127.0.0.1:1/0?password={SECRET}",
        f"unix:///tmp/nope.sock?password={SECRET}",
        f"unix://:{SECRET}@/tmp/nope.sock",
        f"redis://:{SECRET[:4]}/{SECRET[4:]}@127.0.0.1:1/0",
        f"redis://:{SECRET[:4]}?{SECRET[4:]}@127.0.0.1:1/0",
        f"redis://:{SECRET[:4]}#{SECRET[4:]}@127.0.0.1:1/0",
        f"redis:{SECRET}@host",
        f"rediss://{SECRET}@127.0.0.1:1",
        f"redis://:{SECRET}@127.0.0.1:notaport",
    ],
)
def test_no_part_of_a_credential_is_ever_printed(home, monkeypatch, url):
    monkeypatch.delenv("KIABATCH_REDIS_URL", raising=False)
    for args in (["--redis-url", url, "list"], ["status", "--read-only", "--replica-url", url, "x-abcde"]):
        result = kb(*args)
        assert result.exit_code in (2, 3)
        for part in (SECRET, SECRET[:4], SECRET[4:]):
            assert part not in result.stderr + result.stdout, (url, result.stderr)


def test_redact_never_shows_a_password_whatever_its_characters():
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    shapes = [
        "redis://:{p}@h:6379/0", "redis://u:{p}@h/1", "rediss://{p}@h", "unix://:{p}@/s.sock",
        "redis://h:6379/0?password={p}", "unix:///s.sock?password={p}", "redis:{p}@h", "redis://:{p}@h:x",
    ]  # fmt: skip
    password = st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
                       min_size=6, max_size=30).filter(lambda p: p.strip() == p)  # fmt: skip

    @settings(max_examples=300, deadline=None)
    @given(password, st.sampled_from(shapes))
    @example("0000#/", "redis://:{p}@h:6379/0")  # a '#' then '/' in the password once showed "0000" as the host
    def check(secret: str, shape: str) -> None:
        shown = redact(shape.format(p=secret))
        assert secret not in shown
        # Any 4 characters of it in a row would be a leak too (unless they are part of the URL's own text).
        for start in range(len(secret) - 3):
            piece = secret[start : start + 4]
            assert piece not in shown or piece in shape.replace("{p}", ""), (shape, secret, shown)

    check()


def test_workers_inherit_no_kiabatch_setting_and_no_redis_password(redis_server, home, monkeypatch, tmp_path):
    # A password-protected URL to the same server is not possible on a unix socket without ACLs, so a bogus
    # variable with a secret stands in for it besides the real URL.
    monkeypatch.setenv("KIABATCH_REDIS_URL", redis_server.url)
    monkeypatch.setenv("KIABATCH_REPLICA_SECRET_FOR_TEST", SECRET)
    redis_server.client().flushall()
    batch = submit(items=["x"], command=["env"], env={"MINE": "yes"}, wait=True, home=home)
    [result] = batch.results()
    environment = dict(line.split("=", 1) for line in result.text.splitlines() if "=" in line)
    assert not [name for name in environment if name.startswith("KIABATCH_") and name not in
                ("KIABATCH_BATCH", "KIABATCH_LOCAL_WORKER_OF", "KIABATCH_TASK_DIR")]  # fmt: skip
    assert SECRET not in result.text and redis_server.url not in result.text
    assert environment["MINE"] == "yes" and environment["JOB_COMPLETION_INDEX"] == "0"


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_everything_kiabatch_creates_is_private(redis_url, home, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("KIABATCH_SCRATCH", str(scratch))
    os.umask(0o022)
    slow = submit(items=["s"], command=["sh", "-c", "sleep 1; cat {input} > {output}"], wait=False, home=home)
    time.sleep(0.5)
    [batch_scratch] = scratch.glob(f"{slow.id}.*")  # BATCH.HOMEHASH: batches of two homes never share one
    during = _modes(batch_scratch)
    slow.wait(timeout=30)
    modes = _modes(home)
    assert modes["."] == 0o700 and modes["runs"] == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert modes[f"runs/{slow.id}/background.log"] == 0o600
    # Every file and directory kiabatch made is private; the worker's own {output} sits in a 0700 directory.
    assert during["."] == 0o700 and all(mode & 0o077 == 0 for name, mode in during.items()
                                        if not name.endswith("/output")), during  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user (CI runs as root)")
def test_another_local_user_can_read_no_item(redis_url, home, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("KIABATCH_SCRATCH", str(scratch))
    tmp_path.chmod(0o755)
    batch = submit(items=["top secret"], command=["sh", "-c", "cat {input} >/dev/null; sleep 2"], wait=False,
                   home=home)  # fmt: skip
    time.sleep(0.8)
    targets = [p for p in [*scratch.rglob("*"), *home.rglob("*")] if p.is_file()]
    probe = (
        "import os, sys\nos.setgid(65534); os.setuid(65534)\nread = []\n"
        "for path in sys.argv[1:]:\n    try:\n        read.append(open(path, 'rb').read())\n"
        "    except OSError:\n        pass\nprint(sum(b'top secret' in r for r in read))\n"
    )
    seen = subprocess.run([sys.executable, "-c", probe, *map(str, targets)], capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == "0" and targets
    batch.wait(timeout=30)


def test_an_output_that_is_a_symlink_or_a_fifo_is_not_followed(redis_url, home, tmp_path):
    link = submit(items=["x"], command=["ln", "-s", "/etc/hostname", "{output}"], retries=0, wait=True, home=home)
    [dead] = link.failed()
    assert "symbolic link" in dead.reason and link.results() == []
    fifo = submit(items=["x"], command=["mkfifo", "{output}"], retries=0, wait=True, home=home)
    [dead] = fifo.failed()
    assert "not a regular file" in dead.reason


def test_tables_escape_control_characters_from_items(redis_url):
    hostile = ["x\ny", "a\tb", "\x1b[31mred\x1b[0m"]
    done = kb("submit", *[f"--item={json.dumps(h)}" for h in hostile], "--batch-id", "ctl-chars", "--", "echo",
                  "{item}")  # fmt: skip
    assert done.exit_code == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)
    assert "\x1b" not in done.stdout and "\\x1b[31mred" in done.stdout and "x\\ny" in done.stdout
    assert "\x1b" not in kb("results", "ctl-chars").stdout


def test_batches_of_the_same_id_in_two_homes_never_touch_each_others_workers(redis_url, home, tmp_path, monkeypatch):
    # Two state directories (two Redis servers) may hold a batch of the same id; a runner that starts
    # reaps its own dead predecessor's workers and scratch, never the other home's.
    monkeypatch.setenv("KIABATCH_SCRATCH", str(tmp_path / "scratch"))
    other = RedisProcess(tmp_path / "other-redis").start()
    try:
        first = submit(items=["a", "b"], command=sleeper(1.5), parallel=2, retries=0, batch_id="twin",
                       home=home)  # fmt: skip
        time.sleep(0.5)
        second = submit(items=["c"], command=sleeper(0.1), retries=0, batch_id="twin", redis=other.url,
                        home=tmp_path / "other-home", wait=True)  # fmt: skip
        first.wait(timeout=30)
        assert first.failed() == [] and sorted(r.text for r in first.results()) == ["a\n", "b\n"]
        assert second.failed() == [] and [r.text for r in second.results()] == ["c\n"]
    finally:
        other.stop()


# -- output that cannot be written ----------------------------------------------------------


def big_result_batch(home: Path) -> str:
    return submit(items=["x"], command=["head", "-c", "2000000", "/dev/zero"], wait=True, home=home).id


@pytest.mark.parametrize("args", [["results", "--raw"], ["results"], ["-o", "json", "results"]])
def test_a_reader_that_stops_early_is_exit_141_without_noise(redis_url, home, args):
    batch_id = big_result_batch(home)
    process = subprocess.Popen(kiabatch_cmd(*args, batch_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)
    process.stdout.close()  # as `| head -c 10` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141  # 128 + SIGPIPE, as any Unix tool; 1 would say "items failed"
    assert stderr == ""


@pytest.mark.parametrize("args", [["results", "--raw"], ["results"]])
def test_a_full_disk_under_the_output_is_one_line(redis_url, home, args):
    batch_id = big_result_batch(home)
    with open("/dev/full", "w") as full:
        refused = subprocess.run(kiabatch_cmd(*args, batch_id), stdout=full, stderr=subprocess.PIPE, text=True,
                                 timeout=60)  # fmt: skip
    one_line_error(refused, 2, "No space left on device")


def test_a_state_directory_the_shell_cannot_expand_is_one_line(redis_url, tmp_path):
    refused = run_cli("list", env={"KIABATCH_HOME": "~no-such-user-kb/state", "KIABATCH_REDIS_URL": ""})
    one_line_error(refused, 2, "KIABATCH_HOME", "cannot be expanded")


def test_a_runs_directory_that_is_a_file_is_refused_before_the_batch_is_written(redis_url, client, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "runs").write_text("not a directory")
    refused = run_cli("submit", "--item", "1", "--", "true", env={"KIABATCH_HOME": str(state)})
    one_line_error(refused, 2, "runs directory")
    assert keyspace(client) == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["submit", "--help"]])
def test_output_written_while_parsing_to_a_gone_reader_is_exit_141_too(args):
    process = subprocess.Popen(kiabatch_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # gone before a byte is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert stderr == ""
