"""The project's default DVC remote: push from one clone, pull into a fresh one, get the same bytes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from configobj import ConfigObj

from tests.params_yaml import committed_document
from tests.tasks.outputs_tree import OUTPUT_DIRS, dvc, git, init_pipeline_repo

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


def dvc_output(repo: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          env=os.environ | {"DVC_NO_ANALYTICS": "1"}, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_fresh_clone_with_never_run_pipelines_pulls_and_is_up_to_date(tmp_path):
    """The README's `dvc pull dvc.yaml` / `dvc status dvc.yaml` on a clone of a repo that also holds the
    project's optional pipelines, never run; plain `dvc status` names those pipelines and nothing else."""
    tracked = git(ROOT, "ls-files", "finetune", "diagnostics").split()
    assert "finetune/dvc.lock" not in tracked and "diagnostics/dvc.lock" not in tracked, tracked
    repo = tmp_path / "grace"
    init_pipeline_repo(repo, 0.5, [0.1, 0.2])
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    # One out per stage directory, as the real dvc.yaml has: `outputs` whole would overlap their outs.
    pipeline["stages"]["curate"]["outs"] = [f"outputs/{name}" for name in OUTPUT_DIRS]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    params = committed_document()  # the optional pipelines read it
    params["score"] |= {"lambda_": 0.5}
    params["select"] |= {"fractions": [0.1, 0.2]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    optional: set[str] = set()
    for pipeline in ("finetune", "diagnostics"):
        (repo / pipeline).mkdir()
        shutil.copy(ROOT / pipeline / "dvc.yaml", repo / pipeline / "dvc.yaml")
        optional |= {f"{pipeline}/dvc.yaml:{name}" for name in
                     yaml.safe_load((ROOT / pipeline / "dvc.yaml").read_text(encoding="utf-8"))["stages"]}
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "curation only")
    dvc(repo, "push", "-q", "dvc.yaml")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    rc, output = dvc_output(clone, "pull", "dvc.yaml")
    assert rc == 0, output
    assert tree_bytes(clone / "outputs") == tree_bytes(repo / "outputs")
    rc, output = dvc_output(clone, "status", "dvc.yaml")
    assert rc == 0 and "Data and pipelines are up to date." in output, output
    rc, output = dvc_output(clone, "status")
    assert set(re.findall(r"^(\S+):$", output, flags=re.MULTILINE)) == optional, output
    # a plain pull over every pipeline: --allow-missing skips the outputs of stages never run (README)
    for stage_dir in (clone / "outputs").iterdir():  # outputs/.gitignore (git's, not DVC's) stays
        if stage_dir.is_dir():
            shutil.rmtree(stage_dir)
    rc, output = dvc_output(clone, "pull", "--allow-missing")
    assert rc == 0, output
    assert tree_bytes(clone / "outputs") == tree_bytes(repo / "outputs")

