"""Does the fine-tune table see data quality? Its calibration gates, and each selector's share of the oracle's gap.

    python -m tasks.finetune.calibration --runs outputs/finetune/runs [--bootstrap 2000]

Reads the runs stage's results (runs/<name>.json) and prints each gate with its numbers and PASS/FAIL.
The calibration rows come from the labels (tasks/finetune/subsets.py, finetune_eval.calibration): oracle =
random clean traces, anti-oracle = random corrupted traces, doseNN = NN% clean at dose_fraction. On
held-out exact-match accuracy, averaged over a row's seeds:
    G1  oracle - random >= max(10 points, 3 x the pooled seed SD of the two rows), at every budget
    G2  oracle >= full data, at the largest budget
    G3  accuracy falls as the clean share falls: oracle (100%) >= dose rows in decreasing share
    G4  anti-oracle < random, at every budget
While a gate fails the table cannot tell a good selection from a bad one, so no selector may be called
better or worse than random on it (issue 21): fix the testbed, not the selector.

gap recovered = (selector - random) / (oracle - random) at a budget: 0 = random, 1 = the oracle, < 0 = worse
than random. Its 95% interval is a percentile bootstrap over test problems (resampled together for every row:
the rows answered the same problems) and over each row's seeds (resampled within the row); it is given only
where the oracle - random difference stays above 0 in 97.5% of the resamples (else the ratio's interval would
mean nothing: n/a).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

G1_MIN_POINTS = 0.10  # the oracle must beat random by at least 10 accuracy points...
G1_SD_MULTIPLE = 3  # ...and by 3 pooled seed SDs
G1_SEEDS = 3  # ...over at least 3 seeds of each row (with one seed the SD, and so the bar, would vanish)


def read_runs(runs: Path) -> list[dict]:
    index = json.loads((Path(runs) / "index.json").read_text(encoding="utf-8"))
    return [json.loads((Path(runs) / f"{name}.json").read_text(encoding="utf-8")) for name in index["runs"]]


def correctness(runs: list[dict]) -> dict[tuple[str, float], np.ndarray]:
    """(row, fraction) -> (seeds, problems) 0/1 exact match, problems in id order, the same for every run."""
    grouped: dict[tuple[str, float], list[list[float]]] = {}
    problem_ids = None
    for run in runs:
        if "predictions" not in run["eval"]:  # no per-problem answers: nothing to resample
            continue
        predictions = sorted(run["eval"]["predictions"], key=lambda p: p["id"])
        ids = [p["id"] for p in predictions]
        if problem_ids is None:
            problem_ids = ids
        elif ids != problem_ids:
            raise ValueError(f"run {run['name']} was evaluated on other problems than the rest; rerun the table")
        grouped.setdefault((run["method"], run["fraction"]), []).append([float(p["correct"]) for p in predictions])
    return {key: np.array(rows) for key, rows in grouped.items()}


def _mean(matrix: np.ndarray | None) -> float | None:
    return None if matrix is None else float(matrix.mean())


def _sd(matrix: np.ndarray) -> float:
    """Sample SD over seeds of each seed's accuracy (0 with one seed)."""
    per_seed = matrix.mean(axis=1)
    return statistics.stdev(per_seed.tolist()) if len(per_seed) > 1 else 0.0


def budgets(table: dict[tuple[str, float], np.ndarray]) -> list[float]:
    """The table's budgets: the fractions its random rows ran at (a dose-only budget is G3's, not a budget)."""
    return sorted({f for (row, f) in table if row == "random"}) or sorted(
        {f for (row, f) in table if row not in ("base", "full")})


def gates(table: dict[tuple[str, float], np.ndarray]) -> list[dict]:
    """Each gate: {gate, budget, passed, text}; a gate whose rows are missing is reported, not passed."""
    fractions = budgets(table)
    result = []
    for fraction in fractions:
        oracle, random_ = table.get(("oracle", fraction)), table.get(("random", fraction))
        anti = table.get(("anti-oracle", fraction))
        budget = f"{fraction * 100:g}%"
        if oracle is None or random_ is None:
            result.append({"gate": "G1", "budget": budget, "passed": False, "text": "no oracle or random rows"})
        elif min(len(oracle), len(random_)) < G1_SEEDS:
            result.append({"gate": "G1", "budget": budget, "passed": False, "text":
                           f"{len(oracle)} oracle and {len(random_)} random seeds; the gate needs {G1_SEEDS} each"})
        else:
            pooled = ((_sd(oracle) ** 2 + _sd(random_) ** 2) / 2) ** 0.5
            gap, need = _mean(oracle) - _mean(random_), max(G1_MIN_POINTS, G1_SD_MULTIPLE * pooled)
            result.append({"gate": "G1", "budget": budget, "passed": gap >= need - 1e-9, "oracle": _mean(oracle),
                           "random": _mean(random_), "pooled_sd": pooled, "text":
                           f"oracle {100 * _mean(oracle):.1f} - random {100 * _mean(random_):.1f} = {100 * gap:.1f} "
                           f"points, needs >= max(10, 3 x pooled SD {100 * pooled:.1f}) = {100 * need:.1f}"})
        if anti is None or random_ is None:
            result.append({"gate": "G4", "budget": budget, "passed": False, "text": "no anti-oracle or random rows"})
        else:
            result.append({"gate": "G4", "budget": budget, "passed": _mean(anti) < _mean(random_),
                           "text": f"anti-oracle {100 * _mean(anti):.1f} < random {100 * _mean(random_):.1f}"})
    full = next((matrix for (row, _), matrix in table.items() if row == "full"), None)
    top = table.get(("oracle", fractions[-1])) if fractions else None
    if full is None or top is None:
        result.append({"gate": "G2", "budget": "", "passed": False, "text": "no full or oracle rows"})
    else:
        result.append({"gate": "G2", "budget": f"{fractions[-1] * 100:g}%", "passed": _mean(top) >= _mean(full),
                       "text": f"oracle {100 * _mean(top):.1f} >= full data {100 * _mean(full):.1f}"})
    doses = sorted(((int(row[4:]), f, matrix) for (row, f), matrix in table.items() if row.startswith("dose")),
                   reverse=True)
    if not doses:
        result.append({"gate": "G3", "budget": "", "passed": False, "text": "no dose-response rows"})
    else:
        fraction = doses[0][1]
        curve = [(100, table.get(("oracle", fraction)))] + [(share, matrix) for share, _, matrix in doses]
        if curve[0][1] is None:
            result.append({"gate": "G3", "budget": f"{fraction * 100:g}%", "passed": False, "text": "no oracle row"})
        else:
            means = [_mean(matrix) for _, matrix in curve]
            result.append({"gate": "G3", "budget": f"{fraction * 100:g}%",
                           "passed": all(a >= b for a, b in zip(means, means[1:])),
                           "text": " >= ".join(f"{share}% clean {100 * m:.1f}" for (share, _), m in zip(curve, means))})
    return sorted(result, key=lambda gate: (gate["gate"], gate["budget"]))


def gap_recovered(table: dict[tuple[str, float], np.ndarray], n_boot: int = 2000,
                  seed: int = 0) -> dict[tuple[str, float], dict]:
    """(row, fraction) -> {gap, low, high}: the share of the oracle-random gap a row recovers, bootstrapped."""
    rng = np.random.default_rng(seed)
    out = {}
    for fraction in budgets(table):
        oracle, random_ = table.get(("oracle", fraction)), table.get(("random", fraction))
        if oracle is None or random_ is None:
            continue
        n_problems = oracle.shape[1]
        problems = rng.integers(0, n_problems, size=(n_boot, n_problems))  # (B, P), shared by every row

        def boot(matrix: np.ndarray) -> np.ndarray:
            per_seed = matrix[:, problems].mean(axis=2)  # (R, B): each seed's accuracy on each resample
            seeds = rng.integers(0, matrix.shape[0], size=(n_boot, matrix.shape[0]))  # (B, R)
            return np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)  # (B,)

        oracle_b, random_b = boot(oracle), boot(random_)
        denominator = oracle_b - random_b
        # a ratio is only read where the oracle surely beats random: an interval over a denominator that can be
        # 0 or negative means nothing, so then the gap has no interval (n/a)
        resolved = np.percentile(denominator, 2.5) > 0
        for (row, f), matrix in table.items():
            if f != fraction or row in ("oracle", "random"):
                continue
            gap = (_mean(matrix) - _mean(random_)) / (_mean(oracle) - _mean(random_)) \
                if _mean(oracle) != _mean(random_) else None
            row_b = boot(matrix)
            low = high = None
            if resolved:
                low, high = np.percentile((row_b - random_b) / denominator, [2.5, 97.5]).tolist()
            out[(row, fraction)] = {"gap": gap, "low": low, "high": high}
    return out


def gate_lines(results: list[dict]) -> list[str]:
    return [f"{g['gate']} {g['budget']:>4}: {'PASS' if g['passed'] else 'FAIL'}  {g['text']}" for g in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the fine-tune table's calibration gates (PASS/FAIL) and "
                                                 "every row's gap recovered; exit 1 if a gate fails.")
    parser.add_argument("--runs", type=Path, required=True, help="the runs stage's output directory")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the gap's interval")
    args = parser.parse_args(argv)
    table = correctness(read_runs(args.runs))
    results = gates(table)
    print("\n".join(gate_lines(results)))
    passed = all(g["passed"] for g in results)
    print(f"gates: {'all PASS' if passed else 'FAIL: no selector may be called better or worse than random'}")
    for (row, fraction), gap in sorted(gap_recovered(table, args.bootstrap).items(), key=lambda i: (i[0][1], i[0][0])):
        interval = "n/a" if gap["low"] is None else f"[{gap['low']:+.2f}, {gap['high']:+.2f}]"
        value = "n/a" if gap["gap"] is None else f"{gap['gap']:+.2f}"
        print(f"gap recovered {fraction * 100:g}% {row}: {value} {interval}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
