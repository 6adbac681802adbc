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
