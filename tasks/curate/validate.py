"""Stage `validate`: great-expectations suites over every artifact under outputs/.

    python -m tasks.curate.validate --outputs outputs --out-dir outputs/validate

The suites (tasks/curate/expectations.py) check schemas, nulls, cosine ranges, unique ids, that counts
reconcile across stages, that subsets match their manifest and select's own rule (whatever its options),
that every selected id exists upstream, and recompute what is cheap (content hashes, span bounds, step and
sample scores, the ranking's scores). An artifact that cannot be read (missing, truncated) is one failed
check in results.json, not a crash. They run as one great-expectations Checkpoint in an in-memory context (no
project directory, analytics off), whose UpdateDataDocsAction writes Data Docs to
out_dir/data_docs. results.json holds the outcome per suite; a failure raises when fail_on_error.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasks.core.stage import (ParamsError, Stage, StageInputError, output_lock, params_section, remove_stale_staging,
                              stage_logger, write_json)

DOCS_SITE = "grace_outputs"


@params_section("validate")
class Params:
    fail_on_error: bool = True  # a failed expectation fails the run (false: report only)
    data_docs: bool = True  # build great-expectations Data Docs (HTML) under out_dir/data_docs

    def check(self) -> None:
        for name in ("fail_on_error", "data_docs"):
            if not isinstance(getattr(self, name), bool):
                raise ParamsError(f"validate.{name}: {getattr(self, name)!r} is not true or false")


class ExpectationsFailed(RuntimeError):
    """At least one expectation failed; the message lists each one."""


class OutputsUnreadable(ExpectationsFailed, StageInputError):
    """An artifact could not be read: a failed result in results.json, like any failed expectation (the flow
    reads it back), and an input the stage cannot run on (the command line prints its one line, exit 2)."""


def plain(value: Any) -> Any:
    """JSON-ready copy of an observed value: numpy to Python, tuples to lists, NaN to null."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def describe(result) -> dict:
    """A failed expectation as {expectation, column, observed}."""
    kwargs = result.expectation_config.kwargs
    if "column" in kwargs:
        column = kwargs["column"]
    elif "column_A" in kwargs:
        column = f"{kwargs['column_A']} vs {kwargs['column_B']}"
    else:
        column = ",".join(kwargs.get("column_list", [])) or None
    info = result.exception_info or {}
    errors = [info] if "raised_exception" in info else list(info.values())  # flat, or keyed by metric
    messages = [e["exception_message"] for e in errors if e.get("raised_exception")]
    if messages:
        observed = {"error": messages[0]}
    elif "observed_value" in result.result:
        observed = result.result["observed_value"]
    else:
        observed = {
            "unexpected_count": result.result.get("unexpected_count"),
            "unexpected_examples": list(result.result.get("partial_unexpected_list", []))[:5],
        }
    return {"expectation": result.expectation_config.type, "column": column, "observed": plain(observed)}


def run_checkpoint(suites: list, staging: Path, docs_dir: Path | None) -> dict[str, Any]:
    """Run every suite in one Checkpoint; suite name -> its validation result."""
    # Imported here: great-expectations takes seconds to import and only this stage needs it.
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            # absolute: great-expectations refuses a relative base_directory (dvc.yaml passes relative paths)
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("outputs")
    definitions = []
    for suite in suites:
        # Parquet assets, not dataframe assets: one Checkpoint run can then read every table.
        path = staging / f"{suite.name}.parquet"
        pq.write_table(suite.table, path)
        batch = source.add_parquet_asset(suite.name, path=path).add_batch_definition_whole_dataframe("all")
        gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name, expectations=suite.expectations))
        definition = gx.ValidationDefinition(name=suite.name, data=batch, suite=gx_suite)
        definitions.append(context.validation_definitions.add(definition))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])] if docs_dir else []
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(name="grace_outputs", validation_definitions=definitions, actions=actions,
                      result_format="SUMMARY")
    )
    results = {r.suite_name: r for r in checkpoint.run().run_results.values()}
    order = {e.id: i for s in definitions for i, e in enumerate(s.suite.expectations)}
    for result in results.values():  # the suite's own order, for a stable results.json
        result.results.sort(key=lambda r: order.get(r.expectation_config.id, len(order)))
    return results


def validate(outputs: Path, out_dir: Path, params: Params) -> dict:
    """Check every artifact under `outputs`; write results.json and Data Docs; raise on failure."""
    with output_lock(out_dir):
        remove_stale_staging(out_dir, ["results.json", "metrics.json"])  # a killed run's temp copies
        return _validate(outputs, out_dir, params)


def _validate(outputs: Path, out_dir: Path, params: Params) -> dict:
    from tasks.curate.expectations import ArtifactUnreadable, build_suites  # imports great-expectations

    docs_dir = out_dir / "data_docs" if params.data_docs else None
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)  # pages of earlier runs would linger unlinked
    try:
        suites = build_suites(outputs)
    except ArtifactUnreadable as error:  # a truncated or missing artifact is a failed check, not a crash
        report = _write(unreadable_report(" ".join(str(error).split())), out_dir)
        if params.fail_on_error:  # its one line is the whole story: no count line before it
            raise OutputsUnreadable(f"validate: {report['error']}") from None
        stage_logger("validate").error("validate: %s", report["error"])
        return report
    with tempfile.TemporaryDirectory(prefix="grace-validate-") as staging:
        results = run_checkpoint(suites, Path(staging), docs_dir)
    if docs_dir is not None and not (docs_dir / "index.html").is_file():
        raise RuntimeError(f"validate: great-expectations wrote no Data Docs index under {docs_dir}")

    report: dict[str, Any] = {"suites": {}}
    for suite in suites:
        result = results[suite.name]
        failed = [describe(r) for r in result.results if not r.success]
        report["suites"][suite.name] = {
            "success": not failed,
            "n_expectations": len(result.results),
            "n_failed": len(failed),
            "failed": failed,
        }
    report["n_suites"] = len(suites)
    report["n_expectations"] = sum(s["n_expectations"] for s in report["suites"].values())
    report["n_failed"] = sum(s["n_failed"] for s in report["suites"].values())
    report["success"] = report["n_failed"] == 0
    return _finish(report, out_dir, params)


def unreadable_report(error: str) -> dict[str, Any]:
    """results.json for outputs validate could not read: one failed check naming the artifact, in the
    usual layout (the flow's summary and `grace diff` read it as any failure), plus `error`."""
    failed = [{"expectation": "artifact_readable", "column": None, "observed": {"error": error}}]
    return {"suites": {"artifacts": {"success": False, "n_expectations": 1, "n_failed": 1, "failed": failed}},
            "n_suites": 1, "n_expectations": 1, "n_failed": 1, "success": False, "error": error}


def _write(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """results.json and metrics.json (the DVC metrics file: counts only)."""
    write_json(out_dir / "results.json", report)
    write_json(out_dir / "metrics.json", {key: report[key] for key in ("n_expectations", "n_failed")})
    return report


def _finish(report: dict[str, Any], out_dir: Path, params: Params) -> dict[str, Any]:
    """Write the report, log the outcome, raise on failure when fail_on_error."""
    _write(report, out_dir)
    stage_logger("validate").log(logging.INFO if report["success"] else logging.ERROR,
                                 "validate: %d expectations in %d suites, %d failed",
                                 report["n_expectations"], report["n_suites"], report["n_failed"])
    if params.fail_on_error and not report["success"]:
        lines = [
            f"  {name}: {f['expectation']} [{f['column']}] observed {f['observed']}"
            for name, suite in report["suites"].items() for f in suite["failed"]
        ]
        raise ExpectationsFailed(f"validate: {report['n_failed']} expectation(s) failed:\n" + "\n".join(lines))
    return report


STAGE = Stage(validate, Params, paths=[
    ("outputs", "the outputs/ tree of the pipeline"),
    ("out_dir", "where results.json and data_docs/ go"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
