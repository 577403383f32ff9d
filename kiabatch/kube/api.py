"""Talking to the Kubernetes API: configuration, version check, CRUD, watch, logs.

All objects go in and come out as plain dicts. Every API failure becomes a
:class:`~kiabatch.errors.ClusterError` (exit code 3) with one line saying what
went wrong: no configuration, an unreachable server, RBAC, a missing namespace,
an exceeded quota, an invalid object.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from ..errors import ClusterError, NotFoundError

#: Oldest Kubernetes kiabatch supports (backoffLimitPerIndex and native sidecars are GA).
MIN_VERSION = (1, 33)
FIELD_MANAGER = "kiabatch"
# Seconds to connect, and to wait for a reply, before an API call counts as failed (never hang).
_CONNECT_TIMEOUT = 10
_READ_TIMEOUT = 60
_TIMEOUTS = (_CONNECT_TIMEOUT, _READ_TIMEOUT)
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# (apiVersion, kind) -> (API class, method suffix) for the kinds kiabatch manages.
_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ServiceAccount"): ("CoreV1Api", "service_account"),
    ("v1", "Secret"): ("CoreV1Api", "secret"),
    ("v1", "ConfigMap"): ("CoreV1Api", "config_map"),
    ("v1", "Service"): ("CoreV1Api", "service"),
    ("v1", "PersistentVolumeClaim"): ("CoreV1Api", "persistent_volume_claim"),
    ("v1", "Pod"): ("CoreV1Api", "pod"),
    ("batch/v1", "Job"): ("BatchV1Api", "job"),
    ("batch/v1", "CronJob"): ("BatchV1Api", "cron_job"),
    ("apps/v1", "StatefulSet"): ("AppsV1Api", "stateful_set"),
    ("apps/v1", "Deployment"): ("AppsV1Api", "deployment"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("RbacAuthorizationV1Api", "role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("RbacAuthorizationV1Api", "role_binding"),
    ("policy/v1", "PodDisruptionBudget"): ("PolicyV1Api", "pod_disruption_budget"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("NetworkingV1Api", "network_policy"),
}


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason or exc.status)


def explain(exc: Exception, action: str) -> ClusterError:
    """One clear line for a failed API call (``action`` says what we tried)."""
    if isinstance(exc, ApiException):
        message = _message(exc)
        if exc.status == 401:
            return ClusterError(f"{action}: the API server rejected our credentials (401); check your kubeconfig")
        if exc.status == 403 and "exceeded quota" in message:
            return ClusterError(f"{action}: quota exceeded: {message}")
        if exc.status == 403:
            return ClusterError(f"{action}: forbidden by RBAC: {message}")
        if exc.status == 404:
            return ClusterError(f"{action}: not found: {message}")
        if exc.status == 422:
            return ClusterError(f"{action}: the API server rejected the object: {message}")
        return ClusterError(f"{action}: {exc.status} {exc.reason}: {message}")
    reason = getattr(exc, "reason", None) or exc
    return ClusterError(f"{action}: cannot reach the Kubernetes API server: {reason}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the cluster is: kubeconfig context (or in-cluster) and namespace."""

    api: k8s.ApiClient
    namespace: str
    context: str | None


def load(context: str | None = None, namespace: str | None = None) -> ClusterConfig:
    """Resolve configuration as kubectl does: $KUBECONFIG / ~/.kube/config, else in-cluster.

    The namespace is ``namespace``, else the context's, else the pod's own
    (in-cluster), else ``default``.
    """
    # Read KUBECONFIG now (the kubernetes package reads it once, at import).
    config_file = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    try:
        api = k8s_config.new_client_from_config(config_file=config_file, context=context)
        contexts, active = k8s_config.list_kube_config_contexts(config_file=config_file)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        default_namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
        return ClusterConfig(api, namespace or default_namespace, (chosen or {}).get("name"))
    except (ConfigException, FileNotFoundError, TypeError) as exc:
        if context:
            raise ClusterError(f"cannot use kubeconfig context {context!r}: {exc}") from None
        kubeconfig_error = exc
    try:
        configuration = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        raise ClusterError(
            f"no Kubernetes configuration: set KUBECONFIG or ~/.kube/config, or run inside a cluster "
            f"({kubeconfig_error})"
        ) from None
    in_cluster_namespace = _IN_CLUSTER_NAMESPACE.read_text().strip() if _IN_CLUSTER_NAMESPACE.exists() else ""
    return ClusterConfig(k8s.ApiClient(configuration), namespace or in_cluster_namespace or "default", None)


def parse_version(git_version: str, minor: str = "") -> tuple[int, int]:
    """(major, minor) from /version (``v1.33.2-gke.100``; minor may read ``33+``)."""
    match = re.match(r"v?(\d+)\.(\d+)", git_version)
    if match:
        return int(match.group(1)), int(match.group(2))
    return 1, int(re.sub(r"\D", "", minor) or 0)


class Cluster:
    """A namespace of one cluster, as kiabatch uses it."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.api = config.api
        self.namespace = config.namespace
        self.core = k8s.CoreV1Api(self.api)
        self.batch = k8s.BatchV1Api(self.api)
        self._watch_batch: k8s.BatchV1Api | None = None

    @classmethod
    def connect(cls, context: str | None = None, namespace: str | None = None) -> Cluster:
        """Load configuration (no request is made yet)."""
        return cls(load(context, namespace))

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self.api.configuration.host)

    def _call(self, action: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            response = method(*args, _preload_content=False, _request_timeout=_TIMEOUTS, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, action) from None
        data = response.data
        return json.loads(data) if data else {}

    # -- checks ---------------------------------------------------------------------------

    def check_version(self, minimum: tuple[int, int] = MIN_VERSION) -> tuple[int, int]:
        """The server's (major, minor); ClusterError if older than ``minimum``."""
        info = self._call(f"reading the version of {self.server}", k8s.VersionApi(self.api).get_code)
        version = parse_version(info.get("gitVersion", ""), info.get("minor", ""))
        if version < minimum:
            raise ClusterError(
                f"the cluster at {self.server} runs Kubernetes {version[0]}.{version[1]}; "
                f"kiabatch needs {minimum[0]}.{minimum[1]} or newer"
            )
        return version

    def check_namespace(self) -> None:
        """ClusterError if the namespace does not exist (or we may not see it)."""
        try:
            self.core.read_namespace(self.namespace, _preload_content=False, _request_timeout=_TIMEOUTS)
        except ApiException as exc:
            if exc.status == 404:
                raise ClusterError(f"namespace {self.namespace!r} does not exist on {self.server}") from None
            if exc.status == 403:
                return  # may not read namespaces, but may still use this one
            raise explain(exc, f"checking namespace {self.namespace!r}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, f"checking namespace {self.namespace!r}") from None

    # -- generic objects -----------------------------------------------------------------

    def _method(self, obj_or_kind: dict[str, Any] | tuple[str, str], verb: str) -> Any:
        key = (obj_or_kind["apiVersion"], obj_or_kind["kind"]) if isinstance(obj_or_kind, dict) else obj_or_kind
        api_class, suffix = _KINDS[key]
        return getattr(getattr(k8s, api_class)(self.api), f"{verb}_namespaced_{suffix}")

    def create(self, obj: dict[str, Any], *, exist_ok: bool = False, forbidden_ok: bool = False) -> dict[str, Any]:
        """Create ``obj`` in the namespace.

        ``exist_ok``: an existing one is fine. ``forbidden_ok``: so is not being allowed
        to create it (a least-privilege caller relies on it having been created for it).
        """
        action = f"creating {obj['kind']} {obj['metadata']['name']!r} in namespace {self.namespace!r}"
        try:
            response = self._method(obj, "create")(
                self.namespace, obj, _preload_content=False, _request_timeout=_TIMEOUTS
            )
        except ApiException as exc:
            if (exc.status == 409 and exist_ok) or (exc.status == 403 and forbidden_ok):
                return obj
            if exc.status == 404:
                self.check_namespace()
            raise explain(exc, action) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, action) from None
        return json.loads(response.data)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (create or update; kiabatch owns the fields it sets)."""
        action = f"applying {obj['kind']} {obj['metadata']['name']!r} in namespace {self.namespace!r}"
        return self._call(
            action,
            self._method(obj, "patch"),
            obj["metadata"]["name"],
            self.namespace,
            obj,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def patch(self, kind: tuple[str, str], name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of one object (e.g. ``{"spec": {"suspend": True}}``)."""
        return self._call(
            f"patching {kind[1]} {name!r}",
            self._method(kind, "patch"),
            name,
            self.namespace,
            patch,
            _content_type="application/merge-patch+json",
        )

    def get(self, kind: tuple[str, str], name: str) -> dict[str, Any] | None:
        """One object, or None if it does not exist."""
        try:
            response = self._method(kind, "read")(
                name, self.namespace, _preload_content=False, _request_timeout=_TIMEOUTS
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise explain(exc, f"reading {kind[1]} {name!r}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, f"reading {kind[1]} {name!r}") from None
        return json.loads(response.data)

    def list(self, kind: tuple[str, str], selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of ``kind`` in the namespace, optionally by label selector."""
        listing = self._call(f"listing {kind[1]}s", self._method(kind, "list"), self.namespace, label_selector=selector)
        return list(listing.get("items", []))

    def delete(self, kind: tuple[str, str], name: str, *, propagation: str = "Background") -> bool:
        """Delete an object (dependents per ``propagation``); False if it was not there."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self._method(kind, "delete")(
                name, self.namespace, body=body, _preload_content=False, _request_timeout=_TIMEOUTS
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise explain(exc, f"deleting {kind[1]} {name!r}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, f"deleting {kind[1]} {name!r}") from None
        return True

    def replace_secret(self, secret: dict[str, Any]) -> None:
        """Create the Secret, or replace its data if it exists."""
        name = secret["metadata"]["name"]
        try:
            self.core.create_namespaced_secret(
                self.namespace, secret, _preload_content=False, _request_timeout=_TIMEOUTS
            )
        except ApiException as exc:
            if exc.status != 409:
                raise explain(exc, f"creating Secret {name!r} in namespace {self.namespace!r}") from None
            self._call(
                f"replacing Secret {name!r}",
                self.core.replace_namespaced_secret,
                name,
                self.namespace,
                secret,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, f"creating Secret {name!r}") from None

    # -- jobs and pods -------------------------------------------------------------------

    def job(self, name: str) -> dict[str, Any]:
        """The Job called ``name``; NotFoundError if it is gone."""
        found = self.get(("batch/v1", "Job"), name)
        if found is None:
            raise NotFoundError(f"no Job {name!r} in namespace {self.namespace!r} (finished Jobs are removed "
                                "after ttlSecondsAfterFinished)")  # fmt: skip
        return found

    def watch_job(self, name: str, resource_version: str | None, timeout: int) -> Iterator[dict[str, Any]]:
        """Job ``name`` as it changes, for up to ``timeout`` seconds (server-side).

        Watches use a connection pool of their own, so a stream left open never
        shares a connection with other requests.
        """
        if self._watch_batch is None:
            self._watch_batch = k8s.BatchV1Api(k8s.ApiClient(self.api.configuration))
        watcher = k8s_watch.Watch()
        try:
            for event in watcher.stream(
                self._watch_batch.list_namespaced_job,
                self.namespace,
                field_selector=f"metadata.name={name}",
                resource_version=resource_version,
                timeout_seconds=timeout,
                _request_timeout=(_CONNECT_TIMEOUT, timeout + _READ_TIMEOUT),
                deserialize=False,
            ):
                if event.get("type") == "ERROR":
                    return  # e.g. 410 Gone: the caller re-reads and watches again
                yield event["object"]
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise explain(exc, f"watching Job {name!r}") from None
        finally:
            watcher.stop()

    def pods(self, selector: str) -> list[dict[str, Any]]:
        """Pods matching a label selector."""
        return self.list(("v1", "Pod"), selector)

    def pod_log(self, pod: str, container: str, *, follow: bool = False, tail: int | None = None) -> Iterator[bytes]:
        """A container's log as chunks of bytes.

        With ``follow`` the log is streamed until the container ends, waiting for
        a container that has not started yet; without, such a container has no log.
        """
        while True:
            try:
                response = self.core.read_namespaced_pod_log(
                    pod,
                    self.namespace,
                    container=container,
                    follow=follow,
                    tail_lines=tail,
                    _preload_content=False,
                    # A followed log may be quiet for long: no timeout then.
                    _request_timeout=None if follow else _TIMEOUTS,
                )
                yield from response.stream(4096)
                return
            except ApiException as exc:
                if exc.status != 400:  # 400: the container is waiting to start
                    raise explain(exc, f"reading logs of {pod}/{container}") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise explain(exc, f"reading logs of {pod}/{container}") from None
            current = self.get(("v1", "Pod"), pod)
            if not follow or current is None or current.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            time.sleep(0.5)
