"""The one record schema of GRACE-curate.

A trace moves through the DAG as one row keyed by `id`; every stage adds columns or writes a
table keyed by `id`, never renames upstream columns. The Arrow schemas below are the contract
between stages: writers cast to them, readers may rely on them, validate checks them.

    ingest   -> traces.parquet      TRACE_COLUMNS
    segment  -> segments.parquet    TRACE_COLUMNS + SPAN_COLUMNS
    extract  -> shards/*.parquet    EXTRACT_SCHEMA   (one row per trace, span order: steps..., answer)
    score    -> step_scores.parquet STEP_SCORE_SCHEMA (one row per step)
    cluster  -> clusters.parquet    CLUSTER_SCHEMA   (one row per extracted trace)
    aggregate-> sample_scores.parquet SAMPLE_SCORE_SCHEMA (one row per trace)
    unconditional -> losses.parquet UNCONDITIONAL_SCHEMA (one row per trace; finetune/dvc.yaml, ifd only)
    select   -> <subset>/ids.txt, <subset>/subset.jsonl, manifest.json, ranking.parquet RANKING_SCHEMA
    export   -> <subset>/data.parquet EXPORT_SCHEMA (and the JSON formats)

Quarantine records, whatever the stage, follow QUARANTINE_SCHEMA (written as JSONL).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

# ---- ingest: one canonical trace -------------------------------------------------------------
TRACE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),  # given id, else "h-" + content hash prefix
    pa.field("source_row", pa.int64(), nullable=False),  # 0-based row in the input, for provenance
    pa.field("content_hash", pa.string(), nullable=False),  # sha256 of prompt_messages + response
    pa.field("question", pa.string(), nullable=False),  # last user turn, for display
    pa.field("prompt_messages", pa.string(), nullable=False),  # JSON [{"role","content"}...] before the response
    pa.field("response", pa.string(), nullable=False),  # the reasoning trace incl. final-answer line
    pa.field("final_answer", pa.string(), nullable=False),  # extracted answer value, e.g. "115"; "" if none
    pa.field("answer_source", pa.string(), nullable=False),  # field | gsm8k | answer_is | boxed | choice | none
    pa.field("raw", pa.string(), nullable=False),  # the input record as JSON, to write subsets in its own format
]
TRACE_SCHEMA = pa.schema(TRACE_FIELDS)

# ---- segment: character spans of the scored response ------------------------------------------
SPAN_FIELDS = [
    # The text the model scores: `response`, or `response` without <<calc>> annotations.
    pa.field("scored_response", pa.string(), nullable=False),
    pa.field("step_starts", pa.list_(pa.int32()), nullable=False),  # char offsets into scored_response
    pa.field("step_ends", pa.list_(pa.int32()), nullable=False),  # exclusive
    pa.field("answer_start", pa.int32(), nullable=False),
    pa.field("answer_end", pa.int32(), nullable=False),
    pa.field("n_steps", pa.int32(), nullable=False),
    # The rule that placed the answer span: marker | field | last_sentence | last_step (segment.answer_fallback).
    # Segment always writes it; nullable so tables built before the column existed still cast.
    pa.field("answer_span_source", pa.string(), nullable=True),
]
SEGMENT_SCHEMA = pa.schema(TRACE_FIELDS + SPAN_FIELDS)

# ---- extract: per-trace gradient-proxy summaries ------------------------------------------------
# Spans are ordered steps 1..K then the answer (index K). Grams are row-major (K+1) x (K+1):
# gram[i*(K+1)+j] = <g~_i, g~_j>. Every cosine METHOD.md needs (alpha, running-sum or EMA
# consistency, whole-response alignment) is a function of this Gram matrix, so score params
# never force a re-extraction.
EXTRACT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("n_steps", pa.int32(), nullable=False),
        pa.field("span_token_counts", pa.list_(pa.int32()), nullable=False),  # (K+1,) loss tokens per span
        pa.field("span_loss_sums", pa.list_(pa.float64()), nullable=False),  # (K+1,) sum of token NLL per span
        pa.field("proxy_gram", pa.list_(pa.float64()), nullable=False),  # ((K+1)^2,) representation proxy r_t
        pa.field("head_gram", pa.list_(pa.float64()), nullable=True),  # ((K+1)^2,) exact LM-head grads, if enabled
        pa.field("prompt_tokens", pa.int32(), nullable=False),  # prompt tokens kept after truncation
        pa.field("prompt_tokens_truncated", pa.int32(), nullable=False),  # prompt tokens cut from the left
        # (d,) mean final hidden state over the question's tokens: what the cluster stage groups problems by
        pa.field("prompt_embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("projected_gram", pa.list_(pa.float64()), nullable=True),  # ((K+1)^2,) projected exact grads, if enabled
    ]
)

# ---- score: one row per step --------------------------------------------------------------------
STEP_SCORE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("step_index", pa.int32(), nullable=False),  # 0-based k
        pa.field("alpha", pa.float64(), nullable=False),  # cos(g_k, g_A)
        pa.field("consistency", pa.float64(), nullable=True),  # cos(g_k, m_{k-1}); null where skipped
        pa.field("step_score", pa.float64(), nullable=True),  # lambda*alpha + (1-lambda)*c; null where skipped
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)

# ---- aggregate: one row per trace ------------------------------------------------------------
SAMPLE_SCORE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # higher = keep first
        pa.field("method", pa.string(), nullable=False),  # score.method that produced it
        pa.field("n_steps", pa.int32(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),  # response loss tokens (steps + answer)
    ]
)

# ---- cluster: one row per extracted trace ----------------------------------------------------
CLUSTER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),  # 0 = the largest cluster
    ]
)

# ---- unconditional: response loss without its question, one row per trace -------------------
UNCONDITIONAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),  # response loss tokens (steps + answer)
        pa.field("loss_sum", pa.float64(), nullable=False),  # sum of their NLL without the question
        pa.field("mean_loss", pa.float64(), nullable=False),  # loss_sum / n_tokens
    ]
)

# ---- select: every scored trace, ranked -------------------------------------------------------
RANKING_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = best
        pa.field("selected_in", pa.list_(pa.string()), nullable=False),  # subset names holding this trace
        pa.field("question", pa.string(), nullable=True),  # question_key of its prompt; null if not in segments
    ]
)

# ---- export: the parquet format of a subset --------------------------------------------------
MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
EXPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt_messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = best, over all scored traces
    ]
)

# ---- quarantine -----------------------------------------------------------------------------
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=True),  # null where no id could be read
        pa.field("source_row", pa.int64(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),  # a short machine-readable code
        pa.field("detail", pa.string(), nullable=False),  # a sentence for humans
        pa.field("record", pa.string(), nullable=True),  # the offending input, as text
    ]
)


@dataclass(slots=True)
class QuarantineRecord:
    """A record a stage refused, with why; written as one JSONL line."""

    stage: str
    reason: str
    detail: str
    id: str | None = None
    source_row: int | None = None
    record: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "stage": self.stage,
                "id": self.id,
                "source_row": self.source_row,
                "reason": self.reason,
                "detail": self.detail,
                "record": self.record,
            },
            ensure_ascii=False,
        )


def content_hash(prompt_messages_json: str, response: str) -> str:
    """Stable sha256 of what the model sees; the key for ids and the extraction cache."""
    digest = hashlib.sha256()
    digest.update(prompt_messages_json.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(response.encode("utf-8"))
    return digest.hexdigest()
