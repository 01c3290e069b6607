"""Stage `unconditional`: the response's loss without its question, for the IFD baseline.

    python -m tasks.curate.unconditional --segments outputs/segment/segments.parquet --model outputs/model \
        --out-dir outputs/unconditional

IFD (instruction-following difficulty, Cherry-LLM, Li et al. 2024) = the mean response-token loss
given the question / the mean response-token loss without it; score.method=ifd keeps the highest
first (tasks/curate/baselines.py). Extract already has the numerator (span_loss_sums / span_token_counts);
this stage runs one forward pass over each response alone for the denominator.

"Without the question": the input is built exactly as extract builds it (tasks.curate.spans, the same
chat_template and max_length, read from the `extract` params section so the two cannot drift),
with an empty prompt: under a chat template the response is the assistant turn of a chat with no
user turn (whatever the template adds on its own, e.g. SmolLM2's default system prompt, stays);
without one it follows a newline (and BOS where the tokenizer adds it). The scored tokens are the
same response tokens, in the same spans, as extract's. Losses come from the same ProxyModel
forward pass as extract's, so both sides share numerics.

Outputs: losses.parquet (UNCONDITIONAL_SCHEMA, one row per trace, sorted by id), quarantine.jsonl,
stats.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import pack_batches
from tasks.core.progress import show_progress
from tasks.core.schema import UNCONDITIONAL_SCHEMA
from tasks.core.stage import Stage, StageLedger, atomic_outputs, module_logger, write_parquet
from tasks.curate.extract import Params, read_segment_batches
from tasks.curate.proxy import resolve_device
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans
from tasks.curate import vlm

NO_PROMPT = "[]"  # prompt_messages of a chat with no turn before the response
log = module_logger(__name__)
COLUMNS = ["id", "source_row", "scored_response", "step_starts", "step_ends", "answer_start", "answer_end"]


@atomic_outputs
def unconditional(segments: Path, model: Path, out_dir: Path, params: Params) -> dict:
    """Mean response loss of every segmented trace without its question: losses.parquet, stats.json.

    Streams the segments shard_size rows at a time (each chunk tokenized, length-bucketed into
    batches and run like one of extract's shards), so what is held grows with the output only
    (an id and three numbers per trace), not with the response texts.
    """
    started = time.perf_counter()
    ledger = StageLedger("unconditional")
    if pq.read_metadata(segments).num_rows == 0:  # before the model loads: that takes a while
        ledger.require_kept(segments)
    proxy_model = vlm.proxy_model(Path(model), resolve_device(params.device))  # a VLM's language model too
    max_length = params.max_length or proxy_model.context_length
    ids: list[str] = []
    n_tokens: list[int] = []
    loss_sums: list[float] = []
    rows: list[dict] = []

    def run_chunk() -> None:
        encodings = encode_traces(proxy_model.tokenizer, [
            (NO_PROMPT, row["scored_response"],
             trace_spans(row["step_starts"], row["step_ends"], row["answer_start"], row["answer_end"]))
            for row in rows], chat_template=params.chat_template, max_length=max_length)
        encoded = [(row, e) for row, e in zip(rows, encodings) if isinstance(e, EncodedTrace)]
        for row, encoding in zip(rows, encodings):
            if not isinstance(encoding, EncodedTrace):
                ledger.reject(encoding.reason, encoding.detail, id=row["id"], source_row=row["source_row"],
                              record=row["scored_response"])
        for batch in pack_batches([len(e.input_ids) for _, e in encoded], params.batch_tokens):
            numbers = proxy_model.launch([encoded[b][1] for b in batch], head_variant=False).collect()
            for b, trace_numbers in zip(batch, numbers):
                row, encoding = encoded[b]
                ids.append(row["id"])
                n_tokens.append(int(encoding.span_token_counts.sum()))
                loss_sums.append(float(trace_numbers.span_loss_sums.sum()))
            progress.update(len(batch))
        progress.update(len(rows) - len(encoded))  # the refused traces of the chunk
        ledger.keep(len(encoded))
        rows.clear()

    with show_progress("unconditional", pq.ParquetFile(segments).metadata.num_rows, "trace", log) as progress:
        for record_batch in read_segment_batches(segments, COLUMNS):
            for row in record_batch.to_pylist():
                ledger.count_read()
                rows.append(row)
                if len(rows) == params.shard_size:
                    run_chunk()
        if rows:
            run_chunk()
    ledger.require_kept(segments)
    counts = np.array(n_tokens, dtype=np.int32)
    loss_sum = np.array(loss_sums, dtype=np.float64)
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(counts), pa.array(loss_sum),
         pa.array(loss_sum / np.maximum(counts, 1))], schema=UNCONDITIONAL_SCHEMA).sort_by("id")
    write_parquet(Path(out_dir) / "losses.parquet", table)
    ledger.extra.update(loss_tokens=int(counts.sum()),
                        mean_loss=round(float(loss_sum.sum() / max(counts.sum(), 1)), 6),
                        seconds=round(time.perf_counter() - started, 3))
    ledger.metrics.update(mean_loss=ledger.extra["mean_loss"])  # its seconds stay in stats.json: a run counter
    return ledger.write(Path(out_dir) / "stats.json", Path(out_dir) / "quarantine.jsonl")


# The `extract` section, not one of its own: chat_template and max_length must be extract's.
STAGE = Stage(unconditional, Params, paths=[
    ("segments", "segments.parquet from the segment stage"),
    ("model", "model directory from the model stage"),
    ("out_dir", "directory for losses.parquet, quarantine.jsonl, stats.json"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
