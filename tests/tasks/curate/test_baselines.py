"""Baselines: each score equals its definition on hand-made extract rows, and ranks as documented."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import EXTRACT_SCHEMA
from tasks.curate import score as score_stage
from tasks.curate.aggregate import Params, aggregate
from tasks.curate.baselines import MissingArtifactError, baseline_scores, ifd_scores, mean_loss, random_scores
from tests.tasks.extract_tables import extract_row, write_extract

RNG = np.random.default_rng(4)
ROWS = [  # (id, vectors (K+1, d), loss tokens per span, loss sum per span)
    ("short", RNG.normal(size=(2, 6)), [2, 1], [2.0, 0.1]),  # mean loss 2.1/3 = 0.7, answer 0.1
    ("long", RNG.normal(size=(4, 6)), [5, 5, 5, 2], [1.0, 1.0, 1.0, 3.0]),  # 6/17, answer 1.5
    ("mid", RNG.normal(size=(3, 6)), [4, 4, 1], [4.0, 4.0, 0.5]),  # 8.5/9, answer 0.5
]


def table() -> pa.Table:
    rows = [extract_row(i, v, token_counts=n, loss_sums=loss) for i, v, n, loss in ROWS]
    return pa.Table.from_pylist(rows, schema=EXTRACT_SCHEMA)


def scores(method: str, **kwargs) -> dict[str, float]:
    values = baseline_scores(method, table(), seed=kwargs.get("seed", 0), gradient="proxy")
    return dict(zip([r[0] for r in ROWS], values.tolist()))


def ranking(method: str) -> list[str]:
    by_id = scores(method)
    return sorted(by_id, key=lambda i: (-by_id[i], i))


def test_length_keeps_longer_responses_first():
    assert scores("length") == {"short": 3, "long": 17, "mid": 9}
    assert ranking("length") == ["long", "mid", "short"]


def test_loss_keeps_the_highest_mean_token_loss_first():
    assert scores("loss") == pytest.approx({"short": 2.1 / 3, "long": 6 / 17, "mid": 8.5 / 9})
    assert ranking("loss") == ["mid", "short", "long"]


def test_answer_loss_keeps_the_lowest_answer_loss_first():
    assert scores("answer_loss") == pytest.approx({"short": -0.1, "long": -1.5, "mid": -0.5})
    assert ranking("answer_loss") == ["short", "mid", "long"]


def test_mean_loss_refuses_spans_without_tokens():
    rows = [extract_row("empty-answer", np.ones((2, 3)), token_counts=[3, 0], loss_sums=[1.0, 0.0])]
    with pytest.raises(ValueError, match="empty-answer.*answer"):
        mean_loss(pa.Table.from_pylist(rows, schema=EXTRACT_SCHEMA), "answer")


def test_sample_align_is_the_cosine_of_summed_steps_and_answer():
    got = scores("sample_align")
    for id_, vectors, _, _ in ROWS:
        response, answer = vectors[:-1].sum(axis=0), vectors[-1]
        assert got[id_] == pytest.approx(response @ answer / np.linalg.norm(response) / np.linalg.norm(answer))
    cancelling = np.array([[1.0, 2.0], [-1.0, -2.0], [3.0, 1.0]])  # steps sum to zero: no direction
    zero_answer = np.array([[1.0, 2.0], [0.0, 0.0]])
    rows = [extract_row("cancel", cancelling), extract_row("no-answer", zero_answer)]
    assert baseline_scores("sample_align", pa.Table.from_pylist(rows, schema=EXTRACT_SCHEMA), seed=0,
                           gradient="proxy").tolist() == [0.0, 0.0]


def test_random_is_seeded_per_id_and_stable_as_the_corpus_grows():
    ids = [f"id-{i}" for i in range(200)]
    first = random_scores(ids, seed=3)
    assert ((first >= 0) & (first < 1)).all() and len(set(first.tolist())) == 200
    assert random_scores(ids[50:120] + ["new-1", "new-2"], seed=3)[:70].tolist() == first[50:120].tolist()
    assert not np.array_equal(random_scores(ids, seed=4), first)
    assert abs(first.mean() - 0.5) < 0.1  # roughly uniform
    assert scores("random", seed=7) == dict(zip([r[0] for r in ROWS], random_scores([r[0] for r in ROWS], 7)))


def test_full_gives_every_trace_the_same_score_and_says_so(tmp_path):
    assert scores("full") == {"short": 0.0, "long": 0.0, "mid": 0.0}
    extract = write_extract(tmp_path / "extract", table().to_pylist())
    stats = aggregate(tmp_path / "unused.parquet", extract, tmp_path / "out", Params(),
                      score_stage.Params(method="full"))
    assert stats["constant_score"] is True and stats["kept"] == 3
    assert pq.read_table(tmp_path / "out" / "sample_scores.parquet")["id"].to_pylist() == ["long", "mid", "short"]


def test_ifd_without_its_artifact_names_it_and_its_ratio_is_defined():
    with pytest.raises(MissingArtifactError, match="unconditional stage's losses.parquet"):
        baseline_scores("ifd", table(), seed=0, gradient="proxy")
    assert ifd_scores(np.array([1.0, 2.0]), np.array([2.0, 1.0])).tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="not a baseline"):
        baseline_scores("grace", table(), seed=0, gradient="proxy")


def test_baselines_run_through_the_stage_best_first(tmp_path):
    extract = write_extract(tmp_path / "extract", table().to_pylist())
    for method in ("length", "loss", "answer_loss", "sample_align", "random"):
        out = tmp_path / method
        stats = aggregate(tmp_path / "unused.parquet", extract, out, Params(random_seed=1),
                          score_stage.Params(method=method))
        samples = pq.read_table(out / "sample_scores.parquet")
        expected = scores(method, seed=1)
        assert samples["id"].to_pylist() == sorted(expected, key=lambda i: (-expected[i], i))
        assert samples["score"].to_pylist() == pytest.approx(sorted(expected.values(), reverse=True))
        assert set(samples["method"].to_pylist()) == {method} and stats["method"] == method
        assert samples["n_tokens"].to_pylist() == [{"short": 3, "long": 17, "mid": 9}[i] for i in samples["id"].to_pylist()]
