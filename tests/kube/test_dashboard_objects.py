"""The dashboard's Kubernetes objects: valid for 1.33-1.37 (strict), restricted, least-privilege; render and deploy."""

from __future__ import annotations

import pytest

from kiabatch.kube.dashboard_objects import (
    ACTION_RULES,
    NAME,
    READ_RULES,
    DashboardOptions,
    dashboard_objects,
    validate,
)
from kiabatch.kube.objects import REDIS_CLIENT_LABEL, from_yaml
from kiabatch.kube.redis_objects import RedisOptions, network_policy
from tests.helpers import kb, one_line_error
from tests.kube.checks import pod_specs, restricted_violations, validate_all_versions

VARIANTS = {
    "default": DashboardOptions(namespace="batch"),
    "actions+token": DashboardOptions(namespace="batch", allow_actions=True, token_secret="dash-token"),
    "no-kube-details": DashboardOptions(namespace="batch", kube_details=False, port=9000),
}


def by_kind(objects):
    return {obj["kind"]: obj for obj in objects}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_object_is_valid_for_every_supported_version_and_restricted(name):
    for obj in dashboard_objects(VARIANTS[name]):
        validate_all_versions(obj)
        for pod in pod_specs(obj):
            assert restricted_violations(pod) == []


def test_the_pod_is_read_only_and_reads_the_redis_url_from_the_secret():
    deployment = by_kind(dashboard_objects(VARIANTS["default"]))["Deployment"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"][:4] == ["dashboard", "serve", "--host", "0.0.0.0"]
    assert "--allow-actions" not in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KIABATCH_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "kiabatch-redis", "key": "url"}}
    assert "KIABATCH_DASHBOARD_TOKEN" not in env
    assert all("value" not in e or e["name"] == "HOME" for e in container["env"])  # nothing secret inlined
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Prometheus finds it; kiabatch-redis's NetworkPolicy lets it in.
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    admitted = network_policy(RedisOptions())["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"][REDIS_CLIENT_LABEL] == "true"


def test_the_role_grants_exactly_reads_and_with_actions_only_the_verbs_actions_use():
    read = by_kind(dashboard_objects(VARIANTS["default"]))["Role"]["rules"]
    granted = {(rule["apiGroups"][0], rule["resources"][0]): set(rule["verbs"]) for rule in read}
    assert granted == {("batch", "jobs"): {"get", "list", "watch"}, ("batch", "cronjobs"): {"get", "list", "watch"},
                       ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"}}  # fmt: skip
    assert READ_RULES and ACTION_RULES
    acting = by_kind(dashboard_objects(VARIANTS["actions+token"]))["Role"]["rules"]
    granted = {(rule["apiGroups"][0], rule["resources"][0]): set(rule["verbs"]) for rule in acting}
    assert granted[("batch", "jobs")] == {"get", "list", "watch", "create", "delete", "patch"}
    assert granted[("batch", "cronjobs")] == {"get", "list", "watch", "patch"}
    assert granted[("", "pods")] == {"get", "list", "watch"}  # never more than reading pods
    kinds = [obj["kind"] for obj in dashboard_objects(VARIANTS["default"])]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds


def test_without_kube_details_there_is_no_role_and_no_token_mounted():
    objects = by_kind(dashboard_objects(VARIANTS["no-kube-details"]))
    assert "Role" not in objects and "RoleBinding" not in objects
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert objects["Service"]["spec"]["ports"][0]["port"] == 9000


def test_actions_and_the_token_reach_the_pod_through_flags_and_a_secret_reference():
    deployment = by_kind(dashboard_objects(VARIANTS["actions+token"]))["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--allow-actions" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KIABATCH_DASHBOARD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dash-token", "key": "token"}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [({"namespace": "Bad_NS"}, "bad namespace"), ({"token_secret": "no/slash"}, "bad --token-secret"),
     ({"port": 0}, "--port"), ({"cpu": "lots"}, "bad --cpu"), ({"memory": "1 GB"}, "bad --memory"),
     ({"image": "a b"}, "bad --image")],
)  # fmt: skip
def test_bad_options_are_refused_naming_what_is_allowed(changes, fragment):
    from kiabatch.errors import UsageError

    with pytest.raises(UsageError, match=fragment.replace("-", r"\-")):
        validate(DashboardOptions(**changes))


def test_render_prints_the_objects_and_never_the_token_secret():
    done = kb("dashboard", "render", "-n", "batch", "--token-secret", "dash-token", "--allow-actions")
    assert done.exit_code == 0, done.stderr
    objects = from_yaml(done.stdout)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"]
    assert all(o["metadata"]["namespace"] == "batch" for o in objects)
    assert "Secret" not in [o["kind"] for o in objects] and "not rendered: Secret 'dash-token'" in done.stderr


def test_render_refuses_a_bad_value_with_one_line():
    one_line_error(kb("dashboard", "render", "--cpu", "lots"), 2, "bad --cpu")
    one_line_error(kb("dashboard", "render", "--port", "70000"), 2, "--port")


def test_deploy_applies_the_objects_and_generates_a_token_it_never_prints(api):
    done = kb("dashboard", "deploy", "-n", "batch", "--token-secret", "dash-token")
    assert done.exit_code == 0, done.stderr
    store = api.store
    assert store.get("deployments", "batch", NAME)["spec"]["replicas"] == 1
    assert store.get("services", "batch", NAME)["spec"]["type"] == "ClusterIP"
    assert store.get("roles", "batch", NAME)["rules"]
    token = store.get("secrets", "batch", "dash-token")["stringData"]["token"]
    assert len(token) >= 32 and token not in done.stdout + done.stderr
    assert "port-forward svc/kiabatch-dashboard 8577" in done.stdout
    again = kb("dashboard", "deploy", "-n", "batch", "--token-secret", "dash-token")
    assert again.exit_code == 0, again.stderr
    assert store.get("secrets", "batch", "dash-token")["stringData"]["token"] == token  # kept, not regenerated


def test_deploy_to_a_missing_namespace_fails_with_exit_3(api):
    one_line_error(kb("dashboard", "deploy", "-n", "nowhere"), 3, "namespace 'nowhere' does not exist")
