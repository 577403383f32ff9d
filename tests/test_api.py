"""The Python API's shape: every batch option is an explicit keyword, and a typo fails at once, naming it."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest

import kiabatch
from kiabatch import Queue, submit
from kiabatch.submission import BatchOptions
from tests.helpers import one_line_error, run_cli


def test_submit_lists_every_batch_option_by_name():
    parameters = inspect.signature(kiabatch.submit).parameters
    options = {f.name for f in dataclasses.fields(BatchOptions)} - {"workload_options"}
    assert options <= set(parameters), options - set(parameters)
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in options)
    assert parameters["workload_options"].kind is inspect.Parameter.VAR_KEYWORD  # only the workload's own


def test_queue_submit_takes_every_keyword_of_submit_that_means_something_for_a_queue():
    queue_parameters = dict(inspect.signature(Queue.submit).parameters)
    del queue_parameters["self"]
    submit_parameters = inspect.signature(submit).parameters
    # The queue supplies the items and the Redis connection; schedules and workload options are submit's alone.
    only_submit = {"workload", "items", "from_queue", "schedule", "run", "redis", "workload_options"}
    assert set(queue_parameters) == set(submit_parameters) - only_submit
    for name, parameter in queue_parameters.items():
        if name != "command":  # required here: a queue holds items, not a workload
            assert parameter.default == submit_parameters[name].default, name


@pytest.mark.parametrize(
    ("workload", "options", "named", "hint"),
    [
        ("exec", {"items": [1], "command": ["true"], "paralel": 2}, "paralel", "parallel"),
        ("exec", {"items": [1], "command": ["true"], "digits": 5}, "digits", "digits"),  # a pi option on exec
        ("pi", {"digits": 5, "retrys": 1}, "retrys", "retries"),
    ],
)
def test_a_misspelt_keyword_fails_at_once_naming_it(redis_url, client, workload, options, named, hint):
    with pytest.raises(TypeError, match=f"'{named}'") as failure:
        submit(workload, **options)
    assert f"did you mean '{hint}'" in str(failure.value) or hint == named
    assert client.keys("*") == []  # nothing was written


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1, 2}, b"bytes", object()], ids=type)
@pytest.mark.parametrize("command", [["echo", "{item}"], ["echo", "hi"]])
def test_an_item_json_cannot_hold_is_a_usage_error_naming_it_and_nothing_is_written(redis_url, client, bad, command):
    with pytest.raises(kiabatch.UsageError, match="is not JSON-serialisable"):
        submit(items=[1, bad], command=command)
    assert client.keys("*") == []


@pytest.mark.parametrize("items", [[10**5000], [[1, -(10**5000)]], [{"n": 10**4400}]], ids=["int", "nested", "field"])
@pytest.mark.parametrize("limit", [4300, 0], ids=["default limit", "limit lifted"])
def test_an_integer_past_pythons_digit_limit_is_a_usage_error_through_every_door(redis_url, client, items, limit):
    """It was a bare ValueError from submit and enqueue, and a 59-line traceback from the CLI; and where
    this process had lifted Python's limit (mpmath does), it was accepted and broke the runner."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        with pytest.raises(kiabatch.UsageError, match="more than 4,300 digits; give such a number as a string"):
            submit(items=items, command=["true"])
        with pytest.raises(kiabatch.UsageError, match="more than 4,300 digits"):
            Queue("huge").enqueue_many(items)
        with pytest.raises(kiabatch.UsageError, match="more than 4,300 digits"):
            Queue("huge").enqueue(items[0])
    finally:
        sys.set_int_max_str_digits(before)
    assert [key for key in client.keys("*") if key != b"kiabatch:queues"] == []  # no item, no batch
    done = run_cli("queue", "enqueue", "huge", "1" * 5000)
    one_line_error(done, 2, "holds an integer of more than 4,300 digits")
    assert [key for key in client.keys("*") if key != b"kiabatch:queues"] == []


@pytest.mark.parametrize("items", ["abc", b"abc", {"a": 1}], ids=type)
def test_items_that_are_one_string_or_mapping_are_refused_rather_than_split(redis_url, client, items):
    with pytest.raises(kiabatch.UsageError, match="items must be a list"):
        submit(items=items, command=["true"])
    assert client.keys("*") == []


def test_the_public_names_load_lazily_and_all_resolve():
    for name in kiabatch.__all__:
        assert getattr(kiabatch, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kiabatch.nope  # noqa: B018


def test_the_readme_shows_submit_as_it_is():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = re.search(r"```python\n(submit\(workload=.*?\*\*workload_options\))", readme, re.S)
    assert shown, "the README's submit signature block"
    names_and_defaults = dict(re.findall(r"(\w+)=(\(\)|[^,\s)]+)", shown.group(1)))
    parameters = inspect.signature(submit).parameters
    documented = set(names_and_defaults) | {"workload_options"}
    assert documented == set(parameters), documented ^ set(parameters)
    for name, text in names_and_defaults.items():
        assert text == repr(parameters[name].default).replace("'", '"'), name


def test_home_may_be_a_string_and_holds_the_embedded_server_and_the_runner_files(home, tmp_path, monkeypatch):
    other = tmp_path / "other home"
    batch = submit("exec", command=["echo", "{item}"], items=["a", "b"], wait=True, home=str(other))
    assert sorted(result.text for result in batch.results()) == ["a\n", "b\n"]
    assert (other / "redis").is_dir() and (other / "runs").is_dir()
    assert not home.exists()  # $KIABATCH_HOME was not touched
    again = kiabatch.Batch(batch.id, home=str(other))  # the same server, found through the same home
    assert again.status().progress.done == 2
    queue = Queue("q", home=other)
    queue.enqueue("c")
    assert sorted(r.text for r in queue.submit(["echo", "{item}"], wait=True).results()) == ["c\n"]
    assert not home.exists()
    kiabatch.embedded.stop(str(other))


def test_a_client_of_an_embedded_server_brings_its_home_and_another_home_is_refused(home, tmp_path):
    other = tmp_path / "other"
    queue = Queue("jobs", home=other)
    queue.enqueue_many(["x", "y"])
    with pytest.raises(kiabatch.UsageError, match="not the home of the embedded server"):
        queue.submit(["echo", "{item}"], home=tmp_path / "third")
    assert len(queue) == 2  # refused before anything was taken from the queue
    # No home given: the runner (a background one) works where the queue's server is.
    batch = submit("exec", command=["echo", "{item}"], from_queue="jobs", redis=queue.redis, wait=False)
    assert batch.home == other.absolute()
    again = kiabatch.Batch(batch.id, redis=queue.redis)
    assert again.home == other.absolute()
    assert again.wait(timeout=60).status().state == "succeeded"
    assert sorted(r.text for r in again.results()) == ["x\n", "y\n"]
    assert not home.exists()
    kiabatch.embedded.stop(other)


@pytest.mark.parametrize("bad", ["~no-such-user-kb/state", "with\0nul"])
def test_a_home_that_cannot_be_a_path_is_one_usage_error(home, bad):
    for attempt in (
        lambda: submit("exec", command=["true"], items=[1], home=bad),
        lambda: kiabatch.Batch("b-x", home=bad),
        lambda: Queue("q", home=bad),
    ):
        with pytest.raises(kiabatch.UsageError, match="state directory"):
            attempt()


def test_reduce_can_be_asked_twice(redis_url, home):
    batch = submit("pi", digits=120_000, parallel=2, wait=True, home=home)
    first = batch.reduce()
    assert batch.reduce() == first
    assert first.startswith("3.14159")
