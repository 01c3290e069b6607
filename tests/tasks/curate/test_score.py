"""Stage `score`: alpha, consistency and step scores from Gram matrices equal the cosines of the vectors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import STEP_SCORE_SCHEMA
from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate.score import Params, main, score
from tests.tasks.extract_tables import extract_row, write_extract


def cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return 0.0 if norm == 0 else float(a @ b / norm)


def explicit_scores(vectors: np.ndarray, params: Params) -> list[tuple[float, float | None, float | None]]:
    """(alpha, consistency, step score) per step, straight from the vectors, as METHOD.md states them."""
    steps, answer = vectors[:-1], vectors[-1]
    past = np.zeros_like(answer)
    out = []
    for k, g in enumerate(steps):
        alpha = cos(g, answer)
        if k == 0:
            c = alpha if params.first_step == "alpha" else None
        else:
            c = cos(g, past)
        out.append((alpha, c, None if c is None else params.lambda_ * alpha + (1 - params.lambda_) * c))
        past = past + g if params.trajectory == "sum" else params.ema_beta * past + (1 - params.ema_beta) * g
    return out


@pytest.fixture
def traces():
    rng = np.random.default_rng(7)
    shapes = {"t-a": 4, "t-b": 1, "t-c": 3, "t-d": 4, "t-e": 2}  # several traces share K=4
    return {id_: rng.normal(size=(k + 1, 16)) for id_, k in shapes.items()}


def run(tmp_path, traces, params: Params, **row_kwargs):
    extract = write_extract(tmp_path / "extract", [extract_row(i, v, **row_kwargs) for i, v in traces.items()])
    stats = score(extract, tmp_path / "score", params)
    return pq.read_table(tmp_path / "score" / "step_scores.parquet"), stats


@pytest.mark.parametrize("params", [
    Params(),
    Params(trajectory="ema", ema_beta=0.7),
    Params(first_step="skip", lambda_=0.3),
    Params(trajectory="ema", ema_beta=0.0, first_step="skip"),  # beta 0: m_{k-1} = (1-0) g_{k-1}
])
def test_step_scores_equal_the_explicit_cosines(tmp_path, traces, params):
    table, stats = run(tmp_path, traces, params)
    assert table.schema == STEP_SCORE_SCHEMA
    rows = table.to_pylist()
    assert [(r["id"], r["step_index"]) for r in rows] == sorted((i, k) for i, v in traces.items()
                                                                 for k in range(len(v) - 1))
    expected = {(i, k): e for i, v in traces.items() for k, e in enumerate(explicit_scores(v, params))}
    for row in rows:
        alpha, c, s = expected[(row["id"], row["step_index"])]
        assert row["alpha"] == pytest.approx(alpha, abs=1e-12)
        assert row["consistency"] == (None if c is None else pytest.approx(c, abs=1e-12))
        assert row["step_score"] == (None if s is None else pytest.approx(s, abs=1e-12))
        assert row["n_tokens"] == 3
    assert stats["read"] == stats["kept"] == 5 and stats["quarantined"] == 0
    assert stats["steps"] == 14 and stats["skipped_steps"] == (5 if params.first_step == "skip" else 0)
    assert stats["mean_alpha"] == pytest.approx(np.mean([e[0] for e in expected.values()]), abs=1e-6)


def test_ema_and_sum_trajectories_differ_only_after_two_past_steps(tmp_path, traces):
    by_sum = run(tmp_path / "sum", traces, Params())[0].to_pylist()
    by_ema = run(tmp_path / "ema", traces, Params(trajectory="ema", ema_beta=0.5))[0].to_pylist()
    for a, b in zip(by_sum, by_ema):
        assert a["alpha"] == b["alpha"]
        if a["step_index"] <= 1:  # m_0 is g_1 up to a positive factor in both: same cosine
            assert a["consistency"] == pytest.approx(b["consistency"], abs=1e-12)
    assert any(abs(a["consistency"] - b["consistency"]) > 1e-3 for a, b in zip(by_sum, by_ema)
               if a["step_index"] >= 2)


def test_lambda_extremes_pick_alpha_or_consistency(tmp_path, traces):
    only_alpha = run(tmp_path / "one", traces, Params(lambda_=1.0))[0]
    assert only_alpha["step_score"].to_pylist() == only_alpha["alpha"].to_pylist()
    only_consistency = run(tmp_path / "zero", traces, Params(lambda_=0.0))[0]
    assert only_consistency["step_score"].to_pylist() == only_consistency["consistency"].to_pylist()


def test_cosines_stay_within_unit_interval_under_rounding(tmp_path):
    # Parallel vectors whose Gram carries a rounding excess: the raw quotient exceeds 1 and -1.
    gram = np.array([[4.0, -6.0 * (1 + 1e-14), 6.0 * (1 + 1e-14)],
                     [-6.0 * (1 + 1e-14), 9.0, -9.0],
                     [6.0 * (1 + 1e-14), -9.0, 9.0]])
    table, _ = run(tmp_path, {"t": np.zeros((3, 1))}, Params(), gram=gram)
    assert table["alpha"].to_pylist() == [1.0, -1.0]
    assert table["consistency"].to_pylist() == [1.0, -1.0]

    rng = np.random.default_rng(0)
    many = {f"r{i}": rng.normal(size=(6, 3)) * 10.0 ** rng.integers(-8, 8) for i in range(40)}
    table, _ = run(tmp_path / "many", many, Params())
    for name in ("alpha", "consistency", "step_score"):
        values = table[name].to_numpy()
        assert ((values >= -1.0) & (values <= 1.0)).all()


def test_zero_norm_vectors_give_zero_cosines_and_are_counted(tmp_path):
    rng = np.random.default_rng(3)
    no_tokens_step = rng.normal(size=(4, 8))
    no_tokens_step[1] = 0.0  # a step without loss tokens has an exactly zero gradient
    no_tokens_answer = rng.normal(size=(3, 8))
    no_tokens_answer[-1] = 0.0
    first_step_zero = rng.normal(size=(3, 8))
    first_step_zero[0] = 0.0  # the trajectory before step 2 is then zero too
    cancelling = rng.normal(size=(4, 8))
    cancelling[1] = -cancelling[0] * (1 - 3e-15)  # m_2 = g_1 + g_2 is rounding noise, not a direction
    table, stats = run(tmp_path, {"a": no_tokens_step, "b": no_tokens_answer, "c": first_step_zero,
                                  "d": cancelling}, Params())
    rows = {(r["id"], r["step_index"]): r for r in table.to_pylist()}
    assert rows[("a", 1)]["alpha"] == 0.0 and rows[("a", 1)]["consistency"] == 0.0
    assert rows[("a", 2)]["consistency"] == pytest.approx(cos(no_tokens_step[2], no_tokens_step[0]))
    assert [rows[("b", k)]["alpha"] for k in range(2)] == [0.0, 0.0]
    assert rows[("c", 1)]["consistency"] == 0.0
    assert rows[("d", 2)]["consistency"] == 0.0 and rows[("d", 1)]["consistency"] == pytest.approx(-1.0)
    assert stats["zero_norm_steps"] == 2 and stats["zero_norm_answers"] == 1
    assert stats["zero_norm_trajectories"] == 2


def test_head_gradient_reads_the_head_gram_or_names_the_setting(tmp_path, traces):
    rng = np.random.default_rng(11)
    head = {i: rng.normal(size=v.shape) for i, v in traces.items()}
    rows = [extract_row(i, v, head_vectors=head[i]) for i, v in traces.items()]
    write_extract(tmp_path / "extract", rows)
    score(tmp_path / "extract", tmp_path / "out", Params(gradient="head"))
    table = pq.read_table(tmp_path / "out" / "step_scores.parquet").to_pylist()
    for row in table:
        assert row["alpha"] == pytest.approx(cos(head[row["id"]][row["step_index"]], head[row["id"]][-1]))

    write_extract(tmp_path / "no_head", [extract_row(i, v) for i, v in traces.items()])
    with pytest.raises(ValueError, match="extract.head_variant"):
        score(tmp_path / "no_head", tmp_path / "out2", Params(gradient="head"))


def test_projected_gradient_without_projected_extract_stops_with_one_line(tmp_path, traces, capsys):
    """score.gradient: projected on an extract run without extract.projected: exit 2, one line naming both settings."""
    write_extract(tmp_path / "extract", [extract_row(i, v) for i, v in traces.items()])
    (tmp_path / "params.yaml").write_text("score:\n  gradient: projected\n")
    capsys.readouterr()  # what writing the extract logged is not this command's
    with pytest.raises(SystemExit) as stopped:
        main(["--params", str(tmp_path / "params.yaml"), "--extract", str(tmp_path / "extract"),
              "--out-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1, error
    assert "score.gradient: projected needs extract's projected_gram" in error and "extract.projected: true" in error
    assert not (tmp_path / "out").exists()


def test_inconsistent_extract_rows_are_refused_by_id(tmp_path, traces):
    rows = [extract_row(i, v) for i, v in traces.items()]
    rows[2]["proxy_gram"] = rows[2]["proxy_gram"][:-1]
    write_extract(tmp_path / "short", rows)
    with pytest.raises(ValueError, match="t-c"):
        score(tmp_path / "short", tmp_path / "out", Params())

    write_extract(tmp_path / "stepless", [extract_row("lonely", np.ones((1, 4)))])
    with pytest.raises(ValueError, match="lonely.*no steps"):
        score(tmp_path / "stepless", tmp_path / "out", Params())

    rows = [extract_row(i, v) for i, v in traces.items()]
    rows[0]["proxy_gram"][3] = float("nan")
    write_extract(tmp_path / "nan", rows)
    with pytest.raises(ValueError, match="t-a.*NaN"):
        score(tmp_path / "nan", tmp_path / "out", Params())


def test_cli_reads_the_score_section(tmp_path, traces):
    write_extract(tmp_path / "extract", [extract_row(i, v) for i, v in traces.items()])
    (tmp_path / "params.yaml").write_text("score:\n  lambda_: 1.0\n  first_step: skip\n")
    stats = main(["--params", str(tmp_path / "params.yaml"), "--extract", str(tmp_path / "extract"),
                  "--out-dir", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    table = pq.read_table(tmp_path / "out" / "step_scores.parquet")
    assert table["step_score"].null_count == 5


def test_params_name_the_setting_at_fault():
    assert params_from_dict(Params, "score", {}) == Params()
    for bad, name in [({"method": "best"}, "score.method"), ({"gradient": "full"}, "score.gradient"),
                      ({"lambda_": 1.5}, "score.lambda_"), ({"trajectory": "max"}, "score.trajectory"),
                      ({"ema_beta": 1.0}, "score.ema_beta"), ({"first_step": "zero"}, "score.first_step")]:
        with pytest.raises(ParamsError, match=name):
            params_from_dict(Params, "score", bad)
