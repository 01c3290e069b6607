"""Every bundled layout sample (data/layouts/) through the whole DAG, one `dvc exp run` per layout.

The README's "Your own data" commands, run as written (`-S data.pool=... -S ingest.preset=...`) in a
throwaway git+DVC repository on the tiny test model. Among them the seven corpora of issue 23: chat
messages with a system turn, ShareGPT, Alpaca with the problem in `input`, OpenR1 with three generations
(one an exact repeat), plain question/response with prose endings, long `<think>` chain-of-thought, and
question/response/answer. Checked per layout: every stage ran and balanced its books (read = kept +
quarantined), ingest and segment kept the expected number of traces and quarantined the sample's known
bad records with their reasons, extract scored every segmented trace, and every subset was exported in
every format.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tasks.core.stage import read_quarantine
from tests.flows.workspace import REPO, write_workspace
from tests.test_dvc_pipeline import environment, run  # noqa: F401 (environment is a fixture)

pytestmark = pytest.mark.slow

# file, preset (None: the default field mapping), (ingest read, ingest kept, its quarantine reasons),
# (segment kept, its quarantine reasons): the samples' sizes and deliberate bad records
LAYOUTS = [
    ("messages.jsonl", "messages", (5, 4, ["no_assistant_turn"]), (4, [])),  # msg-1 has a system turn
    ("sharegpt.jsonl", "sharegpt", (4, 3, ["no_assistant_turn"]), (3, [])),
    ("alpaca.json", "alpaca", (4, 3, ["empty_field"]), (3, [])),  # the problem in `input`
    ("metamath.jsonl", "metamath", (4, 4, []), (4, [])),
    ("numina.jsonl", "numina", (6, 5, ["null_generation"]), (4, ["unclosed_reasoning"])),
    # OpenR1: 4 problems x 3 generations, each one read; r1-002's third repeats its second
    ("openr1.jsonl", "numina", (12, 11, ["duplicate_response"]), (11, [])),
    ("multiple_choice.jsonl", "multiple_choice", (4, 3, ["wrong_type"]), (3, [])),
    ("long_cot.jsonl", "messages", (4, 4, []), (2, ["empty_final_solution", "unclosed_reasoning"])),
    ("model_written.jsonl", None, (30, 30, []), (30, [])),  # plain {question, response}, 25 prose endings
    ("question_response_answer.jsonl", None, (6, 5, ["missing_field"]), (5, [])),
]
EXPORT_FILES = {"messages.jsonl", "prompt_completion.jsonl", "alpaca.json", "sharegpt.jsonl", "data.parquet",
                "README.md", "dataset_info.json"}


def reasons(path) -> list[str]:
    return [q["reason"] for q in read_quarantine(path)]


def stats_of(outputs, stage: str) -> dict:
    return json.loads((outputs / stage / "stats.json").read_text(encoding="utf-8"))


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
    for name, preset, (read, kept, ingest_reasons), (segmented, segment_reasons) in LAYOUTS:
        run([sys.executable, "-m", "dvc", "exp", "run", "-S", f"data.pool=data/layouts/{name}",
             "-S", f"ingest.preset={'null' if preset is None else preset}"], repo, environment)
        outputs = repo / "outputs"
        for stage in ("ingest", "segment", "extract", "export"):
            stats = stats_of(outputs, stage)
            assert stats["read"] == stats["kept"] + stats["quarantined"], (name, stage)
        ingest, segment, extract = (stats_of(outputs, stage) for stage in ("ingest", "segment", "extract"))
        assert (ingest["read"], ingest["kept"], reasons(outputs / "ingest/quarantine.jsonl")) == \
            (read, kept, ingest_reasons), name
        assert (segment["read"], segment["kept"], reasons(outputs / "segment/quarantine.jsonl")) == \
            (kept, segmented, segment_reasons), name
        assert (extract["read"], extract["kept"]) == (segmented, segmented), name
        assert ingest["preset"] == preset
        assert json.loads((outputs / "validate/results.json").read_text())["success"], name
        for subset in (outputs / "export/subsets").iterdir():
            assert {p.name for p in subset.iterdir()} == EXPORT_FILES, (name, subset.name)
