"""The one Job follower (kiabatch.kube.jobs), against a scripted stand-in for the API."""

from __future__ import annotations

import pytest

from kiabatch.errors import ClusterError
from kiabatch.kube import jobs
from kiabatch.kube.jobs import StuckPods, job_outcome, job_states, parse_indexes, run_job

RUNNING = {"metadata": {"name": "p-0", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
WAITING = {"waiting": {"reason": "ImagePullBackOff", "message": "no"}}
PULLING = {"metadata": {"name": "p-0"},
           "status": {"containerStatuses": [{"name": "worker", "image": "nope:1", "state": WAITING}]}}  # fmt: skip


def job(name: str = "j", version: str = "1", *conditions: str) -> dict:
    found = [{"type": c, "status": "True"} for c in conditions]
    spec = {"template": {"spec": {"containers": [{"name": "main"}]}}}
    return {"metadata": {"name": name, "resourceVersion": version}, "spec": spec, "status": {"conditions": found}}


class ScriptedCluster:
    """Serves the Job states in ``states`` (None: gone), one per get; records the requests."""

    def __init__(self, states: list[dict | None], pods: list[dict] | None = None) -> None:
        self.states = list(states)
        self.calls: list[tuple] = []
        self.open_watches = 0
        self._pods = pods or [RUNNING]

    def create(self, obj: dict) -> dict:
        self.calls.append(("create", obj["metadata"]["name"]))
        return obj

    def get(self, kind: tuple[str, str], name: str) -> dict | None:
        assert self.open_watches == 0, "a request while a watch is open"
        self.calls.append(("get", name))
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def watch_job(self, name: str, version: str | None, timeout: int):
        self.calls.append(("watch", version))
        self.open_watches += 1
        try:
            yield from [job(name, "later"), job(name, "even later")]
        finally:
            self.open_watches -= 1

    def pods(self, selector: str) -> list[dict]:
        assert self.open_watches == 0, "a request while a watch is open"
        return self._pods

    def pod_log(self, pod: str, container: str):
        yield b"the log\n"

    def delete(self, kind: tuple[str, str], name: str) -> bool:
        self.calls.append(("delete", name))
        return True


def test_job_states_reads_the_job_again_after_each_change_and_ends_when_it_is_gone():
    cluster = ScriptedCluster([job("j", "1"), job("j", "2"), None])
    states = list(job_states(cluster, "j"))
    assert [s["metadata"]["resourceVersion"] for s in states] == ["1", "2"]
    assert cluster.calls == [("get", "j"), ("watch", "1"), ("get", "j"), ("watch", "2"), ("get", "j")]
    assert cluster.open_watches == 0  # each watch closed at its first event


def test_the_condition_helpers():
    assert job_outcome(job("j", "1", "SuccessCriteriaMet")) == "succeeded"
    assert job_outcome(job("j", "1", "FailureTarget")) == "failed"
    assert job_outcome(job("j", "1")) is None
    assert parse_indexes("1,3-5,7") == [1, 3, 4, 5, 7] and parse_indexes(None) == []


def test_stuck_pods_are_reported_only_after_the_grace_and_the_clock_restarts_when_they_recover(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(jobs.time, "monotonic", lambda: now[0])
    stuck = StuckPods(grace=10)
    assert stuck.overdue([PULLING]) is None
    now[0] = 110.0
    assert stuck.overdue([PULLING]) is None
    assert stuck.overdue([]) is None  # recovered: the clock restarts
    now[0] = 115.0
    assert stuck.overdue([PULLING]) is None
    now[0] = 125.5
    assert "ImagePullBackOff" in stuck.overdue([PULLING])


def test_run_job_returns_the_log_and_deletes_a_job_that_succeeded_keeps_one_that_failed():
    done = ScriptedCluster([job("j", "1"), job("j", "2", "Complete")])
    assert run_job(done, job("j"), 60) == (True, "the log\n")
    assert done.calls[-1] == ("delete", "j")
    failed = ScriptedCluster([job("j", "1", "Failed")])
    assert run_job(failed, job("j"), 60) == (False, "the log\n")
    assert ("delete", "j") not in failed.calls
    kept = ScriptedCluster([job("j", "1", "Complete")])
    assert run_job(kept, job("j"), 60, keep=True)[0] and ("delete", "j") not in kept.calls


def test_run_job_gives_up_on_pods_that_cannot_start_a_deadline_and_a_job_that_vanished():
    with pytest.raises(ClusterError, match=r"Job 'j' cannot start: pod p-0 container worker \(nope:1\)"):
        run_job(ScriptedCluster([job("j", "1")], pods=[PULLING]), job("j"), 60, pull_grace=-1)
    with pytest.raises(ClusterError, match=r"Job 'j' did not finish within -1s"):
        run_job(ScriptedCluster([job("j", "1")]), job("j"), -1)
    with pytest.raises(ClusterError, match="Job 'j' disappeared before it finished"):
        run_job(ScriptedCluster([None]), job("j"), 60)


def test_one_image_pull_grace_everywhere():
    from kiabatch.cli.submit import common_options
    from kiabatch.kube.batch_job import KubeOptions

    assert KubeOptions().pull_grace == jobs.DEFAULT_PULL_GRACE == 120.0

    @common_options
    def command(**values: object) -> None: ...

    [option] = [p for p in command.__click_params__ if p.name == "kube_pull_grace"]
    assert option.default == "2m"
