"""Resolve where Redis is and open a client to it.

``--redis-url`` / ``KIABATCH_REDIS_URL`` selects any Redis >= 6.2 (``redis://``,
``rediss://`` for TLS, ``unix://``); without one, the embedded server is used.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded, settings
from .client_identity import client_identity
from .errors import UnreachableError, UsageError
from .text import printable

MIN_REDIS_VERSION = (6, 2)
_SCHEMES = ("redis", "rediss", "unix")
_URL_HELP = "expected redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/socket"


def redact(url: str) -> str:
    """A form of ``url`` safe to print: scheme, host, port and database only.

    Whatever could hold a credential is never shown: the user-info part (``:***@``),
    the query (``?password=``) and fragment, and anything that does not parse as a
    URL (a password with an unencoded ``/``, ``?`` or ``#`` breaks the parse, and
    then any part of it may be the secret).
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower() if scheme.lower() in _SCHEMES else ""
    shown = f"{scheme or 'unknown-scheme'}://"
    if not colon or not rest.startswith("//"):
        return f"{shown}<not a URL>"
    authority = rest[2:]
    # The host part ends at the first '/', '?' or '#' (as urlsplit reads it).
    cut = min((i for i in map(authority.find, "/?#") if i >= 0), default=len(authority))
    netloc, after_host = authority[:cut], authority[cut:]
    if "@" in after_host:
        return f"{shown}<unparseable>"  # an '@' after the host: a password with '/', '?' or '#' broke the parse
    credentials, at, hostport = netloc.rpartition("@")
    userinfo = (":***@" if ":" in credentials else "***@") if at else ""
    path = after_host[1:].partition("?")[0].partition("#")[0] if after_host.startswith("/") else ""
    if scheme == "unix":
        return f"{shown}{userinfo}/{path}"
    if not hostport or (not at and ":" in hostport and not hostport.startswith("[")
                        and not hostport.rpartition(":")[2].isdigit()):  # fmt: skip
        return f"{shown}<unparseable>"  # ":secret" with no '@': it may be a password
    database = f"/{path}" if path.isdigit() else ("/<hidden>" if path else "")
    return f"{shown}{userinfo}{printable(hostport)}{database}"


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL kiabatch can use; else raise UsageError.

    Messages name what is wrong without quoting the URL's parts (a password with a
    ``/`` or ``?`` lands in the port or the path).
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"bad Redis URL {redact(url)!r}: {why}; {_URL_HELP}")

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise bad("it does not parse (a port that is not a number from 0 to 65535, or an unclosed '[')") from None
    if parts.scheme not in _SCHEMES:
        raise bad(f"scheme must be one of {', '.join(_SCHEMES)}")
    if parts.scheme == "unix" and not parts.path:
        raise bad("a unix URL needs a socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise bad("no host")
    path = parts.path.lstrip("/")
    if parts.scheme != "unix" and path and not path.isdigit():
        raise bad("database must be a number (the path after the host); a password with '/', '?' or '#' "
                  "must be percent-encoded")  # fmt: skip
    return url


def _retry(seconds: float) -> Retry:
    # Exponential backoff capped at 1 s, enough attempts to cover ``seconds``.
    attempts = 2 if seconds <= 0 else max(2, int(seconds) + 5)
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)


def connect(
    url: str | None = None,
    *,
    home: settings.HomeLike = None,
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
        **client_identity(),
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
        except ValueError:
            raise UsageError(f"bad Redis URL {redact(url)!r}: redis-py cannot use it; {_URL_HELP}") from None
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
    except redis.RedisError as exc:  # e.g. an HTTP server on that port: not the Redis protocol
        raise UnreachableError(f"{where} does not speak the Redis protocol ({type(exc).__name__}: {exc})") from None
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_REDIS_VERSION:
        raise UnreachableError(f"{where} runs Redis {version}; kiabatch needs Redis 6.2 or newer")
    if retry_seconds > 0:
        client.set_retry(_retry(retry_seconds))
    return client


_UNKNOWN = object()


def url_of(client: redis.Redis) -> str | None:
    """The URL a client was opened with (None: the embedded server).

    For clients made elsewhere, the URL is rebuilt from the connection settings
    (TLS certificate options are not carried over).
    """
    known = getattr(client, "kiabatch_url", _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    kwargs = client.connection_pool.connection_kwargs
    password = kwargs.get("password")
    user = kwargs.get("username") or ""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
