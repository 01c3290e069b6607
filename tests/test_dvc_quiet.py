"""A user who never runs the fine-tune or diagnostics pipelines sees no DVC warnings about them.

A throwaway git+DVC repository with the project's three dvc.yaml files and its .dvcignore, on the tiny
test model and the eight-row pool, used as the README says: `dvc repro`, commit, `dvc exp run -S`,
`dvc exp apply`, `dvc metrics show`, `dvc plots show`. Before, these printed "'...quarantine.jsonl' is
empty." and "'outputs/ingest/images' is empty." on every repro (zero-byte outs), "No file hash info
found" for every output of the never-run pipelines on every exp run and exp apply, which then ended in
"ERROR: Checkout failed", and "failed to load" from metrics and plots show.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.flows.workspace import REPO, write_workspace
from tests.test_dvc_pipeline import environment, run  # noqa: F401 (environment is a fixture)

pytestmark = pytest.mark.slow

NOISE = ("is empty.", "No file hash info found", "Checkout failed", "failed to load", "WARNING", "ERROR")


def dvc(repo, env, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo, env)


def assert_quiet(output: str, command: str) -> None:
    noisy = [line for line in output.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, f"`{command}` printed:\n" + "\n".join(noisy)


def test_dvc_says_nothing_about_pipelines_never_run_or_empty_outputs(tmp_path, tiny_model_dir,
                                                                     environment):  # noqa: F811
    repo = write_workspace(tmp_path / "repo", tiny_model_dir)
    for pipeline in ("dvc.yaml", "finetune/dvc.yaml", "diagnostics/dvc.yaml"):
        (repo / pipeline).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / pipeline, repo / pipeline)
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    run(["git", "init", "-q"], repo, environment)
    dvc(repo, environment, "init", "-q")
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")  # after `dvc init`, which writes its own
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm"]

    # The eight-row pool leaves extract's, export's and report's quarantines empty, and ingest's images.
    assert_quiet(dvc(repo, environment, "repro"), "dvc repro")
    assert (repo / "outputs/extract/quarantine.jsonl").read_text() == "\n"
    run(["git", "add", "-A"], repo, environment)
    run([*commit, "curated"], repo, environment)

    assert_quiet(dvc(repo, environment, "exp", "run", "-n", "quarter", "-S", "select.fractions=[0.25,1.0]"),
                 "dvc exp run")
    assert_quiet(dvc(repo, environment, "exp", "apply", "quarter"), "dvc exp apply")
    assert (repo / "outputs/select/subsets/top25pct/ids.txt").is_file()
    assert_quiet(dvc(repo, environment, "metrics", "show"), "dvc metrics show")
    assert_quiet(dvc(repo, environment, "plots", "show"), "dvc plots show")

    # Off is one line away from on: with it deleted, DVC reads the fine-tune pipeline again.
    named = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "finetune/dvc.yaml"], cwd=repo,
                           env=environment, capture_output=True, text=True)
    assert named.returncode != 0 and "dvc-ignored" in named.stdout + named.stderr
    ignore = repo / ".dvcignore"
    ignore.write_text(ignore.read_text().replace("/finetune/dvc.yaml\n", ""))
    assert "warmup" in dvc(repo, environment, "stage", "list", "finetune/dvc.yaml")
