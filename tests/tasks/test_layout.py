"""The package layout of tasks/: every import follows tasks.ALLOWED_IMPORTS, and no import cycle exists.

Read from the import statements with ast (tasks/core/closure.py), lazy imports inside functions and
TYPE_CHECKING blocks included: a lazy import is still a dependency.
"""

from __future__ import annotations

from pathlib import Path

from tasks import ALLOWED_IMPORTS
from tasks.core.closure import ROOT, direct_imports


def package_of(path: Path) -> str:
    """tasks/curate/score.py -> curate; flows/curate.py -> flows."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if parts[0] == "flows" else parts[1]


def project_modules() -> list[Path]:
    return sorted(p for top in ("tasks", "flows") for p in (ROOT / top).rglob("*.py") if p.name != "__init__.py")


def layout_violations() -> list[str]:
    problems = []
    for path in project_modules():
        source = package_of(path)
        for target in sorted(direct_imports(path)):
            if package_of(target) not in ALLOWED_IMPORTS[source]:
                problems.append(f"{path.relative_to(ROOT)} ({source}) imports {target.relative_to(ROOT)} "
                                f"({package_of(target)}); {source} may import {sorted(ALLOWED_IMPORTS[source])}")
    return problems


def import_cycles() -> list[list[str]]:
    """Every cycle found by depth-first search, as the chain of modules that closes it."""
    graph = {path: sorted(direct_imports(path)) for path in project_modules()}
    state: dict[Path, str] = {}
    cycles, stack = [], []

    def visit(node: Path) -> None:
        state[node], _ = "open", stack.append(node)
        for child in graph.get(node, []):
            if state.get(child) == "open":
                cycles.append([p.relative_to(ROOT).as_posix() for p in stack[stack.index(child):]] + [
                    child.relative_to(ROOT).as_posix()])
            elif child not in state:
                visit(child)
        state[node], _ = "done", stack.pop()

    for node in graph:
        if node not in state:
            visit(node)
    return cycles


def test_every_module_lives_in_a_declared_package():
    loose = [p.relative_to(ROOT).as_posix() for p in project_modules() if package_of(p) not in ALLOWED_IMPORTS]
    assert not loose, f"modules outside the packages of tasks/__init__.py: {loose}"


def test_imports_follow_the_allowed_directions():
    problems = layout_violations()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)
