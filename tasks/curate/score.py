"""Stage `score`: per-step alignment, consistency and step score from each trace's Gram matrix.

    python -m tasks.curate.score --extract outputs/extract --out-dir outputs/score

METHOD.md section 2, with g_1..g_K the step gradients (or proxies) and g_A the answer's:
    alpha_k = cos(g_k, g_A)
    c_k     = cos(g_k, m_{k-1}),  m_{k-1} = sum_{j<k} w_kj g_j   (running sum, or EMA with decay beta)
    s_k     = lambda * alpha_k + (1 - lambda) * c_k
Every inner product comes from the Gram matrix G that extract stores, so no gradient is touched:
<g_k, m_{k-1}> = sum_j w_kj G[k, j] and ||m_{k-1}||^2 = w_k^T G w_k. Traces are batched by step
count K, so each group is a few (n, K+1, K+1) numpy operations.

A vector whose squared norm is below ZERO_NORM_RTOL of its largest possible size (a step or answer
without loss tokens, the empty trajectory before step 1) has no direction: its cosines are defined
0, and stats.json counts such vectors. Cosines are clipped to [-1, 1] against rounding.
Every trace has at least one step (segment quarantines step-less ones); the stage refuses others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.artifacts import read_extract
from tasks.core.schema import STEP_SCORE_SCHEMA
from tasks.core.stage import (ParamsError, Stage, StageInputError, StageLedger, atomic_outputs, params_section,
                              write_parquet)

METHODS = ("grace", "random", "full", "length", "loss", "answer_loss", "ifd", "sample_align")
GRAM_COLUMNS = {"proxy": "proxy_gram", "head": "head_gram", "projected": "projected_gram"}
GRADIENTS = tuple(GRAM_COLUMNS)  # score.gradient choices
EXTRACT_SWITCH = {"head": "extract.head_variant: true", "projected": "extract.projected: true"}
ZERO_NORM_RTOL = 1e-12  # float64 Gram entries carry ~1e-16 relative error; far above it, far below real signal


@params_section("score")
class Params:
    method: str = "grace"  # grace, or a baseline (tasks/curate/baselines.py)
    gradient: str = "proxy"  # proxy (representation-level r_t) | head (exact LM-head inner products)
    # | projected (projected exact gradients of the blocks' linear layers: extract.projected)
    lambda_: float = 0.5  # weight of alignment vs consistency in the step score
    trajectory: str = "sum"  # sum (running sum of past steps) | ema (recent steps weigh more)
    ema_beta: float = 0.9  # EMA decay: higher = longer memory
    first_step: str = "alpha"  # c_1 has no past: alpha (c_1 = alpha_1) | skip (step 1 unscored)

    def check(self) -> None:
        choices = {"method": METHODS, "gradient": GRADIENTS, "trajectory": ("sum", "ema"),
                   "first_step": ("alpha", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ParamsError(f"score.{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ParamsError(f"score.lambda_={self.lambda_}: must lie in [0, 1]")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ParamsError(f"score.ema_beta={self.ema_beta}: must lie in [0, 1) (1 never moves the average)")


def gram_column(gradient: str) -> str:
    return GRAM_COLUMNS[gradient]


def list_rows(table: pa.Table, column: str, rows: np.ndarray, width: int) -> np.ndarray:
    """The list column's values at `rows` as an (n, width) float array, refusing wrong lengths."""
    values = pa.chunked_array(table[column]).take(pa.array(rows)).combine_chunks()
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if (lengths != width).any():
        bad = table["id"].take(pa.array(rows[lengths != width])).to_pylist()[:5]
        raise ValueError(f"extract: {column} of traces {bad} does not hold {width} values as n_steps implies")
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(rows), width)


def grams_by_step_count(table: pa.Table, gradient: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(K, row indices, Grams (n, K+1, K+1)) for each step count K present in the extract table."""
    column = gram_column(gradient)
    if table[column].null_count:  # checked before any Gram is read: one line, not a traceback midway
        raise StageInputError(f"score.gradient: {gradient} needs extract's {column}, missing for "
                              f"{table[column].null_count} of {table.num_rows} traces: run extract with "
                              f"{EXTRACT_SWITCH[gradient]}, or set score.gradient: proxy")
    n_steps = table["n_steps"].to_numpy()
    for k in np.unique(n_steps):
        rows = np.flatnonzero(n_steps == k)
        grams = list_rows(table, column, rows, int((k + 1) ** 2)).reshape(len(rows), k + 1, k + 1)
        if not np.isfinite(grams).all():
            bad = table["id"].take(pa.array(rows[~np.isfinite(grams).all(axis=(1, 2))])).to_pylist()[:5]
            raise ValueError(f"extract: {column} of traces {bad} holds NaN or infinity")
        yield int(k), rows, grams


def cosine(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, floor_a, floor_b):
    """cos from an inner product and squared norms; 0 where either vector is below its zero floor."""
    zero_a, zero_b = sq_a <= floor_a, sq_b <= floor_b
    defined = ~(zero_a | zero_b)
    denominator = np.sqrt(np.where(defined, sq_a * sq_b, 1.0))
    return np.clip(np.where(defined, dot / denominator, 0.0), -1.0, 1.0), zero_a, zero_b


def trajectory_weights(k: int, trajectory: str, beta: float) -> np.ndarray:
    """(K, K) strictly lower-triangular W with m_{k-1} = sum_j W[k, j] g_j (0-based k)."""
    lags = np.arange(k)[:, None] - np.arange(k)[None, :]  # (K, K): k - j
    if trajectory == "sum":
        return (lags > 0).astype(np.float64)
    # m_k = beta m_{k-1} + (1 - beta) g_k with m_0 = 0 unrolls to weights (1 - beta) beta^(k-1-j)
    return np.where(lags > 0, (1.0 - beta) * beta ** np.maximum(lags - 1, 0), 0.0)


def step_signals(grams: np.ndarray, params: Params) -> dict[str, np.ndarray]:
    """alpha, consistency, step_score (n, K) for Grams (n, K+1, K+1); NaN marks a skipped step."""
    k = grams.shape[1] - 1
    steps = grams[:, :k, :k]  # (n, K, K) step-step inner products
    step_sq = np.diagonal(steps, axis1=1, axis2=2)  # (n, K)
    answer_sq = grams[:, k, k]  # (n,)
    scale = np.diagonal(grams, axis1=1, axis2=2).max(axis=1, initial=0.0)  # (n,) largest squared norm
    floor = ZERO_NORM_RTOL * scale  # (n,)
    alpha, zero_step, zero_answer = cosine(grams[:, :k, k], step_sq, answer_sq[:, None], floor[:, None],
                                           floor[:, None])
    weights = trajectory_weights(k, params.trajectory, params.ema_beta)  # (K, K)
    dot_past = np.einsum("kj,nkj->nk", weights, steps)  # (n, K) <g_k, m_{k-1}>
    past_sq = np.einsum("kj,njl,kl->nk", weights, steps, weights)  # (n, K) ||m_{k-1}||^2
    # ||m|| <= sum_j |w_kj| ||g_j||, so the trajectory's floor scales with its weights
    past_floor = floor[:, None] * np.abs(weights).sum(axis=1)[None, :] ** 2  # (n, K)
    consistency, _, zero_past = cosine(dot_past, step_sq, past_sq, floor[:, None], past_floor)
    consistency[:, :1] = alpha[:, :1] if params.first_step == "alpha" else np.nan
    return {
        "alpha": alpha,
        "consistency": consistency,
        "step_score": params.lambda_ * alpha + (1.0 - params.lambda_) * consistency,
        "zero_norm_steps": int(zero_step.sum()),
        "zero_norm_answers": int(zero_answer[:, 0].sum()) if k else 0,
        "zero_norm_trajectories": int(zero_past[:, 1:].sum()),  # m_0 = 0 by definition: not counted
    }


@atomic_outputs
def score(extract: Path, out_dir: Path, params: Params) -> dict:
    """Step scores for every trace in the extract output: step_scores.parquet, stats.json."""
    table = read_extract(Path(extract))
    if (table["n_steps"].to_numpy() < 1).any():
        stepless = pc.filter(table["id"], pc.less(table["n_steps"], 1)).to_pylist()[:5]
        raise StageInputError(f"extract: traces {stepless} have no steps; segment quarantines such traces, "
                         "so this extract output did not come from segment")
    ledger = StageLedger("score")
    ledger.count_read(table.num_rows)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in STEP_SCORE_SCHEMA.names}
    zero_counts = {"zero_norm_steps": 0, "zero_norm_answers": 0, "zero_norm_trajectories": 0}
    for k, rows, grams in grams_by_step_count(table, params.gradient):
        signals = step_signals(grams, params)
        for name in zero_counts:
            zero_counts[name] += signals[name]
        columns["id"].append(np.repeat(table["id"].take(pa.array(rows)).to_numpy(zero_copy_only=False), k))
        columns["step_index"].append(np.tile(np.arange(k, dtype=np.int32), len(rows)))
        for name in ("alpha", "consistency", "step_score"):
            columns[name].append(signals[name].ravel())
        columns["n_tokens"].append(list_rows(table, "span_token_counts", rows, k + 1)[:, :k].ravel())
        ledger.keep(len(rows))
    ledger.require_kept(extract)
    arrays = [pa.array(np.concatenate(columns[f.name]) if columns[f.name] else [], type=f.type,
                       from_pandas=True)  # from_pandas: NaN (a skipped step) becomes null
              for f in STEP_SCORE_SCHEMA]
    steps = pa.Table.from_arrays(arrays, schema=STEP_SCORE_SCHEMA).sort_by([("id", "ascending"),
                                                                             ("step_index", "ascending")])
    write_parquet(Path(out_dir) / "step_scores.parquet", steps)

    def mean(name: str) -> float | None:
        value = pc.mean(steps[name]).as_py()
        return None if value is None else round(value, 6)

    settings = {"lambda_": params.lambda_, "trajectory": params.trajectory, "first_step": params.first_step,
                **({"ema_beta": params.ema_beta} if params.trajectory == "ema" else {})}  # for the report
    ledger.extra.update(gradient=params.gradient, **settings, steps=steps.num_rows,
                        skipped_steps=steps["step_score"].null_count, **zero_counts, mean_alpha=mean("alpha"),
                        mean_consistency=mean("consistency"), mean_step_score=mean("step_score"))
    ledger.metrics.update({name: ledger.extra[name] for name in ("mean_alpha", "mean_consistency", "mean_step_score")})
    return ledger.write_stats(Path(out_dir) / "stats.json")


STAGE = Stage(score, Params, paths=[
    ("extract", "extract output directory (holds shards/)"),
    ("out_dir", "directory for step_scores.parquet and stats.json"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
