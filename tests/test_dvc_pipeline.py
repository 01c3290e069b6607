"""`dvc repro` of the project's own dvc.yaml, unchanged, in a throwaway git+DVC repository.

The repository holds dvc.yaml, a copy of tasks/ and flows/, params.yaml on the tiny test model
and an eight-row pool at dvc.yaml's input path. Checked: the first repro runs every stage, and
the Prefect flow, run as `python -m flows.curate` with no Prefect server configured, writes the
same artifacts; then a select param re-runs select and what reads its subsets
(validate, export, report) only, and a score param re-runs score and everything downstream of it,
but not ingest, segment, model or extract. A data.* path that is a number or null ends in DVC's own line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.workspace import REPO, assert_same_artifacts, write_workspace

STAGES = {"ingest", "segment", "model", "extract", "score", "cluster", "aggregate", "select", "validate", "export",
          "report"}
AFTER_SELECT = {"validate", "export", "report"}

pytestmark = pytest.mark.slow


@pytest.fixture
def environment(tmp_path) -> dict[str, str]:
    """This venv's python first on PATH (dvc.yaml runs `python -m tasks.<package>.<stage>`); no network, no user config."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "DVC_"))}
    return env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc_site_cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc_global_config"),
        "HF_HUB_OFFLINE": "1",
        # No PREFECT_API_URL: the flow must run on Prefect's own temporary local API.
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's 20 s default is too short for a temporary server on two busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-6000:]}"
    return output


def repro(repo: Path, env: dict[str, str]) -> set[str]:
    """Run `dvc repro`; the stages it ran (not those it skipped as unchanged)."""
    output = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    return set(re.findall(r"^Running stage '([\w-]+)'", output, flags=re.MULTILINE))


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def test_dvc_repro_reruns_what_changed_and_matches_the_flow(tmp_path, tiny_model_dir, environment):
    repo = write_workspace(tmp_path / "repo", tiny_model_dir)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    # One snapshot of the code for both runs, so they compare the orchestrators, not two versions of the stages.
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], repo, environment)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, environment)

    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert repro(repo, environment) == STAGES == set(stages)
    for stage in stages.values():
        for out in stage["outs"] + stage.get("metrics", []):
            assert (repo / (out if isinstance(out, str) else next(iter(out)))).exists(), out
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], repo, environment)

    # The flow on the same params and input, from a directory of the same layout, writes the same files.
    flow_dir = write_workspace(tmp_path / "flow", tiny_model_dir)
    run([sys.executable, "-m", "flows.curate", "--params", "params.yaml"], flow_dir,
        environment | {"PYTHONPATH": str(repo)})
    assert assert_same_artifacts(repo / "outputs", flow_dir / "outputs") > 20

    set_param(repo, "select", "fractions", [0.25, 1.0])
    assert repro(repo, environment) == {"select"} | AFTER_SELECT
    assert (repo / "outputs/select/subsets/top25pct/ids.txt").is_file()
    assert not (repo / "outputs/select/subsets/top50pct").exists()

    step_scores = (repo / "outputs/score/step_scores.parquet").read_bytes()
    set_param(repo, "score", "lambda_", 0.2)
    assert repro(repo, environment) == {"score", "aggregate", "select"} | AFTER_SELECT
    assert (repo / "outputs/score/step_scores.parquet").read_bytes() != step_scores


@pytest.mark.parametrize("key, value, stage", [
    ("pool", 5, "ingest"),
    ("images", None, "ingest"),
    ("test", 5, "finetune/dvc.yaml:test_set"),
    ("labels", None, "diagnostics/dvc.yaml:diagnostics"),
])
def test_a_wrong_typed_data_path_ends_in_dvcs_own_line_not_a_crash(tmp_path, environment, key, value, stage):
    """Issue 22: data.pool: 5 or data.images: null crashed every dvc command ("unexpected error - 'int' object has
    no attribute 'decode'"). DVC parses the dvc.yaml files before any stage of ours runs and checks no types, so
    the line is DVC's: `dvc status` lists the value as the stage's missing dependency, and `dvc repro` stops at
    that stage with one line naming it and the value."""
    repo = write_workspace(tmp_path / "repo", tmp_path / "no_model")
    for pipeline in ("dvc.yaml", "finetune/dvc.yaml", "diagnostics/dvc.yaml"):
        (repo / pipeline).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / pipeline, repo / pipeline)
    run(["git", "init", "-q"], repo, environment)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, environment)
    set_param(repo, "data", key, value)

    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert status.returncode == 0, status.stdout + status.stderr
    changed = {path: how for entry in json.loads(status.stdout)[stage] if "changed deps" in entry
               for path, how in entry["changed deps"].items()}
    assert changed[str(value)] == "deleted", changed

    if stage == "ingest":  # the first stage, nothing upstream of it: its own missing input stops it
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry", stage], cwd=repo, env=environment,
                              capture_output=True, text=True, timeout=600)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("ERROR")]
        assert done.returncode != 0 and errors == [
            f"ERROR: failed to reproduce 'ingest': [Errno 2] No such file or directory: '{repo / str(value)}'"], errors
