"""Stage `aggregate`: step scores -> sample scores by mean/min/softmin/token_mean, and the baselines' path."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import SAMPLE_SCORE_SCHEMA, STEP_SCORE_SCHEMA
from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate import score as score_stage
from tasks.curate.aggregate import Params, aggregate, grace_sample_scores, main
from tests.tasks.extract_tables import extract_row, write_extract

# (id, step_index, alpha, step_score, n_tokens); None = a skipped step
STEPS = [
    ("a", 0, 0.1, 0.2, 1), ("a", 1, 0.3, -0.4, 2), ("a", 2, 0.5, 0.8, 1),
    ("b", 0, 0.9, None, 6), ("b", 1, 0.0, 0.5, 4),
    ("c", 0, -0.6, None, 2),  # its only step is skipped: falls back to its alpha
]


def step_table(rows=STEPS) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": i, "step_index": k, "alpha": a, "consistency": s, "step_score": s, "n_tokens": n}
         for i, k, a, s, n in reversed(rows)],  # unsorted on purpose
        schema=STEP_SCORE_SCHEMA,
    )


def softmin(values, tau):
    return -tau * math.log(sum(math.exp(-v / tau) for v in values) / len(values))


@pytest.mark.parametrize("how, expected", [
    ("mean", {"a": 0.2, "b": 0.5, "c": -0.6}),
    ("min", {"a": -0.4, "b": 0.5, "c": -0.6}),
    ("softmin", {"a": softmin([0.2, -0.4, 0.8], 0.1), "b": 0.5, "c": -0.6}),
    ("token_mean", {"a": (0.2 - 0.8 + 0.8) / 4, "b": 0.5, "c": -0.6}),
])
def test_each_aggregation_matches_its_formula(how, expected):
    ids, scores, fallback = grace_sample_scores(step_table(), how, tau=0.1)
    assert ids.tolist() == ["a", "b", "c"] and fallback.tolist() == [False, False, True]
    assert scores.tolist() == pytest.approx([expected[i] for i in ids], abs=1e-12)


def test_softmin_spans_min_to_mean_without_overflow():
    values = [0.2, -0.4, 0.8]
    rows = [("a", k, 0.0, v, 1) for k, v in enumerate(values)]
    cold = grace_sample_scores(step_table(rows), "softmin", tau=1e-4)[1][0]
    assert cold == pytest.approx(-0.4 + 1e-4 * math.log(3), abs=1e-9)  # the min, plus tau log(#steps at min)
    hot = grace_sample_scores(step_table(rows), "softmin", tau=1e6)[1][0]
    assert hot == pytest.approx(np.mean(values), abs=1e-6)
    # exp(1/1e-3) overflows a float64: the shifted form never exponentiates a positive number
    extreme = grace_sample_scores(step_table([("x", 0, 0.0, -1.0, 1), ("x", 1, 0.0, 1.0, 1)]), "softmin", 1e-3)
    assert extreme[1][0] == pytest.approx(-1.0 + 1e-3 * math.log(2), abs=1e-12)


def run_grace(tmp_path, vectors: dict, score_params: score_stage.Params, params: Params):
    extract = write_extract(tmp_path / "extract",
                            [extract_row(i, v, token_counts=range(2, len(v) + 2)) for i, v in vectors.items()])
    score_stage.score(extract, tmp_path / "score", score_params)
    stats = aggregate(tmp_path / "score" / "step_scores.parquet", extract, tmp_path / "agg", params, score_params)
    return pq.read_table(tmp_path / "agg" / "sample_scores.parquet"), stats


def test_grace_sample_scores_follow_the_step_scores_best_first(tmp_path):
    rng = np.random.default_rng(5)
    vectors = {f"t{i}": rng.normal(size=(int(rng.integers(2, 6)), 8)) for i in range(12)}
    table, stats = run_grace(tmp_path, vectors, score_stage.Params(), Params(how="min"))
    assert table.schema == SAMPLE_SCORE_SCHEMA
    steps = pq.read_table(tmp_path / "score" / "step_scores.parquet").to_pylist()
    expected = {i: min(r["step_score"] for r in steps if r["id"] == i) for i in vectors}
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == sorted(vectors, key=lambda i: (-expected[i], i))
    for row in rows:
        k = len(vectors[row["id"]]) - 1
        assert row["score"] == pytest.approx(expected[row["id"]], abs=1e-12)
        assert (row["method"], row["n_steps"], row["n_tokens"]) == ("grace", k, sum(range(2, k + 3)))
    assert stats["read"] == stats["kept"] == 12 and stats["quarantined"] == 0
    assert stats["how"] == "min" and stats["alpha_mean_fallbacks"] == 0 and stats["constant_score"] is False


def test_single_skipped_step_falls_back_to_alpha_and_is_counted(tmp_path):
    rng = np.random.default_rng(2)
    vectors = {"one-step": rng.normal(size=(2, 8)), "three-steps": rng.normal(size=(4, 8))}
    table, stats = run_grace(tmp_path, vectors, score_stage.Params(first_step="skip"), Params())
    steps = pq.read_table(tmp_path / "score" / "step_scores.parquet").to_pylist()
    scores = dict(zip(table["id"].to_pylist(), table["score"].to_pylist()))
    assert scores["one-step"] == pytest.approx(steps[0]["alpha"])
    assert scores["three-steps"] == pytest.approx(np.mean([r["step_score"] for r in steps[2:]]))
    assert stats["alpha_mean_fallbacks"] == 1


def test_ties_rank_by_id(tmp_path):
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    table, stats = run_grace(tmp_path, {"z": same, "m": same, "b": same}, score_stage.Params(), Params())
    assert table["id"].to_pylist() == ["b", "m", "z"] and stats["constant_score"] is True


def test_step_scores_from_another_corpus_are_refused(tmp_path):
    extract = write_extract(tmp_path / "extract", [extract_row(i, np.eye(3)) for i in ("a", "b", "d")])
    pq.write_table(step_table(), tmp_path / "steps.parquet")
    with pytest.raises(ValueError, match=r"no step scores for \['d'\].*unknown traces \['c'\]"):
        aggregate(tmp_path / "steps.parquet", extract, tmp_path / "out", Params(), score_stage.Params())


def test_cli_reads_aggregate_and_score_sections(tmp_path):
    rng = np.random.default_rng(9)
    extract = write_extract(tmp_path / "extract", [extract_row(f"t{i}", rng.normal(size=(3, 4))) for i in range(5)])
    score_stage.score(extract, tmp_path / "score", score_stage.Params())
    (tmp_path / "params.yaml").write_text("score:\n  method: length\naggregate:\n  how: min\n")
    stats = main(["--params", str(tmp_path / "params.yaml"), "--step-scores",
                  str(tmp_path / "score" / "step_scores.parquet"), "--extract", str(extract),
                  "--unconditional", str(tmp_path / "unread.parquet"),  # optional; read by score.method ifd only
                  "--out-dir", str(tmp_path / "out")])
    assert stats["method"] == "length" and "how" not in stats
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert set(pq.read_table(tmp_path / "out" / "sample_scores.parquet")["method"].to_pylist()) == {"length"}


def test_ifd_without_unconditional_losses_stops_at_once_naming_the_stage(tmp_path, capsys):
    """The default pipeline no longer computes unconditional (27 of a first run's 61 minutes)."""
    (tmp_path / "params.yaml").write_text("score:\n  method: ifd\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--step-scores", str(tmp_path / "none.parquet"),
            "--extract", str(tmp_path / "no-extract"), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(argv)  # before it reads the extract or the step scores: neither exists
    error = capsys.readouterr().err
    assert "score.method ifd" in error and "dvc repro finetune/dvc.yaml:unconditional" in error, error
    with pytest.raises(SystemExit):
        main(argv + ["--unconditional", str(tmp_path / "missing.parquet")])
    assert "no file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_params_name_the_setting_at_fault():
    assert params_from_dict(Params, "aggregate", {}) == Params()
    for bad, name in [({"how": "median"}, "aggregate.how"), ({"softmin_tau": 0}, "aggregate.softmin_tau"),
                      ({"random_seed": "x"}, "aggregate.random_seed")]:
        with pytest.raises(ParamsError, match=name):
            params_from_dict(Params, "aggregate", bad)
