"""Backends run a batch's tasks: ``local`` (subprocesses) or ``kubernetes`` (an Indexed Job)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError

LOCAL = "local"
KUBERNETES = "kubernetes"
NAMES = (LOCAL, KUBERNETES)


def validate(name: str) -> str:
    """Return ``name`` if it is a backend kiabatch knows."""
    if name not in NAMES:
        raise UsageError(f"unknown backend {name!r}; allowed: {', '.join(NAMES)}")
    return name


def get(name: str) -> Any:
    """The backend object called ``name``."""
    validate(name)
    if name == LOCAL:
        from .local import LocalBackend

        return LocalBackend()
    from .kubernetes import KubernetesBackend

    return KubernetesBackend()
