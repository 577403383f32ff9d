"""The CLI: commands, output formats, exit codes, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiabatch.cli import cli
from tests.helpers import kb, on_a_terminal, one_line_error, run_cli, truth


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_submit_pi_prints_exactly_the_digits(runner, redis_url):
    result = kb("submit", "pi", "--digits", "100", "--parallel", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == truth(100) + "\n"
    assert "succeeded" in result.stderr


def test_submit_exec_prints_item_and_result_per_line(runner, redis_url, tmp_path):
    lines = tmp_path / "names.txt"
    lines.write_text("alpha\n\nbeta\n")
    result = kb("submit", "--command", "echo got {item}", "--lines", str(lines), "-p", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["alpha\tgot alpha", "beta\tgot beta"]


def test_submit_exec_with_the_command_after_a_double_dash_and_jsonl_items(runner, redis_url, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"url": "a"}\n{"url": "b"}\n')
    result = kb("-o", "json", "submit", "--items", str(items), "--", "echo", "{url}")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["item"], r["result"]) for r in rows] == [({"url": "a"}, "a\n"), ({"url": "b"}, "b\n")]


def test_failed_items_are_listed_and_the_exit_code_is_one(runner, redis_url):
    result = kb(
        "submit",
        "--retries",
        "0",
        "--item",
        '"fine"',
        "--item",
        '"bad"',
        "--",
        "sh",
        "-c",
        'test "$1" = fine || {{ echo "cannot do $1" >&2; exit 4; }}',
        "sh",
        "{item}",
    )
    assert result.exit_code == 1
    assert "FAILED bad: exited with status 4 (exit 4, attempts 1)" in result.stderr
    assert "cannot do bad" in result.stderr


def test_no_wait_prints_the_batch_id_and_status_results_logs_follow_it(runner, redis_url):
    submitted = kb(
        "submit",
        "--no-wait",
        "--batch-id",
        "bg-batch",
        "--item",
        "1",
        "--item",
        "2",
        "--command",
        "sh -c 'echo out $0; echo err $0 >&2' {item}",
    )
    assert submitted.exit_code == 0 and submitted.stdout == "bg-batch\n"
    watched = kb("status", "--watch", "--interval", "0.1", "bg-batch")
    assert watched.exit_code == 0 and "succeeded" in watched.stdout
    status = json.loads(kb("-o", "json", "status", "bg-batch").stdout)
    assert status["state"] == "succeeded" and status["progress"]["done"] == 2
    results = kb("results", "bg-batch")
    assert results.stdout.splitlines() == ["1\tout 1", "2\tout 2"]
    logs = kb("logs", "bg-batch", "--index", "0")
    assert logs.stdout.splitlines()[0] == "==> index 0, attempt 1 <=="
    assert logs.stdout.splitlines()[1].startswith("err ")
    # An index the batch does not have was an empty success; it is one line now.
    one_line_error(kb("logs", "bg-batch", "--index", "2"), 2, "has 2 task(s), indexes 0-1; no index 2")
    listed = json.loads(kb("-o", "json", "list").stdout)
    assert [b["id"] for b in listed] == ["bg-batch"]
    assert kb("status").stdout.strip() == "no unfinished batches"


def test_results_reduce_by_default_for_pi_and_per_item_on_request(runner, redis_url):
    kb("submit", "pi", "--digits", "30", "-p", "2", "--batch-id", "pi-thirty")
    assert kb("results", "pi-thirty").stdout == truth(30) + "\n"
    per_item = kb("-o", "json", "results", "pi-thirty", "--no-reduce").stdout.splitlines()
    ranges = [(json.loads(line)["item"]["a"], json.loads(line)["item"]["b"]) for line in per_item]
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[0][1] == ranges[1][0]
    raw = kb("results", "pi-thirty", "--raw")
    assert raw.stdout_bytes.startswith(b"KBPI1\n")


def test_delete_removes_a_batch_and_unknown_ids_exit_two(runner, redis_url, client):
    kb("submit", "--batch-id", "doomed", "--item", "1", "--command", "true")
    deleted = kb("delete", "doomed")
    assert deleted.exit_code == 0 and "deleted batch doomed" in deleted.stderr
    assert client.keys("kiabatch:{doomed}*") == []
    one_line_error(kb("delete", "doomed"), 2, "no batch 'doomed'")
    one_line_error(kb("status", "doomed"), 2, "no batch 'doomed'")
    one_line_error(kb("results", "Not_A_Label"), 2, "bad batch id")


def test_queue_commands_enqueue_list_purge_and_submit_from_queue(runner, redis_url):
    assert kb("queue", "enqueue", "jobs", '"a"', '{"n": 2}').exit_code == 0
    listing = kb("queue", "list")
    assert listing.stdout.splitlines()[1].split() == ["jobs", "2"]
    assert kb("queue", "list", "jobs").stdout.splitlines() == ["a", '{"n":2}']
    submitted = kb("submit", "--from-queue", "jobs", "--command", "echo {item}")
    assert submitted.exit_code == 0 and len(submitted.stdout.splitlines()) == 2
    empty = kb("submit", "--from-queue", "jobs", "--command", "echo {item}")
    assert empty.exit_code == 0 and "is empty: nothing to run" in empty.stderr
    kb("queue", "enqueue", "jobs", "1")
    assert kb("queue", "purge", "jobs", "--yes").stderr.strip() == "removed 1 item(s) from 'jobs'"


def test_queue_purge_asks_on_a_terminal_and_otherwise_needs_yes(runner, redis_url):
    kb("queue", "enqueue", "jobs", "1", "2")
    # No terminal to ask: one line, exit 2, nothing removed (was click's "aborted", exit 130).
    one_line_error(kb("queue", "purge", "jobs"), 2, "pass --yes to confirm")
    code, shown = on_a_terminal("queue", "purge", "jobs", typed=b"n\n")
    assert code == 2 and "remove all 2 item(s) from 'jobs'?" in shown and "nothing removed" in shown
    assert kb("queue", "list", "jobs").stdout.splitlines() == ["1", "2"]
    code, shown = on_a_terminal("queue", "purge", "jobs", typed=b"\x04")  # end of input: a refusal, not Ctrl-C
    assert code == 2 and "nothing removed" in shown
    code, shown = on_a_terminal("queue", "purge", "jobs", typed=b"y\n")
    assert code == 0 and "removed 2 item(s) from 'jobs'" in shown
    empty = kb("queue", "purge", "jobs")  # nothing to confirm
    assert empty.exit_code == 0 and "is empty; nothing to remove" in empty.stderr


def test_submit_and_render_help_say_where_the_options_are(runner):
    """`submit --help` shows only the workloads; it must point at the options (a new user found none)."""
    for group in ("submit", "render"):
        shown = kb(group, "--help").stdout
        assert f"kiabatch {group} exec --help" in shown and f"kiabatch {group} pi --help" in shown
        assert "--parallel" in kb(group, "exec", "--help").stdout


BAD_INPUTS = [
    (["submit", "pi", "--digits", "0"], 2, ["--digits", "1<=x<="]),
    (["submit", "pi", "--digits", "-5"], 2, ["--digits"]),
    (["submit", "pi", "--digits", "abc"], 2, ["--digits", "not a valid integer"]),
    (["submit", "pi", "--digits", "1.5"], 2, ["--digits", "not a valid integer"]),
    (["submit", "pi", "--digits", "100000001"], 2, ["more than 100,000,000", "--force"]),
    (["submit", "pi", "--digits", "100", "--parallel", "0"], 2, ["--parallel", "1<=x<="]),
    (["submit", "pi", "--digits", "10", "--tasks", "9"], 2, ["tasks 9", "use at most 4"]),
    (["submit", "fizz"], 2, ["unknown workload 'fizz'", "exec, pi"]),
    (["submit", "--command", "echo {item}", "--item", "{oops"], 2, ["malformed item JSON", "--item"]),
    (["submit", "--command", "echo {url}", "--item", '{"x": 1}'], 2, ["has no field 'url'"]),
    (["submit", "--command", "echo {", "--item", "1"], 2, ["unmatched or empty brace"]),
    (["submit", "--item", "1"], 2, ["no worker command"]),
    (["submit", "--command", "true"], 2, ["no items to run"]),
    (
        ["submit", "--command", "true", "--item", "1", "--timeout", "soon"],
        2,
        ["--timeout", "not a positive duration"],
    ),
    (["submit", "--command", "true", "--item", "1", "--backend", "mars"], 2, ["--backend", "'local'"]),
    (["submit", "--command", "true", "--item", "1", "--batch-id", "Bad_Id"], 2, ["bad batch id"]),
    (["submit", "--command", "true", "--item", "1", "--env", "1X=2"], 2, ["--env"]),
    (["queue", "enqueue", "q{x}", "1"], 2, ["bad queue name"]),
]


@pytest.mark.parametrize(
    ("args", "code", "fragments"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_input_gets_one_line_a_documented_code_and_writes_nothing(runner, redis_url, client, args, code, fragments):
    one_line_error(kb(*args), code, *fragments)
    assert client.dbsize() == 0


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://example.org", "scheme must be one of"),
        ("redis://:pw@host:notaport", "bad Redis URL 'redis://:***@host"),
        ("redis://localhost/zero", "database must be a number"),
        ("unix://", "needs a socket path"),
    ],
)
def test_a_bad_redis_url_exits_two_and_never_prints_the_password(runner, home, url, fragment):
    result = kb("--redis-url", url, "list")
    one_line_error(result, 2, fragment)
    assert "pw" not in result.stderr.replace("pw@", "") or ":***@" in result.stderr


def test_an_unreachable_redis_exits_three(runner, home, tmp_path):
    for url in (f"unix://{tmp_path}/nothing.sock", "redis://127.0.0.1:1/0"):
        one_line_error(kb("--redis-url", url, "list"), 3, "cannot reach")
    env_result = runner.invoke(cli, ["list"], env={"KIABATCH_REDIS_URL": "redis://:secret@127.0.0.1:1"})
    one_line_error(env_result, 3, "redis://:***@127.0.0.1:1")
    assert "secret" not in env_result.stderr


def test_the_quick_start_works_as_a_real_process_in_a_fresh_home(tmp_path):
    env = {"KIABATCH_HOME": str(tmp_path / "fresh"), "KIABATCH_EMBEDDED_IDLE_TIMEOUT": "2"}
    env_without_url = {k: v for k, v in os.environ.items() if k != "KIABATCH_REDIS_URL"} | env
    done = run_cli("submit", "pi", "--digits", "5000", "--parallel", "3", env=env_without_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == truth(5000) + "\n"
    listed = run_cli("list", env=env_without_url)
    assert "succeeded" in listed.stdout and " pi " in listed.stdout
    run_cli("server", "stop", "--force", env=env_without_url)


def test_pi_through_the_cli_with_the_python_integer_backend(redis_url):
    done = run_cli("submit", "pi", "--digits", "2000", "-p", "2", env={"MPMATH_NOGMPY": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == truth(2000) + "\n"


def test_help_lists_every_command_and_exit_codes_are_documented(runner):
    text = kb("--help").stdout
    for command in (
        "submit",
        "status",
        "list",
        "results",
        "logs",
        "delete",
        "resume",
        "queue",
        "server",
        "task",
    ):
        assert f"  {command}" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in readme


def test_a_terminal_gets_a_live_progress_bar_and_a_pipe_gets_none(redis_url):
    import subprocess

    from tests.helpers import kiabatch_cmd, terminal_stderr

    args = ["submit", "--item", "1", "--item", "2", "--item", "3", "-p", "2", "--", "sh", "-c", "sleep 0.3"]
    terminal = terminal_stderr(*args)
    assert "running" in terminal and "0 failed" in terminal and "3/3" in terminal  # the live bar
    args = kiabatch_cmd(*args)
    piped = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert "running 0, failed" not in piped.stderr and "#" not in piped.stderr  # no bar in a pipe
    assert [line.split(":")[0].split()[0] for line in piped.stderr.strip().splitlines()] == ["batch", "batch"]


def test_json_results_are_exactly_the_outcome_dicts_for_chunks_binary_text_and_failures(redis_url, client, home):
    from kiabatch import submit
    from kiabatch.batch import open_store
    from kiabatch.cli.output import json_lines, outcome_dict, outcome_line, table_lines

    script = 'case "$1" in bad) exit 3;; bin) printf "\\377\\376";; *) printf "%s ✓\\n" "$1";; esac'
    values = ["a", "bin", {"k": [1, "é"]}, "bad", "x\ty", 7, "last"]
    batch = submit(items=values, command=["sh", "-c", script, "sh", "{item}"], chunk=3, retries=0, wait=True,
                   home=home)  # fmt: skip
    store = open_store(client)
    outcomes = list(store.iter_outcomes(batch.id))
    assert [json.loads(line) for line in json_lines(store, batch.id)] == [outcome_dict(o) for o in outcomes]
    assert list(table_lines(store, batch.id)) == [outcome_line(o) for o in outcomes]
    assert len(outcomes) == len(values) and [o.item for o in outcomes if hasattr(o, "reason")] == ["bad"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["schedule", "history", "\udcff"], "bad schedule name"),
        (["schedule", "run-now", "Not_A_Name"], "bad schedule name"),
        (["submit", "pi", "--digits", "1", "--schedule", "\udcff"], "bad schedule name"),
        (["submit", "pi", "--digits", "1", "--run", "\udcff"], "bad run name"),
        (["submit", "pi", "--digits", "1", "--run", "a\nb"], "bad run name"),
        (["render", "--item", "1", "--pod-template", "\x00", "--", "true"], "is not a file name"),
    ],
)
def test_names_the_fuzzer_found_unencodable_are_refused_with_one_line(redis_url, client, args, fragment):
    """Found by tests/test_fuzz_cli.py (random mode): these raised UnicodeEncodeError / ValueError."""
    one_line_error(kb(*args), 2, fragment)
    assert client.keys("*") == []


@pytest.mark.parametrize("chunk", ["1", "3"])
def test_every_results_format_lists_the_same_items_in_order_across_pages(runner, redis_url, chunk):
    # 2,500 items cross the 1,000-item pages the results are streamed in; every 7th one fails.
    items = "".join(f"{n}\n" for n in range(2500))
    submitted = kb("submit", "-q", "--batch-id", "paged", "--chunk", chunk, "--retries", "0", "--lines", "-",
                   "--", "sh", "-c", 'test $(($1 % 7)) -ne 0 || exit 3; printf "r%s\\n" "$1"', "sh", "{item}",
                   input=items)  # fmt: skip
    assert submitted.exit_code == 1
    good = [n for n in range(2500) if n % 7]
    table = kb("results", "paged")
    assert table.exit_code == 1
    assert [line for line in table.stdout.splitlines() if "FAILED" not in line] == [f"{n}\tr{n}" for n in good]
    assert [int(line.split("\t")[0]) for line in table.stdout.splitlines()] == list(range(2500))
    lines = [json.loads(line) for line in kb("-o", "json", "results", "paged").stdout.splitlines()]
    assert [line["item"] for line in lines] == [str(n) for n in range(2500)]  # --lines items are strings
    assert [line["result"] for line in lines if not line["failed"]] == [f"r{n}\n" for n in good]
    raw = kb("results", "paged", "--raw")
    assert raw.exit_code == 1 and raw.stdout_bytes == b"".join(f"r{n}\n".encode() for n in good)


def test_delete_keep_results_of_a_running_batch_leaves_a_finished_batch_that_expires(runner, redis_url, client):
    """It kept an unfinished batch without a TTL, and `resume` then broke on the missing keys (exit 3)."""
    assert kb("submit", "--batch-id", "halted", "--item", "1", "--item", "2", "--no-wait", "-q", "--",
              "sh", "-c", "sleep 30").exit_code == 0  # fmt: skip
    deadline = time.monotonic() + 30
    while kb("-o", "json", "status", "halted").stdout.find('"running"') < 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = kb("delete", "halted", "--keep-results")
    assert stopped.exit_code == 0 and stopped.stderr.startswith("stopped batch halted")
    assert json.loads(kb("-o", "json", "status", "halted").stdout)["state"] == "failed"
    assert 0 < client.ttl("kiabatch:{halted}:meta") <= 7 * 24 * 3600
    resumed = kb("resume", "halted")
    assert resumed.exit_code == 0 and "already failed; nothing to resume" in resumed.stderr
