"""Baseline sample scores (METHOD.md section 5), run through the same select/validate path as GRACE.

Each baseline is a pure function of the extract table (one row per trace; span order steps..., answer)
returning one float per row, higher = keep first:
    random       uniform in [0, 1) from sha256(seed, id): a trace's score does not depend on the others,
                 so adding traces to the corpus never reshuffles the ones already there
    full         0 for every trace. The full-data baseline trains on the whole corpus; its scores only
                 exist so the pipeline runs end to end (select then orders by its id tie-break alone,
                 and stats.json says `constant_score: true`)
    length       response loss tokens (steps + answer): longer first
    loss         mean token loss (NLL) over the response, highest first: the "hard = informative"
                 reading of perplexity filtering (the opposite reading, lowest first = cleanest, is
                 `-loss`; we keep the informative one because GRACE also rewards training signal)
    answer_loss  mean token loss of the answer span, LOWEST first (score = -loss): a trace after which
                 the model finds its own final answer likely is one whose reasoning supports that
                 answer; a high answer loss flags a reasoning/answer mismatch, the typical corruption
    sample_align cos(g_steps, g_A) with g_steps = sum of the step gradients: GRACE's alignment at the
                 sample level, without steps or trajectory
    ifd          mean response loss with the question / without it (Cherry-LLM's instruction-following
                 difficulty), HIGHEST first: the question helps little, so the sample is hard. The
                 denominator is the unconditional stage's losses.parquet (tasks/curate/unconditional.py)
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.curate.score import ZERO_NORM_RTOL, cosine, grams_by_step_count

BASELINES = ("random", "full", "length", "loss", "answer_loss", "sample_align", "ifd")


class MissingArtifactError(RuntimeError):
    """A baseline that needs an artifact the pipeline has not produced."""


def span_sums(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(response total, answer value) per row of a (K+1,)-list column; the answer is the last span."""
    values = pa.chunked_array(table[column]).combine_chunks()
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(rows, weights=flat, minlength=len(lengths)), flat[np.cumsum(lengths) - 1]


def mean_loss(table: pa.Table, span: str) -> np.ndarray:
    """Mean token NLL over the whole response (span="response") or the answer span (span="answer")."""
    loss_total, loss_answer = span_sums(table, "span_loss_sums")
    tokens_total, tokens_answer = span_sums(table, "span_token_counts")
    loss, tokens = (loss_total, tokens_total) if span == "response" else (loss_answer, tokens_answer)
    if (tokens <= 0).any():
        bad = pc.filter(table["id"], pa.array(tokens <= 0)).to_pylist()[:5]
        raise ValueError(f"extract: traces {bad} have no {span} loss tokens, so no mean loss")
    return loss / tokens


def random_scores(ids: Sequence[str], seed: int) -> np.ndarray:
    """Uniform [0, 1) per id from sha256(seed, id): stable whatever else is in the corpus."""
    prefix = f"{seed}\x00".encode("utf-8")
    return np.array([int.from_bytes(hashlib.sha256(prefix + i.encode("utf-8")).digest()[:8], "big")
                     for i in ids], dtype=np.float64) / 2.0**64


def sample_align_scores(table: pa.Table, gradient: str) -> np.ndarray:
    """cos(sum_k g_k, g_A) per trace from its Gram: <sum g_k, g_A> = sum_k G[k, A], ||sum g_k||^2 = sum G[:K, :K]."""
    scores = np.zeros(table.num_rows)
    for k, rows, grams in grams_by_step_count(table, gradient):
        answer_sq = grams[:, k, k]  # (n,)
        floor = ZERO_NORM_RTOL * np.diagonal(grams, axis1=1, axis2=2).max(axis=1)  # (n,)
        response_sq = grams[:, :k, :k].sum(axis=(1, 2))  # (n,) ||sum_k g_k||^2
        dot = grams[:, :k, k].sum(axis=1)  # (n,)
        scores[rows] = cosine(dot, response_sq, answer_sq, floor * k**2, floor)[0]
    return scores


def ifd_scores(conditional_loss: np.ndarray, unconditional_loss: np.ndarray) -> np.ndarray:
    """IFD = mean response loss with the question / without it: high = the question helps little."""
    return conditional_loss / unconditional_loss


def baseline_scores(method: str, table: pa.Table, *, seed: int, gradient: str,
                    unconditional: pa.Table | None = None) -> np.ndarray:
    """The scores of baseline `method` for every row of the extract table, higher = keep first."""
    if method == "random":
        return random_scores(table["id"].to_pylist(), seed)
    if method == "full":
        return np.zeros(table.num_rows)
    if method == "length":
        return span_sums(table, "span_token_counts")[0]
    if method == "loss":
        return mean_loss(table, "response")
    if method == "answer_loss":
        return -mean_loss(table, "answer")
    if method == "sample_align":
        return sample_align_scores(table, gradient)
    if method == "ifd":
        if unconditional is None:
            raise MissingArtifactError("score.method=ifd needs the unconditional stage's losses.parquet "
                                       "(the loss of each response without its question)")
        by_id = dict(zip(unconditional["id"].to_pylist(), unconditional["mean_loss"].to_pylist()))
        missing = [i for i in table["id"].to_pylist() if i not in by_id]
        if missing:
            raise MissingArtifactError(f"score.method=ifd: no unconditional loss for traces {missing[:5]} "
                                       f"({len(missing)} in all); rerun the unconditional stage")
        return ifd_scores(mean_loss(table, "response"), np.array([by_id[i] for i in table["id"].to_pylist()]))
    raise ValueError(f"score.method={method!r} is not a baseline; baselines are {list(BASELINES)}")
