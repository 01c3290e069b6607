"""Hand-made extract output (EXTRACT_SCHEMA shards) from explicit span vectors, for score/aggregate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.schema import EXTRACT_SCHEMA
from tasks.core.stage import StageLedger


def extract_row(id_: str, vectors: np.ndarray, *, token_counts=None, loss_sums=None, head_vectors=None,
                gram: np.ndarray | None = None, prompt_embedding=None) -> dict:
    """One EXTRACT_SCHEMA row; `vectors` (K+1, d) are the span gradients, steps first, answer last."""
    vectors = np.asarray(vectors, dtype=np.float64)
    spans = vectors.shape[0]
    gram = vectors @ vectors.T if gram is None else np.asarray(gram, dtype=np.float64)  # (K+1, K+1)
    return {
        "id": id_,
        "content_hash": f"hash-{id_}",
        "n_steps": spans - 1,
        "span_token_counts": list(token_counts) if token_counts is not None else [3] * spans,
        "span_loss_sums": list(loss_sums) if loss_sums is not None else [1.5] * spans,
        "proxy_gram": gram.ravel().tolist(),
        "head_gram": None if head_vectors is None else (np.asarray(head_vectors) @ np.asarray(head_vectors).T)
        .ravel().tolist(),
        "prompt_tokens": 12,
        "prompt_tokens_truncated": 0,
        "prompt_embedding": [0.0, 1.0] if prompt_embedding is None else [float(x) for x in prompt_embedding],
    }


def write_extract(extract_dir: Path, rows: list[dict]) -> Path:
    """Write rows as the extract stage does: shards/part-00000.parquet, sorted by id, then stats.json."""
    shards = Path(extract_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(sorted(rows, key=lambda row: row["id"]), schema=EXTRACT_SCHEMA)
    pq.write_table(table, shards / "part-00000.parquet")
    ledger = StageLedger("extract")
    ledger.count_read(len(rows))
    ledger.keep(len(rows))
    ledger.write(Path(extract_dir) / "stats.json", Path(extract_dir) / "quarantine.jsonl")
    return Path(extract_dir)
