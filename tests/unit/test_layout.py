"""The layout of `runtime/` is its architecture: every import stays inside its concern or goes
below it, and no module imports itself back through another (docs/DESIGN.md, "Layout").

Read from the source (every `import`, also inside functions and `TYPE_CHECKING` blocks), so a
lazy import cannot hide a dependency the layering forbids.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
GROUND = "ground"
"""`names`, `errors`, `json_input`, `env_numbers`, `security_level` and the package itself: the shared ground."""

BELOW = {
    GROUND: set(),
    "certificates": {GROUND},
    "secrets": {GROUND, "certificates"},
    "lifecycle": {GROUND, "certificates", "secrets"},
    "observability": {GROUND},
    "keys": {GROUND},
    "clients": {GROUND},
    "serving": {GROUND, "certificates", "observability"},
    "auth": {GROUND, "certificates", "observability", "clients", "serving", "keys"},
    "services": {GROUND, "certificates", "secrets", "observability", "clients", "serving", "auth", "keys"},
    "cli": {
        GROUND,
        "certificates",
        "secrets",
        "observability",
        "clients",
        "serving",
        "auth",
        "services",
        "keys",
    },
}
"""What each concern may import besides itself."""


def _module(path: Path) -> str:
    parts = path.relative_to(RUNTIME.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _concern(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return GROUND
    if (RUNTIME / parts[1]).is_dir():
        return parts[1]
    return "cli" if parts[1] == "cli" else GROUND


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("runtime")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runtime"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                submodule = RUNTIME.parent.joinpath(*candidate.split("."))
                is_module = submodule.with_suffix(".py").exists() or submodule.is_dir()
                found.add(candidate if is_module else node.module)
    return found


MODULES = {_module(p): _imports(p) for p in sorted(RUNTIME.rglob("*.py"))}


def test_the_concerns_are_the_folders():
    folders = sorted(p.name for p in RUNTIME.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == sorted(set(BELOW) - {GROUND, "cli"})
    flat = sorted(p.stem for p in RUNTIME.glob("*.py"))
    assert flat == [
        "__init__",
        "cli",
        "env_numbers",
        "errors",
        "json_input",
        "names",
        "security_level",
        "service_catalog",
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_stay_inside_the_concern_or_below(module):
    concern = _concern(module)
    wrong = sorted(
        imported
        for imported in MODULES[module]
        if _concern(imported) != concern and _concern(imported) not in BELOW[concern]
    )
    assert not wrong, (
        f"{module} ({concern}) imports {wrong}, which it may not: it may import {BELOW[concern]}"
    )


@pytest.mark.parametrize("package", sorted(set(BELOW) - {GROUND, "cli"}))
def test_every_concern_says_what_lives_there_and_what_it_may_import(package):
    docstring = ast.get_docstring(ast.parse((RUNTIME / package / "__init__.py").read_text())) or ""
    assert docstring and "Imports" in docstring, f"runtime/{package}/__init__.py needs its one-line docstring"


def test_no_import_cycles():
    graph = {m: {i for i in imports if i in MODULES and i != m} for m, imports in MODULES.items()}
    graph = {
        m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()
    }  # a package's own __init__
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycles.append(
                    [*path[path.index(dependency) :], dependency]
                    if dependency in path
                    else [module, dependency]
                )
            elif dependency not in state:
                visit(dependency, [*path, dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"
