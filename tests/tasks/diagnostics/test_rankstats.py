"""Agreement and detection statistics on hand-made scores and sets."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.diagnostics.rankstats import auroc, bad_step_rank, correlations, jaccard, precision_at, top_ids


def test_auroc_counts_pairs_and_half_ties():
    # positives 0.9, 0.3 vs negatives 0.8, 0.1: 0.9 beats both, 0.3 beats 0.1 only -> 3 of 4 pairs
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2, 0.3], [True, False, False]) == pytest.approx(0.0)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_top_ids_and_precision_follow_select():
    ids = [f"t{i}" for i in range(10)]
    scores = np.arange(10.0)  # t9 best
    assert top_ids(ids, scores, 0.2) == {"t9", "t8"}
    assert top_ids(ids, scores, 0.25) == {"t9", "t8", "t7"}  # 2.5 rounds half up, as select does
    clean = [i % 2 == 1 for i in range(10)]  # t9, t7 clean; t8 not
    assert precision_at(ids, scores, clean, 0.2) == pytest.approx(0.5)
    assert precision_at(ids, scores, clean, 0.25) == pytest.approx(2 / 3)


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard({1}, {1}) == 1.0 and jaccard({1}, {2}) == 0.0
    assert jaccard(set(), set()) is None


def test_bad_step_rank():
    assert bad_step_rank([0.5, -0.2, 0.9], 1) == (0.0, True)
    assert bad_step_rank([0.5, -0.2, 0.9], 2) == (1.0, False)
    assert bad_step_rank([0.1, 0.1, 0.3], 0) == (0.25, True)  # a tie counts half, and still the lowest
    assert bad_step_rank([np.nan, 0.2, 0.4], 1) == (0.0, True)  # an unscored step is left out
    assert bad_step_rank([np.nan, 0.2, 0.4], 0) is None
    assert bad_step_rank([0.3], 0) is None and bad_step_rank([0.3, 0.4], 2) is None


def test_correlations():
    result = correlations([1, 2, 3, 4, np.nan], [2, 4, 6, 8.5, 1.0])
    assert result["n"] == 4 and result["spearman"] == pytest.approx(1.0)
    assert 0.99 < result["pearson"] < 1.0
    assert correlations([1, 1, 1], [1, 2, 3])["spearman"] is None  # a constant side has no correlation
