"""Commands import only what they use: no Kubernetes client unless a command talks to a cluster (issue 10).

Each command runs in a fresh interpreter that reports, at exit, which heavy
packages ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kiabatch import submit

#: Packages only some commands need: the Kubernetes client, YAML, π's arithmetic, cron, process tables,
#: and the dashboard's web stack.
HEAVY = ("kubernetes", "urllib3", "yaml", "mpmath", "gmpy2", "croniter", "psutil", "starlette", "uvicorn", "jinja2",
         "prometheus_client", "anyio")  # fmt: skip

PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr))
sys.argv = ["kiabatch", *sys.argv[1:]]
from kiabatch.cli import main
main()
"""


def loaded(*args: str, env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, done.stderr
    return set(json.loads(lines[-1].removeprefix("MODULES "))) & set(HEAVY)


@pytest.fixture
def finished_batch(redis_url, home):
    return submit(items=["a", "b"], command=["echo", "{item}"], wait=True, home=home)


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["list"],
        ["status"],
        ["status", "{batch}"],
        ["results", "{batch}"],
        ["-o", "json", "results", "{batch}"],
        ["results", "{batch}", "--raw"],
        ["logs", "{batch}"],
        ["queue", "list"],
    ],
    ids=lambda a: " ".join(a),
)
def test_reading_commands_load_no_heavy_package(finished_batch, args):
    assert loaded(*[a.format(batch=finished_batch.id) for a in args]) == set()


def test_the_task_steps_load_neither_the_kubernetes_client_nor_yaml(redis_url, home, tmp_path):
    batch = submit(items=["x"], command=["echo", "{item}"], start=False, home=home)
    directory = tmp_path / "task"
    assert loaded("task", "claim", "--batch", batch.id, "--index", "0", "--dir", str(directory)) == set()
    subprocess.run(["/bin/sh", str(directory / "run.sh")], env={**os.environ, "KIABATCH_TASK_DIR": str(directory)},
                   check=True)  # fmt: skip
    assert loaded("task", "report", "--dir", str(directory)) == set()
    assert [r.text for r in batch.results()] == ["x\n"]


def test_only_the_dashboard_loads_the_web_stack(home):
    # The check above would pass vacuously if the probe never saw imports; here it must.
    assert {"starlette", "jinja2"} <= loaded("dashboard", "serve", "--host", "not-an-address")


def test_a_kubernetes_command_does_load_the_client(home):
    # The check above would pass vacuously if the probe never saw imports; here it must.
    assert "kubernetes" in loaded("secret", "create", "--url-stdin", env={"KUBECONFIG": "/nonexistent"})
