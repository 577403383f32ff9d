"""The one Job follower (kiabatch.kube.jobs), against a scripted stand-in for the API."""

from __future__ import annotations

import time

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


def pending(name: str, message: str) -> dict:
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}}  # fmt: skip


def creating(name: str, scheduled_at: str) -> dict:
    return {"metadata": {"name": name, "creationTimestamp": scheduled_at},
            "status": {"phase": "Pending",
                       "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled_at}],
                       "containerStatuses": [{"name": "worker", "state": {"waiting": {
                           "reason": "ContainerCreating"}}}]}}  # fmt: skip


NOON = 1767268800.0  # 2026-01-01T12:00:00Z


def test_pod_waits_name_unschedulable_pods_with_the_schedulers_message_most_frequent_first():
    full = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [pending("j-0-a", full), pending("j-1-b", full), pending("j-2-c", "0/3 nodes are available: 3 node(s) "
            "had untolerated taint {gpu: true}.\nmore detail"), {"metadata": {"name": "j-3-d"},
            "status": {"phase": "Running"}}]  # fmt: skip
    assert jobs.pod_waits(pods, now=NOON) == [
        f"2 pods Pending: {full}",
        "pod j-2-c Pending: 0/3 nodes are available: 3 node(s) had untolerated taint {gpu: true}.",
    ]


def test_pod_waits_call_containers_slow_only_after_a_minute_since_scheduling():
    young, old = creating("j-0-a", "2026-01-01T11:59:30Z"), creating("j-1-b", "2026-01-01T11:57:00Z")
    assert jobs.pod_waits([young], now=NOON) == []
    assert jobs.pod_waits([young, old], now=NOON) == [
        "pod j-1-b ContainerCreating for over 60s (container worker: an image pulling or a volume attaching)"
    ]
    assert jobs.pod_problems([old]) == []  # slow is not broken: --wait does not fail for it


def queued_job(suspend: bool = True, status: dict | None = None) -> dict:
    return {"metadata": {"name": "ex-q", "namespace": "batch", "uid": "u1",
                         "labels": {"kueue.x-k8s.io/queue-name": "team-a"}},
            "spec": {"suspend": suspend, "parallelism": 2}, "status": status or {}}  # fmt: skip


@pytest.mark.parametrize(
    ("conditions", "checks", "expected"),
    [
        ([], [], "waiting for admission in Kueue queue team-a"),
        ([{"type": "QuotaReserved", "status": "False", "reason": "Inadmissible",
           "message": "LocalQueue team-a doesn't exist"}], [],
         "waiting for admission in Kueue queue team-a: LocalQueue team-a doesn't exist"),
        ([{"type": "Evicted", "status": "True", "reason": "Preempted",
           "message": "Preempted to accommodate a higher priority Workload"},
          {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota for cpu"}],
         [], "waiting for admission in Kueue queue team-a: evicted (Preempted): Preempted to accommodate a higher "
             "priority Workload; insufficient quota for cpu"),
        ([{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "ok"}],
         [{"name": "dws-prov", "state": "Pending"}],
         "waiting for admission in Kueue queue team-a: quota reserved, admission checks pending: dws-prov"),
    ],
)  # fmt: skip
def test_admission_notes_give_kueues_reason(conditions, checks, expected):
    workload = {"status": {"conditions": conditions, "admissionChecks": checks}}
    assert jobs.admission_note(queued_job(), workload if conditions or checks else None) == expected


def test_a_job_suspended_outside_kueue_says_so():
    job = queued_job()
    job["metadata"]["labels"] = {}
    assert jobs.admission_note(job, None) == "suspended (spec.suspend is true)"


def test_slow_start_warns_once_and_never_counts_time_suspended():
    slow = jobs.SlowStart(grace=0.4)
    waits = ["pod j-0-a Pending: 0/1 nodes are available: 1 Insufficient cpu."]
    assert slow.check(queued_job(suspend=True), [], waits) is None
    time.sleep(0.6)  # waiting for admission, longer than the grace
    assert slow.check(queued_job(suspend=True), [], waits) is None
    assert slow.check(queued_job(suspend=False), [], waits) is None  # admitted: the clock starts now
    time.sleep(0.2)
    assert slow.check(queued_job(suspend=False), [], waits) is None
    time.sleep(0.3)
    warning = slow.check(queued_job(suspend=False), [], waits)
    assert warning == ("no pod of Job ex-q has started after 0.4s: pod j-0-a Pending: 0/1 nodes are available: 1 "
                       "Insufficient cpu.; still waiting (a full cluster is not a failure)")  # fmt: skip
    time.sleep(0.5)
    assert slow.check(queued_job(suspend=False), [], waits) is None  # once


def test_slow_start_says_nothing_once_a_pod_has_started():
    slow = jobs.SlowStart(grace=0.1)
    slow.check(queued_job(suspend=False), [], [])
    time.sleep(0.3)
    assert slow.check(queued_job(suspend=False, status={"ready": 1}), [], []) is None
    running = {"metadata": {"name": "j-0-a"}, "status": {"phase": "Running"}}
    assert slow.check(queued_job(suspend=False), [running], []) is None


def test_the_job_summary_shows_the_jobs_own_parallelism():
    assert jobs.job_summary(queued_job())["job_parallelism"] == 2
