"""The fine-tune-and-evaluate table: method x budget -> accuracy, gold loss, % of full-data performance.

    python -m tasks.finetune.report --runs outputs/finetune/runs --out-dir outputs/finetune

Writes results.md (the table, the settings, per-run costs), metrics.json (DVC metrics, nested
method -> subset -> numbers), plots/accuracy_vs_budget.csv and plots/gold_loss_vs_budget.csv (DVC
plots: x = budget_pct, one column per method; the base model at 0% and full data at 100% are every
method's end points, since selecting nothing or everything is the same whatever the method).

Random rows pool their seeds: mean and sample standard deviation (n - 1). Two "% of full" columns:
  acc % of full   100 * accuracy / accuracy(full)      (n/a when full scores 0)
  loss gain %     100 * (loss(base) - loss) / (loss(base) - loss(full)): the share of full data's
                  gold-loss improvement over the base model that the subset reaches (needs base)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tasks.core.stage import Stage, atomic_write_text, write_json
from tasks.curate.select import fraction_subset_name
from tasks.finetune import calibration
from tasks.finetune.subsets import Params


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [value for value in values if value is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, fraction), seeds pooled, in budget order (base first, full last)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["fraction"]), []).append(record)
    rows = []
    for (method, fraction), runs in sorted(groups.items(), key=lambda item: item[0][1]):
        accuracy, accuracy_std = _mean_std([run["eval"]["accuracy"] for run in runs])
        gold_loss, gold_loss_std = _mean_std([run["eval"]["gold_loss"] for run in runs])
        rows.append({"method": method, "fraction": fraction, "seeds": [run["seed"] for run in runs],
                     "n_train": round(statistics.fmean(run["n_train"] for run in runs)),
                     "accuracy": accuracy, "accuracy_std": accuracy_std,
                     "gold_loss": gold_loss, "gold_loss_std": gold_loss_std,
                     "answer_rate": _mean_std([run["eval"]["answer_rate"] for run in runs])[0],
                     "step_accuracy": _mean_std([run["eval"].get("step_accuracy") for run in runs])[0],
                     "clean_share": _mean_std([run.get("clean_share") for run in runs])[0],
                     "n_train_tokens": round(statistics.fmean(run["n_train_tokens"] for run in runs)),
                     "clusters": _mean_std([run.get("n_clusters_covered") for run in runs])[0],
                     "warmup_overlap": _mean_std([run.get("warmup_overlap") for run in runs])[0],
                     "n_scored": runs[0].get("n_scored")})
    full = next((row for row in rows if row["method"] == "full"), None)
    base = next((row for row in rows if row["method"] == "base"), None)
    gain = base["gold_loss"] - full["gold_loss"] if base and full else None  # full data's loss improvement
    for row in rows:
        row["pct_of_full"] = (100 * row["accuracy"] / full["accuracy"]
                              if full and full["accuracy"] and row["accuracy"] is not None else None)
        row["loss_gain_pct"] = 100 * (base["gold_loss"] - row["gold_loss"]) / gain if gain else None
    return rows


def _cell(value: float | None, std: float | None = None, scale: float = 1, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    text = f"{value * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def markdown_table(rows: list[dict], gaps: dict | None = None) -> str:
    """The table; `gaps` ((row, fraction) -> calibration.gap_recovered's entry) adds the gap recovered column."""
    gaps = gaps or {}
    lines = ["| method | budget | n train | train tokens | clean % | accuracy (%) | gap recovered [95% CI] "
             "| step acc (%) | gold loss | answer rate (%) | acc % of full | loss gain % of full | clusters covered |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    pool = max((row["n_train"] for row in rows), default=0)  # full data's row trains on the whole pool
    for row in rows:
        method = row["method"] if len(row["seeds"]) < 2 else f"{row['method']} ({len(row['seeds'])} seeds)"
        gap = gaps.get((row["method"], row["fraction"]))
        gap_cell = "" if gap is None or gap["gap"] is None else f"{gap['gap']:+.2f}" + (
            "" if gap["low"] is None else f" [{gap['low']:+.2f}, {gap['high']:+.2f}]")
        lines.append(f"| {method} | {row['fraction'] * 100:g}% | {row['n_train']} | {row['n_train_tokens']} "
                     f"| {_cell(row['clean_share'], scale=100, digits=0)} "
                     f"| {_cell(row['accuracy'], row['accuracy_std'], 100)} | {gap_cell} "
                     f"| {_cell(row['step_accuracy'], scale=100)} "
                     f"| {_cell(row['gold_loss'], row['gold_loss_std'], digits=4)} "
                     f"| {_cell(row['answer_rate'], scale=100)} | {_cell(row['pct_of_full'])} "
                     f"| {_cell(row['loss_gain_pct'])} | {_cell(row['clusters'], digits=0)} |")
        if row["warmup_overlap"] is not None:
            notes.append(f"{row['method']} at {row['fraction'] * 100:g}%: {row['warmup_overlap']:.0f} of its "
                         f"{row['n_train']} training traces are in the scorer's warm-up subset.")
        if row["n_scored"] is not None and row["n_scored"] < pool:
            notes.append(f"{row['method']} at {row['fraction'] * 100:g}%: the best {row['n_train']} of a seeded "
                         f"random {row['n_scored']} traces (its scorer scores part of the pool only).")
    return "\n".join(lines) + "\n" + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")


def metrics(rows: list[dict]) -> dict:
    """method -> subset name -> numbers (base and full: method -> numbers), for `dvc metrics`."""
    nested: dict = {}
    for row in rows:
        numbers = {key: row[key] for key in ("n_train", "accuracy", "gold_loss", "answer_rate", "pct_of_full",
                                              "loss_gain_pct", "accuracy_std", "gold_loss_std", "clusters",
                                              "step_accuracy", "clean_share")
                   if row[key] is not None}
        if row["method"] in ("base", "full"):
            nested[row["method"]] = numbers
        else:
            nested.setdefault(row["method"], {})[fraction_subset_name(row["fraction"])] = numbers
    return nested


PLOTS = {"accuracy_vs_budget.csv": "accuracy", "gold_loss_vs_budget.csv": "gold_loss"}  # file -> metric


def plot_csv(rows: list[dict], methods: tuple[str, ...], metric: str = "accuracy") -> str:
    """budget_pct plus one `metric` column per method, in params order; base and full shared end points.

    Gold loss gets its own plot: with a small model accuracy can sit at zero for every run, and the
    gold loss is then what still tells the subsets apart."""
    by_key = {(row["method"], row["fraction"]): row[metric] for row in rows}
    fractions = sorted({row["fraction"] for row in rows if row["method"] not in ("base", "full")})
    points = [(fraction, None) for fraction in fractions]  # (budget, the run every column shares, if any)
    if ("base", 0.0) in by_key:
        points.insert(0, (0.0, "base"))
    if ("full", 1.0) in by_key:
        points.append((1.0, "full"))
    lines = ["budget_pct," + ",".join(methods)]
    for fraction, shared in points:
        values = [by_key.get((shared or method, fraction)) for method in methods]
        lines.append(f"{fraction * 100:g}," + ",".join("" if v is None else f"{v:.6g}" for v in values))
    return "\n".join(lines) + "\n"


def settings_line(params: Params, index: dict, evaluation: dict | None) -> str:
    """What the table was made with, in one sentence (and where the time went: index.json)."""
    adapters = f" (r={params.lora_r}, last {params.lora_layers or 'all'} layers)" if params.mode == "lora" else ""
    length = f"{params.steps} steps per run" if params.steps else f"{params.epochs} epoch(s)"
    parts = [f"mode {params.mode}{adapters}", f"lr {params.learning_rate:g}", length, f"budget by {params.budget}",
             f"batch_tokens {params.batch_tokens}", f"max_seq_len {params.max_seq_len}", f"device {index['device']}",
             f"precision {index.get('precision', 'fp32')}"]
    if params.repeats > 1:
        parts.append(f"{params.repeats} training seeds per deterministic row")
    if index.get("trunk_cache"):
        parts.append("frozen-trunk cache")
    if evaluation is not None:
        parts.append(f"accuracy on {evaluation['n_accuracy_problems']} test problems (greedy, max_new_tokens "
                     f"{params.max_new_tokens}), gold loss on {evaluation['n_problems']}")
    return ", ".join(parts)


def report(runs: Path, out_dir: Path, params: Params) -> dict:
    """results.md, metrics.json and plots/{accuracy,gold_loss}_vs_budget.csv from the runs stage's output."""
    index = json.loads((Path(runs) / "index.json").read_text(encoding="utf-8"))
    records = [json.loads((Path(runs) / f"{name}.json").read_text(encoding="utf-8")) for name in index["runs"]]
    rows = summarize(records)
    table = calibration.correctness(records)
    gates = calibration.gates(table) if any(row == "oracle" for row, _ in table) else []
    gaps = calibration.gap_recovered(table) if gates else {}
    if not gates:
        verdict = ("No calibration rows (data.labels gives no labels): nothing says whether this table can tell "
                   "a good selection from a bad one.")
    elif all(gate["passed"] for gate in gates):
        verdict = "Calibration gates: all PASS, so the table sees data quality:"
    else:
        verdict = ("Calibration gates: FAIL, so this table cannot tell a good selection from a bad one: no row may be "
                   "called better or worse than random on it:")
    verdict += "".join(f"\n- {line}" for line in calibration.gate_lines(gates))
    costs = ["| run | n train | train tokens | steps | train s | eval s |", "|---|---:|---:|---:|---:|---:|"]
    for record in records:
        train = record["train"] or {}
        costs.append(f"| {record['name']} | {record['n_train']} | {record['n_train_tokens']} | {train.get('steps', 0)} "
                     f"| {train.get('seconds', 0)} | {record['eval']['seconds']} |")
    settings = settings_line(params, index, records[0]["eval"] if records else None)
    compute = sum((record["train"] or {}).get("seconds", 0) + record["eval"]["seconds"] for record in records)
    text = (f"# Fine-tune and evaluate\n\n{settings}.\n\n{verdict}\n\n{markdown_table(rows, gaps)}\n## Runs\n\n"
            + "\n".join(costs)
            + f"\n\nTrain + eval time summed over the runs: {compute:.0f} s. This invocation: {index['trained']} "
            f"run(s) trained, {index['from_cache']} from cache, {index['seconds']:.0f} s in all "
            f"({index.get('trunk_seconds', 0):.0f} s of them computing the frozen trunk).\n")
    atomic_write_text(Path(out_dir) / "results.md", text)
    gate_metrics = {f"{gate['gate']}{'_' + gate['budget'] if gate['budget'] else ''}": gate["passed"] for gate in gates}
    write_json(Path(out_dir) / "metrics.json", {**metrics(rows), **({"gates": gate_metrics} if gates else {})})
    for name, metric in PLOTS.items():
        atomic_write_text(Path(out_dir) / "plots" / name, plot_csv(rows, params.methods, metric))  # dvc.yaml's columns
    return {"rows": len(rows), "runs": len(records)}


STAGE = Stage(report, Params, paths=[
    ("runs", "output directory of the runs stage (tasks.finetune.runs)"),
    ("out_dir", "directory for results.md, metrics.json, plots/"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
