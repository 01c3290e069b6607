"""The curate flow end to end on eight tiny GSM rows (four bad in some way) and the tiny BPE model.

Each run happens in its own directory with relative paths, as `python -m flows.curate` would run,
against the session's throwaway Prefect API (tests/flows/conftest.py).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterId, FlowRunFilterParentFlowRunId, LogFilter,
                                            LogFilterFlowRunId)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
from prefect.states import Failed

import tasks.core.artifacts
import tasks.curate.extract
from tasks.core.stage import ParamsError, StageInputError, read_quarantine
from tasks.curate.validate import ExpectationsFailed
from flows.curate import (EPHEMERAL_STARTUP_SECONDS, STAGE_PATHS, STAGE_TASK, SUMMARY_ARTIFACT_KEY, curate,
                          ignore_outputs, ingest_task, model_task, prefect_settings, retry_if_transient,
                          score_task, segment_task, stage_paths, summary_markdown, validation_report)
from tests.flows.workspace import REPO, assert_same_artifacts, write_workspace
from tests.params_yaml import committed_document

STAGES = ["ingest", "segment", "model", "extract", "score", "cluster", "aggregate", "select", "validate", "export",
          "report"]  # unconditional runs for score.method ifd only
COUNTED = ["ingest", "segment", "extract", "score", "cluster", "aggregate", "export", "report"]


def run_curate(root: Path):
    """curate() with its default (relative) paths, from `root`; returns the flow's final state."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("GRACE_PROGRESS", "log")  # as `python -m flows.curate` asks
        return curate(return_state=True)


@pytest.fixture(scope="module")
def in_process_run(prefect_api, tmp_path_factory, tiny_model_dir):
    """One flow run extracting in process: (workspace, final state)."""
    root = write_workspace(tmp_path_factory.mktemp("curate_in_process"), tiny_model_dir)
    return root, run_curate(root)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_flow_writes_every_artifact_and_counts_reconcile(in_process_run):
    root, state = in_process_run
    assert state.is_completed(), state
    summary = state.result()
    outputs = root / "outputs"
    stats = {stage: read_json(outputs / stage / "stats.json") for stage in COUNTED}

    # The summary carries what each stage wrote; read = kept + quarantined, quarantine files agree.
    assert list(summary["stages"]) == STAGES
    for stage, on_disk in stats.items():
        assert summary["stages"][stage] == on_disk
        assert on_disk["read"] == on_disk["kept"] + on_disk["quarantined"]
    for stage in ["ingest", "segment", "extract", "export", "report"]:
        assert len(read_quarantine(outputs / stage / "quarantine.jsonl")) == stats[stage]["quarantined"]
    assert {"read": 8, "kept": 5, "quarantined": 3, "quarantined_duplicate_id": 1, "quarantined_malformed_json": 1,
            "quarantined_no_assistant_turn": 1}.items() <= stats["ingest"].items()
    assert (stats["segment"]["read"], stats["segment"]["kept"], stats["segment"]["quarantined_no_steps"]) == (5, 4, 1)

    # Each stage reads what the one before it kept, and its table holds that many traces.
    assert pq.read_metadata(outputs / "ingest" / "traces.parquet").num_rows == 5
    assert pq.read_metadata(outputs / "segment" / "segments.parquet").num_rows == 4
    assert stats["extract"]["read"] == 4 and stats["extract"]["shards"] == 2
    assert sorted(p.name for p in (outputs / "extract" / "shards").glob("*.parquet")) == [
        "part-00000.parquet", "part-00001.parquet"]
    assert tasks.core.artifacts.read_extract(outputs / "extract").num_rows == stats["extract"]["kept"]
    assert stats["score"]["read"] == stats["extract"]["kept"]
    assert not (outputs / "unconditional").exists()  # the default method (grace) does not read it
    assert list(summary["seconds"]) == STAGES and all(s >= 0 for s in summary["seconds"].values())
    n_scored = pq.read_metadata(outputs / "aggregate" / "sample_scores.parquet").num_rows
    assert n_scored == stats["score"]["kept"] == 4
    assert read_json(outputs / "model" / "model_info.json")["identity"] == summary["stages"]["model"]["identity"]

    # Subsets: sizes in the summary, the manifest and the files agree.
    manifest = read_json(outputs / "select" / "manifest.json")
    assert summary["subsets"] == manifest["n_selected"] == {"top50pct": 2, "top100pct": 4, "budget100000tok": 4}
    for name, size in manifest["n_selected"].items():
        subset = outputs / "select" / "subsets" / name
        assert len((subset / "ids.txt").read_text().splitlines()) == size
        assert len((subset / "subset.jsonl").read_text().splitlines()) == size

    results = read_json(outputs / "validate" / "results.json")
    assert results["success"] is True and summary["stages"]["validate"] == results
    assert (outputs / "validate" / "data_docs" / "index.html").is_file()


def test_flow_publishes_markdown_summary(in_process_run):
    root, state = in_process_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    [artifact] = [a for a in artifacts if a.key == SUMMARY_ARTIFACT_KEY]
    assert artifact.type == "markdown"
    markdown = artifact.data
    assert markdown == summary_markdown(state.result())
    assert "| ingest | 8 | 5 | 3 | duplicate_id: 1, malformed_json: 1, no_assistant_turn: 1 |" in markdown
    assert "| segment | 5 | 4 | 1 | no_steps: 1 |" in markdown
    assert "| stage | read | kept | quarantined | quarantined by reason | seconds |" in markdown
    for stage, seconds in state.result()["seconds"].items():  # every stage has its wall time
        assert re.search(rf"^\| {stage} \|.*\| {seconds:.1f} \|$", markdown, flags=re.MULTILINE), stage
    top50 = read_json(root / "outputs" / "select" / "manifest.json")["subsets"]["top50pct"]
    tokens, threshold = top50["n_tokens"], top50["score_threshold"]
    assert f"| top50pct | top 50% of traces | 2 | {tokens} | {threshold:.4g} |" in markdown
    assert "| budget100000tok | token budget 100000 | 4 |" in markdown
    assert "## Validation: passed" in markdown
    assert "| subset | traces | alpaca rows | messages rows | parquet rows |" in markdown
    assert "| top50pct | 2 | 2 | 2 | 2 |" in markdown  # traces, not subset x format rows
    assert f"Scoring model: {state.result()['stages']['model']['source']} (identity " in markdown


def test_a_failed_run_publishes_its_failure_and_its_outputs_ignore_themselves(prefect_api, tmp_path, tiny_model_dir):
    """A run that stops at a stage still replaces the summary artifact (`prefect artifact inspect` would
    show the previous run's "passed"); any --outputs directory keeps itself out of git."""
    root = write_workspace(tmp_path / "ws", tiny_model_dir)
    (root / "data" / "gsm_noisy" / "pool.jsonl").write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        state = curate(outputs_dir="flow_out", return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    [artifact] = [a for a in artifacts if a.key == SUMMARY_ARTIFACT_KEY]
    assert artifact.data.startswith("# GRACE curation run: FAILED at ingest\n")
    assert "StageInputError: ingest: data/gsm_noisy/pool.jsonl holds no records" in artifact.data
    assert "## Validation" not in artifact.data  # nothing claimed for stages that never ran
    assert (root / "flow_out" / ".gitignore").read_text().splitlines()[-1] == "*"


def test_an_outputs_directory_is_ignored_by_git(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    ignore_outputs(tmp_path / "flow_out")
    (tmp_path / "flow_out" / "ingest").mkdir()
    (tmp_path / "flow_out" / "ingest" / "traces.parquet").write_bytes(b"x")
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status == ""  # what `dvc exp run`/`apply` would have committed is invisible to git
    (tmp_path / "flow_out" / ".gitignore").write_text("mine\n")
    ignore_outputs(tmp_path / "flow_out")  # a .gitignore of the user's own is left as it is
    assert (tmp_path / "flow_out" / ".gitignore").read_text() == "mine\n"


def test_stage_log_lines_reach_the_run_log(in_process_run):
    _, state = in_process_run
    APILogHandler().flush()  # the handler ships logs in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])), limit=200)
    messages = [log.message for log in logs]
    for line in ["ingest: read 8, kept 5, quarantined 3 (duplicate_id 1, malformed_json 1, no_assistant_turn 1) in ",
                 "segment: read 5, kept 4, quarantined 1 (no_steps 1) in "]:
        assert any(m.startswith(line) and m.endswith(" s") for m in messages), (line, messages)
    assert any(m.startswith("extract: 4/4 traces (100%)") for m in messages), messages
    assert any(m.startswith("select: ranked 4, top50pct 2 (threshold ") for m in messages), messages
    assert "validate: " in " ".join(messages)


def test_entry_points_give_the_temporary_api_longer_to_start():
    setting = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    with temporary_settings({setting: 20}):  # Prefect's default
        with prefect_settings():
            assert setting.value() == EPHEMERAL_STARTUP_SECONDS == 180
    with temporary_settings({setting: 600}):  # a user's larger value wins
        with prefect_settings():
            assert setting.value() == 600


def test_dask_two_workers_identical(prefect_api, in_process_run, tmp_path, tiny_model_dir):
    """extract.workers: 2 runs the shards on two worker processes inside the flow's extract task (the code
    `dvc repro` runs): the same files as in process."""
    root = write_workspace(tmp_path / "dask", tiny_model_dir, workers=2)
    models_loaded_here = tasks.curate.extract._load_model.cache_info().misses
    state = run_curate(root)
    assert state.is_completed(), state
    assert tasks.curate.extract._load_model.cache_info().misses == models_loaded_here  # shards ran in the workers
    extract_stats = read_json(root / "outputs" / "extract" / "stats.json")
    assert (extract_stats["shards"], extract_stats["traces_computed"], extract_stats["workers"]) == (2, 4, 2)
    assert extract_stats["seconds"] > 0  # the stage's own clock, not a finalize step's (issue 22)
    assert_same_artifacts(in_process_run[0] / "outputs", root / "outputs")


def test_tasks_run_the_stage_functions(tmp_path, tiny_model_dir):
    """task.fn() is the stage call itself: params from the file, paths as given."""
    root = write_workspace(tmp_path, tiny_model_dir)
    params = root / "params.yaml"
    ingest_stats = ingest_task.fn(root / "data" / "gsm_noisy" / "pool.jsonl", tmp_path / "ingest", params)
    assert (ingest_stats["read"], ingest_stats["kept"]) == (8, 5)
    reasons = [q["reason"] for q in read_quarantine(tmp_path / "ingest" / "quarantine.jsonl")]
    assert sorted(reasons) == ["duplicate_id", "malformed_json", "no_assistant_turn"]

    # The section is read from the file: a changed setting changes what the stage does.
    document = yaml.safe_load(params.read_text())
    document["segment"]["strategy"] = "paragraph"  # no blank lines: every trace is one step
    params.write_text(yaml.safe_dump(document))
    segment_stats = segment_task.fn(tmp_path / "ingest" / "traces.parquet", tmp_path / "segment", params)
    assert segment_stats["strategy"] == "paragraph" and segment_stats["steps_total"] == segment_stats["kept"] == 4


def test_retries_only_where_a_retry_helps():
    assert ingest_task.retries > 0 and model_task.retries > 0  # input on a network mount; package index / hub
    assert segment_task.retries == 0 and score_task.retries == 0  # deterministic compute fails the same way twice


def test_stage_paths_are_dvc_yaml_paths():
    """The flow passes each core function exactly the paths dvc.yaml's command passes its CLI."""
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(dvc_stages) == STAGES
    # unconditional, which only score.method ifd reads, is finetune/dvc.yaml's (where the ifd subsets are made)
    dvc_stages["unconditional"] = yaml.safe_load((REPO / "finetune/dvc.yaml").read_text(encoding="utf-8"))[
        "stages"]["unconditional"]
    pool = committed_document()["data"]["pool"]
    assert pool == "data/gsm_noisy/pool.jsonl"  # the flow's default input
    for stage, paths in stage_paths(pool, "outputs").items():
        argv = shlex.split(dvc_stages[stage]["cmd"].replace("${data.pool}", pool), comments=True)
        assert argv[:3] == ["python", "-m", f"tasks.curate.{stage}"]
        flags = dict(zip(argv[3::2], argv[4::2]))
        assert flags == {f"--{name.replace('_', '-')}": path.as_posix() for name, path in paths.items()}, stage


def test_failed_validation_still_reported(tmp_path):
    report = {"success": False, "n_suites": 1, "n_expectations": 3, "n_failed": 1, "suites": {"ids": {
        "success": False, "n_expectations": 3, "n_failed": 1,
        "failed": [{"expectation": "expect_column_values_to_be_unique", "column": "id", "observed": 2}]}}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    assert validation_report(Failed(data=ExpectationsFailed("1 failed")), tmp_path) == report
    crashed = validation_report(Failed(data=FileNotFoundError("outputs/score missing")), tmp_path / "none")
    assert crashed == {"success": False, "error": "FileNotFoundError: outputs/score missing"}

    markdown = summary_markdown({"stages": {"validate": report}})
    assert "## Validation: FAILED" in markdown and "3 expectations in 1 suites, 1 failed." in markdown
    assert "- ids: expect_column_values_to_be_unique [id] observed 2" in markdown
    assert "FileNotFoundError: outputs/score missing" in summary_markdown({"stages": {"validate": crashed}})


def test_the_flow_passes_each_stage_the_paths_its_module_declares():
    """STAGE_PATHS holds where the files are; which keywords a stage takes is its STAGE's."""
    for stage, paths in STAGE_PATHS.items():
        declared = importlib.import_module(f"tasks.curate.{stage}").STAGE
        assert {name for name, _ in declared.paths} <= set(paths) <= set(declared.path_names), stage


@pytest.mark.parametrize("error, retried", [
    (OSError("NFS server not responding"), True), (ConnectionResetError(), True), (TimeoutError(), True),
    (RuntimeError("CUDA out of memory"), True),
    (ParamsError("params.yaml [score]: ..."), False), (StageInputError("no records"), False),
    (ValueError("deterministic"), False), (TypeError("bug"), False), (KeyError("id"), False),
    (ExpectationsFailed("1 failed"), False),
])
def test_retry_condition_retries_only_transient_errors(error, retried):
    assert retry_if_transient(None, None, Failed(data=error)) is retried


def test_a_task_retries_an_os_error_and_not_a_value_error(prefect_api):
    calls = []

    @task(retries=2, retry_delay_seconds=0, **STAGE_TASK)
    def flaky(error_type: type) -> str:
        calls.append(error_type)
        if len(calls) < 3:
            raise error_type("failed")
        return "ok"

    @flow
    def run(error_type: type) -> str:
        return flaky(error_type)

    assert run(OSError) == "ok" and len(calls) == 3  # retried twice, then passed
    calls.clear()
    with pytest.raises(ValueError):
        run(ValueError)
    assert len(calls) == 1  # a deterministic error: not retried
