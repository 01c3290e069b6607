"""The fine-tune table on hand-made run results: % of full, random mean/std, metrics and plot files."""

from __future__ import annotations

import json
import statistics

import pytest

from tasks.finetune.report import markdown_table, metrics, plot_csv, report, summarize
from tasks.finetune.subsets import Params


def record(name, method, fraction, accuracy, gold_loss, seed=None, n_train=0) -> dict:
    return {"name": name, "method": method, "fraction": fraction, "seed": seed, "n_train": n_train,
            "n_train_tokens": 10 * n_train, "train": None if method == "base" else {"steps": 3, "seconds": 1.5},
            "eval": {"accuracy": accuracy, "gold_loss": gold_loss, "answer_rate": 0.9, "n_problems": 10,
                     "n_accuracy_problems": 5,
                     "seconds": 2.0}}


RECORDS = [
    record("base", "base", 0.0, 0.1, 2.0),
    record("grace-top5pct", "grace", 0.05, 0.4, 1.2, n_train=5),
    record("random-seed0-top5pct", "random", 0.05, 0.2, 1.5, seed=0, n_train=5),
    record("random-seed1-top5pct", "random", 0.05, 0.3, 1.3, seed=1, n_train=5),
    record("grace-top20pct", "grace", 0.2, 0.6, 1.1, n_train=20),
    record("full", "full", 1.0, 0.5, 1.0, n_train=100),
]


def test_summary_pools_random_seeds_and_relates_every_row_to_full():
    rows = {(row["method"], row["fraction"]): row for row in summarize(RECORDS)}
    assert [key for key in rows] == [("base", 0.0), ("grace", 0.05), ("random", 0.05), ("grace", 0.2), ("full", 1.0)]
    random = rows[("random", 0.05)]
    assert random["seeds"] == [0, 1]
    assert random["accuracy"] == pytest.approx(0.25)
    assert random["accuracy_std"] == pytest.approx(statistics.stdev([0.2, 0.3]))
    assert random["gold_loss"] == pytest.approx(1.4) and random["gold_loss_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert random["pct_of_full"] == pytest.approx(50.0)  # 0.25 / 0.5
    assert random["loss_gain_pct"] == pytest.approx(60.0)  # (2.0 - 1.4) / (2.0 - 1.0)
    assert rows[("grace", 0.05)]["pct_of_full"] == pytest.approx(80.0)
    assert rows[("grace", 0.05)]["loss_gain_pct"] == pytest.approx(80.0)
    assert rows[("grace", 0.05)]["accuracy_std"] is None  # one seed: no spread
    assert rows[("grace", 0.2)]["pct_of_full"] == pytest.approx(120.0)  # a subset may beat full data
    assert rows[("full", 1.0)]["pct_of_full"] == 100 and rows[("full", 1.0)]["loss_gain_pct"] == 100
    assert rows[("base", 0.0)]["loss_gain_pct"] == 0


def test_percent_of_full_is_undefined_where_full_scores_zero_or_base_is_missing():
    rows = summarize([r for r in RECORDS if r["method"] != "base"][:-1] + [record("full", "full", 1.0, 0.0, 1.0)])
    assert all(row["pct_of_full"] is None and row["loss_gain_pct"] is None for row in rows)
    assert "| n/a | n/a |" in markdown_table(rows)


def test_markdown_metrics_and_plot():
    rows = summarize(RECORDS)
    table = markdown_table(rows)
    assert "| random (2 seeds) | 5% | 5 | 50 | n/a | 25.0 ± 7.1 |  | n/a | 1.4000 ± 0.1414 | 90.0 | 50.0 | 60.0 |" in table
    assert "| full | 100% | 100 | 1000 | n/a | 50.0 |  | n/a | 1.0000 | 90.0 | 100.0 | 100.0 |" in table
    nested = metrics(rows)
    assert nested["grace"]["top5pct"]["accuracy"] == 0.4 and nested["full"]["n_train"] == 100
    assert nested["random"]["top5pct"]["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert "accuracy_std" not in nested["grace"]["top20pct"]
    assert plot_csv(rows, ("grace", "random")).splitlines() == [
        "budget_pct,grace,random", "0,0.1,0.1", "5,0.4,0.25", "20,0.6,", "100,0.5,0.5"]
    assert plot_csv(rows, ("grace", "random"), "gold_loss").splitlines() == [  # random: mean of its two seeds
        "budget_pct,grace,random", "0,2,2", "5,1.2,1.4", "20,1.1,", "100,1,1"]


def test_report_writes_results_metrics_and_plot(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for item in RECORDS:
        (runs / f"{item['name']}.json").write_text(json.dumps(item))
    (runs / "index.json").write_text(json.dumps({"runs": [r["name"] for r in RECORDS], "trained": 2,
                                                 "from_cache": 4, "device": "cpu", "seconds": 12.5,
                                                 "trunk_cache": True, "trunk_seconds": 3.0}))
    params = Params(methods=("grace", "random"))
    assert report(runs, tmp_path / "out", params) == {"rows": 5, "runs": 6}
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| grace | 20% | 20 | 200 | n/a | 60.0 |" in text and "| grace-top20pct | 20 | 200 | 3 | 1.5 | 2.0 |" in text
    assert "2 run(s) trained, 4 from cache, 12 s in all (3 s of them computing the frozen trunk)" in text
    assert "last 4 layers" in text and "frozen-trunk cache" in text
    assert "summed over the runs: 20 s" in text  # 5 x (1.5 + 2.0) + 2.0 for base = 19.5
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["base"]["accuracy"] == 0.1
    assert (tmp_path / "out" / "plots" / "accuracy_vs_budget.csv").read_text() == plot_csv(summarize(RECORDS),
                                                                                            ("grace", "random"))
    gold = (tmp_path / "out" / "plots" / "gold_loss_vs_budget.csv").read_text().splitlines()
    assert gold[0] == "budget_pct,grace,random" and len(gold) == 5
    assert gold == plot_csv(summarize(RECORDS), ("grace", "random"), "gold_loss").splitlines()


@pytest.mark.parametrize("anti, verdict", [([2, 3, 2], "Calibration gates: all PASS"),
                                           ([9, 9, 10], "Calibration gates: FAIL")])
def test_the_table_states_its_gates_and_each_rows_gap_recovered(tmp_path, anti, verdict):
    from tests.tasks.finetune.test_calibration import CALIBRATED, table_of

    records = [{**r, "n_train": 10, "n_train_tokens": 100, "train": {"steps": 3, "seconds": 1.0},
                "eval": {**r["eval"], "gold_loss": 1.0, "answer_rate": 1.0, "n_problems": 20,
                         "n_accuracy_problems": 20, "seconds": 1.0}}
               for r in table_of({**CALIBRATED, ("anti-oracle", 0.2): anti})]
    runs = tmp_path / "runs"
    runs.mkdir()
    for record in records:
        (runs / f"{record['name']}.json").write_text(json.dumps(record))
    (runs / "index.json").write_text(json.dumps({"runs": [r["name"] for r in records], "trained": 1,
                                                 "from_cache": 0, "device": "cpu", "seconds": 1.0}))
    report(runs, tmp_path / "out", Params(methods=("grace", "random", "length")))
    text = (tmp_path / "out" / "results.md").read_text()
    assert verdict in text and "- G1  20%: PASS  oracle 75.0 - random 45.0 = 30.0 points" in text
    grace_row = next(line for line in text.splitlines() if line.startswith("| grace (3 seeds) | 20% |"))
    assert "+0.44 [" in grace_row  # (35 - 27) / (45 - 27) of the 60 answers, with its interval
    gates = json.loads((tmp_path / "out" / "metrics.json").read_text())["gates"]
    assert gates["G1_20%"] and gates["G4_20%"] == (anti == [2, 3, 2])
