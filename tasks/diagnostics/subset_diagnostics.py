"""Stage `subset_diagnostics` (diagnostics pipeline): what each fine-tune subset actually holds.

    dvc repro diagnostics/dvc.yaml:subset_diagnostics
    python -m tasks.diagnostics.subset_diagnostics --subsets outputs/finetune/subsets --labels data/gsm_noisy/labels.jsonl \
        --out-dir outputs/diagnostics/subsets

The fine-tune table says how well each subset trains; this says why, from the labels the curation
and fine-tune pipelines never read. Per row of the table (method or variant, fraction):
  - precision: the fraction of its traces that are clean;
  - problem clusters covered (the cluster stage's, recorded by the subsets stage) and, where the
    labels carry one (`group_field`, the sample's GSM-Symbolic template), problem groups covered;
    the largest groups' share, which says whether a few problem types fill the subset;
and per method or variant, how its sample score separates clean from corrupted traces (AUROC,
clean = positive) over the traces it scored, and the share of the score's variance that lies
between problem groups (eta squared: 1 = the score only ranks problem types, 0 = only traces).

Outputs: subsets.json (DVC metrics) and subsets.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.core.stage import ParamsError, Stage, atomic_write_text, params_section, write_json
from tasks.diagnostics.diagnostics import read_labels
from tasks.diagnostics.rankstats import auroc


@params_section("subset_diagnostics")
class Params:
    group_field: str | None = "template"  # a label field naming each trace's problem group; null = none
    top_groups: int = 5  # the largest groups whose share of a subset is reported

    def check(self) -> None:
        if self.group_field is not None and (not isinstance(self.group_field, str) or not self.group_field):
            raise ParamsError(f"subset_diagnostics.group_field: {self.group_field!r}; expected a field name or null")
        if isinstance(self.top_groups, bool) or not isinstance(self.top_groups, int) or self.top_groups < 1:
            raise ParamsError(f"subset_diagnostics.top_groups: {self.top_groups!r}; expected a positive integer")


def between_group_share(scores: np.ndarray, groups: list) -> float | None:
    """eta^2: the share of the scores' variance explained by the group means."""
    total = float(((scores - scores.mean()) ** 2).sum())
    if total == 0 or len(set(groups)) < 2:
        return None
    by_group: dict = {}
    for score, group in zip(scores.tolist(), groups):
        by_group.setdefault(group, []).append(score)
    between = sum(len(values) * (np.mean(values) - scores.mean()) ** 2 for values in by_group.values())
    return float(between / total)


def diagnose(subsets: Path, labels: Path, out_dir: Path, params: Params) -> dict:
    """Precision, cluster and group coverage per subset; AUROC and between-group variance per scorer."""
    label_of = read_labels(labels)
    runs = json.loads((Path(subsets) / "index.json").read_text(encoding="utf-8"))["runs"]
    rows, scorers = [], {}
    for run in runs:
        if run["ids"] is None:
            continue
        ids = (Path(subsets) / run["ids"]).read_text(encoding="utf-8").split()
        unlabelled = [i for i in ids if i not in label_of]
        if unlabelled:
            raise ValueError(f"subset_diagnostics: {len(unlabelled)} ids of {run['name']} have no label "
                             f"(e.g. {unlabelled[:3]}); are these the labels of this pool?")
        groups = Counter(label_of[i].get(params.group_field) for i in ids) if params.group_field else Counter()
        rows.append({"run": run["name"], "method": run["method"], "seed": run["seed"], "fraction": run["fraction"],
                     "n": len(ids), "precision": sum(not label_of[i]["corrupted"] for i in ids) / len(ids),
                     "clusters": run.get("n_clusters_covered"), "groups": len(groups) if groups else None,
                     "top_groups_share": (sum(n for _, n in groups.most_common(params.top_groups)) / len(ids)
                                          if groups else None)})
        label = run["ids"].split("/", 1)[0]  # the run's work directory: <label>/select/subsets/...
        scores_path = Path(subsets) / label / "aggregate" / "sample_scores.parquet"
        if run["method"] not in ("full", "random") and run["method"] not in scorers and scores_path.is_file():
            table = pq.read_table(scores_path, columns=["id", "score"]).to_pydict()
            scored = [(i, s) for i, s in zip(table["id"], table["score"]) if i in label_of]
            values = np.array([s for _, s in scored])
            clean = np.array([not label_of[i]["corrupted"] for i, _ in scored])
            scorers[run["method"]] = {
                "n_scored": len(scored), "auroc": auroc(values, clean),
                "between_group_share": between_group_share(values, [label_of[i].get(params.group_field)
                                                                    for i, _ in scored])
                if params.group_field else None}
    result = {"subsets": rows, "scorers": scorers}
    write_json(Path(out_dir) / "subsets.json", result)
    atomic_write_text(Path(out_dir) / "subsets.md", markdown(rows, scorers, params))
    return {"subsets": len(rows), "scorers": len(scorers)}


def _cell(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], scorers: dict, params: Params) -> str:
    lines = ["# What each fine-tune subset holds (labels: diagnostics only)", "",
             "| scorer | traces scored | AUROC clean vs corrupted | score variance between problem groups |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['n_scored']} | {_cell(s['auroc'])} | {_cell(s['between_group_share'])} |"
              for name, s in scorers.items()]
    lines += ["", f"| run | traces | precision (clean) | clusters covered | {params.group_field or 'groups'} covered "
              f"| share of the {params.top_groups} largest |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['n']} | {_cell(r['precision'])} | {_cell(r['clusters'])} | {_cell(r['groups'])} "
              f"| {_cell(r['top_groups_share'])} |" for r in rows]
    return "\n".join(lines) + "\n"


STAGE = Stage(diagnose, Params, paths=[
    ("subsets", "the fine-tune pipeline's subsets directory (its index.json)"),
    ("labels", "labels.jsonl: id, corrupted and the group field per trace"),
    ("out_dir", "where subsets.json and subsets.md go"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
