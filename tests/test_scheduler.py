"""Schedules: cron and time-zone validation, and the local scheduler driven by an injected clock."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from kiabatch import Batch, Queue
from kiabatch.cli import cli
from kiabatch.errors import UsageError
from kiabatch.scheduler import LocalScheduler, ScheduleStore, launch_run, run_name
from kiabatch.schedules import Schedule, run_batch_id, validate_cron, validate_time_zone
from tests.helpers import kiabatch_cmd

T0 = datetime(2026, 11, 26, 10, 3, tzinfo=UTC)
WORKER = [sys.executable, "tests/programs/worker.py"]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("*/10 * * * 8", "the day-of-week field '8' is not valid (allowed: 0-6 or SUN-SAT"),
        ("61 * * * *", "the minute field '61' is not valid (allowed: 0-59"),
        ("* 24 * * *", "the hour field '24'"),
        ("* * 0 * *", "the day-of-month field '0'"),
        ("* * * 13 *", "the month field '13'"),
        ("* * * * * *", "needs 5 fields"),
        ("TZ=UTC * * * * *", "--time-zone"),
        ("@often", "needs 5 fields"),
        # croniter reads these, Kubernetes CronJobs refuse them (found by a hostile review):
        ("0 0 L * *", "the day-of-month field 'L' is not valid"),
        ("0 0 15W * *", "the day-of-month field '15W' is not valid"),
        ("0 0 * * 5L", "the day-of-week field '5L' is not valid"),
        ("0 0 * * 5#3", "no L, W or #"),
        ("* * * * 0-7", "the day-of-week field '0-7'"),
        ("* * * * 1-5/2,7", "the day-of-week field '1-5/2,7'"),
        ("* MON * * *", "the hour field 'MON'"),
        # ranges a CronJob refuses as running backwards (croniter wraps them round), and day 0:
        ("5-1 * * * *", "the minute field '5-1'"),
        ("0 22-2 * * *", "the hour field '22-2'"),
        ("0 0 * * SAT-SUN", "the day-of-week field 'SAT-SUN'"),
        ("0 0 * DEC-JAN *", "the month field 'DEC-JAN'"),
        ("0 0 0-0 * *", "the day-of-month field '0-0'"),
    ],
)
def test_a_bad_cron_expression_names_the_bad_field(expression, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("*", r"\*")):
        validate_cron(expression)


def test_good_cron_expressions_and_time_zones_pass():
    for expression in ("*/10 * * * *", "0 3 * * MON-FRI", "5,35 8-18 1 JAN *", "@hourly", "@daily", "0 3 * JUL WED",
                       "0 0 ? * *", "0 0 * * 1-5/2", "0 0 * * sun"):  # fmt: skip
        assert validate_cron(expression) == expression
    assert validate_time_zone("Europe/Berlin") == "Europe/Berlin"
    with pytest.raises(UsageError, match="did you mean Europe/Berlin"):
        validate_time_zone("Europe/Berlln")


@pytest.mark.parametrize("expression", [" @daily", "@hourly ", "\t0 3 * * *\n"])
def test_a_schedule_keeps_its_cron_as_validated_so_spaces_around_it_never_break_it_later(expression):
    """'@daily ' passed the check (which strips) but was stored as given: every list, show and tick then
    raised croniter's error as a traceback."""
    schedule = Schedule(name="spaced", cron=expression, submit_args=["pi"])
    assert schedule.cron == expression.strip()
    assert Schedule.from_json(schedule.to_json()).next_tick(datetime(2026, 7, 1, 12, tzinfo=UTC)).tzinfo is not None


@pytest.mark.parametrize(
    ("cron", "ticks"),
    [
        ("0 10-10 * * *", ["Thu 03 10:00", "Fri 04 10:00"]),  # croniter: every hour
        ("5-5 * * * *", ["Wed 02 14:05", "Wed 02 15:05"]),  # croniter: every minute
        ("0 0 * * 5-5", ["Fri 04 00:00", "Fri 11 00:00"]),  # croniter: every day
        ("0 0 */1 * 1", ["Mon 07 00:00", "Mon 14 00:00"]),  # */1 is a star: Mondays only
        ("0 0 1 * */1", ["Fri 01 00:00", "Mon 01 00:00"]),  # the 1st only
        ("0 0 */2 * 0-6", ["Thu 03 00:00", "Fri 04 00:00"]),  # neither is a star: either matches, every day
        ("0 0 1,15 * MON", ["Mon 07 00:00", "Mon 14 00:00", "Tue 15 00:00"]),
        ("0 0 ? * MON", ["Mon 07 00:00", "Mon 14 00:00"]),
    ],
)
def test_local_ticks_are_the_ones_a_cronjob_would_fire(cron, ticks):
    """robfig/cron's reading (Kubernetes), not croniter's, where the two differ (found by a hostile review)."""
    schedule = Schedule(name="same", cron=cron, submit_args=["pi"])
    moment, seen = datetime(2026, 12, 2, 13, 5, tzinfo=UTC), []  # a Wednesday
    for _ in ticks:
        moment = schedule.next_tick(moment)
        seen.append(moment.strftime("%a %d %H:%M"))
    assert seen == ticks
    assert schedule.last_tick(moment) == moment


def test_ticks_follow_the_time_zone_including_daylight_saving():
    schedule = Schedule(name="nightly", cron="0 3 * * *", submit_args=["pi"], time_zone="Europe/Berlin")
    summer = schedule.next_tick(datetime(2026, 7, 1, 12, tzinfo=UTC))
    winter = schedule.next_tick(datetime(2026, 12, 1, 12, tzinfo=UTC))
    assert (summer.astimezone(UTC).hour, winter.astimezone(UTC).hour) == (1, 2)
    assert schedule.last_tick(datetime(2026, 12, 2, 2, 0, tzinfo=UTC)) == winter


def test_run_batch_ids_are_stable_dns_labels():
    assert run_batch_id("thumbs-202611261010") == run_batch_id("thumbs-202611261010")
    assert run_batch_id("thumbs-202611261010") != run_batch_id("thumbs-202611261020")
    long = run_batch_id("x" * 63)
    assert len(long) <= 52 and long.startswith("xxx")


def make(client, name="every10", cron="*/10 * * * *", **fields) -> Schedule:
    schedule = Schedule(name=name, cron=cron, created_at=T0.timestamp(), **fields)
    ScheduleStore(client).save(schedule)
    return schedule


def scheduler(client, home) -> LocalScheduler:
    return LocalScheduler(client, home=home, log=lambda message: None)


def wait_finished(batch_id: str, timeout: float = 60) -> None:
    Batch(batch_id).wait(timeout=timeout)


def test_a_run_starts_once_per_tick_and_is_an_ordinary_batch(client, home):
    make(client, submit_args=["--item", '"x"', "--", "echo", "{item}"])
    local = scheduler(client, home)
    assert local.tick(T0 + timedelta(minutes=2)) == []
    assert local.tick(T0 + timedelta(minutes=7, seconds=5)) == [("every10", "launched")]
    assert local.tick(T0 + timedelta(minutes=7, seconds=40)) == []  # same tick
    [entry] = ScheduleStore(client).history("every10")
    assert entry["run"] == "every10-202611261010"
    wait_finished(entry["batch"])
    assert [r.text for r in Batch(entry["batch"]).results()] == ["x\n"]
    assert Batch(entry["batch"]).store.spec(entry["batch"]).schedule == "every10"


def test_forbid_skips_a_tick_while_the_previous_run_is_active(client, home):
    make(client, concurrency="forbid", submit_args=["--item", '"a"', "--", *WORKER, "{item}", "--sleep", "3"])
    local = scheduler(client, home)
    assert local.tick(T0 + timedelta(minutes=7)) == [("every10", "launched")]
    assert local.tick(T0 + timedelta(minutes=17)) == [("every10", "skipped")]
    first = ScheduleStore(client).history("every10")[-1]["batch"]
    wait_finished(first)
    assert local.tick(T0 + timedelta(minutes=27)) == [("every10", "launched")]
    outcomes = [e["outcome"] for e in reversed(ScheduleStore(client).history("every10"))]
    assert outcomes == ["launched", "skipped", "launched"]


def test_replace_stops_the_previous_run_which_stays_resumable(client, home):
    make(client, concurrency="replace", submit_args=["--item", '"a"', "--", *WORKER, "{item}", "--sleep", "30"])
    local = scheduler(client, home)
    local.tick(T0 + timedelta(minutes=7))
    first = ScheduleStore(client).history("every10")[0]["batch"]
    time.sleep(1.0)
    assert local.tick(T0 + timedelta(minutes=17)) == [("every10", "launched")]
    assert Batch(first).status().state == "interrupted"
    history = {e["run"]: e for e in ScheduleStore(client).history("every10")}
    assert history["every10-202611261010"]["outcome"] == "replaced"
    assert f"kiabatch resume {first}" in history["every10-202611261010"]["note"]
    second = history["every10-202611261020"]["batch"]
    for batch in (first, second):
        Batch(batch).delete()


def test_allow_runs_overlapping_runs_side_by_side(client, home):
    make(client, concurrency="allow", submit_args=["--item", '"a"', "--", *WORKER, "{item}", "--sleep", "2"])
    local = scheduler(client, home)
    local.tick(T0 + timedelta(minutes=7))
    local.tick(T0 + timedelta(minutes=17))
    batches = [e["batch"] for e in ScheduleStore(client).history("every10")]
    assert len(set(batches)) == 2
    assert all(Batch(b).status().state == "running" for b in batches)
    for batch in batches:
        wait_finished(batch)


def test_a_suspended_schedule_starts_nothing_until_resumed(client, home):
    make(client, suspend=True, submit_args=["pi", "--digits", "5"])
    local = scheduler(client, home)
    assert local.tick(T0 + timedelta(minutes=7)) == []
    runner = CliRunner()
    assert runner.invoke(cli, ["schedule", "resume", "every10"]).exit_code == 0
    assert local.tick(T0 + timedelta(minutes=17)) == [("every10", "launched")]
    wait_finished(ScheduleStore(client).history("every10")[0]["batch"])


@pytest.mark.parametrize(("deadline", "expected"), [(600, "launched"), (60, "skipped")])
def test_after_downtime_at_most_one_missed_tick_runs(client, home, deadline, expected):
    make(client, starting_deadline=deadline, submit_args=["pi", "--digits", "5"])
    local = scheduler(client, home)
    local.tick(T0 + timedelta(minutes=7))  # the 10:10 run
    wait_finished(ScheduleStore(client).history("every10")[0]["batch"])
    # Down from 10:11 to 10:47:30: the ticks 10:20, 10:30 and 10:40 were missed.
    assert local.tick(T0 + timedelta(minutes=44, seconds=30)) == [("every10", expected)]
    runs = [e["run"] for e in ScheduleStore(client).history("every10")]
    assert runs == ["every10-202611261040", "every10-202611261010"]
    if expected == "launched":
        wait_finished(ScheduleStore(client).history("every10")[0]["batch"])


def test_an_empty_queue_ends_the_run_without_a_batch(client, home):
    make(client, submit_args=["--from-queue", "nothing", "--command", "echo {item}"])
    assert scheduler(client, home).tick(T0 + timedelta(minutes=7)) == [("every10", "empty")]
    assert client.keys("kiabatch:{*") == []


def test_starting_the_same_run_twice_attaches_instead_of_draining_again(client, home):
    schedule = make(client, submit_args=["--from-queue", "q", "--command", "echo {item}"])
    Queue("q").enqueue_many(["a", "b"])
    run = run_name("every10", T0)
    first = launch_run(schedule, run, redis_url=None, home=home)
    Queue("q").enqueue("c")  # arrives after the run's snapshot
    again = launch_run(schedule, run, redis_url=None, home=home)  # e.g. the scheduler restarted
    assert first.batch == again.batch == run_batch_id(run)
    wait_finished(first.batch)
    assert sorted(r.item for r in Batch(first.batch).results()) == ["a", "b"]
    assert Queue("q").peek() == ["c"]


def test_drain_under_concurrent_producers_processes_every_item_exactly_once(client, home):
    make(
        client,
        name="drain",
        cron="* * * * *",
        concurrency="allow",
        submit_args=["--from-queue", "drain", "--command", "echo {item}", "-p", "2"],
    )
    local = scheduler(client, home)
    producers, per_producer = 3, 60
    stop = threading.Event()
    produced = [0] * producers

    def produce(worker: int) -> None:
        # At least per_producer items each, and more until the runs below have cut the queue a few times.
        queue = Queue("drain", client)
        while produced[worker] < per_producer or not stop.is_set():
            queue.enqueue(f"{worker}-{produced[worker]}")
            produced[worker] += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    for thread in threads:
        thread.start()
    minute = 0
    while any(t.is_alive() for t in threads) or len(Queue("drain", client)):
        minute += 1
        local.tick(T0 + timedelta(minutes=minute))
        if minute >= 3:
            stop.set()
        assert minute < 200
    batches = [e["batch"] for e in ScheduleStore(client).history("drain", limit=1000) if e["batch"]]
    assert len(batches) >= 2  # the queue was cut several times while producers ran
    seen = []
    for batch in batches:
        wait_finished(batch)
        seen += [r.item for r in Batch(batch).results()]
    assert len(seen) == len(set(seen)) == sum(produced)


def test_the_scheduler_stops_cleanly_on_sigterm(redis_url, home):
    process = subprocess.Popen(kiabatch_cmd("scheduler", "--poll", "0.2"), stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "stopped" in err


def test_schedule_commands_create_list_show_history_run_now_delete(client, home):
    runner = CliRunner()
    created = runner.invoke(cli, ["schedule", "create", "hourly-pi", "--cron", "@hourly", "pi", "--digits", "20"])
    assert created.exit_code == 0, created.stderr
    assert "hourly-pi" in runner.invoke(cli, ["schedule", "list"]).stdout
    shown = runner.invoke(cli, ["-o", "json", "schedule", "show", "hourly-pi"])
    assert shown.exit_code == 0 and '"submit_args": ["pi", "--digits", "20"]' in shown.stdout
    quoted = runner.invoke(cli, ["schedule", "create", "thumbs", "--cron", "@daily", "--item", '"a b"',
                                 "--command", "python thumb.py {input}"])  # fmt: skip
    assert quoted.exit_code == 0, quoted.stderr
    lines = dict(line.split(None, 1) for line in runner.invoke(cli, ["schedule", "show", "thumbs"]).stdout
                 .replace("time zone", "time_zone").replace("submit args", "submit_args").splitlines())  # fmt: skip
    assert lines["time_zone"] == "UTC"  # was Python's None
    # Quoted as a shell would need it: pasting it back gives the same arguments.
    assert shlex.split(lines["submit_args"]) == ["--item", '"a b"', "--command", "python thumb.py {input}"]
    runner.invoke(cli, ["schedule", "delete", "thumbs"])
    # An argument with a control or invisible character: nothing raw reaches the terminal, and bash reads
    # the line back as the same arguments (printable() after shlex.join doubled every backslash).
    args = ["--item", "1", "--", "sed", r"s/\d+/X/", "a\tb", "it's", "zero\u200bwidth", "é\x1b[31m"]
    assert runner.invoke(cli, ["schedule", "create", "odd", "--cron", "@daily", *args]).exit_code == 0
    shown = runner.invoke(cli, ["schedule", "show", "odd"]).stdout
    [line] = [line for line in shown.splitlines() if line.startswith("submit args")]
    quoted = line.removeprefix("submit args").strip()
    assert quoted.isprintable()
    pasted = subprocess.run(["bash", "-c", f"printf '%s\\0' {quoted}"], capture_output=True, check=True).stdout
    stored = json.loads(runner.invoke(cli, ["-o", "json", "schedule", "show", "odd"]).stdout)["submit_args"]
    assert "a\tb" in stored and pasted.decode().split("\0")[:-1] == stored
    started = runner.invoke(cli, ["schedule", "run-now", "hourly-pi"])
    assert started.exit_code == 0, started.stderr
    batch = started.stdout.strip()
    wait_finished(batch)
    history = runner.invoke(cli, ["schedule", "history", "hourly-pi"]).stdout.splitlines()
    assert history[0].split()[:1] == ["RUN"] and "succeeded" in history[1] and batch in history[1]
    again = runner.invoke(cli, ["schedule", "create", "hourly-pi", "--cron", "@hourly", "pi"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert runner.invoke(cli, ["schedule", "delete", "hourly-pi", "--cascade"]).exit_code == 0
    assert runner.invoke(cli, ["schedule", "show", "hourly-pi"]).exit_code == 2
    assert not Batch(batch).store.exists(batch)
