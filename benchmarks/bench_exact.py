"""Proxy vs exact-mode cost per token, on the same traces (a benchmark, not a test).

    dvc repro segment model          # segments.parquet and the model directory
    python benchmarks/bench_exact.py --segments outputs/segment/segments.parquet --model outputs/model --n 20

Times, on the same n traces (a seeded sample of those with steps): the proxy as extract runs it
(length-sorted batches of `--batch-tokens`, one forward pass + span summaries), without and with
the head Gram, and exact mode (tasks/diagnostics/exact.py: one forward, one backward per span) for each target.
Prints wall and CPU (process, all threads) milliseconds per fed token (prompt + response) and each
exact target's ratio to the proxy by CPU time, which other jobs on a shared machine disturb less
than wall time. One warm-up trace runs first, untimed, for each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.core.artifacts import pack_batches
from tasks.curate.proxy import ProxyModel
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans
from tasks.diagnostics.exact import TARGETS, ExactModel, ExactSpec


def load_traces(segments: Path, tokenizer, n: int, seed: int, max_length: int) -> list[EncodedTrace]:
    rows = [row for row in pq.read_table(segments).to_pylist() if row["n_steps"] > 0]
    picked = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    encoded = encode_traces(tokenizer, [(rows[i]["prompt_messages"], rows[i]["scored_response"], trace_spans(
        rows[i]["step_starts"], rows[i]["step_ends"], rows[i]["answer_start"], rows[i]["answer_end"]))
        for i in sorted(picked)], chat_template=True, max_length=max_length)
    return [e for e in encoded if isinstance(e, EncodedTrace)]


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) since `start`."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def time_proxy(model: ProxyModel, traces: list[EncodedTrace], batch_tokens: int,
               head_variant: bool) -> tuple[float, float]:
    model.launch(traces[:1], head_variant).collect()  # warm-up
    start = clock()
    for batch in pack_batches([len(t.input_ids) for t in traces], batch_tokens):
        model.launch([traces[i] for i in batch], head_variant).collect()
    return since(start)


def time_exact(model: ExactModel, traces: list[EncodedTrace]) -> tuple[float, float]:
    model.grams(traces[0])  # warm-up
    start = clock()
    for trace in traces:
        model.grams(trace)
    return since(start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=Path, default=Path("outputs/segment/segments.parquet"))
    parser.add_argument("--model", type=Path, default=Path("outputs/model"))
    parser.add_argument("--n", type=int, default=20, help="traces timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="the proxy's padded tokens per batch")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--last-n-blocks", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On a busy shared machine 1 can be several "
                             "times faster: exact mode runs many small ops, and each multi-threaded op waits for "
                             "every thread to be scheduled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    proxy = ProxyModel(args.model, args.device)
    traces = load_traces(args.segments, proxy.tokenizer, args.n, args.seed, proxy.context_length)
    tokens = sum(len(t.input_ids) for t in traces)
    spans = sum(t.n_spans for t in traces)
    print(f"{len(traces)} traces, {tokens} tokens, {spans} spans; device {args.device}, "
          f"{torch.get_num_threads()} torch threads")
    rows = [("proxy", time_proxy(proxy, traces, args.batch_tokens, head_variant=False)),
            ("proxy + head Gram", time_proxy(proxy, traces, args.batch_tokens, head_variant=True))]
    del proxy
    for target in args.targets:
        exact = ExactModel(args.model, ExactSpec(target, args.last_n_blocks, args.lora_r), args.device)
        rows.append((f"exact {target} ({exact.n_parameters:,} params)", time_exact(exact, traces)))
        del exact
    base = rows[0][1][1]
    print(f"{'scorer':<40} {'wall s':>7} {'CPU s':>7} {'wall ms/tok':>11} {'CPU ms/tok':>10} {'x proxy (CPU)':>13}")
    for name, (wall, cpu) in rows:
        print(f"{name:<40} {wall:7.1f} {cpu:7.1f} {1000 * wall / tokens:11.2f} {1000 * cpu / tokens:10.2f} "
              f"{cpu / base:13.1f}")


if __name__ == "__main__":
    main()
