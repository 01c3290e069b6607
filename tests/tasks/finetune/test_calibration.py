"""The calibration gates and gap recovered (tasks/finetune/calibration.py) on hand-made run records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.finetune import calibration

N_PROBLEMS = 20


def run(name: str, row: str, fraction: float, n_correct: int, seed=None) -> dict:
    """A run record whose first n_correct of N_PROBLEMS problems are answered right."""
    predictions = [{"id": f"p{i:02d}", "correct": i < n_correct} for i in range(N_PROBLEMS)]
    return {"name": name, "method": row, "fraction": fraction, "seed": seed,
            "eval": {"accuracy": n_correct / N_PROBLEMS, "predictions": predictions}}


def table_of(rows: dict[tuple[str, float], list[int]]) -> list[dict]:
    return [run(f"{row}-{seed}-{fraction}", row, fraction, n, seed)
            for (row, fraction), counts in rows.items() for seed, n in enumerate(counts)]


CALIBRATED = {("oracle", 0.2): [14, 15, 16], ("random", 0.2): [8, 9, 10], ("anti-oracle", 0.2): [2, 3, 2],
              ("dose70", 0.2): [12, 12, 13], ("dose40", 0.2): [9, 10, 9], ("full", 1.0): [11],
              ("grace", 0.2): [11, 12, 12], ("length", 0.2): [6, 7, 6]}


def gates_by_name(records: list[dict]) -> dict[str, dict]:
    return {g["gate"]: g for g in calibration.gates(calibration.correctness(records))}


def test_a_calibrated_table_passes_every_gate():
    gates = gates_by_name(table_of(CALIBRATED))
    assert all(gate["passed"] for gate in gates.values()), gates
    assert gates["G1"]["oracle"] == pytest.approx(0.75) and gates["G1"]["random"] == pytest.approx(0.45)
    assert "oracle 75.0 - random 45.0 = 30.0 points" in gates["G1"]["text"]
    assert gates["G3"]["text"] == "100% clean 75.0 >= 70% clean 61.7 >= 40% clean 46.7"


@pytest.mark.parametrize("change, failing", [
    ({("oracle", 0.2): [12, 12, 13], ("random", 0.2): [10, 11, 11]}, "G1"),  # 8.3 points: under 10
    ({("oracle", 0.2): [9, 19, 15]}, "G1"),  # 26.7 points but a pooled SD of 18.1 points: 3 SD = 54.3
    ({("full", 1.0): [16]}, "G2"),  # full data beats the oracle
    ({("dose40", 0.2): [13, 14, 13]}, "G3"),  # less clean data trains better: not monotone
    ({("anti-oracle", 0.2): [9, 9, 10]}, "G4"),  # the corrupted traces train as well as random
])
def test_each_gate_fails_on_its_own_defect(change, failing):
    gates = gates_by_name(table_of({**CALIBRATED, **change}))
    assert {name for name, gate in gates.items() if not gate["passed"]} == {failing}


def test_missing_rows_fail_their_gates_with_a_reason():
    gates = gates_by_name(table_of({("random", 0.2): [8, 9, 10], ("grace", 0.2): [9, 9, 9]}))
    assert not any(gate["passed"] for gate in gates.values())
    assert gates["G1"]["text"] == "no oracle or random rows" and gates["G3"]["text"] == "no dose-response rows"


def test_gap_recovered_and_its_bootstrap_interval():
    gaps = calibration.gap_recovered(calibration.correctness(table_of(CALIBRATED)), n_boot=500)
    # grace 35/60 vs random 27/60 and oracle 45/60: (35 - 27) / (45 - 27)
    assert gaps[("grace", 0.2)]["gap"] == pytest.approx(8 / 18)
    assert gaps[("length", 0.2)]["gap"] == pytest.approx((19 - 27) / 18)
    assert gaps[("anti-oracle", 0.2)]["gap"] < 0
    for key in (("grace", 0.2), ("length", 0.2)):
        assert gaps[key]["low"] < gaps[key]["gap"] < gaps[key]["high"]
    assert gaps[("length", 0.2)]["high"] < 0 < gaps[("grace", 0.2)]["low"]  # the two are told apart
    assert ("oracle", 0.2) not in gaps and ("random", 0.2) not in gaps and ("full", 1.0) not in gaps
    # the same seed, the same interval
    again = calibration.gap_recovered(calibration.correctness(table_of(CALIBRATED)), n_boot=500)
    assert again == gaps


def test_runs_on_other_problems_are_refused():
    records = table_of({("random", 0.2): [8], ("oracle", 0.2): [12]})
    records[1]["eval"]["predictions"][0]["id"] = "other"
    with pytest.raises(ValueError, match="evaluated on other problems"):
        calibration.correctness(records)


def test_the_command_prints_each_gate_and_exits_nonzero_on_a_failure(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    records = table_of({**CALIBRATED, ("anti-oracle", 0.2): [9, 9, 10]})
    for record in records:
        (runs / f"{record['name']}.json").write_text(json.dumps(record))
    (runs / "index.json").write_text(json.dumps({"runs": [record["name"] for record in records]}))
    assert calibration.main(["--runs", str(runs), "--bootstrap", "200"]) == 1
    out = capsys.readouterr().out
    assert "G4  20%: FAIL  anti-oracle 46.7 < random 45.0" in out and "G1  20%: PASS" in out
    assert "gates: FAIL: no selector may be called better or worse than random" in out
    assert np.isfinite(float(out.split("gap recovered 20% grace: ")[1].split()[0]))


def test_g1_at_exactly_ten_points_passes_and_needs_three_seeds():
    exact = gates_by_name(table_of({**CALIBRATED, ("oracle", 0.2): [12, 12, 12], ("random", 0.2): [10, 10, 10],
                                    ("dose70", 0.2): [11, 11, 11], ("dose40", 0.2): [10, 10, 10]}))
    assert exact["G1"]["passed"], exact["G1"]["text"]  # 60.0 - 50.0 is 10 points, float rounding or not
    one_seed = gates_by_name(table_of({**CALIBRATED, ("oracle", 0.2): [15], ("random", 0.2): [9]}))
    assert not one_seed["G1"]["passed"] and "needs 3 each" in one_seed["G1"]["text"]


def test_a_dose_only_budget_is_not_a_budget_of_g1_and_g4():
    """The oracle also runs at dose_fraction; where no random row ran there, it is G3's budget only."""
    records = table_of({**CALIBRATED, ("oracle", 0.5): [18, 18, 18], ("dose70", 0.5): [15, 15, 15]})
    records = [r for r in records if not (r["method"] == "dose70" and r["fraction"] == 0.2)]
    gates = calibration.gates(calibration.correctness(records))
    assert {(g["gate"], g["budget"]) for g in gates} == {("G1", "20%"), ("G4", "20%"), ("G2", "20%"), ("G3", "50%")}


def test_no_interval_where_the_oracle_does_not_surely_beat_random():
    gaps = calibration.gap_recovered(calibration.correctness(table_of(
        {("oracle", 0.2): [10, 11, 9], ("random", 0.2): [10, 9, 11], ("grace", 0.2): [12, 12, 12]})), n_boot=300)
    assert gaps[("grace", 0.2)]["low"] is None and gaps[("grace", 0.2)]["high"] is None
