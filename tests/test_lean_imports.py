"""Commands import only what they use: no Kubernetes client unless a command talks to a cluster (issue 10).

Each command runs in a fresh interpreter that reports, at exit, which heavy
packages ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kiabatch import submit

#: Packages only some commands need: the Kubernetes client, YAML, π's arithmetic, cron, process tables,
#: and the dashboard's web stack.
HEAVY = ("kubernetes", "urllib3", "yaml", "mpmath", "gmpy2", "croniter", "psutil", "starlette", "uvicorn", "jinja2",
         "prometheus_client", "anyio")  # fmt: skip
#: Parts of packages that are loaded anyway: kiabatch's pod-making code (and its option types), and the
#: METADATA parser redis-py uses to look up its own version unless kiabatch names it (client_identity).
HEAVY_PARTS = ("kiabatch.kube", "email.parser")

PROBE = """
import atexit, json, os, sys
report = lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
atexit.register(report)
_exit = os._exit
os._exit = lambda code: (report(), sys.stderr.flush(), _exit(code))  # the pod sidecar's quick exit on SIGTERM
sys.argv = ["kiabatch", *sys.argv[1:]]
from kiabatch.cli import main
main()
"""


def loaded(*args: str, env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, done.stderr
    return heavy(json.loads(lines[-1].removeprefix("MODULES ")))


def heavy(modules: list[str]) -> set[str]:
    """Which of HEAVY (by top-level name) and HEAVY_PARTS (with their submodules) ``modules`` holds."""
    found = {name.split(".")[0] for name in modules} & set(HEAVY)
    return found | {part for part in HEAVY_PARTS for name in modules if name == part or name.startswith(part + ".")}


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


def test_the_pod_sidecar_loads_neither_the_kubernetes_client_nor_yaml(redis_url, home, tmp_path):
    """The one Python process of a pod starts fast: no heavy package, from its claim to its SIGTERM."""
    batch = submit(items=["x"], command=["echo", "{item}"], start=False, home=home)
    directory = tmp_path / "task"
    sidecar = subprocess.Popen([sys.executable, "-c", PROBE, "task", "sidecar", "--batch", batch.id, "--index", "0",
                                "--dir", str(directory)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (directory / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run(["/bin/sh", str(directory / "run.sh")], env={**os.environ, "KIABATCH_TASK_DIR": str(directory),
                   "KIABATCH_AWAIT_REPORT": "1"}, check=True, timeout=60)  # fmt: skip
    sidecar.send_signal(signal.SIGTERM)
    _, stderr = sidecar.communicate(timeout=30)
    [line] = [line for line in stderr.splitlines() if line.startswith("MODULES ")]
    assert heavy(json.loads(line.removeprefix("MODULES "))) == set()
    assert [r.text for r in batch.results()] == ["x\n"]


def test_a_local_submit_loads_neither_the_kubernetes_client_nor_yaml_nor_cron(home):
    """``submit`` names schedules' run ids but does no cron arithmetic: croniter (which runs ``file``
    as it is imported) stays out, like the Kubernetes client and YAML."""
    # psutil cleans up the runner's process groups; kiabatch.kube holds the types of submit's cluster options.
    assert loaded("submit", "-q", "--", "echo", "hi") <= {"psutil", "kiabatch.kube"}
    # The check above would pass vacuously if the probe never saw croniter; a cron check must load it.
    assert "croniter" in loaded("schedule", "create", "nightly", "--cron", "0 0 31 2 *", "--item", "1", "--command",
                                "true")  # fmt: skip
