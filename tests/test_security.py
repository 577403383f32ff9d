"""Item content is data, never code: hostile items pass through every way of reaching a worker verbatim."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiabatch import submit
from tests.helpers import HOSTILE, run_cli


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory and a fake HOME that must stay untouched."""
    fake_home = tmp_path / "fakehome"
    fake_home.mkdir()
    (fake_home / "precious").write_text("keep me")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.chdir(work)
    return tmp_path


def assert_untouched(sandbox: Path) -> None:
    assert (sandbox / "fakehome" / "precious").read_text() == "keep me"
    created = [p.name for p in sandbox.rglob("pwned*")]
    assert created == []


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        (["printf", "%s", "{item}"], False),  # argv substitution
        (["cat", "{input}"], False),  # a file holding the item JSON
        (["cat"], True),  # standard input
        (["sh", "-c", 'printf %s "$1"', "sh", "{item}"], False),  # a shell script reading its argument
    ],
)
def test_hostile_items_reach_the_worker_verbatim_on_the_local_backend(redis_url, home, sandbox, command, stdin):
    batch = submit(items=HOSTILE, command=command, stdin=stdin, parallel=2, wait=True, home=home)
    results = {r.item: r.text for r in batch.results()}
    assert batch.failed() == []
    if "{input}" in command:
        import json

        assert {item: json.loads(text) for item, text in results.items()} == {h: h for h in HOSTILE}
    else:
        assert results == {h: h for h in HOSTILE}
    assert_untouched(sandbox)


def test_hostile_items_through_the_cli(redis_url, sandbox):
    items_file = sandbox / "items.txt"
    items_file.write_text("$(touch pwned); rm -rf ~\n' \" ; |\n")
    done = run_cli(
        "-o",
        "json",
        "submit",
        "--lines",
        str(items_file),
        "--command",
        "printf %s {item}",
        env={"HOME": os.environ["HOME"]},
        cwd=sandbox / "work",
    )
    assert done.returncode == 0, done.stderr
    import json

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["item"]: r["result"] for r in rows} == {
        "$(touch pwned); rm -rf ~": "$(touch pwned); rm -rf ~",
        "' \" ; |": "' \" ; |",
    }
    assert_untouched(sandbox)
