"""subset_diagnostics: precision, coverage and between-group variance of the fine-tune subsets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.schema import SAMPLE_SCORE_SCHEMA
from tasks.core.stage import ParamsError, params_from_dict, write_parquet
from tasks.diagnostics.subset_diagnostics import Params, between_group_share, diagnose


def test_between_group_share_is_one_for_group_scores_and_zero_within():
    groups = ["a", "a", "b", "b"]
    assert between_group_share(np.array([1.0, 1.0, 3.0, 3.0]), groups) == pytest.approx(1.0)
    assert between_group_share(np.array([1.0, 3.0, 1.0, 3.0]), groups) == pytest.approx(0.0)
    assert between_group_share(np.array([2.0, 2.0, 2.0, 2.0]), groups) is None


def test_each_subset_gets_precision_and_coverage_each_scorer_its_auroc(tmp_path):
    ids = [f"t{i}" for i in range(8)]
    labels = [{"id": i, "corrupted": n % 2 == 1, "template": n // 4} for n, i in enumerate(ids)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels), encoding="utf-8")
    subsets = tmp_path / "subsets"
    scores = [1.0 if n % 2 == 0 else 0.0 for n in range(8)]  # clean first: AUROC 1
    write_parquet(subsets / "grace" / "aggregate" / "sample_scores.parquet", pa.Table.from_pylist(
        [{"id": i, "score": s, "method": "grace", "n_steps": 1, "n_tokens": 5} for i, s in zip(ids, scores)],
        schema=SAMPLE_SCORE_SCHEMA))
    (subsets / "grace" / "select").mkdir(parents=True)
    (subsets / "grace" / "select" / "ids.txt").write_text("t0\nt2\n", encoding="utf-8")
    (subsets / "full.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    index = {"runs": [{"name": "base", "method": "base", "seed": None, "fraction": 0.0, "ids": None},
                      {"name": "grace-top25pct", "method": "grace", "seed": None, "fraction": 0.25,
                       "ids": "grace/select/ids.txt", "n_clusters_covered": 1},
                      {"name": "full", "method": "full", "seed": None, "fraction": 1.0, "ids": "full.txt",
                       "n_clusters_covered": 2}]}
    (subsets / "index.json").write_text(json.dumps(index), encoding="utf-8")
    stats = diagnose(subsets, tmp_path / "labels.jsonl", tmp_path / "out", Params())
    assert stats == {"subsets": 2, "scorers": 1}
    result = json.loads((tmp_path / "out" / "subsets.json").read_text())
    grace, full = result["subsets"]
    assert (grace["precision"], grace["groups"], grace["clusters"]) == (1.0, 1, 1)
    assert (full["precision"], full["groups"], full["top_groups_share"]) == (0.5, 2, 1.0)
    assert result["scorers"]["grace"]["auroc"] == 1.0
    assert result["scorers"]["grace"]["between_group_share"] == pytest.approx(0.0)
    assert "| grace-top25pct | 2 | 1.000 |" in (tmp_path / "out" / "subsets.md").read_text()


def test_unlabelled_ids_and_bad_params_are_refused(tmp_path):
    (tmp_path / "labels.jsonl").write_text(json.dumps({"id": "a", "corrupted": False}) + "\n", encoding="utf-8")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "ids.txt").write_text("b\n", encoding="utf-8")
    (tmp_path / "s" / "index.json").write_text(json.dumps({"runs": [
        {"name": "full", "method": "full", "seed": None, "fraction": 1.0, "ids": "ids.txt"}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="have no label"):
        diagnose(tmp_path / "s", tmp_path / "labels.jsonl", tmp_path / "out", Params())
    with pytest.raises(ParamsError, match="subset_diagnostics.top_groups"):
        params_from_dict(Params, "subset_diagnostics", {"top_groups": 0})
