"""Object storage for results that do not belong in Redis: S3-compatible stores and local directories.

A batch with a results store (``--results-to s3://bucket/prefix`` or
``file:///path``) keeps in Redis only a small :class:`ObjectRef` (key, size,
sha256, content type) for every result larger than its inline limit and for every
``{output}`` file; the bytes go to the store first, under a key fixed by
batch, generation, index, position and attempt::

    <prefix>/<batch>/<generation>/<index>/<position>-<attempt>

so a retried upload after a crash overwrites the same object instead of adding
one, and the idempotent REPORT script decides which attempt is referenced. The
generation (the batch's creation time in milliseconds) keeps a batch id that is
used again from ever touching an older batch's objects. Losing attempts' objects
and those of batches that expired are removed by :func:`collect_garbage`
(``kiabatch gc``).

The client library is obstore (Rust's object_store): it signs requests, retries
with backoff, uploads large objects in parts, and reads credentials the usual way
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, web
identity tokens for IRSA, instance metadata). Credentials are never part of a
results URL, a batch's meta, or a message: a URL with user info is refused.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from .errors import KiabatchError, UnreachableError, UsageError
from .text import printable


class BatchSpec(Protocol):
    """What this module reads of a :class:`kiabatch.model.BatchSpec` (kept apart: model imports this module)."""

    id: str
    created_at: float
    results_to: str
    s3_endpoint: str
    inline_limit: int


#: Results up to this size stay in Redis when a store is set (``--inline-limit``).
DEFAULT_INLINE_LIMIT = 64 * 1024
#: Largest ``--inline-limit``: one Redis value holds at most 512 MiB, and a report carries a whole chunk.
MAX_INLINE_LIMIT = 64 * 1024 * 1024
#: Bytes read at a time when streaming an object back.
_CHUNK = 1024 * 1024
#: S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Seconds (and tries) the client keeps retrying a store that fails or is away, per request. The backoff is
#: jittered (a random wait up to 0.5 s, doubling to at most 10 s), so the ten tries end first, after some
#: 10-20 s: a store that restarts or a network that blips is ridden out; longer, the attempt fails and is retried.
_RETRY_TIMEOUT = 60.0
_MAX_RETRIES = 10
_BACKOFF = (0.5, 10.0)
_URL_HELP = "expected s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH"


class ResultsStoreError(UnreachableError):
    """The results store refused a request or cannot be reached (exit code 3)."""


class CorruptResultError(KiabatchError):
    """An object's bytes do not match the size and sha256 its reference recorded (exit code 3)."""

    exit_code = 3


def validate_url(url: str, what: str = "--results-to") -> str:
    """``url`` without a trailing slash if it names a results store kiabatch can use; else UsageError.

    ``s3://bucket[/prefix]`` (any S3-compatible store; the endpoint comes from
    ``--s3-endpoint-url``) or ``file:///absolute/path``. Credentials must not be in
    the URL (they would end up in Redis): the error never repeats the URL then.
    """
    if not isinstance(url, str) or not url or len(url) > 1024 or not url.isprintable():
        raise UsageError(f"bad {what}: {_URL_HELP}")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UsageError(f"bad {what}: {_URL_HELP}") from None
    if "@" in parts.netloc:
        raise UsageError(
            f"bad {what}: credentials do not belong in the URL (give them as AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or --results-secret on Kubernetes)"
        )
    if parts.query or parts.fragment or ";" in url:
        raise UsageError(f"bad {what} {printable(url)!r:.100}: no query or fragment allowed; {_URL_HELP}")
    path = parts.path.rstrip("/")
    if parts.scheme == "s3":
        if not _BUCKET.match(parts.netloc) or ".." in parts.netloc:
            raise UsageError(
                f"bad {what} {printable(url)!r:.100}: the bucket must be 3-63 lowercase letters, digits, '.' or '-'"
            )
        if any(part in ("", ".", "..") for part in path.split("/")[1:]):
            raise UsageError(f"bad {what} {printable(url)!r:.100}: the prefix has an empty, '.' or '..' part")
        return f"s3://{parts.netloc}{path}"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise UsageError(f"bad {what} {printable(url)!r:.100}: {_URL_HELP}")
        if any(part in (".", "..") for part in path.split("/")):
            raise UsageError(f"bad {what} {printable(url)!r:.100}: the path has a '.' or '..' part")
        return f"file://{path or '/'}"
    raise UsageError(f"bad {what} {printable(url)!r:.100}: {_URL_HELP}")


def validate_endpoint(url: str) -> str:
    """An S3 endpoint URL (``http(s)://host[:port]``), without credentials or a path."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or "@" in parts.netloc
        or parts.path.strip("/")
        or parts.query
        or parts.fragment
        or not url.isprintable()
    ):
        shown = "" if parts is not None and "@" in parts.netloc else f" {printable(url)!r:.100}"
        raise UsageError(f"bad --s3-endpoint-url{shown}: expected http(s)://HOST[:PORT], no path or credentials")
    return url.rstrip("/")


@dataclass(frozen=True)
class ObjectRef:
    """What Redis keeps for a result stored as an object."""

    #: The object's key under the store's URL.
    key: str
    size: int
    sha256: str
    content_type: str

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON form (inside the outcome entry of the item)."""
        return {"key": self.key, "size": self.size, "sha256": self.sha256, "type": self.content_type}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectRef:
        """Inverse of :meth:`to_dict`."""
        return cls(key=data["key"], size=int(data["size"]), sha256=data["sha256"], content_type=data["type"])


@dataclass(frozen=True)
class ResultsPlan:
    """Where and when one batch's results leave Redis (from its spec; the same for every task)."""

    url: str
    endpoint: str
    inline_limit: int
    #: ``<batch>/<generation>``: every object of the batch is under it.
    prefix: str

    @classmethod
    def of(cls, spec: BatchSpec) -> ResultsPlan | None:
        """The plan of ``spec``, or None when its results all stay in Redis."""
        if not spec.results_to:
            return None
        return cls(spec.results_to, spec.s3_endpoint, spec.inline_limit, batch_prefix(spec.id, spec.created_at))

    def key(self, index: int, position: int, attempt: int) -> str:
        """The object key of one item's result in one attempt."""
        return f"{self.prefix}/{index}/{position}-{attempt}"

    def offloads(self, size: int, from_file: bool) -> bool:
        """True when a result of ``size`` bytes goes to the store (every ``{output}`` file does)."""
        return from_file or size > self.inline_limit


def batch_prefix(batch_id: str, created_at: float) -> str:
    """``<batch>/<generation>``: a batch id used again never shares keys with an older batch."""
    return f"{batch_id}/{round(created_at * 1000)}"


def sniff_type(data: bytes) -> str:
    """A content type from the first bytes: a few common formats, UTF-8 text, else octet-stream."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data[:65536], final=len(data) <= 65536)
    except UnicodeDecodeError:
        return "application/octet-stream"
    head = data[:1].strip() if data[:1] else b""
    if head in (b"{", b"["):
        return "application/json"
    return "text/plain; charset=utf-8"


_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"\x1f\x8b", "application/gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"RIFF", "application/octet-stream"),
]


def _summary(exc: BaseException) -> str:
    """One line from an obstore error: its first line, without the XML body or debug dump."""
    text = str(exc).split("\n", 1)[0]
    text = text.split(": <?xml", 1)[0]
    for code in ("NoSuchBucket", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "NoSuchKey"):
        if code in str(exc):
            text = f"{text} ({code})"
            break
    return printable(text[:400])


class ResultsStore:
    """A results store (S3-compatible or a local directory), opened lazily on first use."""

    def __init__(self, url: str, *, endpoint: str = "") -> None:
        self.url = validate_url(url)
        self.endpoint = validate_endpoint(endpoint) if endpoint else ""

    def __repr__(self) -> str:
        return f"ResultsStore({self.url!r})"

    @classmethod
    def of(cls, spec: BatchSpec) -> ResultsStore | None:
        """The store of ``spec``, or None."""
        return cls(spec.results_to, endpoint=spec.s3_endpoint) if spec.results_to else None

    @cached_property
    def _store(self) -> Any:
        from obstore.store import LocalStore, S3Store

        if self.url.startswith("file://"):
            root = Path(self.url.removeprefix("file://"))
            if not root.exists():
                from .files import private_dir

                private_dir(root, "the results directory")
            return LocalStore(root)
        retry = {"max_retries": _MAX_RETRIES, "retry_timeout": _timedelta(_RETRY_TIMEOUT),
                 "backoff": {"init_backoff": _timedelta(_BACKOFF[0]), "max_backoff": _timedelta(_BACKOFF[1]),
                             "base": 2}}  # fmt: skip
        config: dict[str, Any] = {}
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"  # what S3-compatible stores expect when none is named
        client: dict[str, Any] = {}
        if self.endpoint:
            config["endpoint"] = self.endpoint
            client["allow_http"] = self.endpoint.startswith("http://")
        try:
            return S3Store.from_url(self.url, config=config, client_options=client, retry_config=retry)
        except Exception as exc:  # obstore's configuration errors (a bad region, say)
            raise ResultsStoreError(f"cannot open the results store {self.url}: {_summary(exc)}") from None

    def object_url(self, key: str) -> str:
        """The URL of object ``key`` (``s3://bucket/prefix/key``)."""
        return f"{self.url.rstrip('/')}/{key}"

    def _fail(self, action: str, key: str, exc: BaseException) -> ResultsStoreError:
        return ResultsStoreError(f"results store {self.url}: cannot {action} {key}: {_summary(exc)}")

    # -- writing --------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectRef:
        """Store ``data`` as ``key`` (replacing any object there) and return its reference."""
        import obstore

        kind = content_type or sniff_type(data)
        try:
            obstore.put(self._store, key, data, attributes=_attributes(self.url, kind))
        except ResultsStoreError:
            raise
        except Exception as exc:
            raise self._fail("upload", key, exc) from None
        return ObjectRef(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(), content_type=kind)

    def delete(self, keys: Iterable[str]) -> int:
        """Delete objects (missing ones are fine); returns how many were asked for."""
        import obstore

        batch = list(keys)
        for start in range(0, len(batch), 1000):
            part = batch[start : start + 1000]
            try:
                obstore.delete(self._store, part)
            except FileNotFoundError:
                for key in part:  # a local store refuses a batch with a missing file: one at a time
                    try:
                        obstore.delete(self._store, key)
                    except FileNotFoundError:
                        pass
                    except Exception as exc:
                        raise self._fail("delete", key, exc) from None
            except ResultsStoreError:
                raise
            except Exception as exc:
                raise self._fail("delete", part[0], exc) from None
        return len(batch)

    # -- reading --------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[dict[str, Any]]:
        """Every object under ``prefix``: dicts with ``path``, ``size`` and ``last_modified``."""
        import obstore

        try:
            for page in obstore.list(self._store, prefix or None, chunk_size=1000):
                yield from page
        except FileNotFoundError:
            return
        except ResultsStoreError:
            raise
        except Exception as exc:
            if "NoSuchBucket" in str(exc):  # nothing was ever stored (buckets may be created on first write)
                return
            raise self._fail("list", prefix or "/", exc) from None

    def chunks(self, ref: ObjectRef) -> Iterator[bytes]:
        """The object's bytes in chunks; CorruptResultError at the end if size or sha256 differ."""
        import obstore

        digest = hashlib.sha256()
        size = 0
        try:
            stream = obstore.get(self._store, ref.key).stream(min_chunk_size=_CHUNK)
            for chunk in stream:
                data = bytes(chunk)
                digest.update(data)
                size += len(data)
                yield data
        except FileNotFoundError:
            raise CorruptResultError(
                f"the result object {self.object_url(ref.key)} is missing (deleted, or expired by a lifecycle rule)"
            ) from None
        except (ResultsStoreError, CorruptResultError):
            raise
        except Exception as exc:
            raise self._fail("download", ref.key, exc) from None
        if size != ref.size or digest.hexdigest() != ref.sha256:
            raise CorruptResultError(
                f"the result object {self.object_url(ref.key)} does not match its reference "
                f"({size} bytes, sha256 {digest.hexdigest()[:16]}..., expected {ref.size} bytes, "
                f"sha256 {ref.sha256[:16]}...): it was changed or corrupted"
            )

    def read(self, ref: ObjectRef) -> bytes:
        """The object's bytes, verified against ``ref``."""
        return b"".join(self.chunks(ref))

    def open(self, ref: ObjectRef) -> IO[bytes]:
        """A binary file object streaming the object (verified when the end is read)."""
        return io.BufferedReader(_ChunkReader(self.chunks(ref)), buffer_size=_CHUNK)


def _timedelta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)


def _attributes(url: str, content_type: str) -> dict[str, str] | None:
    # A local directory keeps no attributes; the reference in Redis carries the type anyway.
    return None if url.startswith("file://") else {"Content-Type": content_type}


class _ChunkReader(io.RawIOBase):
    """A readable binary stream over an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def parse_key(key: str) -> tuple[str, str, int, int, int] | None:
    """(batch, generation, index, position, attempt) of an object key kiabatch wrote, else None."""
    match = _KEY.match(key)
    if match is None:
        return None
    batch, generation, index, position, attempt = match.groups()
    return batch, generation, int(index), int(position), int(attempt)


# BATCH/GENERATION/INDEX/POSITION-ATTEMPT, with a batch id as validate_batch_id allows it and a
# generation of 13 digits (milliseconds since 1970: 2001 to 2286), so that other data that happens
# to look alike (docs/2023/01/5-2) is never taken for kiabatch's.
_KEY = re.compile(r"^([a-z0-9](?:[-a-z0-9]{0,50}[a-z0-9])?)/(\d{13})/(\d+)/(\d+)-(\d+)$")


def outcome_ref(outcome_json: bytes | str | None) -> ObjectRef | None:
    """The reference inside an item's outcome entry, if its result is an object."""
    if not outcome_json:
        return None
    data = json.loads(outcome_json)
    return ObjectRef.from_dict(data["ref"]) if data.get("ref") else None


@dataclass(frozen=True)
class GarbageReport:
    """What :func:`collect_garbage` found: objects kept, and those removed (or to remove, in a dry run)."""

    scanned: int
    removed: list[str]
    #: Batches (``<batch>/<generation>``) whose objects were all removed: gone from Redis, or replaced.
    gone_batches: list[str]


def collect_garbage(results: ResultsStore, referenced: Any, *, dry_run: bool = False) -> GarbageReport:
    """Remove the objects no batch references any more; returns what was (or would be) removed.

    ``referenced(batch_id)`` returns None when the batch no longer exists in Redis
    (expired after its TTL, or deleted), else ``(prefix, settled, keys)``: the
    batch's ``<batch>/<generation>`` prefix, its settled indexes and the object keys
    its results reference. An object is removed when its batch is gone or is a newer
    batch of the same id, or when its index is settled and no result references it
    (the attempt that lost the report). Objects of unsettled indexes stay: their
    report may be on its way. Keys kiabatch did not write are never touched.
    """
    groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
    scanned = 0
    for entry in results.list():
        scanned += 1
        parsed = parse_key(entry["path"])
        if parsed is None:
            continue
        batch, generation, index, _position, _attempt = parsed
        groups.setdefault((batch, generation), []).append((entry["path"], index))
    doomed: list[str] = []
    gone: list[str] = []
    for (batch, generation), objects in sorted(groups.items()):
        state = referenced(batch)
        if state is None or state[0] != f"{batch}/{generation}":
            doomed += [key for key, _ in objects]
            gone.append(f"{batch}/{generation}")
            continue
        _prefix, settled, keys = state
        doomed += [key for key, index in objects if index in settled and key not in keys]
    if not dry_run:
        results.delete(doomed)
    return GarbageReport(scanned=scanned, removed=doomed, gone_batches=gone)
