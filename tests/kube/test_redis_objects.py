"""kiabatch's Redis objects, built by pure functions: every field, valid for 1.33-1.37, restricted pods."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from kiabatch.errors import UsageError
from kiabatch.kube import manifests
from kiabatch.kube.batch_job import KubeOptions, job
from kiabatch.kube.objects import REDIS_CLIENT_LABEL, from_yaml, to_yaml
from kiabatch.kube.redis_backup import (
    BACKUP_CLAIM,
    INSTANTIATE_ANNOTATION,
    backup_claim,
    backup_cronjob,
    job_from_cronjob,
    job_name,
    list_job,
    restore_job,
    status_job,
    validate_snapshot,
)
from kiabatch.kube.redis_manifests import redis_deployment_objects
from kiabatch.kube.redis_objects import (
    AUTH_SECRET,
    SCRIPTS,
    RedisOptions,
    auth_secret,
    config_hash,
    config_map,
    data_claim,
    disruption_budget,
    headless_service,
    network_policy,
    primary_service,
    quantity_bytes,
    replicas_service,
    statefulset,
    validate,
)
from kiabatch.model import BatchSpec, WorkerSpec
from tests.kube.checks import pod_specs, restricted_violations, validate_all_versions

REPO = Path(__file__).resolve().parent.parent.parent
SNAPSHOT = "kiabatch-redis-20260314T031700Z.rdb"
CUSTOM = RedisOptions(
    namespace="batch", replicas=5, storage_size="50Gi", storage_class="fast-ssd", pvc_when_deleted="Delete",
    pvc_when_scaled="Delete", memory="4Gi", cpu="2", image="registry.example/redis:7.2.5", backup_keep=3,
    backup_schedule="*/30 * * * *", backup_time_zone="Europe/Paris", backup_storage_size="100Gi",
    backup_storage_class="cheap", image_pull_policy="IfNotPresent",
)  # fmt: skip


def every_object(options: RedisOptions) -> list[dict]:
    cronjob = backup_cronjob(options)
    cronjob["metadata"]["uid"] = "0b7e-cron"
    return [
        *redis_deployment_objects(options),
        data_claim(options),
        job_from_cronjob(cronjob, job_name("backup-manual")),
        list_job(options, job_name("backups")),
        restore_job(options, SNAPSHOT, job_name("restore")),
        status_job(options, job_name("status"), options.replicas),
    ]


def containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod.get("initContainers", []) + pod["containers"]}


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(key) == value for key, value in selector.items())


# -- schemas and Pod Security -------------------------------------------------------------------


@pytest.mark.parametrize("options", [RedisOptions(), CUSTOM, RedisOptions(namespace=None, replicas=1)],
                         ids=["defaults", "custom", "no-namespace"])  # fmt: skip
def test_every_object_is_valid_for_every_supported_version_in_strict_mode(options):
    objects = every_object(options)
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget",
                                            "NetworkPolicy", "PersistentVolumeClaim", "CronJob", "Job"}  # fmt: skip
    for obj in objects:
        validate_all_versions(obj)


def test_every_pod_meets_the_restricted_pod_security_standard():
    pods = [pod for obj in every_object(CUSTOM) for pod in pod_specs(obj)]
    assert len(pods) == 6  # StatefulSet, CronJob, manual backup, listing, restore, status probe
    for pod in pods:
        assert restricted_violations(pod) == []
        assert pod["securityContext"]["runAsUser"] == 999 and pod["securityContext"]["fsGroup"] == 999
        assert pod["automountServiceAccountToken"] is False
        for container in containers(pod).values():
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]


def test_a_validation_error_names_the_field():
    bad = statefulset(RedisOptions())
    bad["spec"]["podManagementPolicy"] = 3
    with pytest.raises(AssertionError, match=r"spec\.podManagementPolicy"):
        validate_all_versions(bad)


# -- the StatefulSet ---------------------------------------------------------------------------


def test_the_statefulset_defaults_to_three_ordered_pods_with_retained_volumes():
    spec = statefulset(RedisOptions(namespace="batch"))["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec["serviceName"] == "kiabatch-redis"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}}}


def test_replicas_storage_and_retention_are_settable():
    spec = statefulset(CUSTOM)["spec"]
    assert spec["replicas"] == 5
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Delete"}
    claim = spec["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd" and claim["resources"]["requests"]["storage"] == "50Gi"
    assert data_claim(CUSTOM)["spec"] == claim  # restore recreates pod 0's claim exactly like the template
    assert data_claim(CUSTOM)["metadata"]["name"] == "data-kiabatch-redis-0"


def test_the_init_container_chooses_the_role_and_reads_the_password_from_the_secret():
    pod = statefulset(CUSTOM)["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["command"] == ["sh", "/etc/kiabatch-redis/init.sh"]
    assert init["image"] == "registry.example/redis:7.2.5" and init["imagePullPolicy"] == "IfNotPresent"
    env = env_of(init)
    assert env["KIABATCH_REDIS_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["KIABATCH_REDIS_SERVICE"] == "kiabatch-redis"
    assert env["KIABATCH_REDIS_CLUSTER_DOMAIN"] == "cluster.local"
    assert int(env["KIABATCH_REDIS_WAIT_TRIES"]) * int(env["KIABATCH_REDIS_WAIT_SECONDS"]) == 120
    assert env["REDISCLI_AUTH"] == {"secretKeyRef": {"name": "kiabatch-redis-auth", "key": "password"}}
    assert "KIABATCH_REDIS_PRIMARY_ADDRESS" not in env  # only tests override the primary's address


def test_the_redis_container_starts_with_probes_resources_volumes_and_the_secret():
    pod = statefulset(CUSTOM)["spec"]["template"]["spec"]
    [redis] = pod["containers"]
    assert redis["command"] == ["sh", "/etc/kiabatch-redis/start.sh"]
    env = env_of(redis)
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "kiabatch-redis-auth", "key": "password"}}
    assert env["KIABATCH_REDIS_DATA"] == "/data"
    assert redis["ports"] == [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}]
    assert redis["readinessProbe"]["exec"]["command"] == ["sh", "/etc/kiabatch-redis/probe.sh", "ready"]
    assert redis["livenessProbe"]["exec"]["command"] == ["sh", "/etc/kiabatch-redis/probe.sh", "live"]
    assert redis["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    assert mounts == {"/etc/kiabatch-redis": "config", "/run/kiabatch-redis": "run", "/tmp": "tmp", "/data": "data"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "kiabatch-redis-config"
    assert volumes["run"]["emptyDir"]["medium"] == "Memory"
    assert "data" not in volumes  # it comes from the volumeClaimTemplate


def test_a_config_change_rolls_the_pods_and_a_scale_change_does_not():
    def annotation(options):
        return statefulset(options)["spec"]["template"]["metadata"]["annotations"]["kiabatch.io/config-hash"]

    base = RedisOptions()
    assert annotation(base) == config_hash(base)
    assert annotation(RedisOptions(replicas=7)) == annotation(base)
    assert annotation(RedisOptions(memory="2Gi")) != annotation(base)  # maxmemory is in redis.conf


# -- ConfigMap, Secret, Services, PDB, NetworkPolicy ------------------------------------------------


def test_the_config_map_carries_the_package_scripts_and_a_durable_redis_conf():
    data = config_map(RedisOptions(memory="1Gi"))["data"]
    assert set(data) == {"redis.conf", *SCRIPTS}
    for name in SCRIPTS:
        text = (REPO / "kiabatch" / "data" / "redis" / name).read_text()
        assert data[name] == text
        assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text
    conf = dict(line.split(" ", 1) for line in data["redis.conf"].splitlines() if line and not line.startswith("#"))
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction" and int(conf["maxmemory"]) == int(0.7 * 2**30)
    assert conf["replica-read-only"] == "yes" and conf["replica-serve-stale-data"] == "yes"


def test_no_rendered_object_holds_a_password():
    rendered = to_yaml(redis_deployment_objects(CUSTOM))
    assert "kind: Secret" not in rendered and "stringData" not in rendered
    password_variables = 0
    for obj in every_object(CUSTOM):
        for pod in pod_specs(obj):
            for container in containers(pod).values():
                for variable in container.get("env", []):
                    if variable["name"] in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
                        password_variables += 1
                        assert variable == {"name": variable["name"], "valueFrom": {
                            "secretKeyRef": {"name": "kiabatch-redis-auth", "key": "password"}}}  # fmt: skip
    assert password_variables == 6  # init, redis (x2), backup (CronJob and manual), status probe
    secret = auth_secret("s3cret-value", "batch")
    assert secret["metadata"]["name"] == AUTH_SECRET and secret["stringData"] == {"password": "s3cret-value"}
    validate_all_versions(secret)


def test_the_services_headless_primary_and_replicas():
    options = RedisOptions(namespace="batch")
    pod_labels = statefulset(options)["spec"]["template"]["metadata"]["labels"]
    headless = headless_service(options)["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    primary = primary_service(options)
    assert primary["metadata"]["name"] == "kiabatch-redis-primary"
    assert primary["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "kiabatch-redis-0"
    replicas = replicas_service(options)
    assert replicas["metadata"]["name"] == "kiabatch-redis-replicas"
    for service in (headless, primary["spec"], replicas["spec"]):
        assert service["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
        without_pod_name = {k: v for k, v in service["selector"].items() if k != "statefulset.kubernetes.io/pod-name"}
        assert selects(without_pod_name, pod_labels)


def test_the_disruption_budget_lets_one_pod_go_at_a_time():
    budget = disruption_budget(RedisOptions())["spec"]
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget
    assert budget["selector"]["matchLabels"] == statefulset(RedisOptions())["spec"]["selector"]["matchLabels"]
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_network_policy_admits_only_kiabatch_pods_on_the_redis_port():
    options = RedisOptions(namespace="batch")
    policy = network_policy(options)["spec"]
    redis_pods = statefulset(options)["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], redis_pods)
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    peers = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # this namespace only

    def admitted(pod_labels):
        return any(selects(peer, pod_labels) for peer in peers)

    spec = BatchSpec(id="pi-x7k2p", workload="pi", worker=WorkerSpec(command=["pi"]), tasks=2, parallelism=2,
                     chunk=1, retries=1, total=2, created_at=time.time(), ttl=60)  # fmt: skip
    batch_pod = job(spec, KubeOptions(namespace="batch"))["spec"]["template"]["metadata"]["labels"]
    assert batch_pod[REDIS_CLIENT_LABEL] == "true" and admitted(batch_pod)
    assert admitted(backup_cronjob(options)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    assert admitted(status_job(options, "s", 3)["spec"]["template"]["metadata"]["labels"])
    assert admitted(redis_pods)  # replication between the pods
    assert not admitted({"app.kubernetes.io/name": "kiabatch"})
    assert not admitted({"app": "something-else", REDIS_CLIENT_LABEL: "false"})


# -- backups, restore, status probe -------------------------------------------------------------


def test_the_backup_cronjob_never_overlaps_and_cleans_up():
    cronjob = backup_cronjob(CUSTOM)
    spec = cronjob["spec"]
    assert spec["schedule"] == "*/30 * * * *" and spec["timeZone"] == "Europe/Paris"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 3600
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    job_spec = spec["jobTemplate"]["spec"]
    assert job_spec["ttlSecondsAfterFinished"] == 86400 and job_spec["backoffLimit"] == 2
    pod = job_spec["template"]["spec"]
    [backup] = pod["containers"]
    assert backup["command"] == ["sh", "/etc/kiabatch-redis/backup.sh", "take"]
    env = env_of(backup)
    assert env["KIABATCH_REDIS_PRIMARY_ADDRESS"] == "kiabatch-redis-primary:6379"
    assert env["KIABATCH_BACKUP_KEEP"] == "3" and env["KIABATCH_BACKUP_DIR"] == "/backups"
    assert env["REDISCLI_AUTH"] == {"secretKeyRef": {"name": "kiabatch-redis-auth", "key": "password"}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["backups"]["persistentVolumeClaim"] == {"claimName": BACKUP_CLAIM, "readOnly": False}
    claim = backup_claim(CUSTOM)["spec"]
    assert claim["resources"]["requests"]["storage"] == "100Gi" and claim["storageClassName"] == "cheap"


def test_a_manual_backup_is_the_cronjobs_template_owned_by_the_cronjob():
    cronjob = backup_cronjob(RedisOptions(namespace="batch"))
    cronjob["metadata"]["uid"] = "1234-abcd"
    manual = job_from_cronjob(cronjob, "kiabatch-redis-backup-manual-1")
    assert manual["spec"] == cronjob["spec"]["jobTemplate"]["spec"]
    assert manual["metadata"]["labels"] == cronjob["spec"]["jobTemplate"]["metadata"]["labels"]
    assert manual["metadata"]["annotations"][INSTANTIATE_ANNOTATION] == "manual"
    assert manual["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "CronJob", "name": "kiabatch-redis-backup", "uid": "1234-abcd",
         "controller": True}
    ]  # fmt: skip
    assert manual["metadata"]["namespace"] == "batch"


def test_the_listing_job_mounts_the_backups_read_only():
    pod = list_job(RedisOptions(), "l")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["sh", "/etc/kiabatch-redis/backup.sh", "list"]
    assert {"name": "backups", "mountPath": "/backups", "readOnly": True} in container["volumeMounts"]
    assert "REDISCLI_AUTH" not in env_of(container)  # it never talks to Redis


def test_the_restore_job_mounts_the_backups_and_pod_0s_volume():
    job_spec = restore_job(CUSTOM, SNAPSHOT, "r")["spec"]
    pod = job_spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["sh", "/etc/kiabatch-redis/restore.sh", SNAPSHOT]
    assert container["resources"]["limits"]["memory"] == "4Gi"  # the snapshot is loaded into memory
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "data-kiabatch-redis-0"
    assert volumes["backups"]["persistentVolumeClaim"]["readOnly"] is True
    assert job_spec["backoffLimit"] == 0


@pytest.mark.parametrize("name", ["latest.rdb", "../kiabatch-redis-20260314T031700Z.rdb",
                                  "kiabatch-redis-20260314T031700Z.rdb\n", "kiabatch-redis-2026.rdb"])  # fmt: skip
def test_only_snapshot_names_are_accepted(name):
    with pytest.raises(UsageError, match="bad snapshot name"):
        validate_snapshot(name)
    with pytest.raises(UsageError):
        restore_job(RedisOptions(), name, "r")
    assert validate_snapshot(SNAPSHOT) == SNAPSHOT


def test_the_status_probe_asks_every_pod_by_its_stable_name():
    pod = status_job(RedisOptions(), "s", 3)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["KIABATCH_REDIS_PODS"] == " ".join(f"kiabatch-redis-{i}.kiabatch-redis:6379" for i in range(3))


def test_job_names_are_valid_and_distinct():
    names = {job_name("backup-manual") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert len(name) <= 63 and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"replicas": 0}, "--replicas"),
        ({"pvc_when_deleted": "Keep"}, "--pvc-when-deleted"),
        ({"storage_size": "lots"}, "bad quantity"),
        ({"memory": "16Mi"}, "too small"),
        ({"cpu": "two"}, "--cpu"),
        ({"backup_keep": 0}, "--backup-keep"),
        ({"backup_schedule": "daily"}, "--backup-schedule"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"image": "redis 7"}, "--image"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(change, message):
    with pytest.raises(UsageError, match=message):
        validate(RedisOptions(**change))


def test_quantities():
    assert quantity_bytes("1Gi") == 2**30 and quantity_bytes("512M") == 512 * 10**6 and quantity_bytes("100") == 100
    assert quantity_bytes("1.5Gi") == int(1.5 * 2**30)


# -- manifests/redis -----------------------------------------------------------------------------


def test_drift_in_the_redis_set_is_detected(tmp_path):
    manifests.write(tmp_path)
    assert manifests.drifted(tmp_path) == []
    target = tmp_path / "redis" / "statefulset-kiabatch-redis.yaml"
    target.write_text(target.read_text().replace("podManagementPolicy: OrderedReady", "podManagementPolicy: Parallel"))
    (tmp_path / "redis" / "service-kiabatch-redis-primary.yaml").unlink()
    (tmp_path / "redis" / "extra.yaml").write_text("---\n")
    assert manifests.drifted(tmp_path) == [
        "redis/service-kiabatch-redis-primary.yaml: missing",
        "redis/extra.yaml: not made by the builders",
        "redis/statefulset-kiabatch-redis.yaml: differs from the builders' output",
    ]
    assert manifests.main(["--root", str(tmp_path), "--check"]) == 1
    manifests.main(["--root", str(tmp_path), "--write"])
    assert manifests.drifted(tmp_path) == [] and not (tmp_path / "redis" / "extra.yaml").exists()


def test_the_kustomize_base_is_the_rendered_objects_one_file_each():
    directory = REPO / "manifests" / "redis"
    [kustomization] = from_yaml((directory / "kustomization.yaml").read_text())
    files = kustomization["resources"]
    objects = [obj for name in files for obj in from_yaml((directory / name).read_text())]
    assert objects == redis_deployment_objects(RedisOptions(namespace="kiabatch"))
    assert kustomization["namespace"] == "kiabatch"
