"""Every object of kiabatch's Redis, and the kustomize base ``manifests/redis/`` made from them.

``kiabatch redis render`` and ``deploy`` use :func:`redis_objects`; the files in
``manifests/redis/`` are the same objects with default options, one file per
object, in the conventions of :mod:`kiabatch.kube.manifests` (namespace
``kiabatch``, which a kustomize overlay may change)::

    python -m kiabatch.kube.redis_manifests --write   # regenerate manifests/redis/
    python -m kiabatch.kube.redis_manifests --check   # exit 1 on drift (a test runs this)

The password Secret is not among them: a password must not live in a repository.
``kiabatch redis deploy`` generates it; the README shows the kubectl equivalent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .manifests import NAMESPACE, document, kustomization
from .redis_backup import backup_claim, backup_cronjob
from .redis_objects import (
    RedisOptions,
    config_map,
    disruption_budget,
    headless_service,
    network_policy,
    primary_service,
    replicas_service,
    statefulset,
)

#: Where the kustomize base lives in the repository.
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "manifests" / "redis"
_NOTE = (
    "Needs the Secret kiabatch-redis-auth (key: password) in the namespace: kiabatch redis deploy\n"
    'creates it, or see the README\'s "Redis on Kubernetes".'
)


def redis_objects(options: RedisOptions) -> list[dict[str, Any]]:
    """Everything ``render`` prints and ``deploy`` applies, in apply order (no Secret)."""
    return [
        config_map(options),
        headless_service(options),
        primary_service(options),
        replicas_service(options),
        statefulset(options),
        disruption_budget(options),
        network_policy(options),
        backup_claim(options),
        backup_cronjob(options),
    ]


def file_name(obj: dict[str, Any]) -> str:
    """``statefulset-kiabatch-redis.yaml``: one file per object, named by kind and name."""
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def redis_set() -> dict[str, str]:
    """File name -> text of ``manifests/redis/`` (default options)."""
    objects = redis_objects(RedisOptions(namespace=NAMESPACE))
    files = {file_name(obj): document([obj], _NOTE) for obj in objects}
    return {"kustomization.yaml": kustomization(list(files)), **files}


def drift(directory: Path = DEFAULT_DIR) -> list[str]:
    """Files in ``directory`` that differ from the builders' output (missing, changed or extra)."""
    expected = redis_set()
    present = {path.name for path in directory.glob("*.yaml")} if directory.is_dir() else set()
    problems = [f"{name}: missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: not made by the builders" for name in sorted(present - set(expected))]
    problems += [f"{name}: differs from the builders' output" for name in sorted(set(expected) & present)
                 if (directory / name).read_text() != expected[name]]  # fmt: skip
    return problems


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    """(Re)write the kustomize base, removing YAML files the builders no longer make."""
    directory.mkdir(parents=True, exist_ok=True)
    files = redis_set()
    for stale in directory.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (directory / name).write_text(text)
    return [directory / name for name in files]


def main(argv: list[str] | None = None) -> int:
    """``--write`` regenerates the base; ``--check`` exits 1 if it drifted."""
    parser = argparse.ArgumentParser(prog="python -m kiabatch.kube.redis_manifests")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: manifests/redis")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the kustomize base")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file differs from the builders")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.dir):
            print(path)
        return 0
    problems = drift(args.dir)
    for problem in problems:
        print(f"drifted: {args.dir}/{problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
