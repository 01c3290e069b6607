"""cluster: k-means on extract's prompt embeddings, and select's within-cluster shares and coverage."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate.cluster import Params, cluster, cluster_count, main
from tasks.curate.select import Params as SelectParams
from tasks.curate.select import select
from tests.tasks.curate.test_select import make_records, write_sample_scores, write_segments
from tests.tasks.extract_tables import extract_row, write_extract

SIZES = (24, 10, 6)  # three problem types of unequal size


def planted_embeddings(seed: int = 0, d: int = 48) -> tuple[list[str], np.ndarray, list[int]]:
    """Three well-separated groups, plus one huge outlier dimension shared by all (as LM hidden states have)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(SIZES), d)) * 3.0
    ids, rows, truth = [], [], []
    for group, size in enumerate(SIZES):
        for _ in range(size):
            row = centres[group] + rng.normal(size=d) * 0.5
            row[0] = 500.0 + rng.normal() * 40.0  # outlier dimension: noise that swamps raw Euclidean distance
            rows.append(row)
            truth.append(group)
            ids.append(f"t{len(ids):03d}")
    return ids, np.array(rows, dtype=np.float32), truth


def write_planted(tmp_path, seed: int = 0):
    ids, embeddings, truth = planted_embeddings(seed)
    rows = [extract_row(i, np.eye(2), prompt_embedding=e) for i, e in zip(ids, embeddings)]
    return write_extract(tmp_path / "extract", rows), ids, truth


def test_planted_groups_are_recovered_and_numbered_by_size(tmp_path):
    extract, ids, truth = write_planted(tmp_path)
    stats = cluster(extract, tmp_path / "cluster", Params(n_clusters=3))
    table = pq.read_table(tmp_path / "cluster" / "clusters.parquet").to_pydict()
    assert table["id"] == sorted(ids)
    labels = dict(zip(table["id"], table["cluster"]))
    # each planted group is one cluster, and cluster 0 is the largest
    pairs = {(truth[ids.index(i)], labels[i]) for i in ids}
    assert pairs == {(0, 0), (1, 1), (2, 2)}
    assert (stats["read"], stats["kept"], stats["n_clusters"]) == (40, 40, 3)
    assert (stats["size_min"], stats["size_max"]) == (6, 24)


def test_labels_are_deterministic_and_follow_the_seed_only(tmp_path):
    extract, _, _ = write_planted(tmp_path)
    first = cluster(extract, tmp_path / "a", Params(n_clusters=5, seed=3))
    again = cluster(extract, tmp_path / "b", Params(n_clusters=5, seed=3))
    assert (tmp_path / "a" / "clusters.parquet").read_bytes() == (tmp_path / "b" / "clusters.parquet").read_bytes()
    assert {**first, "seconds": None} == {**again, "seconds": None}  # seconds: a run counter, in milliseconds


def test_auto_count_is_sqrt_half_n_and_never_above_n():
    assert cluster_count(Params(), 1770) == 30
    assert cluster_count(Params(), 1) == 1
    assert cluster_count(Params(n_clusters=50), 7) == 7


def test_bad_params_name_the_setting():
    for values, setting in (({"n_clusters": 0}, "cluster.n_clusters"), ({"n_clusters": "many"}, "cluster.n_clusters"),
                            ({"pca_dims": 0}, "cluster.pca_dims"), ({"seed": "x"}, "cluster.seed")):
        with pytest.raises(ParamsError, match=setting):
            params_from_dict(Params, "cluster", values)


def test_empty_extract_gives_empty_clusters(tmp_path):
    extract = write_extract(tmp_path / "extract", [])
    stats = cluster(extract, tmp_path / "cluster", Params())
    assert (stats["read"], stats["kept"], stats["n_clusters"]) == (0, 0, 0)
    assert pq.read_table(tmp_path / "cluster" / "clusters.parquet").num_rows == 0


def test_cli_writes_clusters(tmp_path):
    extract, _, _ = write_planted(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("cluster:\n  n_clusters: 3\n", encoding="utf-8")
    stats = main(["--params", str(params), "--extract", str(extract), "--out-dir", str(tmp_path / "out")])
    assert stats["n_clusters"] == 3


@pytest.fixture
def clustered(tmp_path):
    """40 traces in three planted problem clusters; the score favours the largest cluster throughout."""
    extract, ids, truth = write_planted(tmp_path)
    cluster(extract, tmp_path / "cluster", Params(n_clusters=3))
    records = make_records(len(ids))
    scores = [1.0 - 0.01 * i if truth[i] == 0 else 0.1 - 0.001 * i for i in range(len(ids))]
    return {"ids": ids, "truth": truth, "clusters": tmp_path / "cluster" / "clusters.parquet",
            "segments": write_segments(tmp_path / "segments.parquet", records),
            "scores": write_sample_scores(tmp_path / "scores.parquet", ids, scores, [10] * len(ids))}


def test_global_selection_collapses_and_within_clusters_keeps_every_cluster(clustered, tmp_path):
    fractions = (0.25, 0.5)
    plain = select(clustered["scores"], clustered["segments"], tmp_path / "plain", SelectParams(fractions=fractions),
                   clusters=clustered["clusters"])
    shared = select(clustered["scores"], clustered["segments"], tmp_path / "shared",
                    SelectParams(fractions=fractions, within_clusters=True), clusters=clustered["clusters"])
    assert plain["n_clusters"] == shared["n_clusters"] == 3
    assert plain["subsets"]["top25pct"]["n_clusters_covered"] == 1  # the score's favourite only
    assert shared["subsets"]["top25pct"]["n_clusters_covered"] == 3
    for name, size in (("top25pct", 10), ("top50pct", 20)):
        chosen = (tmp_path / "shared" / "subsets" / name / "ids.txt").read_text(encoding="utf-8").split()
        assert len(chosen) == size == plain["subsets"][name]["n_selected"]
        per_cluster = Counter(clustered["truth"][clustered["ids"].index(i)] for i in chosen)
        quota = {g: size * n / len(clustered["ids"]) for g, n in enumerate(SIZES)}
        assert all(abs(per_cluster[g] - quota[g]) < 1 for g in quota)  # largest-remainder shares
        # inside a cluster the best-scored traces are kept
        for group in quota:
            members = [i for i, g in zip(clustered["ids"], clustered["truth"]) if g == group]
            assert [i for i in chosen if i in members] == members[:per_cluster[group]]


def test_within_clusters_without_clusters_or_with_unclustered_ids_is_refused(clustered, tmp_path):
    with pytest.raises(ValueError, match="within_clusters needs"):
        select(clustered["scores"], clustered["segments"], tmp_path / "x", SelectParams(within_clusters=True))
    other = write_sample_scores(tmp_path / "other.parquet", clustered["ids"] + ["stranger"], [0.5] * 41, [10] * 41)
    with pytest.raises(ValueError, match="have no cluster"):
        select(other, clustered["segments"], tmp_path / "y", SelectParams(), clusters=clustered["clusters"])


def test_cluster_refuses_an_extract_output_that_did_not_finish(tmp_path):
    """Only a finished extract (stats.json, its shard count matching the files) is read (issue 22)."""
    from tasks.core.stage import StageInputError

    extract = write_extract(tmp_path / "extract", [extract_row(f"t{i}", np.eye(3)[:2] + i) for i in range(4)])
    stats = json.loads((extract / "stats.json").read_text())
    (extract / "stats.json").write_text(json.dumps(stats | {"shards": 2}))  # a second run's shard is missing
    with pytest.raises(StageInputError, match="stats.json counts 2 shards but shards/ holds 1"):
        cluster(extract, tmp_path / "cluster", Params(n_clusters=2))
    (extract / "stats.json").unlink()  # a run still writing (or killed): no stats.json yet
    with pytest.raises(StageInputError, match="no stats.json, so extract did not finish"):
        cluster(extract, tmp_path / "cluster", Params(n_clusters=2))
    assert not (tmp_path / "cluster").exists()
