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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import pack_batches
from tasks.core.progress import show_progress
from tasks.core.schema import UNCONDITIONAL_SCHEMA
from tasks.core.stage import Stage, StageLedger, atomic_outputs, module_logger, write_parquet
from tasks.curate.extract import Params, absolute, load_model, segment_reader
from tasks.curate.fanout import map_units, worker_pool
from tasks.curate.proxy import resolve_device
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans

NO_PROMPT = "[]"  # prompt_messages of a chat with no turn before the response
log = module_logger(__name__)


@dataclass
class ChunkLosses:
    """One chunk's results: per kept trace its id, response token count and loss sum; the refused traces."""

    ids: list[str] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    loss_sums: list[float] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)  # StageLedger.reject's arguments


def chunk_losses(bounds: tuple[int, int], segments: Path | pa.Table, model: Path, params: Params,
                 progress=None) -> ChunkLosses:
    """Segments rows [start, stop): tokenized without their prompts, length-bucketed and run like one of
    extract's shards (in process, or on a worker of tasks/curate/fanout.py: the model loads once per process)."""
    rows = segment_reader(segments).rows(*bounds)
    proxy_model = load_model(str(model), resolve_device(params.device))  # a VLM's language model too
    encodings = encode_traces(proxy_model.tokenizer, [
        (NO_PROMPT, row["scored_response"],
         trace_spans(row["step_starts"], row["step_ends"], row["answer_start"], row["answer_end"]))
        for row in rows], chat_template=params.chat_template,
        max_length=params.max_length or proxy_model.context_length)
    result = ChunkLosses()
    encoded = []
    for row, encoding in zip(rows, encodings):
        if isinstance(encoding, EncodedTrace):
            encoded.append((row, encoding))
        else:
            result.refused.append({"reason": encoding.reason, "detail": encoding.detail, "id": row["id"],
                                   "source_row": row["source_row"], "record": row["scored_response"]})
    if progress is not None:
        progress.update(len(rows) - len(encoded))  # the refused traces of the chunk
    for batch in pack_batches([len(e.input_ids) for _, e in encoded], params.batch_tokens):
        numbers = proxy_model.launch([encoded[b][1] for b in batch], head_variant=False).collect()
        for b, trace_numbers in zip(batch, numbers):
            row, encoding = encoded[b]
            result.ids.append(row["id"])
            result.n_tokens.append(int(encoding.span_token_counts.sum()))
            result.loss_sums.append(float(trace_numbers.span_loss_sums.sum()))
        if progress is not None:
            progress.update(len(batch))
    return result


@atomic_outputs
def unconditional(segments: Path, model: Path, out_dir: Path, params: Params) -> dict:
    """Mean response loss of every segmented trace without its question: losses.parquet, stats.json.

    Streams the segments shard_size rows at a time (each chunk tokenized, length-bucketed into
    batches and run like one of extract's shards; chunks over extract.workers processes as extract's
    shards are), so what is held grows with the output only (an id and three numbers per trace),
    not with the response texts.
    """
    started = time.perf_counter()
    ledger = StageLedger("unconditional")
    n_rows = pq.read_metadata(segments).num_rows
    if n_rows == 0:  # before the model loads: that takes a while
        ledger.require_kept(segments)
    chunks = [(start, min(start + params.shard_size, n_rows)) for start in range(0, n_rows, params.shard_size)]
    with show_progress("unconditional", n_rows, "trace", log) as progress, worker_pool(
            "unconditional", params.workers, params.scheduler_address, params.device, len(chunks), n_rows,
            model) as client:
        if client is None:
            results = [chunk_losses(chunk, segments, model, params, progress) for chunk in chunks]
        else:
            results = map_units(client, chunk_losses, chunks, progress, absolute(segments), Path(model).resolve(),
                                replace(params, cache_dir=None))
    for result in results:
        ledger.count_read(len(result.ids) + len(result.refused))
        ledger.keep(len(result.ids))
        for refused in result.refused:
            ledger.reject(refused.pop("reason"), refused.pop("detail"), **refused)
    ledger.require_kept(segments)
    ids = [trace_id for result in results for trace_id in result.ids]
    counts = np.array([n for result in results for n in result.n_tokens], dtype=np.int32)
    loss_sum = np.array([x for result in results for x in result.loss_sums], dtype=np.float64)
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
    # Run the importable tasks.curate.unconditional, not this __main__ copy: what goes to Dask workers (the shard
    # function, its params and specs) is pickled by module name, and a remote worker has no __main__ of ours.
    import importlib

    importlib.import_module("tasks.curate.unconditional").main()
