"""The project's default DVC remote: push from one clone, pull into a fresh one, get the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

from configobj import ConfigObj

from tests.tasks.outputs_tree import dvc, git, init_pipeline_repo

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_project_remote_is_a_sibling_directory_of_the_clone():
    config = ConfigObj(str(ROOT / ".dvc/config"))  # the parser DVC itself uses
    name = config["core"]["remote"]
    # Relative to .dvc/: <parent of the clone>/grace-dvc-remote, the same for every clone side by side.
    assert config[f'remote "{name}"']["url"] == "../../grace-dvc-remote"


def test_push_then_pull_in_a_fresh_clone_restores_outputs_byte_identically(tmp_path):
    repo = tmp_path / "grace"
    init_pipeline_repo(repo, 0.5, [0.1, 0.2])
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the project's remote setting, as committed
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline")
    dvc(repo, "push", "-q")
    assert any((tmp_path / "grace-dvc-remote/files/md5").rglob("*")), "push wrote nothing to the sibling remote"

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "outputs").exists()
    dvc(clone, "pull", "-q")
    expected, restored = tree_bytes(repo / "outputs"), tree_bytes(clone / "outputs")
    assert restored == expected
    assert "select/subsets/top10pct/ids.txt" in restored and "select/subsets/ranking.parquet" in restored
