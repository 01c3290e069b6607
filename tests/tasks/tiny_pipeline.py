"""Real ingest -> segment -> extract outputs for a handful of rows and a tiny model (fidelity, IFD, diagnostics tests)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.curate import extract, ingest, segment


def build_segments(root: Path, rows: list[dict]) -> Path:
    """rows (GSM format) -> root/segment/segments.parquet through the real ingest and segment stages."""
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    ingest.ingest(pool, root / "ingest", ingest.Params())
    segment.segment(root / "ingest" / "traces.parquet", root / "segment", segment.Params())
    return root / "segment" / "segments.parquet"


def build_extract(root: Path, segments: Path, model_dir: Path) -> Path:
    """The real extract stage on CPU, head variant on, no cache: root/extract."""
    extract.extract(segments, model_dir, root / "extract", extract.Params(device="cpu", cache_dir=None,
                                                                          head_variant=True))
    return root / "extract"
