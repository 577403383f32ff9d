"""Backends run a batch's tasks: ``local`` (subprocesses) or ``kubernetes`` (an Indexed Job).

Every backend implements :class:`~kiabatch.backends.base.Backend`; :func:`get`
builds one by name (the name a batch's meta records), and nothing else in
kiabatch asks which backend it is talking to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import settings
from ..errors import UsageError
from .base import Backend, LogChunk, RunHooks

if TYPE_CHECKING:
    from ..kube.batch_job import KubeOptions

LOCAL = "local"
KUBERNETES = "kubernetes"
NAMES = (LOCAL, KUBERNETES)


def validate(name: str) -> str:
    """Return ``name`` if it is a backend kiabatch knows."""
    if name not in NAMES:
        raise UsageError(f"unknown backend {name!r}; allowed: {', '.join(NAMES)}")
    return name


def get(name: str, *, home: settings.HomeLike = None, kube: KubeOptions | None = None) -> Backend:
    """The backend called ``name``: ``home`` is the local state directory, ``kube`` the settings of new Jobs.

    The Kubernetes client is imported only when a Kubernetes backend is asked for.
    """
    validate(name)
    if name == LOCAL:
        from .local import LocalBackend

        return LocalBackend(settings.as_home(home))
    from .kubernetes import KubernetesBackend

    return KubernetesBackend(kube)


__all__ = ["KUBERNETES", "LOCAL", "NAMES", "Backend", "LogChunk", "RunHooks", "get", "validate"]
