"""params.yaml as committed: what the tests compare code defaults with and run stages on.

`dvc exp run -S key=value`, `dvc exp apply` and the README's `cp params.mm_charts.yaml params.yaml`
rewrite the working params.yaml; the README's test command must still pass after them. So the tests
read each params file as HEAD holds it (`git show HEAD:<file>`), and the working file only where there
is no git checkout or HEAD does not track it. A fresh clone (CI) has the two equal, so a code default
that drifts from the committed file still fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tasks.core.stage import load_params

REPO = Path(__file__).resolve().parents[1]


def committed_text(name: str = "params.yaml", root: Path = REPO) -> str:
    """The file as HEAD holds it; the working file without git, outside a checkout or when HEAD lacks it."""
    git = shutil.which("git")
    if git:
        shown = subprocess.run([git, "-C", str(root), "show", f"HEAD:./{name}"], capture_output=True)
        if shown.returncode == 0:
            return shown.stdout.decode("utf-8")
    return (root / name).read_text(encoding="utf-8")


def committed_document(name: str = "params.yaml", root: Path = REPO) -> dict:
    return yaml.safe_load(committed_text(name, root))


def committed_file(directory: Path, name: str = "params.yaml", root: Path = REPO) -> Path:
    """The committed file written to directory/name (a path a stage's --params can take)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(committed_text(name, root), encoding="utf-8")
    return directory / name


def defaults_are_the_section(params_cls, section: str, directory: Path, root: Path = REPO) -> bool:
    """params_cls() equals its section of the committed params.yaml, or of the working one (a developer who
    changed a default in both and has not committed yet): a user's experiment edits neither default."""
    committed = load_params(params_cls, section, committed_file(directory / "committed", root=root))
    return committed == params_cls() or load_params(params_cls, section, root / "params.yaml") == params_cls()
