"""``kiabatch redis status``: what every pod of kiabatch's Redis is doing, from two sources.

* The Kubernetes API: the StatefulSet, each pod (phase, readiness, restarts, IP)
  and its data volume (PVC phase and capacity).
* Redis INFO (replication, memory, persistence) of each pod, read either by the
  status probe Job (``info.sh``, one INFO per pod by its stable DNS name; its log
  is parsed by :func:`parse_probe_log`) or, without the Job, from one endpoint
  given with ``--redis-url`` (usually a port-forward to the primary), whose
  replica list still gives every replica's offset and lag.

Pure functions: :meth:`kiabatch.kube.redis_ops.RedisOps.status` gathers the inputs into
:func:`pod_rows`, which ``kiabatch redis status`` prints.
"""

from __future__ import annotations

from typing import Any

from .redis_objects import STATEFULSET, data_claim_name

#: INFO fields shown per pod (``--output json`` has them all).
PERSISTENCE_FIELDS = (
    "loading",
    "aof_enabled",
    "aof_rewrite_in_progress",
    "aof_last_bgrewrite_status",
    "aof_last_write_status",
    "rdb_last_bgsave_status",
)


def parse_info(text: str) -> dict[str, str]:
    """``field:value`` lines of INFO (section headers and blank lines skipped)."""
    info = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            info[key] = value
    return info


def parse_probe_log(text: str) -> dict[int, dict[str, str] | str]:
    """The status Job's output: pod ordinal -> INFO fields, or why it was unreadable.

    Raises ValueError if the output is cut short (no ``### end``): the Job did not finish.
    """
    found: dict[int, dict[str, str] | str] = {}
    current: int | None = None
    lines: list[str] = []
    ended = False

    def close() -> None:
        if current is not None:
            errors = [line[4:] for line in lines if line.startswith("!!! ")]
            found[current] = errors[0] if errors else parse_info("\n".join(lines))

    for line in text.splitlines():
        if line.startswith("### "):
            close()
            words, lines = line[4:].split(), []
            current = int(words[0]) if words and words[0].isdigit() else None
            ended = ended or words == ["end"]
        elif current is not None:
            lines.append(line)
    close()
    if not ended:
        raise ValueError("the status probe's output is incomplete")
    return found


def replicas_seen_by(primary: dict[str, str]) -> list[dict[str, str]]:
    """The primary's ``slaveN:ip=...,port=...,state=...,offset=...,lag=...`` lines."""
    seen = []
    for key, value in sorted(primary.items()):
        if key.startswith("slave") and key[5:].isdigit():
            seen.append(dict(part.split("=", 1) for part in value.split(",") if "=" in part))
    return seen


def _ordinal(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["name"].rsplit("-", 1)[1])


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in pod.get("status", {}).get("conditions") or []
    )


def _restarts(pod: dict[str, Any]) -> int:
    statuses = (pod.get("status", {}).get("containerStatuses") or []) + (
        pod.get("status", {}).get("initContainerStatuses") or []
    )
    return sum(int(s.get("restartCount", 0)) for s in statuses)


def _volume(claim: dict[str, Any] | None) -> str:
    if claim is None:
        return "missing"
    status = claim.get("status", {})
    capacity = (status.get("capacity") or {}).get("storage") or claim["spec"]["resources"]["requests"]["storage"]
    return f"{status.get('phase', 'Pending')} {capacity}"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def persistence_summary(info: dict[str, str]) -> str:
    """``aof ok``, ``loading``, ``aof rewriting``, ``aof write err``...: one short phrase."""
    if info.get("loading") == "1":
        return "loading"
    if info.get("aof_enabled") != "1":
        return "aof off" if info.get("aof_rewrite_in_progress") != "1" else "aof starting"
    if info.get("aof_last_write_status", "ok") != "ok":
        return f"aof write {info['aof_last_write_status']}"
    if info.get("aof_last_bgrewrite_status", "ok") != "ok":
        return f"aof rewrite {info['aof_last_bgrewrite_status']}"
    return "aof rewriting" if info.get("aof_rewrite_in_progress") == "1" else "aof ok"


def pod_rows(
    replicas: int,
    pods: list[dict[str, Any]],
    claims: list[dict[str, Any]],
    infos: dict[int, dict[str, str] | str],
) -> list[dict[str, Any]]:
    """One dict per pod ordinal 0..replicas-1 (and any pod still beyond that, e.g. while scaling down).

    ``infos`` maps an ordinal to its INFO fields, or to why INFO could not be read;
    ordinals without an entry were not asked.
    """
    by_ordinal = {_ordinal(p): p for p in pods if p["metadata"]["name"].rsplit("-", 1)[-1].isdigit()}
    claims_by_name = {c["metadata"]["name"]: c for c in claims}
    primary = next((i for i in infos.values() if isinstance(i, dict) and i.get("role") == "master"), None)
    primary_offset = _int(primary.get("master_repl_offset")) if primary else None
    seen_by_ip = {r.get("ip"): r for r in replicas_seen_by(primary)} if primary else {}
    rows = []
    for ordinal in sorted(set(range(replicas)) | set(by_ordinal)):
        pod = by_ordinal.get(ordinal)
        info = infos.get(ordinal)
        row: dict[str, Any] = {
            "pod": f"{STATEFULSET}-{ordinal}",
            "phase": pod.get("status", {}).get("phase", "Pending") if pod else "missing",
            "ready": _ready(pod) if pod else False,
            "restarts": _restarts(pod) if pod else 0,
            "ip": pod.get("status", {}).get("podIP") if pod else None,
            "volume": _volume(claims_by_name.get(data_claim_name(ordinal))),
            "expected_role": "primary" if ordinal == 0 else "replica",
            "role": None,
            "error": info if isinstance(info, str) else None,
        }
        view = seen_by_ip.get(row["ip"]) if row["ip"] else None
        if isinstance(info, dict):
            row["role"] = {"master": "primary", "slave": "replica"}.get(info.get("role", ""), info.get("role"))
            row["used_memory"] = info.get("used_memory_human")
            row["maxmemory"] = info.get("maxmemory_human")
            row["used_memory_bytes"] = _int(info.get("used_memory"))
            row["maxmemory_bytes"] = _int(info.get("maxmemory"))
            row["persistence"] = persistence_summary(info)
            row["persistence_fields"] = {k: info[k] for k in PERSISTENCE_FIELDS if k in info}
            if row["role"] == "primary":
                row["offset"] = _int(info.get("master_repl_offset"))
                row["connected_replicas"] = _int(info.get("connected_slaves"))
            else:
                row["offset"] = _int(info.get("slave_repl_offset"))
                row["link"] = info.get("master_link_status")
                row["last_io_seconds"] = _int(info.get("master_last_io_seconds_ago"))
        elif view is not None:  # no INFO of its own: what the primary says about it
            row["role"] = "replica"
            row["offset"] = _int(view.get("offset"))
            row["link"] = view.get("state")
        if row["role"] == "replica" and primary_offset is not None and row.get("offset") is not None:
            row["lag_bytes"] = max(0, primary_offset - row["offset"])
        if row["role"] == "replica" and view is not None:
            row["lag_seconds"] = _int(view.get("lag"))
        rows.append(row)
    return rows


def table_cells(row: dict[str, Any]) -> list[str]:
    """The text columns of one row: POD STATUS ROLE OFFSET LAG MEMORY PERSISTENCE VOLUME."""
    status = f"{row['phase']}{', ready' if row['ready'] else ''}"
    if row["restarts"]:
        status += f", {row['restarts']} restarts"
    role = row["role"] or "?"
    if row["role"] and row["role"] != row["expected_role"]:
        role += f" (expected {row['expected_role']})"
    if row["role"] == "primary":
        role += f", {row.get('connected_replicas', 0)} replicas"
    elif row.get("link"):
        role += f", link {row['link']}"
    offset = "-" if row.get("offset") is None else str(row["offset"])
    lag = "-"
    if row.get("lag_bytes") is not None or row.get("lag_seconds") is not None:
        parts = []
        if row.get("lag_bytes") is not None:
            parts.append(f"{row['lag_bytes']} B")
        if row.get("lag_seconds") is not None:
            parts.append(f"{row['lag_seconds']} s")
        lag = ", ".join(parts)
    memory = "-"
    if row.get("used_memory"):
        memory = f"{row['used_memory']} / {row.get('maxmemory') or '?'}"
    persistence = row.get("persistence") or ("?" if row["error"] else "-")
    if row["error"]:
        persistence = f"INFO failed: {row['error'][:60]}"
    return [row["pod"], status, role, offset, lag, memory, persistence, row["volume"]]


HEADERS = ["POD", "STATUS", "ROLE", "OFFSET", "LAG", "MEMORY", "PERSISTENCE", "VOLUME"]


def memory_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """A warning for every pod past half of its maxmemory (past 95%, reports fail with "Redis is full")."""
    warnings = []
    for row in rows:
        used, limit = row.get("used_memory_bytes"), row.get("maxmemory_bytes")
        if used and limit and used > limit // 2:
            warnings.append(
                f"warning: {row['pod']} uses {100 * used // limit}% of its maxmemory ({row.get('used_memory')} of "
                f"{row.get('maxmemory')}); store large results with --results-to, delete finished batches, or give "
                "Redis more --memory"
            )
    return warnings


def statefulset_line(statefulset: dict[str, Any]) -> str:
    """``StatefulSet kiabatch-redis in batch: 3/3 ready (revision ...)``."""
    spec, status = statefulset.get("spec", {}), statefulset.get("status", {})
    line = (
        f"StatefulSet {statefulset['metadata']['name']} in {statefulset['metadata'].get('namespace', '?')}: "
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 0)} ready"
    )
    if status.get("updateRevision") and status.get("currentRevision") != status.get("updateRevision"):
        line += f", rolling out {status['updateRevision']}"
    return line
