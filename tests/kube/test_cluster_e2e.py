"""Opt-in end to end run on a real cluster: ``pytest -m cluster``.

Needs a cluster KUBECONFIG points at (1.33+), the kiabatch image pushed where the
cluster can pull it, and a Redis both this machine and the pods can reach:

    KIABATCH_IMAGE=registry.example.com/kiabatch:0.1.0
    KIABATCH_E2E_REDIS_URL=redis://:pw@localhost:6379/0        # as this machine sees it
    KIABATCH_E2E_POD_REDIS_URL=redis://:pw@kiabatch-redis-primary:6379/0   # as pods see it
    KIABATCH_E2E_NAMESPACE=kiabatch-e2e                        # must exist

Skipped (with the reason) when any of that is missing or the API server does not answer.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from kiabatch.cli import cli
from kiabatch.errors import KiabatchError
from tests.helpers import truth

pytestmark = pytest.mark.cluster


@pytest.fixture
def real_cluster(monkeypatch, home):
    needed = ["KIABATCH_IMAGE", "KIABATCH_E2E_REDIS_URL", "KIABATCH_E2E_POD_REDIS_URL"]
    missing = [name for name in needed if not os.environ.get(name)]
    if missing:
        pytest.skip(f"set {', '.join(missing)} to run against a real cluster")
    from kiabatch.kube.api import Cluster

    namespace = os.environ.get("KIABATCH_E2E_NAMESPACE", "default")
    try:
        Cluster.connect(None, namespace).check_version()
    except KiabatchError as exc:
        pytest.skip(f"no reachable Kubernetes cluster: {exc}")
    monkeypatch.setenv("KIABATCH_REDIS_URL", os.environ["KIABATCH_E2E_REDIS_URL"])
    return namespace


def test_pi_runs_on_the_cluster_and_prints_the_same_digits(real_cluster):
    runner = CliRunner()
    created = runner.invoke(
        cli,
        ["secret", "create", "-n", real_cluster, "--url-stdin"],
        input=os.environ["KIABATCH_E2E_POD_REDIS_URL"] + "\n",
    )
    assert created.exit_code == 0, created.stderr
    done = runner.invoke(cli, ["submit", "pi", "--digits", "5000", "--parallel", "3", "--backend", "kubernetes",
                               "-n", real_cluster])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert done.stdout == truth(5000) + "\n"
