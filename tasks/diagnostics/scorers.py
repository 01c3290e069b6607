"""Every scorer's step and sample scores in process, from an extract table, with the stages' own functions.

The fidelity and diagnostics reports compare scorers (GRACE on the proxy, on the head Gram, on
exact gradients, and each baseline) on the same traces. They call what the score and aggregate
stages call (tasks.curate.score.step_signals, tasks.curate.aggregate.grace_sample_scores,
tasks.curate.baselines.baseline_scores) instead of re-implementing it, so a report measures the
pipeline's own numbers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.core.schema import STEP_SCORE_SCHEMA
from tasks.curate import aggregate as aggregate_stage
from tasks.curate import score as score_stage
from tasks.curate.baselines import baseline_scores


def step_table(table: pa.Table, score: score_stage.Params) -> pa.Table:
    """STEP_SCORE_SCHEMA rows (what the score stage writes) for an EXTRACT_SCHEMA table, sorted by id, step."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in STEP_SCORE_SCHEMA.names}
    for k, rows, grams in score_stage.grams_by_step_count(table, score.gradient):
        if k == 0:
            continue  # no step to score
        signals = score_stage.step_signals(grams, score)
        columns["id"].append(np.repeat(table["id"].take(pa.array(rows)).to_numpy(zero_copy_only=False), k))
        columns["step_index"].append(np.tile(np.arange(k, dtype=np.int32), len(rows)))
        for name in ("alpha", "consistency", "step_score"):
            columns[name].append(signals[name].ravel())
        columns["n_tokens"].append(score_stage.list_rows(table, "span_token_counts", rows, k + 1)[:, :k].ravel())
    arrays = [pa.array(np.concatenate(columns[f.name]) if columns[f.name] else [], type=f.type, from_pandas=True)
              for f in STEP_SCORE_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=STEP_SCORE_SCHEMA).sort_by([("id", "ascending"),
                                                                          ("step_index", "ascending")])


def sample_scores(table: pa.Table, score: score_stage.Params, aggregate: aggregate_stage.Params,
                  unconditional: pa.Table | None = None) -> np.ndarray:
    """(n,) sample scores of score.method for the rows of `table`, in its row order; NaN = no score."""
    if score.method != "grace":
        return baseline_scores(score.method, table, seed=aggregate.random_seed, gradient=score.gradient,
                               unconditional=unconditional)
    ids, scores, _ = aggregate_stage.grace_sample_scores(step_table(table, score), aggregate.how,
                                                          aggregate.softmin_tau)
    by_id = dict(zip(ids.tolist(), scores.tolist()))
    return np.array([by_id.get(i, np.nan) for i in table["id"].to_pylist()], dtype=np.float64)


def with_gram(table: pa.Table, grams: list[np.ndarray]) -> pa.Table:
    """`table` with proxy_gram replaced by other (K+1, K+1) Grams, one per row: score them with gradient=proxy."""
    field = table.schema.field("proxy_gram")
    column = pa.array([np.asarray(g, dtype=np.float64).ravel() for g in grams], type=field.type)
    return table.set_column(table.schema.get_field_index("proxy_gram"), field, column)
