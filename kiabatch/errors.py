"""One exception hierarchy for everything kiabatch reports to a user.

Every error carries the process exit code the CLI uses for it, so the mapping
from "what went wrong" to "what the shell sees" lives in exactly one place.
"""

from __future__ import annotations

#: Every item succeeded.
EXIT_OK = 0
#: The batch finished, but some items failed (they are listed).
EXIT_ITEMS_FAILED = 1
#: Bad input: an unknown option value, malformed item JSON, a missing batch.
EXIT_USAGE = 2
#: A backend cannot be reached: Redis, or the Kubernetes API server.
EXIT_UNREACHABLE = 3
#: Interrupted by Ctrl-C or SIGTERM; the batch can be resumed.
EXIT_INTERRUPTED = 130
#: The reader of the output went away (``| head``): 128 + SIGPIPE, as for any Unix tool.
EXIT_BROKEN_PIPE = 141


class KiabatchError(Exception):
    """Base class of every error kiabatch raises on purpose."""

    exit_code = EXIT_USAGE


class UsageError(KiabatchError, ValueError):
    """The caller asked for something that is not allowed (bad value, bad item)."""

    exit_code = EXIT_USAGE


class NotFoundError(KiabatchError, LookupError):
    """A batch, queue or schedule does not exist (or has expired)."""

    exit_code = EXIT_USAGE


class UnreachableError(KiabatchError, ConnectionError):
    """Redis or the Kubernetes API cannot be reached or refused us."""

    exit_code = EXIT_UNREACHABLE


class ClusterError(UnreachableError):
    """The Kubernetes API answered, but with an error the user must fix (RBAC, quota, image)."""


class BatchFailedError(KiabatchError):
    """A batch ended with failed items (raised by ``Batch.reduce``, which needs every item)."""

    exit_code = EXIT_ITEMS_FAILED


class InterruptedBatchError(KiabatchError):
    """The batch was stopped by a signal before it finished; ``resume`` continues it."""

    exit_code = EXIT_INTERRUPTED
