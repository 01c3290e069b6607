"""Stage `aggregate`: one score per trace, higher = keep first (GRACE or a baseline).

    python -m tasks.curate.aggregate --step-scores outputs/score/step_scores.parquet \
        --extract outputs/extract --out-dir outputs/aggregate \
        [--unconditional outputs/unconditional/losses.parquet]  # score.method ifd only

score.method=grace turns each trace's step scores s_1..s_K into a sample score by `how`:
    mean        (1/K) sum_k s_k
    min         min_k s_k: a trace is as good as its worst step
    softmin     -tau log((1/K) sum_k exp(-s_k / tau)): min as tau -> 0, mean as tau -> infinity;
                computed as m - tau log mean exp(-(s_k - m) / tau) with m = min_k s_k, so no exponent is
                positive and nothing overflows
    token_mean  sum_k n_k s_k / sum_k n_k with n_k the step's loss tokens (plain mean if all n_k = 0)
Skipped steps (score.first_step=skip) have no step score and are left out. A trace none of whose steps
has a step score (one step, skipped) falls back to the mean of its alphas; stats.json counts these.
Any other score.method is a baseline of tasks/curate/baselines.py, computed from the extract table;
ifd also reads the unconditional stage's losses, which only finetune/dvc.yaml computes (the default
`dvc repro` does not: 27 of a first run's 61 minutes went to it), so it needs --unconditional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.artifacts import read_extract, read_losses
from tasks.core.schema import SAMPLE_SCORE_SCHEMA
from tasks.core.stage import ParamsError, Stage, StageInputError, StageLedger, atomic_outputs, params_section, write_parquet
from tasks.curate import score as score_stage
from tasks.curate.baselines import baseline_scores, span_sums

HOWS = ("mean", "min", "softmin", "token_mean")
NEEDS_UNCONDITIONAL = ("ifd",)  # the score.method values that read the unconditional stage's losses


@params_section("aggregate")
class Params:
    how: str = "mean"  # mean | min | softmin | token_mean
    softmin_tau: float = 0.1  # softmin temperature: small -> min (worst step decides), large -> mean
    random_seed: int = 0  # seed of the random baseline (score.method: random)

    def check(self) -> None:
        if self.how not in HOWS:
            raise ParamsError(f"aggregate.how={self.how!r}: choose one of {list(HOWS)}")
        if not (isinstance(self.softmin_tau, (int, float)) and 0 < self.softmin_tau < float("inf")):
            raise ParamsError(f"aggregate.softmin_tau={self.softmin_tau!r}: must be a positive number")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ParamsError(f"aggregate.random_seed={self.random_seed!r}: must be an integer")


def grace_sample_scores(steps: pa.Table, how: str, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, sample scores, fell back to alpha mean) per trace of a STEP_SCORE_SCHEMA table, ids sorted."""
    steps = steps.sort_by([("id", "ascending"), ("step_index", "ascending")])
    ids = steps["id"].to_numpy(zero_copy_only=False)
    if not len(ids):
        return ids, np.zeros(0), np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first row of each trace
    trace = np.cumsum(np.r_[True, ids[1:] != ids[:-1]]) - 1  # (steps,) trace index of each row
    s = steps["step_score"].to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    scored = ~np.isnan(s)

    def group_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(trace, weights=values, minlength=len(starts))

    count = group_sum(scored.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):  # all-skipped traces fall back below
        lowest = np.minimum.reduceat(np.where(scored, s, np.inf), starts)
        if how == "mean":
            result = group_sum(np.where(scored, s, 0.0)) / count
        elif how == "min":
            result = lowest
        elif how == "softmin":
            shifted = np.where(scored, np.exp(-(s - lowest[trace]) / tau), 0.0)  # each in (0, 1]
            result = lowest - tau * np.log(group_sum(shifted) / count)
        else:  # token_mean
            weights = np.where(scored, steps["n_tokens"].to_numpy().astype(np.float64), 0.0)
            weight_sum = group_sum(weights)
            result = np.where(weight_sum > 0, group_sum(weights * np.nan_to_num(s)) / weight_sum,
                              group_sum(np.where(scored, s, 0.0)) / count)
    fallback = count == 0
    alpha_mean = group_sum(steps["alpha"].to_numpy()) / np.bincount(trace, minlength=len(starts))
    return ids[starts], np.where(fallback, alpha_mean, result), fallback


@atomic_outputs
def aggregate(step_scores: Path, extract: Path, out_dir: Path, params: Params,
              score: score_stage.Params, unconditional: Path | None = None) -> dict:
    """Sample scores for every extracted trace: sample_scores.parquet (best first), stats.json."""
    if score.method in NEEDS_UNCONDITIONAL and (unconditional is None or not Path(unconditional).is_file()):
        given = "no --unconditional" if unconditional is None else f"no file {unconditional}"
        raise StageInputError(
            f"aggregate: score.method {score.method} reads the unconditional stage's losses ({given}); the default "
            "pipeline does not compute them: run `dvc repro finetune/dvc.yaml:unconditional` (first delete its line "
            "in .dvcignore, where a fresh clone keeps it off), then pass "
            "--unconditional outputs/unconditional/losses.parquet (the Prefect flow runs unconditional itself)")
    table = read_extract(Path(extract))  # sorted by id
    ledger = StageLedger("aggregate")
    ledger.count_read(table.num_rows)
    ledger.extra["method"] = score.method
    if score.method == "grace":
        ids, scores, fallback = grace_sample_scores(pq.read_table(step_scores), params.how, params.softmin_tau)
        extract_ids = table["id"].to_numpy(zero_copy_only=False)
        if len(ids) != len(extract_ids) or (ids != extract_ids).any():
            missing = sorted(set(extract_ids) - set(ids))[:5]
            extra = sorted(set(ids) - set(extract_ids))[:5]
            raise ValueError(f"{step_scores} does not match {extract}: no step scores for {missing}, "
                             f"step scores of unknown traces {extra}; rerun the score stage")
        ledger.extra.update(how=params.how, alpha_mean_fallbacks=int(fallback.sum()))
        if params.how == "softmin":
            ledger.extra["softmin_tau"] = params.softmin_tau
    else:
        losses = read_losses(Path(unconditional)) if score.method in NEEDS_UNCONDITIONAL else None
        scores = baseline_scores(score.method, table, seed=params.random_seed, gradient=score.gradient,
                                 unconditional=losses)
        if score.method == "random":
            ledger.extra["random_seed"] = params.random_seed
    if not np.isfinite(scores).all():
        bad = pc.filter(table["id"], pa.array(~np.isfinite(scores))).to_pylist()[:5]
        raise ValueError(f"score.method={score.method}: non-finite sample scores for traces {bad}")
    samples = pa.Table.from_arrays(
        [table["id"], pa.array(scores), pa.array([score.method] * table.num_rows), table["n_steps"],
         pa.array(span_sums(table, "span_token_counts")[0].astype(np.int32))],
        schema=SAMPLE_SCORE_SCHEMA,
    ).sort_by([("score", "descending"), ("id", "ascending")])
    write_parquet(Path(out_dir) / "sample_scores.parquet", samples)
    ledger.keep(samples.num_rows)
    ledger.require_kept(extract)
    ledger.extra.update(
        constant_score=bool(len(scores) and np.all(scores == scores[0])),  # e.g. method full: no ranking
        score_min=float(scores.min()) if len(scores) else None,
        score_mean=round(float(scores.mean()), 6) if len(scores) else None,
        score_max=float(scores.max()) if len(scores) else None,
    )
    ledger.metrics["score_mean"] = ledger.extra["score_mean"]
    return ledger.write_stats(Path(out_dir) / "stats.json")


STAGE = Stage(aggregate, Params, paths=[
    ("step_scores", "step_scores.parquet from the score stage"),
    ("extract", "extract output directory (holds shards/)"),
    ("out_dir", "directory for sample_scores.parquet and stats.json"),
], optional_paths=[
    ("unconditional", "losses.parquet from the unconditional stage (finetune/dvc.yaml): score.method ifd only"),
], extra_sections=[("score", score_stage.Params)])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
