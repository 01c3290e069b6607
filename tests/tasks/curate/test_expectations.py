"""The expectations validate runs, on breaks that agree with every count: a subset that is no longer
the top of the ranking or out of rank order, a NaN where score writes a number, a NaN in a shard.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.core.stage import StageInputError, write_json
from tasks.curate.validate import ExpectationsFailed, Params, validate
from tests.tasks.curate.test_validate import build_outputs, rewrite


@pytest.fixture
def outputs(tmp_path) -> Path:
    return build_outputs(tmp_path)


def rewrite_subset(outputs: Path, name: str, change) -> None:
    """Change one subset's ids (and subset.jsonl with them), with its manifest entry made to agree."""
    folder, manifest_path = outputs / "select" / "subsets" / name, outputs / "select" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    pairs = change(list(zip(folder.joinpath("ids.txt").read_text().splitlines(),
                            folder.joinpath("subset.jsonl").read_text().splitlines())))
    ids_txt, jsonl = "".join(i + "\n" for i, _ in pairs), "".join(line + "\n" for _, line in pairs)
    folder.joinpath("ids.txt").write_text(ids_txt)
    folder.joinpath("subset.jsonl").write_text(jsonl)
    entry = manifest["subsets"][name]
    entry.update(n_selected=len(pairs), n_tokens=8 * len(pairs),  # build_outputs: 8 tokens per trace
                 sha256_ids_txt=hashlib.sha256(ids_txt.encode()).hexdigest(),
                 sha256_subset_jsonl=hashlib.sha256(jsonl.encode()).hexdigest())
    manifest["n_selected"][name] = len(pairs)
    manifest_path.write_text(json.dumps(manifest))


def set_first_step(outputs: Path, first_step: str) -> None:
    stats = json.loads((outputs / "score" / "stats.json").read_text())
    write_json(outputs / "score" / "stats.json", stats | {"first_step": first_step})


def failures(outputs: Path, out_dir: Path) -> dict[str, list[str]]:
    report = validate(outputs, out_dir, Params(fail_on_error=False, data_docs=False))
    return {name: [f"{f['expectation']} [{f['column']}] {f['observed']}" for f in suite["failed"]]
            for name, suite in report["suites"].items() if suite["failed"]}


def test_breaks_that_every_count_agrees_with_still_fail(outputs, tmp_path):
    rewrite_subset(outputs, "top20pct", lambda pairs: pairs[:-1])  # one short: no longer round(0.2 * 20)
    rewrite_subset(outputs, "top10pct", lambda pairs: pairs[::-1])  # the same two traces, worst first
    set_first_step(outputs, "alpha")  # no step is skipped: a NaN is a fault
    rewrite(outputs / "score" / "step_scores.parquet",
            lambda rows: [rows[0] | {"step_score": math.nan}, rows[1] | {"consistency": math.nan}] + rows[2:])
    rewrite(outputs / "extract" / "shards" / "part-00000.parquet",
            lambda rows: [rows[0] | {"proxy_gram": [1.0, math.nan, 0.2, 1.0]}] + rows[1:])

    failed = failures(outputs, tmp_path / "v")
    subsets = failed.pop("select_subsets")
    assert len(subsets) == 2  # both break the rule; only the reordered one breaks rank order
    assert subsets[0].startswith("expect_column_pair_values_to_be_equal [rule_sha256_ids vs file_sha256_ids] "
                                 "{'unexpected_count': 2, ")
    assert subsets[1] == ("expect_column_values_to_be_between [rank_order_breaks] "
                          "{'unexpected_count': 1, 'unexpected_examples': [1]}")
    assert failed == {
        "score_missing": ["expect_column_values_to_be_between [unexpected_missing] "
                          "{'unexpected_count': 2, 'unexpected_examples': [1, 1]}"],
        "extract_shapes": ["expect_column_values_to_be_between [non_finite_numbers] "
                           "{'unexpected_count': 1, 'unexpected_examples': [1]}"],
    }


def test_a_skipped_first_step_must_be_empty_and_only_it(outputs, tmp_path):
    set_first_step(outputs, "skip")  # every build_outputs trace has one step: its consistency must be null
    assert failures(outputs, tmp_path / "a") == {"score_missing": [
        "expect_column_values_to_be_between [unexpected_value] {'unexpected_count': 20, "
        "'unexpected_examples': [2, 2, 2, 2, 2]}"]}
    rewrite(outputs / "score" / "step_scores.parquet",
            lambda rows: [row | {"consistency": None, "step_score": None} for row in rows])
    assert failures(outputs, tmp_path / "b") == {}


# ---- issue 22: no false alarm whatever select's options, no blind spot for an edited number ------------------
SELECT_OPTIONS = [
    {"within_clusters": True},
    {"max_per_question": 1},
    {"max_per_question": 2, "within_clusters": True},
    {"stratify_by": "level"},
    {"stratify_by": "level", "within_clusters": True, "max_per_question": 1},
    {"fractions": (0.05, 0.25, 1.0), "token_budget": None},
    {"fractions": (), "token_budget": 47},
]


@pytest.mark.parametrize("options", SELECT_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_select_option_passes_validate(tmp_path, options):
    """validate checks each subset against select's own rule (select.choose), whatever options select ran with;
    three responses per question make max_per_question bite (before: size_error -3 and a rule mismatch)."""
    outputs = build_outputs(tmp_path, questions=7, **options)
    manifest = json.loads((outputs / "select" / "manifest.json").read_text())
    if "max_per_question" in options:
        assert manifest["n_capped"] > 0
    assert failures(outputs, tmp_path / "v") == {}


def test_validate_refuses_what_select_did_not_choose_under_its_options(tmp_path):
    outputs = build_outputs(tmp_path, questions=7, max_per_question=1)
    rewrite_subset(outputs, "top20pct", lambda pairs: pairs[:-1])
    assert "select_subsets" in failures(outputs, tmp_path / "v")


def edit_rows(path: Path, change) -> None:
    rewrite(path, lambda rows: [change(row) for row in rows])


def test_edited_numbers_and_cut_artifacts_fail_where_every_count_agrees(outputs, tmp_path):
    scores = pq.read_table(outputs / "aggregate" / "sample_scores.parquet").to_pylist()
    top, second = scores[0]["id"], scores[1]["id"]
    # the best sample score raised, in sample_scores and ranking alike: the order is kept
    for path in (outputs / "aggregate" / "sample_scores.parquet", outputs / "select" / "subsets" / "ranking.parquet"):
        edit_rows(path, lambda row: row | {"score": row["score"] + 0.01} if row["id"] == top else row)
    # a score edited in ranking.parquet only
    edit_rows(outputs / "select" / "subsets" / "ranking.parquet",
              lambda row: row | {"score": row["score"] - 0.001} if row["id"] == second else row)
    # one step's alpha edited (its step score left as it was)
    edit_rows(outputs / "score" / "step_scores.parquet",
              lambda row: row | {"alpha": row["alpha"] / 2 + 0.1} if row["id"] == "t005" else row)
    # clusters.parquet cut to 5 rows
    rewrite(outputs / "cluster" / "clusters.parquet", lambda rows: rows[:5])
    # an answer span ending past the response; a response replaced in traces.parquet
    edit_rows(outputs / "segment" / "segments.parquet",
              lambda row: row | {"answer_end": len(row["scored_response"]) + 4} if row["id"] == "t003" else row)
    edit_rows(outputs / "ingest" / "traces.parquet",
              lambda row: row | {"response": "Something else.\n#### 9"} if row["id"] == "t004" else row)

    failed = failures(outputs, tmp_path / "v")
    sample = failed.pop("recomputed_sample_scores")
    assert any(line.startswith("expect_column_values_to_be_between [score_error] {'unexpected_count': 1,")
               for line in sample), sample
    assert any(line.startswith("expect_column_values_to_be_between [ranking_score_error] "
                               "{'unexpected_count': 1,") for line in sample), sample
    assert any(line.startswith("expect_column_pair_values_to_be_equal [id vs clusters_id] "
                               "{'unexpected_count': 15,") for line in sample), sample
    assert failed.pop("recomputed_step_scores")[0].startswith(
        "expect_column_values_to_be_between [step_score_error] {'unexpected_count': 1,")
    assert failed.pop("segment_spans") == [
        "expect_column_values_to_be_null [span_fault] {'unexpected_count': 1, 'unexpected_examples': "
        "['answer span (11, 21) is empty or leaves the 17-char response']}"]
    hashes = failed.pop("recomputed_hashes")
    assert len(hashes) == 1 and "'unexpected_count': 1," in hashes[0]
    reconcile = failed.pop("reconcile")
    assert reconcile == ["expect_column_pair_values_to_be_equal [cluster_kept vs clusters_rows] "
                         "{'unexpected_count': 1, 'unexpected_examples': [[20, 5]]}"]
    assert failed == {}


def test_a_truncated_artifact_is_a_failed_result_not_a_crash(outputs, tmp_path):
    path = outputs / "aggregate" / "sample_scores.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out_dir = tmp_path / "v"
    with pytest.raises(ExpectationsFailed, match="sample_scores.parquet") as failure:
        validate(outputs, out_dir, Params(data_docs=False))
    assert isinstance(failure.value, StageInputError)  # on the command line: one line, exit 2
    results = json.loads((out_dir / "results.json").read_text())
    assert results["success"] is False and results["n_failed"] == 1
    (failure,) = results["suites"]["artifacts"]["failed"]
    assert failure["expectation"] == "artifact_readable" and "sample_scores.parquet" in failure["observed"]["error"]
    report = validate(outputs, tmp_path / "w", Params(fail_on_error=False))  # report only: returned, not raised
    assert report["success"] is False and "sample_scores.parquet" in report["error"]
