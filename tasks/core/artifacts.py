"""What stages read of each other's outputs, and how traces are packed into batches.

read_extract (extract's shards), read_losses (unconditional's losses) and pack_batches (extract,
unconditional, fine-tuning and evaluation) live here rather than in the stage modules that write
or first used them, so a stage that only reads those numbers (score, aggregate, cluster,
diagnostics) or only packs batches does not import the model code of extract (torch,
transformers): its import closure, hence its DVC deps and cache keys (tasks/core/closure.py),
holds only the code that decides its output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.schema import EXTRACT_SCHEMA, UNCONDITIONAL_SCHEMA
from tasks.core.stage import StageInputError


def extract_shards(extract_dir: Path) -> list[Path]:
    """The shard files of a finished extract output, for every reader (score, aggregate, cluster).

    extract's finalize writes stats.json last and a shard write removes it first, so without it the
    shards may be a run's first few, or two runs' mixed; stats.json's shard count must match the files.
    """
    stats_path = Path(extract_dir) / "stats.json"
    if not stats_path.is_file():
        raise StageInputError(f"{extract_dir}: no stats.json, so extract did not finish there; run it again")
    parts = sorted((Path(extract_dir) / "shards").glob("part-*.parquet"))
    try:
        planned = json.loads(stats_path.read_text(encoding="utf-8")).get("shards")
    except (ValueError, AttributeError):
        raise StageInputError(f"{stats_path} is not a stats file; run extract again") from None
    if planned is not None and planned != len(parts):
        raise StageInputError(f"{extract_dir}: stats.json counts {planned} shards but shards/ holds {len(parts)}; "
                              "another run wrote there, run extract again")
    return parts


def read_extract(extract_dir: Path) -> pa.Table:
    """All shards of an extract output as one EXTRACT_SCHEMA table, sorted by id; refused unless finished."""
    parts = extract_shards(extract_dir)
    table = pa.concat_tables([pq.read_table(part, schema=EXTRACT_SCHEMA) for part in parts]) if parts \
        else EXTRACT_SCHEMA.empty_table()
    return table.sort_by("id")


def read_losses(path: Path) -> pa.Table:
    """unconditional's losses.parquet: per trace, the response loss without its question (the IFD baseline)."""
    return pq.read_table(path, schema=UNCONDITIONAL_SCHEMA)


def pack_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first, so memory peaks at once) packed to batch_tokens padded tokens."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])  # a trace longer than batch_tokens runs alone
    return batches
