"""The rooms of the house (orchestrator's top-level modules and packages) import one another one way: no
circle between two rooms, so that they stack in floors and no import runs back up; and the design's
rules of who never imports whom hold. Read from the source (every import statement, those inside functions
too), so that a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import orchestrator

PACKAGE = Path(orchestrator.__file__).parent


def room(module: str) -> str | None:
    """`orchestrator.data.stream` -> `data`, `orchestrator.spec` -> `spec`; None outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "orchestrator" and len(parts) > 1 else None


def arrows() -> dict[tuple[str, str], set[str]]:
    """(room, room it imports) -> the files that do, over every import statement of the package."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        here = room(".".join(rel.with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from orchestrator import tracking` names the room in the imported name
                base = node.module
                targets = [f"{base}.{a.name}" for a in node.names] if base == "orchestrator" else [base]
            else:
                continue
            for target in targets:
                there = room(target)
                if here and there and there != here:
                    found[here, there].add(str(rel))
    return found


def test_no_two_rooms_import_each_other_even_through_others() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for here, there in arrows():
        graph[here].add(there)
    try:
        floors = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        circle = e.args[1]
        files = {f"{a} -> {b}": sorted(arrows()[a, b]) for a, b in zip(circle, circle[1:], strict=False)}
        pytest.fail(f"rooms import each other in a circle {' -> '.join(circle)}: {files}")
    assert {"spec", "train", "execution", "data", "models"} <= set(floors)


@pytest.mark.parametrize(
    ("here", "never", "why"),
    [
        ("train", "execution", "the loop gets what it needs of Ray's private API from execution/trainer.py"),
        ("inference", "train", "inference shares the checkpoint contract (checkpoints.py), not training"),
        ("data", "models", "data knows no models"),
        ("models", "data", "models read no data"),
        ("spec", "train", "the spec validator stays torch-free"),
    ],
)
def test_the_designs_rooms_never_import_what_they_must_not(here: str, never: str, why: str) -> None:
    assert (here, never) not in arrows(), f"{here}/ imports {never}/ ({sorted(arrows()[here, never])}): {why}"
