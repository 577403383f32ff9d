"""The "restricted" Pod Security Standard, checked on a pod spec before kiabatch sends it.

kiabatch's own pods always pass; a ``--pod-template`` fragment can change that, and
is then refused with the field it breaks (unless ``--allow-privileged-template``).
The rules are the Baseline and Restricted controls of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the policy the
``pod-security.kubernetes.io/enforce: restricted`` namespace label enforces).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Volume types a restricted pod may use.
ALLOWED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
#: The "safe" sysctls of the Baseline policy.
SAFE_SYSCTLS = frozenset(
    {
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
)
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def restricted_violations(pod: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> list[str]:
    """Every way the pod spec ``pod`` breaks the restricted standard, each naming its field (empty: it passes)."""
    problems: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for name in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(name):
            problems.append(f"spec.{name} is true (host namespaces are not allowed)")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("spec.securityContext.windowsOptions.hostProcess is true")
    for volume in pod.get("volumes") or []:
        kinds = sorted(set(volume) - {"name"} - ALLOWED_VOLUMES)
        if kinds:
            problems.append(f"spec.volumes[{volume.get('name')}] is a {kinds[0]} volume (allowed: "
                            f"{', '.join(sorted(ALLOWED_VOLUMES))})")  # fmt: skip
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls sets {sysctl.get('name')!r} (not a safe sysctl)")
    problems += _identity("spec.securityContext", pod_sc)
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"spec.securityContext.seccompProfile.type is {pod_seccomp} (RuntimeDefault or Localhost)")
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    for key, value in (annotations or {}).items():
        if key.startswith(_APPARMOR_ANNOTATION) and value == "unconfined":
            problems.append(f"metadata.annotations[{key}] is unconfined")
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(field) or []:
            where = f"spec.{field}[{container.get('name')}]"
            problems += _container(where, container, pod_seccomp=pod_seccomp, pod_non_root=pod_non_root)
    return problems


def _identity(where: str, sc: Mapping[str, Any]) -> list[str]:
    """Checks a pod and a container securityContext share: root UID, AppArmor, SELinux."""
    problems = []
    if sc.get("runAsUser") == 0:
        problems.append(f"{where}.runAsUser is 0 (root)")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append(f"{where}.appArmorProfile.type is Unconfined")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in _SELINUX_TYPES:
        problems.append(f"{where}.seLinuxOptions.type is {selinux.get('type')!r}")
    if selinux.get("user") or selinux.get("role"):
        problems.append(f"{where}.seLinuxOptions sets a user or role")
    return problems


def _container(where: str, container: Mapping[str, Any], *, pod_seccomp: str | None, pod_non_root: bool) -> list[str]:
    sc = container.get("securityContext") or {}
    problems = _identity(f"{where}.securityContext", sc)
    if sc.get("privileged"):
        problems.append(f"{where}.securityContext.privileged is true")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}.securityContext.windowsOptions.hostProcess is true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}.securityContext.allowPrivilegeEscalation must be false")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}.securityContext.capabilities.drop must include ALL")
    added = sorted(set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"})
    if added:
        problems.append(f"{where}.securityContext.capabilities.add has {', '.join(added)} (only NET_BIND_SERVICE)")
    if not (sc.get("runAsNonRoot") is True or (pod_non_root and sc.get("runAsNonRoot") is not False)):
        problems.append(f"{where}.securityContext.runAsNonRoot must be true (here or on the pod)")
    seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}.securityContext.seccompProfile.type must be RuntimeDefault or Localhost")
    if sc.get("procMount", "Default") != "Default":
        problems.append(f"{where}.securityContext.procMount is {sc['procMount']}")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            problems.append(f"{where}.ports sets hostPort {port['hostPort']}")
    return problems
