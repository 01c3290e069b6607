"""finetune/dvc.yaml under DVC, in a throwaway git+DVC repository on the tiny test model.

Checked: a plain `dvc repro` runs the curation only (not unconditional, which only the IFD baseline
reads); `dvc repro finetune/dvc.yaml` then runs unconditional and the fine-tune stages (params from
the root params.yaml); `dvc metrics show` and `dvc plots show` find
the table and the plot; asking again runs nothing; a new method reruns subsets, runs and report,
and the runs stage retrains only the new method's run, the others coming from the per-run cache.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.workspace import REPO, write_workspace
from tests.test_dvc_pipeline import environment, run  # noqa: F401  (environment is a fixture)

pytestmark = pytest.mark.slow

FINETUNE_STAGES = {f"finetune/dvc.yaml:{name}" for name in ("test_set", "warmup", "scorers", "unconditional", "subsets",
                                                             "runs", "report")}
TEST_ROWS = [{"id": f"test-{i}", "question": f"Ann has {i} pens and gets {i} more. How many pens?",
              "answer": f"She has {i}+{i} = <<{i}+{i}={2 * i}>>{2 * i} pens.\n#### {2 * i}"} for i in (2, 5, 8)]


def repro(repo: Path, env: dict[str, str], *targets: str) -> set[str]:
    output = run([sys.executable, "-m", "dvc", "repro", *targets], repo, env)
    return set(re.findall(r"^Running stage '([^']+)'", output, flags=re.MULTILINE))


def set_finetune(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["finetune_eval"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def test_finetune_pipeline_runs_only_when_asked_and_resumes(tmp_path, tiny_model_dir, environment):  # noqa: F811
    repo = write_workspace(tmp_path / "repo", tiny_model_dir)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "finetune", repo / "finetune", ignore=shutil.ignore_patterns("dvc.lock"))
    shutil.copytree(REPO / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data/gsm_noisy/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST_ROWS), encoding="utf-8")
    set_finetune(repo, methods=["grace", "random"], random_seeds=[0], fractions=[0.5], lora_layers=1,
                 batch_tokens=256, accuracy_problems=2, max_new_tokens=4, eval_batch_size=2, device="cpu",
                 variants=[{"name": "grace-warmed", "scorer": "warmed", "within_clusters": True}],
                 scorers={"warmed": {"model": "warmup", "projected": False, "pool": None}})
    run(["git", "init", "-q"], repo, environment)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, environment)

    curation = repro(repo, environment)
    assert curation and not curation & FINETUNE_STAGES and not (repo / "outputs/finetune").exists()
    assert not (repo / "outputs/unconditional").exists()  # the default selection does not read it

    assert repro(repo, environment, "finetune/dvc.yaml") == FINETUNE_STAGES
    results = (repo / "outputs/finetune/results.md").read_text(encoding="utf-8")
    assert "| grace | 50% |" in results and "| full | 100% |" in results and "| grace-warmed | 50% |" in results
    metrics = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo, environment))
    (workspace,) = metrics.values()  # dvc 3 keys the workspace as ""
    table = workspace["data"]["outputs/finetune/metrics.json"]["data"]
    # random-tokens: the token-matched random anchor; no gates (no labels, so no calibration rows)
    assert set(table) == {"base", "grace", "random", "random-tokens", "full", "grace-warmed"}
    assert "No calibration rows" in results
    plots = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo, environment))
    assert not plots.get("errors") and plots["data"]["accuracy_vs_budget"]
    fields = {value["field"] for value in plots["data"]["accuracy_vs_budget"][0]["content"]["data"]["values"]}
    assert fields == {"grace", "random"}  # one line per method of params.yaml

    assert repro(repo, environment, "finetune/dvc.yaml") == set()
    set_finetune(repo, methods=["grace", "random", "length"])
    unchanged = {f"finetune/dvc.yaml:{name}" for name in ("test_set", "warmup", "scorers", "unconditional")}
    assert repro(repo, environment, "finetune/dvc.yaml") == FINETUNE_STAGES - unchanged
    index = json.loads((repo / "outputs/finetune/runs/index.json").read_text(encoding="utf-8"))
    assert (index["trained"], index["from_cache"]) == (1, 6)  # only length-top50pct is new
