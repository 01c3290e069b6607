"""The projected gradient source's cost next to a bare forward, the proxy, LESS and exact autograd (a benchmark).

    dvc repro segment model          # segments.parquet and the model directory
    OMP_NUM_THREADS=1 python benchmarks/bench_projected.py --segments outputs/segment/segments.parquet \
        --model outputs/model --n 8

One run, side by side on the same --n traces (a seeded sample of those with steps), each path
after one untimed warm-up trace:
  bare forward   the model's own forward (logits at every position), in extract's batches
  proxy          extract's model part as today (tasks/curate/proxy.py: forward + span summaries, head Gram
                 per --params), in extract's batches (pack_batches, batch_tokens)
  projected      tasks/curate/projected.py at the --params extract settings (projection_dim, target,
                 blocks): one forward, one batched backward for the K+1 spans, per trace
  projected loop the same with one backward pass per span instead of the batched one
  LESS sample    one backward per trace of the whole response loss, projected the same way (the
                 sample-level gradient LESS uses: every loss position in one span)
  exact full     tasks/diagnostics/exact.py, every parameter, one full backward per span, on --exact-n traces
Prints fed tokens (prompt + response) per second, wall time, and ratios to bare and to the proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.core.artifacts import pack_batches
from tasks.core.stage import load_params
from tasks.curate.extract import Params, projected_spec
from tasks.curate.projected import ProjectedModel
from tasks.curate.proxy import ProxyModel, collate, resolve_device
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans
from tasks.diagnostics.exact import ExactModel, ExactSpec


def load_traces(segments: Path, tokenizer, n: int, seed: int, params: Params, context: int) -> list[EncodedTrace]:
    rows = [row for row in pq.read_table(segments).to_pylist() if row["n_steps"] > 0]
    picked = sorted(np.random.default_rng(seed).choice(len(rows), size=min(n + 1, len(rows)), replace=False))
    encoded = encode_traces(tokenizer, [(rows[i]["prompt_messages"], rows[i]["scored_response"], trace_spans(
        rows[i]["step_starts"], rows[i]["step_ends"], rows[i]["answer_start"], rows[i]["answer_end"]))
        for i in picked], chat_template=params.chat_template, max_length=params.max_length or context)
    return [e for e in encoded if isinstance(e, EncodedTrace)]


def one_span(trace: EncodedTrace) -> EncodedTrace:
    """The trace with every loss position in one span: its gradient is the whole response's (LESS)."""
    return dataclasses.replace(trace, loss_span=np.where(trace.loss_span >= 0, 0, -1).astype(trace.loss_span.dtype),
                               n_spans=1)


def timed(run, warm) -> float:
    run(warm)
    started = time.perf_counter()
    run(None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=Path, default=Path("outputs/segment/segments.parquet"))
    parser.add_argument("--model", type=Path, default=Path("outputs/model"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its extract section is used")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--exact-n", type=int, default=None, help="traces for exact full (default: all --n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["loop", "less", "exact"])
    parser.add_argument("--target", default=None, help="extract.projected_target (default: --params')")
    args = parser.parse_args()
    params = dataclasses.replace(load_params(Params, "extract", args.params), projected=True)
    if args.target:
        params = dataclasses.replace(params, projected_target=args.target)
    device = resolve_device(args.device)
    spec = projected_spec(params)
    proxy = ProxyModel(args.model, device)
    traces = load_traces(args.segments, proxy.tokenizer, args.n, args.seed, params, proxy.context_length)
    warm, traces = traces[:1], traces[1:]
    tokens = sum(len(t.input_ids) for t in traces)
    spans = sum(t.n_spans for t in traces)
    batches = [[traces[i] for i in b] for b in pack_batches([len(t.input_ids) for t in traces], params.batch_tokens)]
    print(f"{len(traces)} traces, {tokens} fed tokens, {spans} spans (mean K+1 = {spans / len(traces):.2f}), "
          f"device {device}, torch threads {torch.get_num_threads()}")

    def bare(warmup):
        with torch.inference_mode(), proxy._autocast():
            for batch in [warmup] if warmup else batches:
                proxy.model(input_ids=collate(batch, proxy.pad_id, pin=False)["input_ids"].to(device), use_cache=False)

    def proxied(warmup):
        for batch in [warmup] if warmup else batches:
            proxy.launch(batch, params.head_variant).collect()

    seconds = {"bare forward": timed(bare, warm), "proxy": timed(proxied, warm)}
    projected = ProjectedModel(args.model, device, spec)
    seconds["projected"] = timed(lambda w: projected.launch(w or traces, params.head_variant), warm)
    print(f"projected: {spec}, {len(projected.layers)} layers, {projected.dimension:,} numbers per span, "
          f"batched VJP: {projected.batched}")
    if "loop" not in args.skip:
        projected.batched = False
        seconds["projected loop"] = timed(lambda w: projected.launch(w or traces, params.head_variant), warm)
    if "less" not in args.skip:
        seconds["LESS sample"] = timed(lambda w: projected.launch([one_span(t) for t in w or traces], False), warm)
    exact_n = args.exact_n or len(traces)
    exact_tokens = sum(len(t.input_ids) for t in traces[:exact_n])
    if "exact" not in args.skip:
        del projected
        exact = ExactModel(args.model, ExactSpec("full"), device)
        seconds["exact full"] = timed(lambda w: [exact.grams(t) for t in (w or traces[:exact_n])], warm)
    rate = {name: (exact_tokens if name == "exact full" else tokens) / s for name, s in seconds.items()}
    print(f"\n{'path':<16}{'tokens/s':>10}{'seconds':>10}{'x bare':>9}{'x proxy':>9}")
    for name, s in seconds.items():
        print(f"{name:<16}{rate[name]:>10.1f}{s:>10.2f}{rate['bare forward'] / rate[name]:>9.2f}"
              f"{rate['proxy'] / rate[name]:>9.2f}")
    if exact_n != len(traces):
        print(f"(exact full on the first {exact_n} traces, {exact_tokens} tokens)")


if __name__ == "__main__":
    main()
