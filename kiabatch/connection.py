"""Resolve where Redis is and open a client to it.

``--redis-url`` / ``KIABATCH_REDIS_URL`` selects any Redis >= 6.2 (``redis://``,
``rediss://`` for TLS, ``unix://``); without one, the embedded server is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded, settings
from .errors import UnreachableError, UsageError

MIN_REDIS_VERSION = (6, 2)
_SCHEMES = ("redis", "rediss", "unix")
_URL_HELP = "expected redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/socket"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    # "user:password@" keeps the user; a lone "secret@" may be a password, so hide it.
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{hidden}@{hostport}"))


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL kiabatch can use; else raise UsageError."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {redact(url)!r}: {exc}; {_URL_HELP}") from None
    if parts.scheme not in _SCHEMES:
        raise UsageError(f"bad Redis URL {redact(url)!r}: scheme must be one of {', '.join(_SCHEMES)}; {_URL_HELP}")
    if parts.scheme == "unix" and not parts.path:
        raise UsageError(f"bad Redis URL {redact(url)!r}: a unix URL needs a socket path; {_URL_HELP}")
    if parts.scheme != "unix" and not parts.hostname:
        raise UsageError(f"bad Redis URL {redact(url)!r}: no host; {_URL_HELP}")
    del port
    path = parts.path.lstrip("/")
    if parts.scheme != "unix" and path and not path.isdigit():
        raise UsageError(f"bad Redis URL {redact(url)!r}: database must be a number, not {path!r}; {_URL_HELP}")
    return url


def _retry(seconds: float) -> Retry:
    # Exponential backoff capped at 1 s, enough attempts to cover ``seconds``.
    attempts = 2 if seconds <= 0 else max(2, int(seconds) + 5)
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)


def connect(
    url: str | None = None,
    *,
    home: Path | None = None,
    retry_seconds: float = 0.0,
) -> redis.Redis:
    """Open a client: ``url``, else ``$KIABATCH_REDIS_URL``, else the embedded server.

    ``retry_seconds`` is how long commands keep retrying a lost connection;
    CLI queries fail fast (0), worker-side steps survive a Redis restart.
    Raises UsageError for a malformed URL and UnreachableError when Redis does
    not answer or is older than 6.2. Later, a connection lost mid-command raises
    redis-py's ConnectionError once the retries are spent; an embedded server that
    cannot be reached (or started) within ``KIABATCH_EMBEDDED_WAIT`` seconds, or
    ``retry_seconds`` if longer, raises UnreachableError, which is not retried.
    """
    url = url or os.environ.get(settings.ENV_REDIS_URL) or None
    options: dict[str, Any] = {
        "retry": _retry(0),  # fail fast while checking the server; see set_retry below
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    if url is None:
        # A worker-side step waits for a server that does not answer at least as long as it retries.
        wait = max(settings.float_env(settings.ENV_EMBEDDED_WAIT, settings.DEFAULT_EMBEDDED_WAIT), retry_seconds)
        client = embedded.connect(home, wait=wait, **options)
        where = "the embedded Redis"
        client.kiabatch_url = None  # type: ignore[attr-defined]
    else:
        validate_url(url)
        try:
            client = redis.Redis.from_url(url, **options)
        except ValueError as exc:
            raise UsageError(f"bad Redis URL {redact(url)!r}: {exc}; {_URL_HELP}") from None
        where = f"Redis at {redact(url)}"
        client.kiabatch_url = url  # type: ignore[attr-defined]
    try:
        version = client.info("server")["redis_version"]
    except UnreachableError:
        raise  # the embedded server's own, complete message
    except redis.AuthenticationError as exc:
        raise UnreachableError(f"{where} refused the credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise UnreachableError(f"cannot reach {where}: {exc}") from None
    except redis.ResponseError as exc:
        raise UnreachableError(f"{where} refused INFO: {exc}") from None
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_REDIS_VERSION:
        raise UnreachableError(f"{where} runs Redis {version}; kiabatch needs Redis 6.2 or newer")
    if retry_seconds > 0:
        client.set_retry(_retry(retry_seconds))
    return client


def url_of(client: redis.Redis) -> str | None:
    """The URL a client was opened with (None: the embedded server).

    For clients made elsewhere, the URL is rebuilt from the connection settings
    (TLS certificate options are not carried over).
    """
    if hasattr(client, "kiabatch_url"):
        return client.kiabatch_url
    kwargs = client.connection_pool.connection_kwargs
    password = kwargs.get("password")
    user = kwargs.get("username") or ""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
