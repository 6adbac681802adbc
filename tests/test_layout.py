"""The layering rule: the actor runtime knows nothing of nex."""

from __future__ import annotations

import ast
from pathlib import Path

ACTORS = Path(__file__).resolve().parents[1] / "actors"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_actors_never_imports_nex() -> None:
    sources = sorted(ACTORS.rglob("*.py"))
    assert len(sources) > 5
    offenders = {
        str(path.relative_to(ACTORS)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "nex")
        for path in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


NEX = ACTORS.parent / "nex"

#: nex's packages and top-level modules, lowest layer first: a module may import from its own layer
#: and those below it, never from above. Within a layer, packages must not import each other in a
#: cycle (checked below too).
LAYERS: list[set[str]] = [
    {"__init__", "api", "config", "crypto", "ids", "logs", "linux", "proc", "sysinfo", "affinity", "state"},
    {"bus", "net", "sandbox", "agent"},
    {"vm"},
    {"workload"},
    {"node"},
    {"client", "cli", "__main__"},
]


def _unit(path: Path) -> str:
    """The package (``bus``) or top-level module (``config``) a file of nex/ belongs to."""
    parts = path.relative_to(NEX).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _nex_imports(path: Path) -> set[str]:
    """The units of nex/ that ``path`` imports (absolute ``nex.x`` imports and relative ``..x`` ones)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    units: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nex."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module == "nex":
                units.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("nex."):
                units.add(node.module.split(".")[1])
            elif node.level >= 2 and node.module:  # from ..x import y, inside a package
                units.add(node.module.split(".")[0])
    return {u if (NEX / u).is_dir() or (NEX / f"{u}.py").exists() else "__init__" for u in units}


def _layer(unit: str) -> int:
    for index, members in enumerate(LAYERS):
        if unit in members:
            return index
    raise AssertionError(f"nex/{unit} is in no layer of tests/test_layout.py: place it")


def test_nex_imports_only_downward() -> None:
    upward = []
    for path in sorted(NEX.rglob("*.py")):
        unit = _unit(path)
        for imported in _nex_imports(path) - {unit}:
            if _layer(imported) > _layer(unit):
                upward.append(f"{path.relative_to(NEX)} ({unit}) imports {imported}")
    assert upward == []


def test_no_two_packages_of_nex_import_each_other() -> None:
    edges: dict[str, set[str]] = {}
    for path in NEX.rglob("*.py"):
        edges.setdefault(_unit(path), set()).update(_nex_imports(path) - {_unit(path)})
    cycles = sorted(
        f"{a} <-> {b}" for a, targets in edges.items() for b in targets if a < b and a in edges.get(b, set())
    )
    assert cycles == []
