"""Every bundled layout sample (data/layouts/) through the whole DAG, one `dvc exp run` per layout.

The README's "Your own data" commands, run as written (`-S data.pool=... -S ingest.preset=...`) in a
throwaway git+DVC repository on the tiny test model. Checked per layout: every stage ran and balanced
its books, the quarantine reasons are the sample's known bad records, and every subset was exported
in every format.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.flows.workspace import REPO, write_workspace
from tests.test_dvc_pipeline import environment, run  # noqa: F401 (environment is a fixture)

pytestmark = pytest.mark.slow

# file, preset, (ingest quarantine reasons, segment quarantine reasons): the samples' deliberate bad records
LAYOUTS = [
    ("messages.jsonl", "messages", (["no_assistant_turn"], [])),
    ("sharegpt.jsonl", "sharegpt", (["no_assistant_turn"], [])),
    ("alpaca.json", "alpaca", (["empty_field"], [])),
    ("metamath.jsonl", "metamath", ([], [])),
    ("numina.jsonl", "numina", (["null_generation"], ["unclosed_reasoning"])),
    ("multiple_choice.jsonl", "multiple_choice", (["wrong_type"], [])),
    ("long_cot.jsonl", "messages", ([], ["empty_final_solution", "unclosed_reasoning"])),
]


def reasons(path) -> list[str]:
    return [json.loads(line)["reason"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_layout_runs_through_dvc_exp_run(tmp_path, tiny_model_dir, environment):  # noqa: F811
    repo = write_workspace(tmp_path / "repo", tiny_model_dir)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "layouts", repo / "data" / "layouts")
    run(["git", "init", "-q"], repo, environment)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, environment)
    run(["git", "add", "-A"], repo, environment)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "layouts"], repo, environment)
    for name, preset, (ingest_reasons, segment_reasons) in LAYOUTS:
        run([sys.executable, "-m", "dvc", "exp", "run", "-S", f"data.pool=data/layouts/{name}",
             "-S", f"ingest.preset={preset}"], repo, environment)
        outputs = repo / "outputs"
        assert reasons(outputs / "ingest/quarantine.jsonl") == ingest_reasons, name
        assert reasons(outputs / "segment/quarantine.jsonl") == segment_reasons, name
        for stage in ("ingest", "segment", "extract", "export"):
            stats = json.loads((outputs / stage / "stats.json").read_text(encoding="utf-8"))
            assert stats["read"] == stats["kept"] + stats["quarantined"], (name, stage)
        assert json.loads((outputs / "ingest/stats.json").read_text())["preset"] == preset
        assert json.loads((outputs / "validate/results.json").read_text())["success"], name
        for subset in (outputs / "export/subsets").iterdir():
            assert {p.name for p in subset.iterdir()} == {"messages.jsonl", "prompt_completion.jsonl", "alpaca.json",
                                                          "data.parquet", "README.md", "dataset_info.json"}, \
                (name, subset.name)
