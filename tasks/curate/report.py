"""Stage `report`: one self-contained HTML page of a curation run, plus DVC plot data.

    python -m tasks.curate.report --outputs outputs --out-dir outputs/report

Writes report.html (inline SVG and CSS only: it opens offline and can be mailed as one file),
plots/*.csv (declared under `plots:` in dvc.yaml for `dvc plots show/diff`), stats.json and
quarantine.jsonl (example traces whose spans could not be drawn).
"""

from __future__ import annotations

import io
import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.core.stage import (ParamsError, Stage, StageLedger, atomic_outputs, atomic_write_bytes, atomic_write_text,
                              params_section)
from tasks.curate import images, svgplot
from tasks.curate.runinfo import read_json, run_settings
from tasks.curate.select import per_question_text

STAGE_ORDER = ("ingest", "segment", "model", "extract", "unconditional", "score", "aggregate", "select", "validate",
               "export")
LEDGER_KEYS = ("stage", "read", "kept", "quarantined")


@params_section("report")
class Params:
    n_examples: int = 6  # traces shown per group (kept, rejected): more = a longer page
    seed: int = 0  # which traces are shown and which steps the scatter samples
    bins: int = 40  # histogram bins; also the points of the subset-size-vs-threshold curve
    max_points: int = 3000  # steps drawn in the alpha-vs-consistency scatter: more = a heavier page

    def check(self) -> None:
        for name in ("n_examples", "bins", "max_points"):
            if getattr(self, name) < 1:
                raise ParamsError(f"params.yaml [report]: {name} must be >= 1, got {getattr(self, name)}")


# ---- inputs ----------------------------------------------------------------------------------------
def read_stage_stats(outputs: Path, skip: Path | None = None) -> list[dict[str, Any]]:
    """Every outputs/<stage>/stats.json but skip's (by name: a stage writes into a staging copy), and a row
    for model, select and validate (which write other files), in DAG order (unknown stages last, by name)."""
    found = [p for p in outputs.glob("*/stats.json")
             if not p.parent.name.startswith(".") and (skip is None or p.parent.name != skip.name)]
    stats = [{"stage": p.parent.name, **json.loads(p.read_text(encoding="utf-8"))} for p in found]
    named = {s["stage"] for s in stats}
    model, manifest = read_json(outputs / "model/model_info.json"), read_json(outputs / "select/manifest.json")
    results = read_json(outputs / "validate/results.json")
    if model and "model" not in named:
        stats.append({"stage": "model", **{k: model[k] for k in ("source", "identity", "n_params") if k in model}})
    if manifest and "select" not in named:  # select ranks every scored trace and drops none
        n = manifest.get("n_scored")
        stats.append({"stage": "select", "read": n, "kept": n, "quarantined": 0 if n is not None else None,
                      **{k: manifest[k] for k in ("method", "stratify_by", "n_selected") if k in manifest}})
    if results and "validate" not in named:
        stats.append({"stage": "validate", **{k: results[k] for k in ("success", "n_suites", "n_expectations",
                                                                      "n_failed") if k in results}})
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(stats, key=lambda s: (order.get(s["stage"], len(order)), s["stage"]))


def read_subsets(subsets_dir: Path) -> dict[str, list[str]]:
    return {p.parent.name: p.read_text(encoding="utf-8").splitlines() for p in sorted(subsets_dir.glob("*/ids.txt"))}


def write_csv(path: Path, columns: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    pacsv.write_csv(pa.table(columns), buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ---- traces with coloured steps ----------------------------------------------------------------
def span_problem(row: dict[str, Any]) -> str | None:
    """Why a trace's spans cannot be drawn (out of the text, or overlapping), else None."""
    spans = sorted(list(zip(row["step_starts"], row["step_ends"])) + [(row["answer_start"], row["answer_end"])])
    end_so_far = 0
    for start, end in spans:
        if not 0 <= start <= end <= len(row["scored_response"]):
            return f"span [{start}, {end}) lies outside the {len(row['scored_response'])}-character response"
        if start < end_so_far:
            return f"span [{start}, {end}) overlaps the span ending at {end_so_far}"
        end_so_far = end
    return None


def render_trace(row: dict[str, Any], steps: dict[int, dict[str, Any]], limit: float, meta: str) -> str:
    """The response with each step's background coloured by its step score; the answer underlined."""
    text = row["scored_response"]
    spans = [(s, e, k) for k, (s, e) in enumerate(zip(row["step_starts"], row["step_ends"]))]
    spans.append((row["answer_start"], row["answer_end"], None))
    pieces, cursor = [], 0
    for start, end, k in sorted(spans, key=lambda span: span[0]):
        pieces.append(escape(text[cursor:start]))
        if k is None:
            pieces.append(f'<span class="answer" title="answer">{escape(text[start:end])}</span>')
        else:
            step = steps.get(k, {})
            value = step.get("step_score")
            tip = (f"step {k + 1}: score {_num(value)}, alpha {_num(step.get('alpha'))}, "
                   f"consistency {_num(step.get('consistency'))}")
            pieces.append(f'<span class="n">{k + 1}</span>'
                          f'<span class="step" style="background:{svgplot.diverging_colour(value, limit)}" '
                          f'title="{escape(tip)}">{escape(text[start:end])}</span>')
        cursor = end
    pieces.append(escape(text[cursor:]))
    # The numbers in the page itself: a printed or mailed copy has no hover tooltips.
    numbers = "".join(f"<tr><td>{k + 1}</td><td>{_num(steps.get(k, {}).get('alpha'))}</td>"
                      f"<td>{_num(steps.get(k, {}).get('consistency'))}</td>"
                      f"<td>{_num(steps.get(k, {}).get('step_score'))}</td></tr>" for k in range(len(row["step_starts"])))
    thumbnails = images.thumbnails_html(row["prompt_messages"])  # "" for a text trace
    return (f'<div class="trace"><div class="meta">{meta}</div>{thumbnails}'
            f'<div class="question">{escape(row["question"])}</div>'
            f'<pre>{"".join(pieces)}</pre><table class="steps"><tr><th>step</th><th>alpha</th><th>consistency</th>'
            f'<th>step score</th></tr>{numbers}</table></div>')


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def scored_turn(prompt_messages: str) -> str:
    """Which turn of a multi-turn chat was scored: ingest scores the last assistant turn, the turns before it
    are its context (docs/data.md); "" for a single-turn trace."""
    earlier = sum(m["role"] == "assistant" for m in json.loads(prompt_messages))
    if not earlier:
        return ""
    return (f"turn {earlier + 1} of {earlier + 1} scored; {earlier} earlier turn{'s' * (earlier > 1)} "
            "as context")


# Beside the kept examples: their colours say nothing of correctness, and what was measured of that.
CORRECTNESS_CAVEAT = (
    "The score does not check correctness: it measures how each step's gradient agrees with the answer's and "
    "with the steps before it, so a wrong step (or a wrong answer) can be shown in deep blue. Measured on "
    "labelled corruptions, GRACE's score is at chance on the ones that break the answer (operator flips, a "
    "systematic wrong rule, random wrong results: AUROC 0.45-0.51), and its step score puts the corrupted "
    "step lowest in 32% of traces against 31% by chance (docs/calibration.md); on the gsm_noisy labels its "
    "AUROC clean vs corrupted is 0.515 (0.45-0.62 across GRACE's scorer variants; docs/selection-study.md). "
    "Check answers separately.")


def pick_examples(ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    ids = sorted(ids)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]


# ---- the stage -----------------------------------------------------------------------------------
@atomic_outputs
def report(outputs: Path, out_dir: Path, params: Params) -> dict:
    """Render a curation run (outputs/) into report.html and DVC plot data."""
    rng = np.random.default_rng(params.seed)
    ledger = StageLedger("report")
    sample = pq.read_table(outputs / "aggregate/sample_scores.parquet", columns=["id", "score"])
    steps = pq.read_table(outputs / "score/step_scores.parquet",
                          columns=["id", "step_index", "alpha", "consistency", "step_score"])
    subsets = read_subsets(outputs / "select/subsets")
    score_of = dict(zip(sample.column("id").to_pylist(), sample.column("score").to_pylist()))
    rank_of = {id_: r + 1 for r, id_ in enumerate(sorted(score_of, key=lambda i: (-score_of[i], i)))}
    thresholds = {name: min(score_of[i] for i in ids if i in score_of)
                  for name, ids in subsets.items() if any(i in score_of for i in ids)}
    markers = [(t, f"{name} >= {t:.3g}") for name, t in sorted(thresholds.items(), key=lambda kv: -kv[1])]

    # Plot data, shared by the page and `dvc plots`.
    scores = np.asarray(sample.column("score").to_numpy(zero_copy_only=False), dtype=float)
    counts, edges = np.histogram(scores, bins=params.bins)
    step_values = pc.drop_null(steps.column("step_score")).to_numpy(zero_copy_only=False).astype(float)
    step_counts, step_edges = np.histogram(step_values, bins=params.bins)
    paired = steps.filter(pc.invert(pc.is_null(steps.column("consistency"))))
    chosen = np.sort(rng.choice(paired.num_rows, size=min(params.max_points, paired.num_rows), replace=False))
    alpha = paired.column("alpha").take(chosen).to_numpy(zero_copy_only=False).astype(float)
    consistency = paired.column("consistency").take(chosen).to_numpy(zero_copy_only=False).astype(float)
    grid = np.linspace(edges[0], edges[-1], params.bins + 1)
    n_selected = len(scores) - np.searchsorted(np.sort(scores), grid, side="left")  # scores >= threshold
    plots = out_dir / "plots"
    write_csv(plots / "score_hist.csv", {"score": (edges[:-1] + edges[1:]) / 2, "count": counts})
    write_csv(plots / "step_score_hist.csv", {"step_score": (step_edges[:-1] + step_edges[1:]) / 2,
                                              "count": step_counts})
    write_csv(plots / "alpha_consistency.csv", {"alpha": alpha, "consistency": consistency})
    write_csv(plots / "subset_size.csv", {"threshold": grid, "n_selected": n_selected})

    # Example traces: kept = in some subset, rejected = scored but in none.
    member_sets = {name: set(ids) for name, ids in subsets.items()}
    in_subsets = set().union(*member_sets.values())
    groups = {"kept": [i for i in score_of if i in in_subsets], "rejected": [i for i in score_of if i not in in_subsets]}
    examples = {g: pick_examples(ids, params.n_examples, rng) for g, ids in groups.items()}
    wanted = [id_ for ids in examples.values() for id_ in ids]
    segments = pq.read_table(outputs / "segment/segments.parquet",
                             filters=pc.field("id").isin(wanted) if wanted else None)
    trace_of = {row["id"]: row for row in segments.to_pylist()}
    example_steps = steps.filter(pc.field("id").isin(wanted)).to_pylist() if wanted else []
    steps_of: dict[str, dict[int, dict]] = {}
    for row in example_steps:
        steps_of.setdefault(row["id"], {})[row["step_index"]] = row
    limit = float(np.quantile(np.abs(step_values), 0.99)) if step_values.size else 1.0
    limit = limit if limit > 0 else 1.0
    rendered: dict[str, list[str]] = {}
    for group, ids in examples.items():
        for id_ in sorted(ids, key=lambda i: rank_of[i]):
            ledger.count_read()
            row = trace_of.get(id_)
            problem = "not in segments.parquet" if row is None else span_problem(row)
            if problem:
                ledger.reject("id_not_in_segments" if row is None else "bad_spans", problem, id=id_)
                continue
            member = ", ".join(n for n, members in sorted(member_sets.items()) if id_ in members) or "no subset"
            turn = scored_turn(row["prompt_messages"])
            meta = (f"<b>{escape(id_)}</b> &middot; score {score_of[id_]:.4g} &middot; rank {rank_of[id_]} "
                    f"of {len(rank_of)} &middot; {escape(member)}" + (f" &middot; {escape(turn)}" if turn else ""))
            rendered.setdefault(group, []).append(render_trace(row, steps_of.get(id_, {}), limit, meta))
            ledger.keep()

    charts = [
        svgplot.histogram(counts, edges, markers, "sample score", "Sample scores with selection thresholds"),
        svgplot.histogram(step_counts, step_edges, [], "step score", "Step scores"),
        svgplot.scatter(alpha, consistency, "alpha (alignment with the answer)", "consistency (with the past)",
                        f"alpha vs consistency, {len(alpha)} steps"),
        svgplot.line(grid, n_selected, "score threshold", "traces with score >= threshold",
                     "Subset size vs threshold", markers),
    ]
    first_step = read_json(outputs / "score/stats.json").get("first_step", "alpha")
    header = {"settings": run_settings(outputs), "model": read_json(outputs / "model/model_info.json"),
              "validation": read_json(outputs / "validate/results.json"), "first_step": first_step}
    manifest = json.loads((outputs / "select/manifest.json").read_text(encoding="utf-8"))
    per_question = {name: entry.get("responses_per_question") for name, entry in manifest["subsets"].items()}
    html = page(read_stage_stats(outputs, skip=out_dir), subsets, thresholds, len(score_of), charts,
                svgplot.colour_legend(limit, "step score"), rendered, header, per_question)
    atomic_write_text(out_dir / "report.html", html)
    ledger.extra.update({"examples_kept": len(rendered.get("kept", [])),
                         "examples_rejected": len(rendered.get("rejected", [])), "scatter_points": len(alpha)})
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


# ---- the page ------------------------------------------------------------------------------------
CSS = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td.text{text-align:left}.trace{border:1px solid #ddd;margin:1em 0;padding:.5em}
.meta{font-size:12px;color:#555}.question{margin:.4em 0;font-style:italic}td.text{overflow-wrap:anywhere}
pre{white-space:pre-wrap;font-size:13px;line-height:1.6}.answer{text-decoration:underline 2px;font-weight:bold}
.n{font-size:10px;color:#555;vertical-align:super;margin:0 2px}.caption{font-size:13px;color:#444}
.failed{color:#b2182b;font-weight:bold}.passed{color:#1b7837;font-weight:bold}
.warning{border:2px solid #b2182b;padding:0 1em;margin:1em 0}
.caveat{font-size:13px;border-left:4px solid #b2182b;padding:.2em .8em;background:#fdf3f3}"""


def stage_rows(stats: list[dict[str, Any]]) -> str:
    rows = []
    for s in stats:
        reasons = ", ".join(f"{k.removeprefix('quarantined_')}: {v}" for k, v in s.items()
                            if k.startswith("quarantined_"))
        other = "; ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in s.items()
                          if k not in LEDGER_KEYS and k != "warnings" and not k.startswith("quarantined_"))
        cells = [escape(s["stage"])] + [escape(str(s.get(k, "-"))) for k in LEDGER_KEYS[1:]]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) +
                    f'<td class="text">{escape(reasons) or "-"}</td><td class="text">{escape(other)}</td></tr>')
    return ("<table><tr><th>stage</th><th>read</th><th>kept</th><th>quarantined</th><th>by reason</th>"
            "<th>other</th></tr>" + "".join(rows) + "</table>")


def warnings_html(stats: list[dict[str, Any]]) -> str:
    """The stages' warnings (stats.json `warnings`), first on the page: what makes the scores mean less."""
    items = "".join(f"<li>{escape(s['stage'])}: {escape(w)}</li>" for s in stats for w in s.get("warnings", []))
    return f'<div class="warning"><h2>Warnings</h2><ul>{items}</ul></div>' if items else ""


def header_html(header: dict[str, Any]) -> str:
    """Settings that shaped the selection, the scoring model and the validation status."""
    settings = "".join(f'<tr><td>{escape(name)}</td><td class="text">{escape(value)}</td></tr>'
                       for name, value in header["settings"])
    model = header["model"]
    n_params = model.get("n_params")
    model_text = (f"{escape(str(model.get('source')))} &middot; identity <code>{escape(str(model.get('identity')))}</code>"
                  + (f" &middot; {n_params:,} parameters" if isinstance(n_params, int) else "") if model else "not recorded")
    results = header["validation"]
    if not results:
        validation = "not recorded"
    elif results.get("success"):
        validation = (f'<span class="passed">passed</span>: {results.get("n_expectations")} expectations in '
                      f'{results.get("n_suites")} suites (details: validate/results.json)')
    else:
        failures = "".join(f"<li>{escape(name)}: {escape(str(f.get('expectation')))} [{escape(str(f.get('column')))}] "
                           f"observed {escape(str(f.get('observed')))}</li>"
                           for name, suite in results.get("suites", {}).items() for f in suite.get("failed", []))
        validation = (f'<span class="failed">FAILED</span>: {results.get("n_failed")} of '
                      f'{results.get("n_expectations")} expectations<ul>{failures}</ul>')
    return (f"<h2>Run</h2><p>Scoring model: {model_text}</p><p>Validation: {validation}</p>"
            f"<table><tr><th>setting</th><th>value</th></tr>{settings}</table>")


def page(stats: list[dict[str, Any]], subsets: dict[str, list[str]], thresholds: dict[str, float], n_scored: int,
         charts: list[str], legend: str, rendered: dict[str, list[str]], header: dict[str, Any],
         per_question: dict[str, dict[str, int] | None] | None = None) -> str:
    per_question = per_question or {}
    subset_rows = "".join(f"<tr><td>{escape(n)}</td><td>{len(ids)}</td><td>{_num(thresholds.get(n))}</td>"
                          f'<td class="text">{per_question_text(per_question.get(n))}</td></tr>'
                          for n, ids in sorted(subsets.items(), key=lambda kv: len(kv[1])))
    caveat = f'<p class="caveat">{escape(CORRECTNESS_CAVEAT)}</p>'
    traces = "".join(f"<h3>{group.capitalize()} ({len(items)})</h3>" + (caveat if group == "kept" else "")
                     + "".join(items) for group, items in rendered.items())
    diagonal = ("The dense diagonal (consistency = alpha) is the first steps: a first step has no earlier step "
                "to agree with, so its consistency is its alpha (score.first_step: alpha)."
                if header["first_step"] == "alpha" else "First steps have no consistency (score.first_step: skip) "
                "and are not drawn.")
    captions = ["", "", diagonal, ""]
    figures = "".join(f'<div>{chart}<p class="caption">{caption}</p></div>' if caption else f"<div>{chart}</div>"
                      for chart, caption in zip(charts, captions))
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>GRACE curation report</title>
<style>{CSS}</style></head><body><h1>GRACE curation report</h1>
<p>{n_scored} traces scored.</p>
{warnings_html(stats)}{header_html(header)}
<h2>Subsets</h2><table><tr><th>subset</th><th>size</th><th>lowest kept score</th>
<th>responses per question (responses x questions)</th></tr>{subset_rows}</table>
<h2>Per-stage counts</h2>{stage_rows(stats)}
<h2>Distributions</h2>{figures}
<h2>Example traces</h2><p>Steps coloured by step score and numbered; the table under each trace gives every
step's alpha (alignment with the answer), consistency (with the steps before it) and step score. The answer is
underlined. Kept traces are in at least one subset, rejected ones in none. A multi-turn chat is scored on its
last assistant turn, with the turns before it as context; its line above says which turn.</p>{legend}{traces}
</body></html>
"""


STAGE = Stage(report, Params, paths=[
    ("outputs", "the pipeline's outputs/ tree"),
    ("out_dir", "where report.html and plots/ go"),
])


def main(argv: list[str] | None = None):
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
