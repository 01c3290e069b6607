"""The project modules a module imports, transitively: cache keys and DVC deps follow the code.

A hand-kept list of the files a stage depends on drifts (issue 11: the fine-tune run cache hashed
five files and missed extract.py, whose pack_batches decides every training batch). This reads the
import statements with `ast` (no module is executed) and follows those that name a module of this
repository (`tasks`, `flows`); third-party imports are the environment's business (constraints.txt).
Imports inside functions count too: a lazily imported module still decides the numbers.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "flows")


def _module_file(name: str) -> Path | None:
    """tasks.curate.extract -> ROOT/tasks/curate/extract.py (or a package's __init__.py); None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(path: Path) -> set[Path]:
    """The project files one module imports directly."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, module] if module else parts)
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]  # `from tasks import score`
        for name in names:
            file = _module_file(name)
            if file is not None and file.name != "__init__.py":
                found.add(file)
    return found


@functools.lru_cache(maxsize=None)
def import_closure(path: str | Path) -> tuple[Path, ...]:
    """`path` and every project module it imports, transitively, sorted."""
    seen: set[Path] = set()
    pending = [Path(path).resolve()]
    while pending:
        file = pending.pop()
        if file in seen:
            continue
        seen.add(file)
        pending.extend(direct_imports(file) - seen)
    return tuple(sorted(seen))


def relative_closure(path: str | Path) -> list[str]:
    """import_closure as repository-relative POSIX paths (the form dvc.yaml lists deps in)."""
    return [file.relative_to(ROOT).as_posix() for file in import_closure(path)]
