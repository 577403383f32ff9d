"""The import structure of ``kiabatch/``, read with ``ast`` (nothing is imported).

* No import cycles between kiabatch modules, counting the imports that run when a
  module is loaded: module-level ones (also inside a top-level ``if``/``try``), not
  those inside functions or under ``if TYPE_CHECKING:``.
* ``kiabatch.kube`` is in no cycle even counting the imports inside functions, and
  never loads the CLI or the submission layer above it, directly or through
  another module, at any level.

An import names the module it loads: ``from . import x`` the submodule ``x`` if
there is one, ``from .x import name`` the module ``x``. The packages on the way
(``kiabatch/__init__.py``) are not counted: Python loads them first either way.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kiabatch"
#: kiabatch.kube may not load these (nor anything under them).
ABOVE_KUBE = ("kiabatch.cli", "kiabatch.submission")


@dataclass(frozen=True)
class Import:
    target: str
    module_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a (possibly relative) ``from`` import starts at."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([name] if name else []))


def imports_of(module: str) -> list[Import]:
    """Every kiabatch module ``module`` imports, and whether it does so when loaded."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, module_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(Import(submodule if submodule in MODULES else base, module_level))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, module_level)

    visit(ast.parse(path.read_text(), str(path)), True)
    return [found_import for found_import in found if found_import.target.split(".")[0] == "kiabatch"]


def _known(target: str) -> str | None:
    """The kiabatch module ``target`` loads (``kiabatch.x.name`` of a non-module: ``kiabatch.x``)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def graph(module_level_only: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        for found in imports_of(module):
            target = _known(found.target)
            if target is not None and target != module and (found.module_level or not module_level_only):
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(frozenset(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(groups, key=sorted)


def describe(groups: list[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(group)) for group in groups)


def test_the_reader_finds_module_level_function_level_and_relative_imports():
    found = {(i.target, i.module_level) for i in imports_of("kiabatch.cli.redis")}
    assert ("kiabatch.kube.api", True) in found  # from ..kube.api import Cluster
    backend = {(i.target, i.module_level) for i in imports_of("kiabatch.backends")}
    assert ("kiabatch.backends.kubernetes", False) in backend  # inside a function
    assert _base("kiabatch.kube.manifests", False, 2, None) == "kiabatch"
    assert _base("kiabatch.backends", True, 1, "kubernetes") == "kiabatch.backends.kubernetes"
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [frozenset({"a", "b"})]
    assert chain_to("a", ("c",), {"a": {"b"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]


def test_no_import_cycles_between_kiabatch_modules():
    found = cycles(graph(module_level_only=True))
    assert found == [], f"import cycles: {describe(found)}"


def test_no_kube_module_is_in_an_import_cycle_even_through_imports_inside_functions():
    found = [group for group in cycles(graph(module_level_only=False))
             if any(module.startswith("kiabatch.kube.") for module in group)]  # fmt: skip
    assert found == [], f"import cycles: {describe(found)}"


def test_no_import_cycles_even_through_imports_inside_functions():
    found = cycles(graph(module_level_only=False))
    assert found == [], f"import cycles: {describe(found)}"


def test_callers_never_probe_a_backend_or_branch_on_its_name():
    """Outside ``backends/``, nothing asks ``hasattr(backend, ...)`` or compares a backend's name."""
    root = ROOT
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "backends" in path.relative_to(root).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if "hasattr(" in code or re.search(
                r"""(==|!=)\s*(backends\.)?(KUBERNETES|LOCAL|["'](kubernetes|local)["'])""", code
            ):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def chain_to(start: str, wanted: tuple[str, ...], edges: dict[str, set[str]]) -> list[str] | None:
    """The shortest import chain from ``start`` to a module under one of ``wanted``, if any."""
    came_from: dict[str, str] = {}
    queue = [start]
    while queue:
        module = queue.pop(0)
        if module != start and any(module == w or module.startswith(f"{w}.") for w in wanted):
            chain = [module]
            while chain[-1] in came_from:
                chain.append(came_from[chain[-1]])
            return chain[::-1]
        for target in sorted(edges[module]):
            if target != start and target not in came_from:
                came_from[target] = module
                queue.append(target)
    return None


def test_kube_does_not_load_the_cli_or_submission():
    edges = graph(module_level_only=False)
    chains = [chain_to(module, ABOVE_KUBE, edges) for module in MODULES if module.startswith("kiabatch.kube.")]
    wrong = [" -> ".join(chain) for chain in chains if chain]
    assert wrong == [], "kiabatch.kube loads a layer above it: " + "; ".join(wrong)
