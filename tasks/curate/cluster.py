"""Stage `cluster`: group the traces' problems, so select can keep every kind of problem (issue 12).

    python -m tasks.curate.cluster --extract outputs/extract --out-dir outputs/cluster

A score that ranks problem types rather than traces fills a global top fraction with a few types.
Select's `within_clusters` keeps each cluster's share instead, and every subset reports how many
clusters it covers. The representation is extract's `prompt_embedding`: the scoring model's mean
final hidden state over the question's tokens, a by-product of the forward pass extract already
runs (no extra model pass). It sees the question only, so a clean and a corrupted solution of one
problem fall in the same cluster: clusters are problems, scores are traces.

Preprocessing, and why: the final hidden states of a language model have a few outlier dimensions
whose magnitude swamps Euclidean distance, so each dimension is standardised; PCA then keeps the
directions that vary between questions (`pca_dims`), and rows are L2-normalised so k-means groups
by direction (cosine), the way sentence embeddings are compared. k-means is scikit-learn's
(KMeans with k-means++ seeding and `n_init` restarts, or MiniBatchKMeans past `minibatch_above`
traces, where full Lloyd passes get slow), seeded, on one thread so the labels do not depend on the
machine's core count. Cluster numbers are renumbered by (size descending, smallest member id), so
they do not depend on k-means' internal order.

Outputs: clusters.parquet (CLUSTER_SCHEMA, sorted by id) and stats.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import extract_shards
from tasks.core.schema import CLUSTER_SCHEMA
from tasks.core.stage import ParamsError, Stage, StageLedger, atomic_outputs, params_section, write_parquet


@params_section("cluster")
class Params:
    n_clusters: int | str = "auto"  # auto = round(sqrt(n / 2)), the usual rule of thumb; or a number
    pca_dims: int = 64  # dimensions kept before k-means: more = finer distinctions, slower
    n_init: int = 4  # k-means restarts (KMeans only): more = a better optimum, slower
    minibatch_above: int = 50_000  # MiniBatchKMeans for more traces than this (full k-means gets slow)
    seed: int = 0  # k-means seeding

    def check(self) -> None:
        if self.n_clusters != "auto" and (isinstance(self.n_clusters, bool) or not isinstance(self.n_clusters, int)
                                          or self.n_clusters < 1):
            raise ParamsError(f"cluster.n_clusters: {self.n_clusters!r}; expected auto or a positive integer")
        for name in ("pca_dims", "n_init", "minibatch_above"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"cluster.{name}: {value!r}; expected a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ParamsError(f"cluster.seed: {self.seed!r}; expected an integer")


def cluster_count(params: Params, n: int) -> int:
    """The number of clusters for n traces: the param, or sqrt(n / 2); never more than n."""
    wanted = max(1, round(math.sqrt(n / 2))) if params.n_clusters == "auto" else params.n_clusters
    return min(wanted, n)


def features(embeddings: np.ndarray, pca_dims: int, seed: int) -> np.ndarray:
    """(n, d) prompt embeddings -> (n, p) standardised, PCA-reduced, unit-length rows."""
    from sklearn.decomposition import PCA

    centred = embeddings - embeddings.mean(axis=0)  # (n, d)
    scale = centred.std(axis=0)
    standard = centred / np.where(scale > 0, scale, 1.0)  # (n, d) outlier dimensions tamed
    dims = min(pca_dims, *standard.shape)
    reduced = PCA(n_components=dims, svd_solver="full", random_state=seed).fit_transform(standard) \
        if dims < standard.shape[1] else standard  # (n, p)
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return reduced / np.where(norms > 0, norms, 1.0)


def assign(embeddings: np.ndarray, ids: list[str], params: Params) -> tuple[np.ndarray, dict]:
    """(n,) cluster of each trace (0 = largest cluster) and k-means' own numbers."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    n = len(ids)
    k = cluster_count(params, n)
    if k == 1:
        return np.zeros(n, dtype=np.int32), {"n_clusters": 1, "inertia": None, "algorithm": "none"}
    x = features(embeddings.astype(np.float64), params.pca_dims, params.seed)
    minibatch = n > params.minibatch_above
    with threadpool_limits(limits=1):  # the same labels on a 2-core laptop and a 64-core server
        model = (MiniBatchKMeans(k, random_state=params.seed, n_init=3, batch_size=4096) if minibatch
                 else KMeans(k, random_state=params.seed, n_init=params.n_init))
        raw = model.fit_predict(x)  # (n,)
    # renumber by size descending, then by smallest member id: stable whatever k-means' order
    smallest_id = {}
    for label, id_ in zip(raw.tolist(), ids):
        smallest_id[label] = min(smallest_id.get(label, id_), id_)
    sizes = np.bincount(raw, minlength=k)
    order = sorted(smallest_id, key=lambda label: (-sizes[label], smallest_id[label]))
    renumber = np.empty(k, dtype=np.int32)
    renumber[order] = np.arange(len(order), dtype=np.int32)
    return renumber[raw], {"n_clusters": len(order), "inertia": round(float(model.inertia_), 6),
                           "algorithm": "minibatch_kmeans" if minibatch else "kmeans"}


def read_embeddings(extract_dir: Path) -> tuple[list[str], np.ndarray]:
    """Every extracted trace's id and prompt embedding, sorted by id."""
    parts = extract_shards(extract_dir)  # refused unless extract finished there
    if not parts:
        return [], np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables([pq.read_table(part, columns=["id", "prompt_embedding"]) for part in parts]).sort_by("id")
    ids = table.column("id").to_pylist()
    if not ids:
        return [], np.zeros((0, 0), dtype=np.float32)
    flat = table.column("prompt_embedding").combine_chunks()
    dims = set(pa.compute.list_value_length(flat).unique().to_pylist())
    if len(dims) != 1:
        raise ValueError(f"cluster: {extract_dir} holds prompt embeddings of several sizes {sorted(dims)}")
    embeddings = flat.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), dims.pop())  # (n, d)
    if not np.isfinite(embeddings).all():
        raise ValueError(f"cluster: {extract_dir} holds non-finite prompt embeddings; rerun extract")
    return ids, embeddings


@atomic_outputs
def cluster(extract: Path, out_dir: Path, params: Params) -> dict:
    """Cluster the traces' questions by the scoring model's prompt embedding: clusters.parquet, stats.json."""
    ids, embeddings = read_embeddings(extract)
    ledger = StageLedger("cluster")
    ledger.count_read(len(ids))
    labels, info = assign(embeddings, ids, params) if ids else (np.zeros(0, dtype=np.int32), {"n_clusters": 0})
    ledger.keep(len(ids))
    write_parquet(Path(out_dir) / "clusters.parquet",
                  pa.table({"id": ids, "cluster": labels.astype(np.int32)}, schema=CLUSTER_SCHEMA))
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    ledger.extra.update(info, size_min=int(sizes.min()) if len(sizes) else 0,
                        size_median=float(np.median(sizes)) if len(sizes) else 0.0,
                        size_max=int(sizes.max()) if len(sizes) else 0)
    return ledger.write_stats(Path(out_dir) / "stats.json")  # every extracted trace gets a cluster: no quarantine


def read_clusters(clusters: Path) -> dict[str, int]:
    """id -> cluster, from the cluster stage's clusters.parquet."""
    table = pq.read_table(clusters, schema=CLUSTER_SCHEMA)
    return dict(zip(table.column("id").to_pylist(), table.column("cluster").to_pylist()))


STAGE = Stage(cluster, Params, paths=[
    ("extract", "extract output directory (its prompt_embedding column)"),
    ("out_dir", "where clusters.parquet and stats.json go"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
