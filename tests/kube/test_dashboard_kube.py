"""The dashboard on Kubernetes batches, with exactly the rights its Role grants: Job conditions, pod problems
(image pulls, unschedulable pods), pod logs and CronJobs read; nothing changed unless --allow-actions."""

from __future__ import annotations

import pytest

from kiabatch.dashboard.data import Actions, Dashboard
from kiabatch.errors import ClusterError
from kiabatch.readonly import ReadOnlyStore, read_only_client
from kiabatch.store import Store
from tests.helpers import kb, wait_for


@pytest.fixture
def secret(cluster, redis_url):
    assert kb("secret", "create", "-n", "batch").exit_code == 0
    return redis_url


def as_dashboard(api, tmp_path, monkeypatch, *deploy_args: str) -> None:
    """Deploy the dashboard's objects, then talk to the API with its ServiceAccount's token (RBAC enforced)."""
    done = kb("dashboard", "deploy", "-n", "batch", *deploy_args)
    assert done.exit_code == 0, done.stderr
    token = "serviceaccount:batch:kiabatch-dashboard"
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "dashboard-sa", namespace="batch", token=token)))


def unschedulable_pod(batch_id: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{batch_id}-0-zzzzz", "labels": {"kiabatch.io/batch": batch_id,
                                                                  "batch.kubernetes.io/job-completion-index": "0"}},
            "spec": {"containers": [{"name": "worker", "image": "x"}]},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient cpu."}]}}  # fmt: skip


def test_the_dashboards_role_is_enough_to_show_jobs_pod_problems_logs_and_cronjobs(
    secret, cluster, tmp_path, monkeypatch, client
):
    done = kb("submit", "--backend", "kubernetes", "-n", "batch", "--batch-id", "ex-dash", "--item", '"a"',
              "--item", '"b"', "--", "sh", "-c", "echo {item}; echo note-{item} >&2")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    stuck = kb("submit", "--backend", "kubernetes", "-n", "batch", "--image", "registry.example/doesnotexist:1",
               "--batch-id", "ex-stuck", "--no-wait", "--item", "1", "--", "true")  # fmt: skip
    assert stuck.exit_code == 0, stuck.stderr
    cluster.store.create("pods", "batch", unschedulable_pod("ex-stuck"))
    as_dashboard(cluster, tmp_path, monkeypatch)
    dashboard = Dashboard(ReadOnlyStore(read_only_client(secret)), schedules_backend="kubernetes", namespace="batch")

    view = dashboard.batch("ex-dash")
    assert view.detail_error == "" and "Complete" in view.status.detail["job_conditions"]
    logs = dict((label, text) for label, text, _ in dashboard.logs("ex-dash", 0))
    assert any(label.endswith("worker") for label in logs)
    assert any("note-" in text for text in logs.values())

    def stuck_view():
        found = dashboard.batch("ex-stuck")
        return found if "ImagePullBackOff" in found.status.detail.get("problem", "") else None

    found = wait_for(stuck_view, timeout=30)
    problems = found.status.detail["pod_problems"]
    assert any("ImagePullBackOff" in line for line in problems)
    assert any("not scheduled: Unschedulable: 0/3 nodes are available: 3 Insufficient cpu." in line
               for line in problems)  # fmt: skip
    rows = {row.status.id: row for row in dashboard.batches().rows}
    assert rows["ex-stuck"].status.detail["job_state"] == "ex-stuck: Running"  # the list joins unfinished Jobs
    assert dashboard.schedules() == ([], "")  # CronJobs may be listed
    with pytest.raises(ClusterError, match="forbidden"):  # even with a writable Redis, the Role reads only
        Actions(Dashboard(Store(client))).delete("ex-stuck")
    assert cluster.store.list("jobs", "batch", "kiabatch.io/batch=ex-stuck", None)


def test_with_allow_actions_the_role_lets_it_delete_scale_and_suspend(secret, cluster, tmp_path, monkeypatch, client):
    stuck = kb("submit", "--backend", "kubernetes", "-n", "batch", "--image", "registry.example/doesnotexist:1",
               "--batch-id", "ex-act", "--no-wait", "--item", "1", "--item", "2", "--", "true")  # fmt: skip
    assert stuck.exit_code == 0, stuck.stderr
    created = kb("schedule", "create", "nightly", "--cron", "0 3 * * *", "--backend", "kubernetes", "-n", "batch",
                 "--item", "1", "-c", "true")  # fmt: skip
    assert created.exit_code == 0, created.stderr
    as_dashboard(cluster, tmp_path, monkeypatch, "--allow-actions")
    actions = Actions(Dashboard(Store(client), schedules_backend="kubernetes", namespace="batch"))
    assert actions.scale("ex-act", 2) == "batch ex-act: parallelism 2"
    assert cluster.store.get("jobs", "batch", "ex-act")["spec"]["parallelism"] == 2
    actions.suspend("nightly", True)
    assert cluster.store.get("cronjobs", "batch", "nightly")["spec"]["suspend"] is True
    assert actions.delete("ex-act") == "deleted batch ex-act"
    assert not cluster.store.list("jobs", "batch", "kiabatch.io/batch=ex-act", None)
