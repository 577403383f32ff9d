"""Read-only access for ``kiabatch status --read-only`` and ``results --read-only``.

*Where* it reads (first that applies):

1. ``--replica-url`` / ``KIABATCH_REDIS_REPLICA_URL``;
2. when ``--redis-url`` names kiabatch's primary Service (host
   ``kiabatch-redis-primary``, with or without ``.<ns>.svc...``), the same URL
   with ``kiabatch-redis-replicas``: the reads go to the replicas, so progress
   can be watched while the primary is under load or being repaired;
3. otherwise ``--redis-url`` (or the embedded server) itself.

*How*: the client refuses, before anything is sent, every command the server
flags as a write (``COMMAND INFO``) and every script call; a replica would
refuse them anyway (``replica-read-only yes``). The batch's status is read with
``read_only=True`` (no reconciling with a Kubernetes Job) and ``list`` does not
prune expired ids. A replica may trail the primary by a moment.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.client import Pipeline

from . import settings
from .batch import Batch
from .connection import connect
from .errors import UsageError
from .kube.options import PRIMARY_SERVICE, REPLICAS_SERVICE
from .model import Status
from .store import Store

ENV_REPLICA_URL = settings.ENV_REPLICA_URL
#: Calls that may write whatever the server's flags say.
_SCRIPT_CALLS = frozenset({"EVAL", "EVALSHA", "FCALL"})


class WriteRefusedError(UsageError):
    """A read-only client was asked to write (a bug in the caller; nothing was sent)."""


def replica_url(redis_url: str | None, explicit: str | None = None) -> str | None:
    """Where read-only commands read (see the module docstring); None is the embedded server."""
    if explicit:
        return explicit
    if not redis_url:
        return None
    parts = urlsplit(redis_url)
    host = parts.hostname or ""
    if host == PRIMARY_SERVICE or host.startswith(PRIMARY_SERVICE + "."):
        userinfo, at, hostport = parts.netloc.rpartition("@")
        hostport = hostport.replace(PRIMARY_SERVICE, REPLICAS_SERVICE, 1)
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hostport}"))
    return redis_url


class _Guard:
    """Knows which commands write, from the server's own COMMAND INFO (cached)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.writes: dict[str, bool] = {}

    def check(self, name: Any) -> None:
        command = (name.decode() if isinstance(name, bytes) else str(name)).upper()
        if command not in self.writes:
            self.writes[command] = command in _SCRIPT_CALLS or self._flagged_write(command)
        if self.writes[command]:
            raise WriteRefusedError(f"read-only connection: refusing {command}, which may write")

    def _flagged_write(self, command: str) -> bool:
        try:
            info = self.client.execute_command("COMMAND", "INFO", command)
        except TypeError:  # redis-py cannot parse the answer for an unknown command
            return False
        entry = (info or {}).get(command.lower()) or {}
        return "write" in (entry.get("flags") or [])


class ReadOnlyRedis(redis.Redis):
    """A client that sends no write command (checked before sending)."""

    _guard: _Guard

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run a command unless the server flags it as a write."""
        self._guard.check(args[0])
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        """A pipeline that refuses write commands as they are queued."""
        pipe = _ReadOnlyPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe._guard = self._guard
        return pipe


class _ReadOnlyPipeline(Pipeline):
    _guard: _Guard

    def pipeline_execute_command(self, *args: Any, **options: Any) -> Any:
        self._guard.check(args[0])
        return super().pipeline_execute_command(*args, **options)

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        self._guard.check(args[0])
        return super().immediate_execute_command(*args, **options)


def read_only_client(url: str | None) -> ReadOnlyRedis:
    """Connect to ``url`` (None: the embedded server) with a client that never writes."""
    client = connect(url)
    guarded = ReadOnlyRedis(connection_pool=client.connection_pool)
    guarded._guard = _Guard(client)
    guarded.kiabatch_url = getattr(client, "kiabatch_url", url)  # type: ignore[attr-defined]
    return guarded


class ReadOnlyStore(Store):
    """A Store whose reads never write (``list_batches`` leaves expired ids in place)."""

    def list_batches(self, limit: int = 100, *, prune: bool = False) -> list[Status]:
        """Recent batches, newest first (expired ids are skipped, not pruned: that is a write)."""
        del prune
        return super().list_batches(limit, prune=False)


class ReadOnlyBatch(Batch):
    """A Batch whose status never writes (no reconciling with a Kubernetes Job)."""

    def __init__(self, batch_id: str, store: ReadOnlyStore) -> None:
        super().__init__(batch_id, store.redis)
        self.store = store

    def status(self, read_only: bool = True) -> Status:
        """State and progress, always read-only."""
        del read_only
        return super().status(read_only=True)


def open_read_only(redis_url: str | None, explicit_replica: str | None = None) -> ReadOnlyStore:
    """The read-only Store for ``--read-only`` (see the module docstring for where it reads)."""
    explicit = explicit_replica or os.environ.get(ENV_REPLICA_URL) or None
    return ReadOnlyStore(read_only_client(replica_url(redis_url, explicit)))
