"""Stage `fidelity` (diagnostics pipeline): is the proxy right? Proxy, head and projected Grams against exact gradients.

    dvc repro diagnostics/dvc.yaml:fidelity
    python -m tasks.diagnostics.fidelity --segments outputs/segment/segments.parquet --extract-dir outputs/extract \
        --model outputs/model --out-dir outputs/fidelity

On a seeded sample of `n_traces` extracted traces with at least one step, exact mode
(tasks/diagnostics/exact.py) computes the true per-span gradient Gram for each target; the score and aggregate
stages' own functions (tasks/diagnostics/scorers.py) turn proxy, head and exact Grams alike into alpha,
consistency, step and sample scores. Per exact target, for the proxy, the head variant and, where
extract ran with extract.projected, the projected source (each scorer whose Gram the extract holds):
  - Spearman and Pearson correlation with exact, pooled over the sampled steps, of alpha, of
    consistency (steps k >= 2 only: c_1 = alpha_1 by default would count alpha twice) and of the
    step score; and over the sampled traces, of the sample score;
  - Jaccard of the top `select_fraction` subsets among the sampled traces (select's ranking rule).
Traces are re-encoded with tasks.curate.spans under extract's settings and each must give extract's span
token counts: exact mode scores the very tokens and spans the proxy scored.

Outputs: fidelity.json (DVC metrics), stats.json (each target's seconds and ms per token), fidelity.md,
steps.parquet (every sampled step's signals).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.artifacts import read_extract
from tasks.core.progress import show_progress
from tasks.core.stage import (ParamsError, Stage, atomic_write_text, module_logger, params_section, write_json,
                              write_parquet)
from tasks.curate import aggregate as aggregate_stage
from tasks.curate import extract as extract_stage
from tasks.curate import score as score_stage
from tasks.curate.proxy import resolve_device
from tasks.curate.select import fraction_subset_name
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans
from tasks.diagnostics.exact import TARGETS, ExactModel, ExactSpec
from tasks.diagnostics.rankstats import correlations, jaccard, top_ids
from tasks.diagnostics.scorers import sample_scores, step_table, with_gram

SIGNALS = ("alpha", "consistency", "step_score")
CANDIDATES = {"proxy": "proxy_gram", "head": "head_gram", "projected": "projected_gram"}  # scorer -> extract column
TIMINGS = ("seconds", "ms_per_token")  # per target: run counters, in stats.json, not in the metrics file
log = module_logger(__name__)


@params_section("fidelity")
class Params:
    n_traces: int = 150  # traces checked: exact mode costs one backward pass per span
    seed: int = 0  # which traces are sampled
    targets: tuple[str, ...] = ("head", "last_blocks", "lora")  # exact-mode parameters (tasks.diagnostics.exact.TARGETS):
    # head | last_blocks | lora | full; full (every parameter) costs a full backward per span
    last_n_blocks: int = 2  # last_blocks: decoder blocks from the top (+ final norm)
    lora_r: int = 8  # lora: adapter rank
    lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora: adapted projections
    select_fraction: float = 0.2  # top subset whose agreement (Jaccard) is reported
    device: str = "cpu"  # exact mode: cpu | auto | cuda | cuda:N (fp32 everywhere)

    def check(self) -> None:
        if self.n_traces < 3:
            raise ParamsError(f"fidelity.n_traces={self.n_traces}: at least 3 traces make a correlation")
        if not self.targets or set(self.targets) - set(TARGETS):
            raise ParamsError(f"fidelity.targets={list(self.targets)}: choose from {list(TARGETS)}")
        if self.last_n_blocks < 1 or self.lora_r < 1:
            raise ParamsError("fidelity.last_n_blocks and fidelity.lora_r must be at least 1")
        if not 0 < self.select_fraction <= 1:
            raise ParamsError(f"fidelity.select_fraction={self.select_fraction}: must lie in (0, 1]")


def sample_table(table: pa.Table, n: int, seed: int) -> pa.Table:
    """n traces with steps, drawn without replacement by a seeded generator, in id order."""
    candidates = np.flatnonzero(table["n_steps"].to_numpy() > 0)
    rows = np.random.default_rng(seed).choice(candidates, size=min(n, len(candidates)), replace=False)
    return table.take(pa.array(np.sort(rows)))


def encode_like_extract(sampled: pa.Table, segments: Path, tokenizer, extract: extract_stage.Params,
                        context_length: int) -> list[EncodedTrace]:
    """The sampled traces as extract encoded them; refuses any whose span token counts differ from extract's."""
    wanted = pq.read_table(segments, columns=["id", "prompt_messages", "scored_response", "step_starts",
                                              "step_ends", "answer_start", "answer_end"])
    by_id = {row["id"]: row for row in wanted.filter(pc.is_in(wanted["id"], sampled["id"])).to_pylist()}
    rows = [by_id[i] for i in sampled["id"].to_pylist()]
    encoded = encode_traces(tokenizer, [(r["prompt_messages"], r["scored_response"], trace_spans(
        r["step_starts"], r["step_ends"], r["answer_start"], r["answer_end"])) for r in rows],
        chat_template=extract.chat_template, max_length=extract.max_length or context_length)
    for row, enc, counts in zip(rows, encoded, sampled["span_token_counts"].to_pylist()):
        if not isinstance(enc, EncodedTrace) or enc.span_token_counts.tolist() != counts:
            raise ValueError(f"fidelity: trace {row['id']} does not encode to extract's span token counts "
                             f"{counts}; were extract's outputs made with other extract settings or model?")
    return encoded


def run_target(model: Path, spec: ExactSpec, device: str, sampled: pa.Table, segments: Path,
               extract: extract_stage.Params) -> tuple[list[np.ndarray], dict]:
    """Exact Grams of every sampled trace for one target, with timing and a loss cross-check."""
    exact = ExactModel(model, spec, device)
    encoded = encode_like_extract(sampled, segments, exact.tokenizer, extract,
                                  exact.model.config.max_position_embeddings)
    started, grams, loss_gap = time.perf_counter(), [], 0.0
    # one backward per span and trace: minutes per target on a CPU (tasks/core/progress.py)
    with show_progress(f"fidelity {spec.target}", len(encoded), "trace", log) as progress:
        for trace, extract_losses in zip(encoded, sampled["span_loss_sums"].to_pylist()):
            numbers = exact.grams(trace)
            grams.append(numbers.gram)
            loss_gap = max(loss_gap, float(np.max(np.abs(numbers.span_loss_sums - extract_losses)
                                                  / np.maximum(np.abs(extract_losses), 1e-6))))
            progress.update(1)
    seconds = time.perf_counter() - started
    tokens = sum(len(t.input_ids) for t in encoded)
    return grams, {"n_parameters": exact.n_parameters, "seconds": round(seconds, 2),
                   "ms_per_token": round(1000 * seconds / tokens, 3),
                   "max_span_loss_rel_diff_vs_extract": loss_gap}


def compare(candidate: dict, exact: dict, fraction: float) -> dict:
    """Agreement of one scorer's signals with exact mode's on the same steps and traces."""
    steps_c, steps_e = candidate["steps"], exact["steps"]
    later = steps_e["step_index"].to_numpy() > 0
    result = {name: correlations(steps_c[name].to_numpy(zero_copy_only=False),
                                 steps_e[name].to_numpy(zero_copy_only=False)) for name in ("alpha", "step_score")}
    result["consistency"] = correlations(steps_c["consistency"].to_numpy(zero_copy_only=False)[later],
                                         steps_e["consistency"].to_numpy(zero_copy_only=False)[later])
    result["sample_score"] = correlations(candidate["samples"], exact["samples"])
    ids = candidate["ids"]
    result[f"jaccard_{fraction_subset_name(fraction)}"] = jaccard(top_ids(ids, candidate["samples"], fraction),
                                                                  top_ids(ids, exact["samples"], fraction))
    return result


def fidelity(segments: Path, extract_dir: Path, model: Path, out_dir: Path, params: Params,
             extract: extract_stage.Params, score: score_stage.Params, aggregate: aggregate_stage.Params) -> dict:
    """Proxy and head scores against exact-gradient scores on a sample: fidelity.json, fidelity.md, steps.parquet."""
    sampled = sample_table(read_extract(Path(extract_dir)), params.n_traces, params.seed)
    grace = dataclasses.replace(score, method="grace", gradient="proxy")  # every Gram goes in the proxy column

    def scored(table: pa.Table) -> dict:
        return {"steps": step_table(table, grace), "samples": sample_scores(table, grace, aggregate),
                "ids": table["id"].to_pylist()}

    scorers = {"proxy": scored(sampled)}
    for name, column in list(CANDIDATES.items())[1:]:
        if sampled[column].null_count == 0:
            scorers[name] = scored(with_gram(sampled, [np.asarray(g) for g in sampled[column].to_pylist()]))
    report = {"n_traces": sampled.num_rows, "n_steps": int(pc.sum(sampled["n_steps"]).as_py()),
              "seed": params.seed, "select_fraction": params.select_fraction, "targets": {}}
    device = resolve_device(params.device)
    for target in params.targets:
        spec = ExactSpec(target, params.last_n_blocks, params.lora_r, tuple(params.lora_modules), params.seed)
        grams, timing = run_target(Path(model), spec, device, sampled, Path(segments), extract)
        scorers[f"exact_{target}"] = scored(with_gram(sampled, grams))
        report["targets"][target] = {**timing, **{name: compare(scorers[name], scorers[f"exact_{target}"],
                                                                params.select_fraction)
                                                  for name in CANDIDATES if name in scorers}}
    steps = scorers["proxy"]["steps"].select(["id", "step_index", "n_tokens"])
    for name, result in scorers.items():
        for signal in SIGNALS:
            steps = steps.append_column(f"{signal}_{name}", result["steps"][signal])
    write_parquet(Path(out_dir) / "steps.parquet", steps)
    # The DVC metrics file holds the comparisons; each target's timing (a run counter, different on every
    # machine) goes to stats.json, so `dvc metrics diff` across machines shows only real changes.
    write_json(Path(out_dir) / "fidelity.json", {**report, "targets": {
        target: {key: value for key, value in result.items() if key not in TIMINGS}
        for target, result in report["targets"].items()}})
    write_json(Path(out_dir) / "stats.json", {"targets": {
        target: {key: result[key] for key in TIMINGS} for target, result in report["targets"].items()}})
    atomic_write_text(Path(out_dir) / "fidelity.md", markdown(report))
    return report


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    jaccard_key = f"jaccard_{fraction_subset_name(report['select_fraction'])}"
    lines = [f"# Proxy fidelity: {report['n_traces']} traces, {report['n_steps']} steps (seed {report['seed']})", "",
             "Spearman / Pearson correlation with exact-gradient scores; consistency over steps k >= 2; "
             f"Jaccard of the top {report['select_fraction']:g} subsets among the sampled traces.", "",
             "| exact target | scorer | alpha | consistency | step score | sample score | Jaccard |",
             "|---|---|---|---|---|---|---|"]
    for target, result in report["targets"].items():
        for name in CANDIDATES:
            if name in result:
                r = result[name]
                cells = [f"{_cell(r[s]['spearman'])} / {_cell(r[s]['pearson'])}"
                         for s in ("alpha", "consistency", "step_score", "sample_score")]
                lines.append(f"| {target} | {name} | {' | '.join(cells)} | {_cell(r[jaccard_key])} |")
    lines += ["", "| exact target | parameters | seconds | ms per token | max span-loss gap vs extract |",
              "|---|---|---|---|---|"]
    lines += [f"| {t} | {r['n_parameters']:,} | {r['seconds']} | {r['ms_per_token']} | "
              f"{r['max_span_loss_rel_diff_vs_extract']:.1e} |" for t, r in report["targets"].items()]
    return "\n".join(lines) + "\n"


STAGE = Stage(fidelity, Params, paths=[
    ("segments", "segments.parquet from the segment stage"),
    ("extract_dir", "extract output directory (holds shards/)"),
    ("model", "model directory from the model stage"),
    ("out_dir", "directory for fidelity.json, stats.json, fidelity.md and steps.parquet"),
], extra_sections=[
    ("extract", extract_stage.Params),
    ("score", score_stage.Params),
    ("aggregate", aggregate_stage.Params),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
