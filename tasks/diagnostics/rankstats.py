"""Agreement and detection statistics shared by the fidelity and diagnostics reports.

Selections use the select stage's own ranking (score descending, ties by sha256(id)) and subset
size (round half up, at least 1), so "top 20%" here is the subset select would write.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from tasks.curate.select import fraction_size, rank_order


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def correlations(x, y) -> dict[str, float | int | None]:
    """Spearman and Pearson correlation over the pairs where both are finite; None where undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    both = np.isfinite(x) & np.isfinite(y)
    x, y = x[both], y[both]
    defined = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0  # a constant side has no correlation
    return {
        "n": int(len(x)),
        "spearman": _finite(stats.spearmanr(x, y).statistic) if defined else None,
        "pearson": _finite(stats.pearsonr(x, y).statistic) if defined else None,
    }


def top_ids(ids: list[str], scores, fraction: float) -> set[str]:
    """The ids select keeps for `fraction` of these traces."""
    order = rank_order(list(ids), [float(s) for s in scores])
    return {ids[i] for i in order[:fraction_size(fraction, len(ids))]}


def jaccard(a: set, b: set) -> float | None:
    """|a & b| / |a | b|; None for two empty sets."""
    union = a | b
    return len(a & b) / len(union) if union else None


def auroc(scores, positive) -> float | None:
    """P(score of a random positive > that of a random negative), ties counting one half.

    Mann-Whitney U from average ranks; None when one class is empty.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(scores)  # (n,) average ranks, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(ids: list[str], scores, positive, fraction: float) -> float:
    """Fraction of positives among the traces select keeps for `fraction`."""
    keep = top_ids(ids, scores, fraction)
    is_positive = dict(zip(ids, np.asarray(positive, dtype=bool).tolist()))
    return sum(is_positive[i] for i in keep) / len(keep)


def bad_step_rank(step_scores, bad_step: int) -> tuple[float, bool] | None:
    """(normalised rank, is lowest) of step `bad_step` among a trace's scored steps.

    Rank 0 = the lowest score, 1 = the highest, ties counting one half: a scorer that finds the bad
    step gives ~0, chance gives 0.5. None where the bad step is unscored or fewer than 2 steps are.
    """
    step_scores = np.asarray(step_scores, dtype=np.float64)
    if not 0 <= bad_step < len(step_scores) or not np.isfinite(step_scores[bad_step]):
        return None
    others = np.delete(step_scores, bad_step)
    others = others[np.isfinite(others)]
    if len(others) == 0:
        return None
    value = step_scores[bad_step]
    below = float((others < value).sum() + 0.5 * (others == value).sum())
    return below / len(others), bool(value <= others.min())
