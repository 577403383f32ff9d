"""Workloads by name. ``exec`` runs any command; ``pi`` is the demo map/reduce."""

from __future__ import annotations

from importlib import import_module

from ..errors import UsageError
from .base import Plan, Reducible, Runtime, Workload, local_runtime

#: Built-in workloads: name -> "module:class", imported when first asked for (π needs mpmath).
_BUILT_IN = {"exec": ".exec:ExecWorkload", "pi": ".pi:PiWorkload"}
_REGISTRY: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Make ``workload`` available by its name (to ``submit`` and the CLI)."""
    _REGISTRY[workload.name] = workload
    return workload


def get(name: str) -> Workload:
    """The workload called ``name``; UsageError naming the known ones otherwise."""
    if name not in _REGISTRY and name in _BUILT_IN:
        module, cls = _BUILT_IN[name].split(":")
        register(getattr(import_module(module, __name__), cls)())
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown workload {name!r:.60}; available: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered workload names."""
    return sorted({*_BUILT_IN, *_REGISTRY})


__all__ = ["Plan", "Reducible", "Runtime", "Workload", "get", "local_runtime", "names", "register"]
