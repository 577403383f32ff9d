"""A local stand-in for a Kubernetes cluster, for tests.

* ``FakeApiServer`` speaks the API's real JSON over HTTP on 127.0.0.1: objects
  with uid / resourceVersion / creationTimestamp, ``Status`` error bodies with
  the real codes and reasons (404 NotFound, 409 AlreadyExists, 403 Forbidden),
  label and field selectors, watch streams (``?watch=true``: one JSON event per
  line), pod logs, server-side apply and merge patches, deletion with
  background propagation. Tests point kiabatch at it with a kubeconfig file.
* ``JobEmulator`` plays the Job controller, the scheduler and the kubelet for
  Indexed Jobs: it creates pods and runs their containers as local processes
  exactly as rendered, in the kubelet's order — init containers one by one, a
  native sidecar counted as started once its process runs, its postStart hook
  returned and its startupProbe passed, then the worker — with the task emptyDir
  as a temporary directory, environment from the spec (Secret references resolved
  from stored Secrets), ``JOB_COMPLETION_INDEX`` set, and per-index retries,
  ``podFailurePolicy`` and ``maxFailedIndexes``. It reads the Job afresh each
  round: ``parallelism`` may change, and ``suspend`` holds the Job (a test admits
  and preempts like Kueue: a suspended Job's pods stop, with DisruptionTarget).
  While ``unschedulable`` is set, new pods stay Pending with that FailedScheduling
  message (a pod condition and an Event), as on a full cluster.

The emulator's only translations are the ones a container runtime makes: volume
mount paths map to temporary directories, and the kiabatch image's entrypoint
(``kiabatch``) and PATH (its worker programs) map to this checkout.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

REPO = Path(__file__).resolve().parent.parent.parent

# plural -> (apiVersion, kind)
RESOURCES = {
    "jobs": ("batch/v1", "Job"),
    "cronjobs": ("batch/v1", "CronJob"),
    "pods": ("v1", "Pod"),
    "secrets": ("v1", "Secret"),
    "serviceaccounts": ("v1", "ServiceAccount"),
    "configmaps": ("v1", "ConfigMap"),
    "services": ("v1", "Service"),
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim"),
    "statefulsets": ("apps/v1", "StatefulSet"),
    "deployments": ("apps/v1", "Deployment"),
    "roles": ("rbac.authorization.k8s.io/v1", "Role"),
    "rolebindings": ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    "poddisruptionbudgets": ("policy/v1", "PodDisruptionBudget"),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
    "events": ("v1", "Event"),
    "workloads": ("kueue.x-k8s.io/v1beta1", "Workload"),
}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def matches(obj: dict[str, Any], label_selector: str | None, field_selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
    return True


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Store:
    """Objects by (plural, namespace, name), with a change feed for watches."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self.version = itertools.count(1)
        self.changed = threading.Condition()
        self.logs: dict[tuple[str, str, str], bytearray] = {}  # (namespace, pod, container)
        self.namespaces = {"default"}
        self.on_create: list[Callable[[str, dict[str, Any]], None]] = []

    def _record(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        rv = next(self.version)
        obj["metadata"]["resourceVersion"] = str(rv)
        self.events.append((rv, plural, kind, copy.deepcopy(obj)))
        self.changed.notify_all()

    def create(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.changed:
            name = obj["metadata"].get("name")
            if not name and obj["metadata"].get("generateName"):
                name = obj["metadata"]["generateName"] + secrets.token_hex(3)[:5]
            key = (plural, namespace, name)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
            stored = copy.deepcopy(obj)
            stored["metadata"].update(name=name, namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now())
            stored["metadata"].setdefault("labels", {})
            stored.setdefault("status", {})
            self.objects[key] = stored
            self._record(plural, "ADDED", stored)
            result = copy.deepcopy(stored)
        for hook in self.on_create:
            hook(plural, result)
        return result

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self.changed:
            try:
                return copy.deepcopy(self.objects[(plural, namespace, name)])
            except KeyError:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found') from None

    def update(self, plural: str, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict:
        with self.changed:
            obj = self.objects.get((plural, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            change(obj)
            self._record(plural, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, plural: str, namespace: str, name: str, propagation: str = "Background") -> dict[str, Any]:
        with self.changed:
            obj = self.objects.pop((plural, namespace, name), None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            self._record(plural, "DELETED", obj)
        if propagation == "Orphan":
            return obj
        # The garbage collector: dependents whose ownerReferences name the deleted object go too.
        uid = obj["metadata"]["uid"]
        for dependent_plural, dependent_ns, dependent in [
            k for k, o in list(self.objects.items())
            if k[1] == namespace and any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])
        ]:  # fmt: skip
            with contextlib.suppress(ApiError):
                self.delete(dependent_plural, dependent_ns, dependent)
        if plural == "jobs":  # background propagation: the Job's pods go too
            for key in [k for k, o in list(self.objects.items()) if k[0] == "pods" and k[1] == namespace
                        and o["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name]:  # fmt: skip
                with self.changed:
                    pod = self.objects.pop(key, None)
                    if pod:
                        self._record("pods", "DELETED", pod)
        if plural == "statefulsets":  # background propagation: the pods it owns go too
            for key in [k for k, o in list(self.objects.items()) if k[0] == "pods" and k[1] == namespace
                        and any(ref.get("kind") == "StatefulSet" and ref.get("name") == name
                                for ref in o["metadata"].get("ownerReferences") or [])]:  # fmt: skip
                with self.changed:
                    pod = self.objects.pop(key, None)
                    if pod:
                        self._record("pods", "DELETED", pod)
        return obj

    def list(self, plural: str, namespace: str, labels: str | None, fields: str | None) -> list[dict[str, Any]]:
        with self.changed:
            return [copy.deepcopy(o) for (p, ns, _), o in self.objects.items()
                    if p == plural and ns == namespace and matches(o, labels, fields)]  # fmt: skip


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class FakeApiServer:
    """The HTTP side. ``deny`` maps (method, plural) to an error to answer instead."""

    def __init__(self, version: str = "v1.34.2") -> None:
        self.store = Store()
        self.version = version
        self.deny: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # streams use chunked transfer encoding, as the real server does

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self, "GET")

            def do_POST(self) -> None:
                server.handle(self, "POST")

            def do_PUT(self) -> None:
                server.handle(self, "PUT")

            def do_PATCH(self) -> None:
                server.handle(self, "PATCH")

            def do_DELETE(self) -> None:
                server.handle(self, "DELETE")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hang up on watches and log streams; that is normal

        self.http = Server(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def start(self) -> FakeApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.store.changed:
            self.store.changed.notify_all()
        self.http.shutdown()
        self.http.server_close()

    def kubeconfig(
        self, path: Path, namespace: str | None = None, context: str = "fake", token: str = "test-token"
    ) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "tester",
                                                        **({"namespace": namespace} if namespace else {})}}],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        return path

    # -- request handling ----------------------------------------------------------------

    def _send(self, handler: BaseHTTPRequestHandler, code: int, body: Any, content_type: str = "application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, url.path))
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            if url.path.rstrip("/") == "/version":
                minor = self.version.split(".")[1]
                return self._send(handler, 200, {"major": "1", "minor": minor, "gitVersion": self.version})
            parts = [p for p in url.path.split("/") if p]
            if parts[:2] == ["api", "v1"]:
                rest = parts[2:]
            elif parts[0] == "apis":
                rest = parts[3:]
            else:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            if rest[:1] == ["namespaces"] and len(rest) == 2:
                if rest[1] not in self.store.namespaces:
                    raise ApiError(404, "NotFound", f'namespaces "{rest[1]}" not found')
                return self._send(handler, 200, {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": rest[1]}})  # fmt: skip
            namespace, plural = rest[1], rest[2]
            name = rest[3] if len(rest) > 3 else None
            sub = rest[4] if len(rest) > 4 else None
            denied = self.deny.get((method, plural))
            if denied:
                raise ApiError(*denied)
            self._authorize(handler, method, parts, namespace, plural, name, sub, query)
            if namespace not in self.store.namespaces and method == "POST":
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            body = json.loads(raw) if raw else None
            if sub == "log":
                return self._logs(handler, namespace, name, query)
            if method == "GET" and name is None and query.get("watch") in ("true", "True", "1"):
                return self._watch(handler, plural, namespace, query)
            if method == "GET" and name is None:
                items = self.store.list(plural, namespace, query.get("labelSelector"), query.get("fieldSelector"))
                api_version, kind = RESOURCES[plural]
                return self._send(handler, 200, {"apiVersion": api_version, "kind": f"{kind}List",
                                                 "metadata": {"resourceVersion": str(next(self.store.version))},
                                                 "items": items})  # fmt: skip
            if method == "GET":
                return self._send(handler, 200, self.store.get(plural, namespace, name))
            if method == "POST":
                self._validate(plural, body)
                return self._send(handler, 201, self.store.create(plural, namespace, body))
            if method == "PUT":
                return self._send(
                    handler,
                    200,
                    self.store.update(
                        plural,
                        namespace,
                        name,
                        lambda o: o.update({k: v for k, v in body.items() if k != "status"}),
                    ),
                )
            if method == "PATCH":
                return self._patch(handler, plural, namespace, name, body, handler.headers.get("Content-Type", ""))
            if method == "DELETE":
                self.store.delete(plural, namespace, name, (body or {}).get("propagationPolicy", "Background"))
                return self._send(handler, 200, status_body(200, "", "deleted") | {"status": "Success"})
        except ApiError as exc:
            return self._send(handler, exc.code, status_body(exc.code, exc.reason, exc.message))
        raise ApiError(405, "MethodNotAllowed", method)

    def _authorize(self, handler, method, parts, namespace, plural, name, sub, query) -> None:
        """RBAC for service account tokens (``serviceaccount:NS:NAME``): Roles bound in the namespace.

        The test user's token is an administrator, as a cluster admin's kubeconfig would be.
        """
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not token.startswith("serviceaccount:"):
            return
        _, account_namespace, account = token.split(":", 2)
        if method == "GET":
            verb = "watch" if query.get("watch") in ("true", "True", "1") else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        group = "" if parts[0] == "api" else parts[1]
        resource = f"{plural}/{sub}" if sub else plural
        for binding in self.store.list("rolebindings", namespace, None, None):
            if not any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == account
                and s.get("namespace", namespace) == account_namespace
                for s in binding.get("subjects", [])
            ):
                continue
            try:
                role = self.store.get("roles", namespace, binding["roleRef"]["name"])
            except ApiError:
                continue
            for rule in role.get("rules", []):
                if (
                    group in rule.get("apiGroups", [])
                    and resource in rule.get("resources", [])
                    and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
                ):
                    return
        where = f'in API group "{group}" ' if group else ""
        raise ApiError(
            403,
            "Forbidden",
            f'{plural} is forbidden: User "system:serviceaccount:{account_namespace}:'
            f'{account}" cannot {verb} resource "{resource}" {where}in the namespace '
            f'"{namespace}"',
        )

    def _validate(self, plural: str, body: dict[str, Any]) -> None:
        api_version, kind = RESOURCES[plural]
        if body.get("kind") != kind or body.get("apiVersion") != api_version:
            raise ApiError(400, "BadRequest", f"expected {api_version} {kind}")

    def _patch(self, handler, plural, namespace, name, body, content_type) -> None:
        if "apply-patch" in content_type:
            try:
                current = self.store.get(plural, namespace, name)
            except ApiError:
                self._validate(plural, body)
                return self._send(handler, 201, self.store.create(plural, namespace, body))
            merged = deep_merge(current, {k: v for k, v in body.items() if k != "status"})
            return self._send(handler, 200, self.store.update(plural, namespace, name, lambda o: o.update(merged)))
        patched = self.store.update(plural, namespace, name, lambda o: o.update(deep_merge(o, body)))
        return self._send(handler, 200, patched)

    @staticmethod
    def _start_stream(handler: BaseHTTPRequestHandler, content_type: str) -> Callable[[bytes], None]:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True

        def write(data: bytes) -> None:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        return write

    def _watch(self, handler, plural, namespace, query) -> None:
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        write = self._start_stream(handler, "application/json")
        sent = 0
        if not since:  # no version: the current state first, as ADDED events
            for obj in self.store.list(plural, namespace, query.get("labelSelector"), query.get("fieldSelector")):
                write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            since = max((e[0] for e in self.store.events), default=0)
        try:
            while time.monotonic() < deadline:
                with self.store.changed:
                    pending = [e for e in self.store.events[sent:] if e[0] > since and e[1] == plural
                               and e[3]["metadata"].get("namespace") == namespace
                               and matches(e[3], query.get("labelSelector"), query.get("fieldSelector"))]  # fmt: skip
                    sent = len(self.store.events)
                    if not pending:
                        self.store.changed.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                for _, _, kind, obj in pending:
                    write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            write(b"")  # the last chunk: the watch ends at its timeout, as a real one does
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _logs(self, handler, namespace, pod, query) -> None:
        container = query.get("container", "")
        key = (namespace, pod, container)
        if key not in self.store.logs:
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{pod}" is waiting to start')
        if query.get("follow") not in ("true", "True"):
            return self._send(handler, 200, bytes(self.store.logs[key]), "text/plain")
        write = self._start_stream(handler, "text/plain")
        offset = 0
        while True:
            data = bytes(self.store.logs[key])
            if len(data) > offset:
                write(data[offset:])
                offset = len(data)
            try:
                phase = self.store.get("pods", namespace, pod)["status"].get("phase")
            except ApiError:
                phase = "Gone"
            if phase in ("Succeeded", "Failed", "Gone") and len(self.store.logs[key]) == offset:
                write(b"")
                return
            time.sleep(0.05)


class JobEmulator:
    """Runs Indexed Jobs created in ``server`` as local processes (see the module docstring)."""

    UNPULLABLE = "doesnotexist"

    def __init__(self, server: FakeApiServer, kiabatch_image: str) -> None:
        self.server = server
        self.store = server.store
        self.kiabatch_image = kiabatch_image
        self.root = Path(tempfile.mkdtemp(prefix="kbfake-"))
        self.threads: list[threading.Thread] = []
        self.evict: set[tuple[str, int]] = set()  # (job, index): evict that index's next pod
        # (job, index): that index's next pod dies (node failure) after its worker finished but
        # before the reporter uploaded anything.
        self.kill_before_upload: set[tuple[str, int]] = set()
        # (job, index) -> predicate: that index's next pod is killed (SIGKILL) once it holds.
        self.kill_when: dict[tuple[str, int], Callable[[], bool]] = {}
        # The scheduler's verdict while set: new pods stay Pending with this FailedScheduling
        # message (e.g. "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.").
        self.unschedulable: str | None = None
        # (namespace, job) of the Jobs currently suspended (pods are stopped, none start).
        self.suspended_jobs: set[tuple[str, str]] = set()
        # pod -> [(container, "process" | "running" | "started" | "exited", monotonic time)]
        self.timeline: dict[str, list[tuple[str, str, float]]] = {}
        self.stopping = False
        # The cluster DNS stand-in: "host:port" a pod would dial -> a local "127.0.0.1:port",
        # substituted in containers' environment values.
        self.dns: dict[str, str] = {}
        self.store.on_create.append(self._created)

    def close(self) -> None:
        self.stopping = True
        for thread in self.threads:
            thread.join(timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def _created(self, plural: str, obj: dict[str, Any]) -> None:
        if plural == "jobs":
            thread = threading.Thread(target=self._run_job, args=(obj,), daemon=True)
            self.threads.append(thread)
            thread.start()

    # -- the Job controller ------------------------------------------------------------

    def _set_status(self, job: dict[str, Any], **fields: Any) -> None:
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]

        def change(obj: dict[str, Any]) -> None:
            obj.setdefault("status", {}).update(fields)

        with contextlib.suppress(ApiError):
            self.store.update("jobs", namespace, name, change)

    def _job_exists(self, job: dict[str, Any]) -> bool:
        try:
            self.store.get("jobs", job["metadata"]["namespace"], job["metadata"]["name"])
            return True
        except ApiError:
            return False

    def _run_job(self, job: dict[str, Any]) -> None:
        """The Job controller for one Indexed Job, reading the Job afresh on every round.

        ``parallelism`` may change while it runs (``kiabatch scale``), and ``suspend``
        (Kueue) holds it: a suspended Job starts no pods, and suspending a running one
        stops its pods, which end Failed with a DisruptionTarget condition.
        """
        spec = job["spec"]
        completions = spec.get("completions", 1)
        per_index = spec.get("backoffLimitPerIndex", spec.get("backoffLimit", 6))
        max_failed = spec.get("maxFailedIndexes")
        rules = (spec.get("podFailurePolicy") or {}).get("rules", [])
        pending = list(range(completions))
        failures = dict.fromkeys(pending, 0)
        completed: set[int] = set()
        failed: set[int] = set()
        counts = {"succeeded": 0, "failed": 0}
        lock = threading.Lock()
        running: dict[int, threading.Thread] = {}
        suspended: bool | None = None
        key = (job["metadata"]["namespace"], job["metadata"]["name"])

        def run(index: int) -> None:
            outcome, exit_codes, disrupted = self._run_pod(job, index)
            with lock:
                if outcome == "Succeeded":
                    completed.add(index)
                    counts["succeeded"] += 1
                else:
                    counts["failed"] += 1
                    if disrupted and any(r["action"] == "Ignore" for r in rules):
                        pending.append(index)  # evictions and preemptions do not count
                    elif any(r["action"] == "FailIndex" and set(exit_codes) & set(r["onExitCodes"]["values"])
                             for r in rules if "onExitCodes" in r):  # fmt: skip
                        failed.add(index)
                    else:
                        failures[index] += 1
                        if failures[index] > per_index:
                            failed.add(index)
                        else:
                            pending.append(index)
                del running[index]

        while not self.stopping:
            current = self._current(job)
            if current is None:
                break
            now_suspended = bool(current["spec"].get("suspend"))
            if now_suspended != suspended:
                suspended = now_suspended
                if suspended:
                    self.suspended_jobs.add(key)
                else:
                    self.suspended_jobs.discard(key)
                if suspended:
                    self._set_condition(job, "Suspended", "True", "JobSuspended", "Job suspended")
                elif any(c["type"] == "Suspended" for c in current.get("status", {}).get("conditions") or []):
                    self._set_condition(job, "Suspended", "False", "JobResumed", "Job resumed")
                if not suspended:
                    self._set_status(job, startTime=now())
            with lock:
                too_many = max_failed is not None and len(failed) > max_failed
                if too_many or (not pending and not running):
                    break
                parallelism = current["spec"].get("parallelism", 1)
                while not suspended and pending and len(running) < parallelism:
                    index = pending.pop(0)
                    running[index] = threading.Thread(target=run, args=(index,), daemon=True)
                    running[index].start()
                active = len(running)
            ready = sum(1 for pod in self.store.list("pods", key[0], f"batch.kubernetes.io/job-name={key[1]}", None)
                        if pod["status"].get("phase") == "Running")  # fmt: skip
            self._set_status(job, active=active, ready=min(ready, active), succeeded=counts["succeeded"],
                             failed=counts["failed"], completedIndexes=_ranges(completed),
                             failedIndexes=_ranges(failed) or None)  # fmt: skip
            time.sleep(0.05)
        while running:
            time.sleep(0.05)
        self.suspended_jobs.discard(key)
        if not self._job_exists(job):
            return
        conditions = [c for c in (self._current(job) or {}).get("status", {}).get("conditions") or []
                      if c["type"] == "Suspended"]  # fmt: skip
        if max_failed is not None and len(failed) > max_failed:
            conditions += [
                {"type": "FailureTarget", "status": "True", "reason": "MaxFailedIndexesExceeded"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "MaxFailedIndexesExceeded",
                    "message": "Job has exceeded the specified maximal number of failed indexes",
                },
            ]
        elif failed:
            conditions += [
                {"type": "FailureTarget", "status": "True", "reason": "FailedIndexes"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "FailedIndexes",
                    "message": "Job has failed indexes",
                },
            ]
        else:
            conditions += [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
            ]
        self._set_status(job, active=0, ready=0, succeeded=counts["succeeded"], failed=counts["failed"],
                         completedIndexes=_ranges(completed), failedIndexes=_ranges(failed) or None,
                         conditions=conditions, completionTime=now())  # fmt: skip

    def _current(self, job: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.store.get("jobs", job["metadata"]["namespace"], job["metadata"]["name"])
        except ApiError:
            return None

    def _set_condition(self, job: dict[str, Any], kind: str, status: str, reason: str, message: str) -> None:
        def change(obj: dict[str, Any]) -> None:
            found = [c for c in obj.setdefault("status", {}).get("conditions") or [] if c["type"] != kind]
            obj["status"]["conditions"] = [*found, {"type": kind, "status": status, "reason": reason,
                                                    "message": message, "lastTransitionTime": now()}]  # fmt: skip

        with contextlib.suppress(ApiError):
            self.store.update("jobs", job["metadata"]["namespace"], job["metadata"]["name"], change)

    def _stopped(self, job: dict[str, Any]) -> bool:
        """The pod must go: its Job was deleted or suspended, or the emulator is closing."""
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        return self.stopping or key in self.suspended_jobs or not self._job_exists(job)

    # -- the scheduler and the kubelet ---------------------------------------------------

    def _schedule(self, job: dict[str, Any], namespace: str, pod_name: str) -> bool:
        """Keep the pod Pending while ``unschedulable`` says the cluster is full (FailedScheduling); True once bound."""
        reported = None
        while self.unschedulable and not self._stopped(job):
            message = self.unschedulable
            if message != reported:
                reported = message
                self._pod_status(namespace, pod_name, phase="Pending", conditions=[
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastTransitionTime": now()}])  # fmt: skip
                self.store.create("events", namespace, {
                    "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{pod_name}."},
                    "involvedObject": {"kind": "Pod", "name": pod_name, "namespace": namespace},
                    "type": "Warning", "reason": "FailedScheduling", "message": message,
                    "source": {"component": "default-scheduler"}})  # fmt: skip
            time.sleep(0.05)
        if self._stopped(job):
            return False
        self._pod_status(namespace, pod_name, conditions=[{"type": "PodScheduled", "status": "True"}])
        return True

    def _run_pod(self, job: dict[str, Any], index: int) -> tuple[str, list[int], bool]:
        """Create and run one pod; returns (phase, worker exit codes, disrupted).

        Containers start as the kubelet starts them: regular init containers one
        after the other, each to completion; a native sidecar (``restartPolicy:
        Always``) counts as started once its process runs, its postStart hook has
        returned and its startupProbe, if any, has succeeded — only then does the
        next container start. Sidecars get SIGTERM once the worker has exited.
        """
        namespace, job_name = job["metadata"]["namespace"], job["metadata"]["name"]
        template = job["spec"]["template"]
        pod_name = f"{job_name}-{index}-{secrets.token_hex(3)[:5]}"
        labels = {**template["metadata"].get("labels", {}), "batch.kubernetes.io/job-name": job_name,
                  "batch.kubernetes.io/job-completion-index": str(index)}  # fmt: skip
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "labels": labels,
                            "annotations": dict(template["metadata"].get("annotations") or {}),
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                 "uid": job["metadata"]["uid"], "controller": True}]},
               "spec": copy.deepcopy(template["spec"]), "status": {"phase": "Pending"}}  # fmt: skip
        self.store.create("pods", namespace, pod)
        self.timeline[pod_name] = []
        spec = pod["spec"]
        if not self._schedule(job, namespace, pod_name):
            self._pod_status(namespace, pod_name, phase="Failed", conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKueue"}])  # fmt: skip
            return "Failed", [], True
        containers = spec.get("initContainers", []) + spec["containers"]
        if any(self.UNPULLABLE in c["image"] for c in containers):
            bad = next(c for c in containers if self.UNPULLABLE in c["image"])
            self._pod_status(namespace, pod_name, phase="Pending", initContainerStatuses=[
                {"name": bad["name"], "image": bad["image"], "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "ImagePullBackOff",
                                       "message": f'Back-off pulling image "{bad["image"]}"'}}}])  # fmt: skip
            while not self._stopped(job):
                time.sleep(0.1)
            return "Failed", [], False
        volumes = {v["name"]: self._volume(namespace, pod_name, v) for v in spec.get("volumes", [])}
        sidecars: list[subprocess.Popen[bytes]] = []
        try:
            env_missing = self._env_problem(namespace, spec)
            if env_missing:
                first = containers[0]
                self._pod_status(namespace, pod_name, phase="Pending", initContainerStatuses=[
                    {"name": first["name"], "image": first["image"], "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": "CreateContainerConfigError",
                                           "message": env_missing}}}])  # fmt: skip
                while not self._stopped(job):
                    time.sleep(0.1)
                return "Failed", [], False
            self._pod_status(namespace, pod_name, phase="Running")
            doomed = (job_name, index) in self.kill_before_upload
            self.kill_before_upload.discard((job_name, index))
            for container in spec.get("initContainers", []):
                process = self._start(namespace, pod_name, container, volumes, index)
                if container.get("restartPolicy") == "Always":
                    sidecars.append(process)
                    if doomed and "task" in volumes:
                        # This pod's node dies after its worker finished but before the upload:
                        # the sidecar freezes once it has laid out the task, so it never reports.
                        self._freeze_when(process, volumes["task"] / "ready")
                    if not self._sidecar_started(namespace, pod_name, container, volumes, index, process):
                        self._stop_all(sidecars, kill=True)
                        self._pod_status(namespace, pod_name, phase="Failed")
                        return "Failed", [], False
                    continue
                code = process.wait()
                self.timeline[pod_name].append((container["name"], "exited", time.monotonic()))
                if code != 0:
                    self._stop_all(sidecars)
                    self._pod_status(namespace, pod_name, phase="Failed")
                    return "Failed", [], False
            [worker_spec] = spec["containers"]
            worker = self._start(namespace, pod_name, worker_spec, volumes, index)
            disrupted = False
            predicate = self.kill_when.pop((job_name, index), None)
            if predicate is not None:
                while worker.poll() is None and not predicate():
                    time.sleep(0.02)
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)  # the pod's container dies; the Job counts a failure
            if doomed:
                done = volumes["task"] / "done"
                while not done.exists() and worker.poll() is None:
                    time.sleep(0.01)
                os.killpg(worker.pid, signal.SIGKILL)
                disrupted = True
            if (job_name, index) in self.evict:
                self.evict.discard((job_name, index))
                ready = volumes["task"] / "ready" if "task" in volumes else None
                while ready is not None and not ready.exists() and worker.poll() is None:
                    time.sleep(0.01)  # evicted mid-task: after its claim
                time.sleep(0.3)
                disrupted = True
                worker.send_signal(signal.SIGKILL)  # API-initiated eviction: the node stops the pod
            while worker.poll() is None:
                if self._stopped(job):  # suspended (preempted) or deleted: the kubelet stops the pod
                    disrupted = True
                    self._terminate(worker)
                    break
                time.sleep(0.02)
            code = worker.wait()
            self.timeline[pod_name].append((worker_spec["name"], "exited", time.monotonic()))
            worker.collector.join(timeout=10)  # type: ignore[attr-defined]  # the log is complete once it ended
            self._stop_all(sidecars, kill=doomed)
            phase = "Succeeded" if code == 0 and not disrupted else "Failed"
            conditions = (
                [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}] if disrupted else []
            )
            self._pod_status(namespace, pod_name, phase=phase, conditions=conditions, containerStatuses=[
                {"name": worker_spec["name"], "image": worker_spec["image"], "ready": False, "restartCount": 0,
                 "state": {"terminated": {"exitCode": code}}}])  # fmt: skip
            return phase, ([code] if code else []), disrupted
        finally:
            self._stop_all(sidecars, kill=True)
            shutil.rmtree(self.root / pod_name, ignore_errors=True)

    def _sidecar_started(
        self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path], index: int,
        process: subprocess.Popen[bytes],
    ) -> bool:  # fmt: skip
        """Run the sidecar's postStart hook and startupProbe (exec) as the kubelet does; False if either fails."""
        self.timeline[pod].append((container["name"], "running", time.monotonic()))
        hook = ((container.get("lifecycle") or {}).get("postStart") or {}).get("exec")
        if hook and self._exec(namespace, pod, container, volumes, index, hook["command"]) != 0:
            return False
        probe = container.get("startupProbe")
        if probe and "exec" in probe:
            time.sleep(probe.get("initialDelaySeconds", 0))
            failures = 0
            while self._exec(namespace, pod, container, volumes, index, probe["exec"]["command"]) != 0:
                failures += 1
                if failures >= probe.get("failureThreshold", 3) or process.poll() is not None:
                    return False
                time.sleep(probe.get("periodSeconds", 10))
        self.timeline[pod].append((container["name"], "started", time.monotonic()))
        return True

    def _exec(
        self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path], index: int,
        command: list[str],
    ) -> int:  # fmt: skip
        """``kubectl exec``-style: ``command`` inside ``container`` (its mounts and environment)."""
        argv, env = self._process(namespace, pod, {**container, "command": command, "args": []}, volumes, index)
        return subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode  # fmt: skip

    @staticmethod
    def _freeze_when(process: subprocess.Popen[bytes], path: Path) -> None:
        def freeze() -> None:
            while process.poll() is None and not path.exists():
                time.sleep(0.005)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGSTOP)

        threading.Thread(target=freeze, daemon=True).start()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def _pod_status(self, namespace: str, name: str, **fields: Any) -> None:
        def change(obj: dict[str, Any]) -> None:
            obj["status"].update(fields)

        with contextlib.suppress(ApiError):
            self.store.update("pods", namespace, name, change)

    def _secret_value(self, namespace: str, ref: dict[str, str]) -> str | None:
        try:
            secret = self.store.get("secrets", namespace, ref["name"])
        except ApiError:
            return None
        if ref["key"] in (secret.get("stringData") or {}):
            return secret["stringData"][ref["key"]]
        if ref["key"] in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        return None

    def _env_problem(self, namespace: str, spec: dict[str, Any]) -> str | None:
        for container in spec.get("initContainers", []) + spec["containers"]:
            for variable in container.get("env", []):
                ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional") and self._secret_value(namespace, ref) is None:
                    return f'secret "{ref["name"]}" not found'
        return None

    def _process(
        self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path], index: int
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of a container's process, as the runtime would start it."""
        mounts = {m["mountPath"]: str(volumes[m["name"]]) for m in container.get("volumeMounts", [])}

        # A mount path counts only as a whole path component at the start of a value or after
        # "=", ":" or a space, never inside a host path (this checkout may itself live under /tmp).
        alternatives = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(?:(?<=^)|(?<=[=:\s]))({alternatives})(?=/|:|\s|$)") if mounts else None

        def mount(text: str) -> str:  # one pass, so a host path is never rewritten again
            return pattern.sub(lambda m: mounts[m.group(1)], text) if pattern else text

        env = {"PATH": os.environ["PATH"], "JOB_COMPLETION_INDEX": str(index)}
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = self._resolve(mount(variable["value"]))
            elif "fieldRef" in variable["valueFrom"]:
                env[variable["name"]] = self._field(namespace, pod, variable["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                value = self._secret_value(namespace, variable["valueFrom"]["secretKeyRef"])
                if value is not None or not variable["valueFrom"]["secretKeyRef"].get("optional"):
                    env[variable["name"]] = value or ""  # an optional key that is missing sets nothing
        env.update(self._service_account_env(namespace, pod))
        if container["image"] == self.kiabatch_image:
            # The kiabatch image: entrypoint `kiabatch`, worker programs on PATH.
            env["PATH"] = f"{REPO / 'workers'}:{Path(sys.executable).parent}:{env['PATH']}"
            entrypoint = [sys.executable, "-m", "kiabatch"]
        else:
            entrypoint = []
        # The image's own entrypoint is a host path already; only the spec's command is mapped.
        command = [mount(part) for part in container["command"]] if "command" in container else entrypoint
        args = [mount(part) for part in container.get("args", [])]
        return [*command, *args], env

    def _start(
        self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path], index: int
    ) -> subprocess.Popen[bytes]:
        argv, env = self._process(namespace, pod, container, volumes, index)
        key = (namespace, pod, container["name"])
        self.store.logs[key] = bytearray()
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        self.timeline.setdefault(pod, []).append((container["name"], "process", time.monotonic()))

        def collect() -> None:
            for line in iter(process.stdout.readline, b""):
                self.store.logs[key] += line

        process.collector = threading.Thread(target=collect, daemon=True)  # type: ignore[attr-defined]
        process.collector.start()  # type: ignore[attr-defined]
        return process

    def _field(self, namespace: str, pod: str, path: str) -> str:
        """The downward API: metadata.name, metadata.namespace, metadata.labels['key']."""
        obj = self.store.get("pods", namespace, pod)
        if path == "metadata.name":
            return pod
        if path == "metadata.namespace":
            return namespace
        match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if match:
            return obj["metadata"].get("labels", {}).get(match.group(1), "")
        raise ApiError(422, "Invalid", f"unsupported fieldRef {path}")

    def _service_account_env(self, namespace: str, pod: str) -> dict[str, str]:
        """What the projected service account token gives a pod: here, a kubeconfig with its identity.

        Pods with automountServiceAccountToken: false get nothing, like on a cluster.
        """
        spec = self.store.get("pods", namespace, pod)["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return {}
        account = spec.get("serviceAccountName", "default")
        path = self.root / "tokens" / f"{namespace}-{account}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.server.kubeconfig(path, namespace=namespace, token=f"serviceaccount:{namespace}:{account}")
        return {"KUBECONFIG": str(path)}

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The directory standing in for a PersistentVolumeClaim's volume (it outlives pods)."""
        path = self.root / "claims" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _volume(self, namespace: str, pod: str, volume: dict[str, Any]) -> Path:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            return self.claim_dir(namespace, claim)
        path = self.root / pod / volume["name"]
        path.mkdir(parents=True)
        if volume.get("configMap"):  # the kubelet projects the ConfigMap's keys as files
            try:
                data = self.store.get("configmaps", namespace, volume["configMap"]["name"]).get("data") or {}
            except ApiError:
                data = {}
            for key, text in data.items():
                (path / key).write_text(text)
        return path

    def _resolve(self, text: str) -> str:
        for name, address in sorted(self.dns.items(), key=lambda item: -len(item[0])):
            text = text.replace(name, address)
        return text

    @staticmethod
    def _stop_all(sidecars: list[subprocess.Popen[bytes]], *, kill: bool = False) -> None:
        """SIGTERM (SIGKILL with ``kill``: a node that died) to the sidecars, in reverse order, as the kubelet."""
        for sidecar in reversed(sidecars):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.pid, signal.SIGKILL if kill else signal.SIGTERM)
        for sidecar in sidecars:
            try:
                sidecar.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sidecar.kill()


def _ranges(indexes: set[int]) -> str:
    """The Job status index format: 1,3-5,7."""
    out, ordered = [], sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if j - i < 2 else f"{ordered[i]}-{ordered[j]}")
        if j - i == 1:
            out.append(str(ordered[j]))
        i = j + 1
    return ",".join(out)
