"""validate: a consistent outputs tree passes; each kind of inconsistency fails, named."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import (CLUSTER_SCHEMA, EXTRACT_SCHEMA, SEGMENT_SCHEMA, STEP_SCORE_SCHEMA, TRACE_SCHEMA,
                               content_hash)
from tasks.core.stage import ParamsError, params_from_dict, write_json, write_parquet
from tasks.curate.select import Params as SelectParams
from tasks.curate.select import select
from tasks.curate.validate import ExpectationsFailed, Params, main, validate
from tests.tasks.curate.test_select import make_records, segment_rows, write_sample_scores

N_TRACES = 20


def write_stage(outputs: Path, stage: str, read: int, kept: int, quarantine: list[dict] = (), extra: dict = {}) -> None:
    lines = "".join(json.dumps({"stage": stage, "id": q["id"], "source_row": None, "reason": "bad",
                                "detail": "bad record", "record": None}) + "\n" for q in quarantine)
    if stage in ("ingest", "segment", "extract"):
        (outputs / stage / "quarantine.jsonl").write_text(lines)
    write_json(outputs / stage / "stats.json",
               {"stage": stage, "read": read, "kept": kept, "quarantined": len(quarantine), **extra})


def build_outputs(root: Path, questions: int | None = None, **select_params) -> Path:
    """Every artifact of a 20-trace run (one quarantined at ingest), in its schema, its numbers consistent (hashes,
    step and sample scores as score and aggregate compute them); cluster and select run for real. `questions`:
    that many distinct questions, the responses spread over them (several responses per question)."""
    outputs = root / "outputs"
    rows = segment_rows(make_records(N_TRACES))
    if questions is not None:
        rows = [row | {"prompt_messages": json.dumps([{"role": "user", "content": f"Question {k % questions}?"}])}
                for k, row in enumerate(rows)]
    rows = [row | {"content_hash": content_hash(row["prompt_messages"], row["response"])} for row in rows]
    ids = [r["id"] for r in rows]
    write_parquet(outputs / "ingest" / "traces.parquet",
                  pa.Table.from_pylist([{k: r[k] for k in TRACE_SCHEMA.names} for r in rows], schema=TRACE_SCHEMA))
    write_stage(outputs, "ingest", N_TRACES + 1, N_TRACES, [{"id": "broken"}])
    write_parquet(outputs / "segment" / "segments.parquet", pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA))
    write_stage(outputs, "segment", N_TRACES, N_TRACES)

    extract = [{"id": i, "content_hash": r["content_hash"], "n_steps": 1, "span_token_counts": [5, 3],
                "span_loss_sums": [4.0, 1.5], "proxy_gram": [1.0, 0.2, 0.2, 1.0], "head_gram": None,
                "prompt_tokens": 12, "prompt_tokens_truncated": 0, "prompt_embedding": [0.0, 1.0]}
               for i, r in zip(ids, rows)]
    for shard, part in (("part-00000", extract[:12]), ("part-00001", extract[12:])):
        table = pa.Table.from_pylist(part, schema=EXTRACT_SCHEMA)
        write_parquet(outputs / "extract" / "shards" / f"{shard}.parquet", table)
    write_stage(outputs, "extract", N_TRACES, N_TRACES)

    # one step per trace, alpha = consistency = step score = the sample score (aggregate.how mean)
    scores = [((k * 7) % N_TRACES) / N_TRACES for k in range(N_TRACES)]
    steps = [{"id": i, "step_index": 0, "alpha": s, "consistency": s, "step_score": s, "n_tokens": 5}
             for i, s in zip(ids, scores)]
    write_parquet(outputs / "score" / "step_scores.parquet", pa.Table.from_pylist(steps, schema=STEP_SCORE_SCHEMA))
    write_stage(outputs, "score", N_TRACES, N_TRACES, extra={"lambda_": 0.5, "first_step": "alpha"})
    write_parquet(outputs / "cluster" / "clusters.parquet", pa.table(
        {"id": ids, "cluster": [k % 3 for k in range(N_TRACES)]}, schema=CLUSTER_SCHEMA))
    write_stage(outputs, "cluster", N_TRACES, N_TRACES)
    write_sample_scores(outputs / "aggregate" / "sample_scores.parquet", ids, scores, [8] * N_TRACES)
    write_stage(outputs, "aggregate", N_TRACES, N_TRACES, extra={"method": "grace", "how": "mean"})
    select(outputs / "aggregate" / "sample_scores.parquet", outputs / "segment" / "segments.parquet",
           outputs / "select", SelectParams(**{"fractions": (0.1, 0.2), "token_budget": 30, **select_params}),
           clusters=outputs / "cluster" / "clusters.parquet")
    return outputs


@pytest.fixture
def outputs(tmp_path) -> Path:
    return build_outputs(tmp_path)


def test_consistent_outputs_pass_and_write_data_docs(outputs, tmp_path):
    out_dir = tmp_path / "validate"
    report = validate(outputs, out_dir, Params())
    assert report["success"] and report["n_failed"] == 0
    assert json.loads((out_dir / "results.json").read_text()) == report
    assert set(report["suites"]) == {
        "schema", "ingest_traces", "segment_segments", "extract", "extract_shapes", "score_step_scores",
        "aggregate_sample_scores", "select_ranking", "reconcile", "select_subsets", "select_ids", "score_missing",
        "cluster_clusters", "recomputed_hashes", "segment_spans", "recomputed_step_scores", "recomputed_sample_scores",
    }
    assert all(s["n_expectations"] > 0 and s["success"] for s in report["suites"].values())
    index = out_dir / "data_docs" / "index.html"
    assert index.is_file() and "reconcile" in index.read_text()
    assert not (Path.cwd() / "gx").exists()


def rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    write_parquet(path, pa.Table.from_pylist(change(table.to_pylist()), schema=table.schema))


def cosine_out_of_range(outputs: Path) -> None:
    rewrite(outputs / "score" / "step_scores.parquet", lambda rows: [rows[0] | {"alpha": 1.5}] + rows[1:])


def duplicate_id(outputs: Path) -> None:
    rewrite(outputs / "extract" / "shards" / "part-00001.parquet", lambda rows: rows + rows[:1])


def count_mismatch(outputs: Path) -> None:
    write_stage(outputs, "segment", N_TRACES + 1, N_TRACES + 1)  # balanced, but not what ingest kept


def subset_wrong_size(outputs: Path) -> None:
    """top10pct holds top20pct's traces, manifest updated to match: only the size is wrong."""
    select_dir = outputs / "select"
    manifest = json.loads((select_dir / "manifest.json").read_text())
    for name in ("ids.txt", "subset.jsonl"):
        source = (select_dir / "subsets" / "top20pct" / name).read_bytes()
        (select_dir / "subsets" / "top10pct" / name).write_bytes(source)
    manifest["subsets"]["top10pct"] = manifest["subsets"]["top20pct"] | {"fraction": 0.1}
    (select_dir / "manifest.json").write_text(json.dumps(manifest))


def selected_id_not_upstream(outputs: Path) -> None:
    ids_txt = outputs / "select" / "subsets" / "top20pct" / "ids.txt"
    ids_txt.write_text("ghost\n" + "".join(line + "\n" for line in ids_txt.read_text().splitlines()[1:]))


def schema_drift(outputs: Path) -> None:
    path = outputs / "aggregate" / "sample_scores.parquet"
    table = pq.read_table(path)
    float32_score = pa.field("score", pa.float32(), nullable=False)
    write_parquet(path, table.set_column(1, float32_score, table["score"].cast(pa.float32())))


# Each break touches its own file and trips its own expectation, so one validate run checks them all
# (great-expectations takes ~1 s a run); each expected line can only come from its own break.
BREAKS = [
    (cosine_out_of_range, "score_step_scores: expect_column_values_to_be_between [alpha] observed "
                          "{'unexpected_count': 1, 'unexpected_examples': [1.5]}"),
    (duplicate_id, "extract: expect_column_values_to_be_unique [id] observed "
                   "{'unexpected_count': 2, 'unexpected_examples': ['t012', 't012']}"),
    (count_mismatch, "reconcile: expect_column_pair_values_to_be_equal [ingest_kept vs segment_read] observed "
                     "{'unexpected_count': 1, 'unexpected_examples': [[20, 21]]}"),
    (subset_wrong_size, "select_subsets: expect_column_values_to_be_between [size_error] observed "
                        "{'unexpected_count': 1, 'unexpected_examples': [2.0]}"),
    (selected_id_not_upstream, "select_ids: expect_column_pair_values_to_be_equal [id vs segments_id] observed "
                               "{'unexpected_count': 1, 'unexpected_examples': [['ghost', None]]}"),
    (schema_drift, "schema: expect_column_pair_values_to_be_equal [expected vs actual] observed "
                   "{'unexpected_count': 1, "
                   "'unexpected_examples': [['score: double not null', 'score: float not null']]}"),
]


def test_each_inconsistency_fails_naming_the_expectation(outputs, tmp_path):
    for break_outputs, _ in BREAKS:
        break_outputs(outputs)
    with pytest.raises(ExpectationsFailed) as failure:
        validate(outputs, tmp_path / "validate", Params(data_docs=False))
    message = str(failure.value)
    missing = [expected for _, expected in BREAKS if expected not in message]
    assert not missing, message
    results = json.loads((tmp_path / "validate" / "results.json").read_text())
    assert results["success"] is False and results["n_failed"] == message.count("\n  ")
    assert results["suites"]["select_ids"]["failed"] == [
        {"expectation": "expect_column_pair_values_to_be_equal", "column": f"id vs {upstream}_id",
         "observed": {"unexpected_count": 1, "unexpected_examples": [["ghost", None]]}}
        for upstream in ("segments", "sample_scores")
    ]


def test_report_only_mode_and_command_line(outputs, tmp_path):
    count_mismatch(outputs)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("validate:\n  fail_on_error: false\n  data_docs: false\n")
    report = main(["--params", str(params_file), "--outputs", str(outputs), "--out-dir", str(tmp_path / "v")])
    assert report["success"] is False and report["suites"]["reconcile"]["n_failed"] >= 1
    assert report["suites"]["ingest_traces"]["success"]
    assert json.loads((tmp_path / "v" / "results.json").read_text()) == report
    assert not (tmp_path / "v" / "data_docs").exists()


def test_params_check_names_the_setting():
    with pytest.raises(ParamsError, match="validate.fail_on_error"):
        params_from_dict(Params, "validate", {"fail_on_error": "yes"})
