"""Checks every rendered object must pass: the official schemas, and the "restricted" Pod Security Standard."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

#: Kubernetes versions kiabatch supports (each validated in strict mode).
VERSIONS = ["1.33", "1.34", "1.35", "1.36", "1.37"]

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (Baseline + Restricted)
_ALLOWED_VOLUME_KEYS = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def validate_all_versions(obj: dict[str, Any]) -> None:
    """Strict schema validation for every supported version (raises on the first error)."""
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']} {obj['metadata']['name']} invalid for {version} at {path}: {exc.message}"
            ) from None


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload object (Pod, Job, CronJob, StatefulSet...)."""
    kind = obj["kind"]
    if kind == "Pod":
        return [obj["spec"]]
    if kind in ("Job", "StatefulSet", "Deployment", "DaemonSet", "ReplicaSet"):
        return [obj["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way ``pod`` breaks the Pod Security Standard "restricted" (empty: it passes)."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"pod sets {field}")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        problems.append("pod sets hostProcess")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUME_KEYS:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - _ALLOWED_VOLUME_KEYS)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            problems.append(f"unsafe sysctl {sysctl['name']}")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runs as UID 0")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccomp {pod_seccomp}")
    if pod_sc.get("appArmorProfile", {}).get("type") == "Unconfined":
        problems.append("pod AppArmor Unconfined")
    if pod_sc.get("seLinuxOptions", {}).get("type") not in (
        None,
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
        "container_engine_t",
    ):
        problems.append("pod SELinux type")
    containers = pod.get("initContainers", []) + pod.get("containers", []) + pod.get("ephemeralContainers", [])
    for container in containers:
        name = container["name"]
        sc = container.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name} does not set allowPrivilegeEscalation: false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name} does not drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name} adds capabilities {caps['add']}")
        if not (
            sc.get("runAsNonRoot") is True
            or (pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)
        ):
            problems.append(f"{name} may run as root (runAsNonRoot not true)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name} runs as UID 0")
        seccomp = sc.get("seccompProfile", {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name} has no RuntimeDefault/Localhost seccomp profile")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name} procMount {sc['procMount']}")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            problems.append(f"{name} AppArmor Unconfined")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name} uses a hostPort")
    return problems
