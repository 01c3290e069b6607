"""The expectations validate runs, on breaks that agree with every count: a subset that is no longer
the top of the ranking or out of rank order, a NaN where score writes a number, a NaN in a shard.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from tasks.core.stage import write_json
from tasks.curate.validate import Params, validate
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
