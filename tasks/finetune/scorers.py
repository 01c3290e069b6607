"""Stage `scorers` of the fine-tune table: the extra extractions its variants score with (issue 12).

    python -m tasks.finetune.scorers --segments outputs/segment/segments.parquet --model outputs/model \
        --warmup outputs/finetune/warmup --out-dir outputs/finetune/scorers

Each entry of finetune_eval.scorers is one extract run, by extract's own code and per-trace cache
(so an interrupted stage resumes), with the curation's extract params except what the entry sets:
  model      base (the curation's scoring model) | warmup (the warmup stage's warmed model)
  projected  true = also the projected exact-gradient Grams (score.gradient: projected)
  pool       null = every trace | N = a seeded random N traces only. The projected source costs
             several forward passes' worth per trace; on a small machine it can only score part of
             the pool. Its subsets are then the best of those N at the table's budgets (the same
             number of traces as every other row), which the table says.
Outputs: <name>/extract/ (an extract output) and, for a pooled entry, <name>/segments.parquet.
The curation's own extract (outputs/extract) is the implicit scorer `base`.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.progress import show_progress
from tasks.core.stage import Stage, module_logger, write_json, write_parquet
from tasks.curate import extract as extract_stage
from tasks.finetune.subsets import Params

log = module_logger(__name__)


def pooled_segments(segments: Path, n: int, seed: int, out: Path) -> Path:
    """A seeded random `n` rows of the segments (by sorted id, so input order does not matter), in segments order."""
    table = pq.read_table(segments)
    ids = sorted(table.column("id").to_pylist())
    chosen = set(random.Random(f"scorer-pool-{seed}").sample(ids, min(n, len(ids))))
    write_parquet(out, table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(chosen), pa.string()))))
    return out


def build_scorers(segments: Path, model: Path, warmup: Path, out_dir: Path, params: Params,
                  extract: extract_stage.Params) -> dict:
    """Run extract once per finetune_eval.scorers entry; scorers/<name>/extract, index.json."""
    summary = {}
    # each extract logs its own traces' progress; this counts the scorers, and says which one runs
    with show_progress("scorers", len(params.scorers), "scorer", log) as progress:
        for name, spec in sorted(params.scorers.items()):
            work = Path(out_dir) / name
            source = segments
            if spec.get("pool") is not None:
                source = pooled_segments(segments, spec["pool"], params.seed, work / "segments.parquet")
            model_dir = Path(model) if spec.get("model", "base") == "base" else Path(warmup) / "model"
            settings = dataclasses.replace(extract, projected=bool(spec.get("projected", False)))
            log.info("scorers: %s (model %s, projected %s, pool %s)", name, spec.get("model", "base"),
                     settings.projected, spec.get("pool"))
            stats = extract_stage.extract(source, model_dir, work / "extract", settings)
            summary[name] = {**spec, "kept": stats["kept"], "read": stats["read"],
                             "model_seconds": stats.get("model_seconds")}
            progress.update(1)
    write_json(Path(out_dir) / "index.json", summary)
    return summary


STAGE = Stage(build_scorers, Params, paths=[
    ("segments", "segments.parquet (segment stage)"),
    ("model", "the base model (model stage)"),
    ("warmup", "the warmup stage's output directory (its model/)"),
    ("out_dir", "directory for one extract output per scorer"),
], extra_sections=[("extract", extract_stage.Params)])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
