"""Workloads by name. ``exec`` runs any command; ``pi`` is the demo map/reduce."""

from __future__ import annotations

from ..errors import UsageError
from .base import Plan, Reducible, Runtime, Workload, local_runtime
from .exec import ExecWorkload, parse_command
from .pi import PiWorkload

_REGISTRY: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Make ``workload`` available by its name (to ``submit`` and the CLI)."""
    _REGISTRY[workload.name] = workload
    return workload


def get(name: str) -> Workload:
    """The workload called ``name``; UsageError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown workload {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    """Registered workload names."""
    return sorted(_REGISTRY)


register(ExecWorkload())
register(PiWorkload())

__all__ = [
    "Plan",
    "Reducible",
    "Runtime",
    "Workload",
    "get",
    "local_runtime",
    "names",
    "parse_command",
    "register",
]
