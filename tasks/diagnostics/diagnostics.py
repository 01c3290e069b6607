"""Stage `diagnostics` (diagnostics pipeline): how well does each scorer find the corrupted traces?

    dvc repro diagnostics/dvc.yaml:diagnostics
    python -m tasks.diagnostics.diagnostics --extract-dir outputs/extract --unconditional outputs/unconditional/losses.parquet \
        --labels data/gsm_noisy/labels.jsonl --out-dir outputs/diagnostics

Reads labels ({"id", "corrupted", "corruption", "bad_step", "n_steps"} per line), which the curation
pipeline never does. Every scorer's scores come in process from the same extract (and unconditional)
artifacts through the stages' own functions (tasks/diagnostics/scorers.py), under the score and aggregate params:
  grace_proxy, grace_head                GRACE on the proxy / head Gram (score.lambda_ etc. as set)
  grace_proxy_alpha, ..._consistency     GRACE on the proxy with lambda_ 1 (alignment only) / 0 (consistency only)
  each of `baselines`                    as score.method would compute it (sample_align on the proxy)
Per scorer, with clean = positive and a higher score = cleaner:
  - AUROC of clean vs corrupted, overall and per corruption type (clean vs that type only);
  - precision (fraction clean) of the top fractions, as select would cut them;
  - for step-level scorers: where the labelled bad step ranks among its trace's step scores
    (0 = lowest, 1 = highest, chance 0.5) and how often it is the lowest, per corruption type.
    wrong_final_answer labels the answer (bad_step = n_steps), which has no step score: it is left
    out of the ranks and reported on its own line (its AUROC); so are traces whose labelled step
    count differs from the segmentation's.

Outputs: diagnostics.json (DVC metrics), diagnostics.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.core.artifacts import read_extract, read_losses
from tasks.core.stage import ParamsError, Stage, atomic_write_text, params_section, write_json
from tasks.curate import aggregate as aggregate_stage
from tasks.curate import score as score_stage
from tasks.curate.baselines import BASELINES
from tasks.curate.select import fraction_subset_name
from tasks.diagnostics.rankstats import auroc, bad_step_rank, precision_at
from tasks.diagnostics.scorers import sample_scores, step_table

ANSWER_CORRUPTION = "wrong_final_answer"  # bad_step = n_steps: the answer span, not a step
GRACE_VARIANTS = {"grace_proxy": {"gradient": "proxy"}, "grace_head": {"gradient": "head"},
                  "grace_projected": {"gradient": "projected"},
                  "grace_proxy_alpha": {"gradient": "proxy", "lambda_": 1.0},
                  "grace_proxy_consistency": {"gradient": "proxy", "lambda_": 0.0}}


@params_section("diagnostics")
class Params:
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2)  # top fractions whose precision is reported
    baselines: tuple[str, ...] = ("random", "full", "length", "loss", "answer_loss", "ifd", "sample_align")

    def check(self) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ParamsError(f"diagnostics.fractions={list(self.fractions)}: numbers in (0, 1], at least one")
        if set(self.baselines) - set(BASELINES):
            raise ParamsError(f"diagnostics.baselines={list(self.baselines)}: choose from {list(BASELINES)}")


def read_labels(path: Path) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return {row["id"]: row for row in map(json.loads, filter(str.strip, handle))}


def detection(scores: np.ndarray, ids: list[str], labels: list[dict], fractions) -> dict:
    """AUROC (overall, per corruption type) and precision of the top fractions; clean = positive."""
    clean = np.array([not label["corrupted"] for label in labels])
    kinds = np.array([label["corruption"] or "clean" for label in labels])
    result = {"auroc": auroc(scores, clean)}
    # recall per corruption type: flag as many traces as there are corrupted ones, the lowest scored; the share of
    # each type flagged (a random score flags the corrupted share of every type)
    flagged = np.zeros(len(scores), dtype=bool)
    tiebreak = np.random.default_rng(0).permutation(len(scores))  # tied scores flagged at random, not by row order
    flagged[np.lexsort((tiebreak, scores))[: int((~clean).sum())]] = True
    result.update({f"precision_{fraction_subset_name(f)}": precision_at(ids, scores, clean, f) for f in fractions})
    for kind in sorted(set(kinds) - {"clean"}):
        keep = clean | (kinds == kind)
        result[f"auroc_{kind}"] = auroc(scores[keep], clean[keep])
        result[f"recall_{kind}"] = float(flagged[kinds == kind].mean())
    return result


def step_loss_table(table: pa.Table) -> pa.Table:
    """id, step_score = minus the step's mean token loss, per step of every trace (the answer span left out)."""
    ids, scores = [], []
    for id_, k, counts, sums in zip(table["id"].to_pylist(), table["n_steps"].to_pylist(),
                                    table["span_token_counts"].to_pylist(), table["span_loss_sums"].to_pylist()):
        ids += [id_] * k
        scores += [-s / c if c else np.nan for s, c in zip(sums[:k], counts[:k])]
    return pa.table({"id": ids, "step_score": pa.array(scores, pa.float64(), from_pandas=True)})


def bad_step_ranks(steps: pa.Table, labels: dict[str, dict], n_steps: dict[str, int]) -> dict:
    """Rank of each labelled bad step among its trace's step scores, pooled and per corruption type."""
    by_trace: dict[str, list[float]] = {}
    for id_, value in zip(steps["id"].to_pylist(), steps["step_score"].to_pylist()):
        by_trace.setdefault(id_, []).append(np.nan if value is None else value)
    ranks: dict[str, list[tuple[float, bool]]] = {}
    skipped = {"answer_span": 0, "n_steps_mismatch": 0, "unrankable": 0}
    for id_, label in labels.items():
        if not label["corrupted"]:
            continue
        if label["corruption"] == ANSWER_CORRUPTION:
            skipped["answer_span"] += 1
        elif label["n_steps"] != n_steps[id_]:
            skipped["n_steps_mismatch"] += 1
        elif (rank := bad_step_rank(by_trace.get(id_, []), label["bad_step"])) is None:
            skipped["unrankable"] += 1  # fewer than two scored steps
        else:
            ranks.setdefault(label["corruption"], []).append(rank)

    def summary(pairs: list[tuple[float, bool]]) -> dict:
        return {"n": len(pairs), "mean_normalised_rank": float(np.mean([r for r, _ in pairs])) if pairs else None,
                "fraction_lowest": float(np.mean([low for _, low in pairs])) if pairs else None}

    return {**summary([pair for pairs in ranks.values() for pair in pairs]),
            **{f"skipped_{reason}": n for reason, n in skipped.items()},
            "by_corruption": {kind: summary(pairs) for kind, pairs in sorted(ranks.items())}}


def diagnostics(extract_dir: Path, unconditional: Path, labels: Path, out_dir: Path, params: Params,
                score: score_stage.Params, aggregate: aggregate_stage.Params) -> dict:
    """Detection of labelled corruptions by every scorer: diagnostics.json, diagnostics.md."""
    table = read_extract(Path(extract_dir))
    all_labels = read_labels(Path(labels))
    unlabelled = [i for i in table["id"].to_pylist() if i not in all_labels]
    if unlabelled:
        raise ValueError(f"{labels}: no label for traces {unlabelled[:5]} ({len(unlabelled)} in all)")
    ids = table["id"].to_pylist()
    trace_labels = [all_labels[i] for i in ids]
    losses = read_losses(Path(unconditional)) if "ifd" in params.baselines else None
    n_steps = dict(zip(ids, table["n_steps"].to_pylist()))
    report = {"n_traces": len(ids), "n_clean": sum(not label["corrupted"] for label in trace_labels),
              "labels_not_scored": len(all_labels) - len(ids), "scorers": {}}
    present = {"proxy": True, "head": table["head_gram"].null_count == 0,  # a Gram the extract computed
               "projected": "projected_gram" in table.column_names and table["projected_gram"].null_count == 0}
    scorers = {name: dataclasses.replace(score, method="grace", **change) for name, change in GRACE_VARIANTS.items()
               if present[change["gradient"]]}
    scorers.update({name: dataclasses.replace(score, method=name, gradient="proxy") for name in params.baselines})
    for name, scorer in scorers.items():
        scores = sample_scores(table, scorer, aggregate, losses)
        scored = np.isfinite(scores)  # GRACE gives no score to a trace without steps
        kept = np.flatnonzero(scored)
        result = {"n_scored": int(scored.sum()),
                  **detection(scores[kept], [ids[i] for i in kept], [trace_labels[i] for i in kept], params.fractions)}
        if scorer.method == "grace":
            result["bad_step"] = bad_step_ranks(step_table(table, scorer), dict(zip(ids, trace_labels)), n_steps)
        report["scorers"][name] = result
    # the plainest step signal beside GRACE's: a step whose tokens the model finds unlikely (high loss) is suspect
    report["step_loss"] = {"bad_step": bad_step_ranks(step_loss_table(table), dict(zip(ids, trace_labels)), n_steps)}
    write_json(Path(out_dir) / "diagnostics.json", report)
    atomic_write_text(Path(out_dir) / "diagnostics.md", markdown(report, params.fractions))
    return report


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict, fractions) -> str:
    kinds = sorted({key[6:] for r in report["scorers"].values() for key in r if key.startswith("auroc_")})
    tops = [f"precision_{fraction_subset_name(f)}" for f in fractions]
    lines = [f"# Diagnostics: {report['n_traces']} traces, {report['n_clean']} clean "
             f"({report['n_clean'] / max(report['n_traces'], 1):.1%}, the precision of a random subset)", "",
             "AUROC: clean vs corrupted, higher score = cleaner (0.5 = chance). Precision: fraction clean in the top subset.", "",
             "| scorer | AUROC | " + " | ".join(t[10:] for t in tops) + " | " + " | ".join(kinds) + " |",
             "|---" * (2 + len(tops) + len(kinds)) + "|"]
    for name, r in report["scorers"].items():
        cells = [_cell(r["auroc"])] + [_cell(r[t]) for t in tops] + [_cell(r.get(f"auroc_{k}")) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Recall per corruption type: the lowest-scored {report['n_traces'] - report['n_clean']} traces (as many "
              "as are corrupted) flagged; the share of each type flagged (a random score flags "
              f"{(report['n_traces'] - report['n_clean']) / max(report['n_traces'], 1):.3f} of each).", "",
              "| scorer | " + " | ".join(kinds) + " |", "|---" * (1 + len(kinds)) + "|"]
    for name, r in report["scorers"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(f"recall_{k}")) for k in kinds) + " |")
    lines += ["", "Bad-step rank among the trace's step scores (0 = lowest, chance 0.5); "
              f"{ANSWER_CORRUPTION} labels the answer, not a step, and is left out (its AUROC is above).", "",
              "| scorer | corruption | n | mean normalised rank | fraction lowest |", "|---|---|---|---|---|"]
    for name, r in [*report["scorers"].items(), ("step loss (minus the step's mean token loss)",
                                                 report.get("step_loss", {}))]:
        if "bad_step" in r:
            b = r["bad_step"]
            for kind, s in [("all steps", b), *b["by_corruption"].items()]:
                lines.append(f"| {name} | {kind} | {s['n']} | {_cell(s['mean_normalised_rank'])} | "
                             f"{_cell(s['fraction_lowest'])} |")
    return "\n".join(lines) + "\n"


STAGE = Stage(diagnostics, Params, paths=[
    ("extract_dir", "extract output directory (holds shards/)"),
    ("unconditional", "losses.parquet from the unconditional stage (the ifd baseline)"),
    ("labels", "labels.jsonl: corrupted, corruption, bad_step, n_steps per id"),
    ("out_dir", "directory for diagnostics.json and diagnostics.md"),
], extra_sections=[("score", score_stage.Params), ("aggregate", aggregate_stage.Params)])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
