"""Extract's speed and memory next to a bare forward pass and exact autograd (a benchmark, not a test).

    dvc repro segment model          # segments.parquet and the model directory
    python benchmarks/bench_extract.py --segments outputs/segment/segments.parquet --model outputs/model

Measured side by side in one run, on the same --n traces (neighbours in token length from a seeded
place: the traces of one of extract's length-bucketed batches) and the same batches (pack_batches):
  bare forward       collated and passed through the model's own forward, logits at every position
  bare, loss pos.    the decoder, then the LM head at the loss positions only, as extract runs it: the
                     baseline that leaves exactly the proxy's own cost to extract
  extract            the stage itself, tasks.curate.extract.extract with the params.yaml extract section (cache
                     off, model loaded beforehand): its model part (stats model_seconds) and its wall
                     time (reading, tokenization, model, writing shards); with head_variant on, also
                     its model part without the head Gram (the proxy alone)
  exact              tasks/diagnostics/exact.py (one forward, then one backward per span) for every parameter
                     (`full`: METHOD.md's g_k) and for the LM head alone, on the first --exact-n of those
                     traces, per token; then (first target) on --probe-n traces of about the same
                     length and from few to many spans, per trace against its number of spans
Each is the best of --repeats alternating runs, so load on a shared machine hits them alike.
Then: padding waste of extract's batches on every trace of the file; peak RSS of extract in a
subprocess on 1x and 10x traces (--memory-traces rows, then ten copies of them with new ids and
content keys, so every trace is computed), and an incremental run (1% new traces appended, the
10x run's cache) against the 10x run. The memory runs use a tiny random model built on the spot
(--memory-model to use another): the real model makes 10x too slow on a CPU, and what is measured
there is how memory and time grow with the number of traces, not the model's speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.diagnostics.exact import TARGETS, ExactModel, ExactSpec  # noqa: E402
from tasks.core.artifacts import pack_batches  # noqa: E402
from tasks.curate.extract import Params, extract, load_model  # noqa: E402
from tasks.curate.proxy import collate, resolve_device  # noqa: E402
from tasks.curate.spans import EncodedTrace, SpanError, encode_traces, trace_spans  # noqa: E402
from tasks.core.stage import load_params, write_parquet  # noqa: E402

# Runs in a fresh interpreter: extract on argv's paths, then its peak RSS and its stats as JSON. The peak
# is VmHWM, this process's own: ru_maxrss would carry over the forking parent's (it survives exec).
MEMORY_RUN = """
import dataclasses, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tasks.curate.extract import Params, extract, load_model
segments, model, out_dir, cache_dir, params = sys.argv[2:6] + [json.loads(sys.argv[6])]
params = dataclasses.replace(Params(), **params, cache_dir=cache_dir)
load_model(model, "cpu")
started = time.perf_counter()
stats = extract(Path(segments), Path(model), Path(out_dir), params)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_kb / 1024, **stats}))
"""


def encode(model, rows: list[dict], params: Params) -> list[EncodedTrace | SpanError]:
    return encode_traces(model.tokenizer, [(r["prompt_messages"], r["scored_response"], trace_spans(
        r["step_starts"], r["step_ends"], r["answer_start"], r["answer_end"])) for r in rows],
        chat_template=params.chat_template, max_length=params.max_length or model.context_length)


def extract_batches(encoded: list[EncodedTrace | SpanError], params: Params) -> list[list[EncodedTrace]]:
    """The batches extract runs on these rows: per shard of shard_size rows, pack_batches by length."""
    batches = []
    for start in range(0, len(encoded), params.shard_size):
        traces = [e for e in encoded[start:start + params.shard_size] if isinstance(e, EncodedTrace)]
        batches += [[traces[i] for i in batch] for batch in pack_batches([len(t.input_ids) for t in traces],
                                                                          params.batch_tokens)]
    return batches


def padding_waste(batches: list[list[EncodedTrace]]) -> float:
    real = sum(len(t.input_ids) for batch in batches for t in batch)
    return 1 - real / sum(len(batch) * max(len(t.input_ids) for t in batch) for batch in batches)


def time_bare_forward(model, batches: list[list[EncodedTrace]], loss_positions_only: bool) -> float:
    """The model's forward with logits at every position, or (as extract) at the loss positions only."""
    started = time.perf_counter()
    for batch in batches:
        inputs = {name: tensor.to(model.device, non_blocking=True)
                  for name, tensor in collate(batch, model.pad_id, pin=model.cuda).items()}
        with torch.inference_mode(), model._autocast():
            if loss_positions_only:
                hidden = model.decoder(input_ids=inputs["input_ids"], use_cache=False).last_hidden_state  # (B, T, d)
                logits = model.head(hidden.flatten(0, 1)[inputs["flat_positions"]])  # (N, V)
            else:  # right padding, no mask: as extract runs it (tasks.curate.proxy.collate)
                logits = model.model(input_ids=inputs["input_ids"], use_cache=False).logits  # (B, T, V)
        del logits
    if model.cuda:
        torch.cuda.synchronize()  # once: extract too keeps the GPU busy and waits one batch behind
    return time.perf_counter() - started


def time_exact(model_dir: Path, traces: list[EncodedTrace], device: str, target: str) -> list[float]:
    """Seconds of exact mode per trace (one forward, one backward per span, the Gram), after a warm-up."""
    exact = ExactModel(model_dir, ExactSpec(target), device)
    exact.grams(traces[0])
    seconds = []
    for trace in traces:
        started = time.perf_counter()
        exact.grams(trace)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    del exact
    return seconds


def span_probe(encoded: list[EncodedTrace | SpanError], length: float, n: int) -> list[EncodedTrace]:
    """n traces with span counts spread from the fewest to the most in the file, each the one of its
    count closest to `length` tokens, so the span count is what varies."""
    by_spans: dict[int, list[EncodedTrace]] = {}
    for trace in encoded:
        if isinstance(trace, EncodedTrace):
            by_spans.setdefault(trace.n_spans, []).append(trace)
    counts = sorted(by_spans)
    picked = sorted({counts[round(i * (len(counts) - 1) / max(n - 1, 1))] for i in range(n)})
    return [min(by_spans[k], key=lambda t: abs(len(t.input_ids) - length)) for k in picked]  # first in file order on ties


def exact_by_spans(name: str, traces: list[EncodedTrace], seconds: list[float], extract_per_token: float) -> None:
    """Per trace: exact cost per token over extract's. Exact runs one backward per span, so the ratio grows
    with the spans per trace (about 1 + 2(K+1) forward passes for the full model); a least-squares line
    through (K+1, ratio) says where it crosses 30x."""
    ratios = [s / len(t.input_ids) / extract_per_token for t, s in zip(traces, seconds)]
    spans = [t.n_spans for t in traces]
    print(f"\n{name}, per trace: spans (K+1), tokens, seconds, x extract per token")
    for trace, s, ratio in sorted(zip(traces, seconds, ratios), key=lambda x: x[0].n_spans):
        print(f"  {trace.n_spans:3d} {len(trace.input_ids):6d} {s:8.2f} {ratio:8.1f}")
    if len(set(spans)) >= 2:
        slope, intercept = np.polyfit(spans, ratios, 1)
        crossing = (30 - intercept) / slope if slope > 0 else float("inf")
        print(f"  fit: x extract = {intercept:.1f} + {slope:.2f} (K+1); 30x at K+1 = {crossing:.0f} spans "
              f"(an extrapolation from {len(spans)} traces with K+1 in {min(spans)}..{max(spans)})")


def copies(table: pa.Table, n: int, tag: str) -> pa.Table:
    """n copies of the rows under new ids and content keys: new traces to extract, same text and lengths."""
    parts = []
    for copy in range(n):
        ids = pc.binary_join_element_wise(table.column("id"), pa.scalar(f"{tag}{copy}"), "#")
        keys = pa.array([hashlib.sha256(f"{h}:{tag}{copy}".encode()).hexdigest()
                         for h in table.column("content_hash").to_pylist()])
        renamed = table.set_column(table.schema.get_field_index("id"), "id", ids)
        parts.append(renamed.set_column(table.schema.get_field_index("content_hash"), "content_hash", keys))
    return pa.concat_tables(parts)


def memory_run(segments: Path, model: Path, out_dir: Path, cache_dir: Path, params: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(REPO), str(segments), str(model), str(out_dir),
                           str(cache_dir), json.dumps(params)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_model(path: Path) -> Path:
    from tests.conftest import build_bpe_tokenizer, build_tiny_model_dir

    return build_tiny_model_dir(path, build_bpe_tokenizer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=Path, default=Path("outputs/segment/segments.parquet"))
    parser.add_argument("--model", type=Path, default=Path("outputs/model"))
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="its extract section is used")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=12, help="traces timed (bare forward and extract)")
    parser.add_argument("--exact-n", type=int, default=6, help="of those, traces timed in exact mode")
    parser.add_argument("--exact-targets", nargs="+", default=["full", "head"], choices=TARGETS,
                        help="full = METHOD.md's g_k (every parameter); the first one heads the last column")
    parser.add_argument("--probe-n", type=int, default=5,
                        help="traces, spread over the span counts of the file, timed in exact mode against "
                             "their span count (first of --exact-targets; 0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-traces", type=int, default=768,
                        help="1x of the memory runs, 3 default shards: the next is prefetched as one runs (0: skip)")
    parser.add_argument("--memory-model", type=Path, default=None, help="default: a tiny random model")
    args = parser.parse_args()
    print("command: python " + " ".join(shlex.quote(arg) for arg in sys.argv))
    device = resolve_device(args.device)
    params = dataclasses.replace(load_params(Params, "extract", args.params), device=device, cache_dir=None)
    table = pq.read_table(args.segments)
    model = load_model(str(args.model), device)  # extract() below reuses this one
    encoded = encode(model, table.to_pylist(), params)
    every = extract_batches(encoded, params)
    # The timed traces: n neighbours in length order from a seeded place, like the traces of one of
    # extract's batches (a shard is bucketed by length); a random handful would pad far more than extract does.
    by_length = sorted((i for i, e in enumerate(encoded) if isinstance(e, EncodedTrace)),
                       key=lambda i: (len(encoded[i].input_ids), i))
    first = int(np.random.default_rng(args.seed).integers(0, max(1, len(by_length) - args.n + 1)))
    picked = sorted(by_length[first:first + args.n])
    sample = table.take(picked)
    batches = extract_batches([encoded[i] for i in picked], params)
    tokens = sum(len(t.input_ids) for batch in batches for t in batch)
    print(f"model {args.model} ({model.identity[:12]}), device {device}, {torch.get_num_threads()} torch threads; "
          f"extract params: batch_tokens {params.batch_tokens}, shard_size {params.shard_size}, "
          f"head_variant {params.head_variant}")
    print(f"{len(sample)} traces, {tokens} tokens in {len(batches)} batches, "
          f"padding waste {padding_waste(batches):.1%}")

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as scratch:
        scratch = Path(scratch)
        write_parquet(scratch / "sample.parquet", sample)
        bare, bare_loss = "bare forward", "bare forward, loss pos."
        timings: dict[str, list[float]] = {bare: [], bare_loss: [], "extract model": [], "extract stage": []}
        # The proxy alone (one (spans, V) @ (V, d) product per batch) next to the params' setting: the
        # head variant adds an (n, V) @ (V, n) product per trace of n loss tokens.
        proxy_only = dataclasses.replace(params, head_variant=False) if params.head_variant else None
        if proxy_only:
            timings["extract model, no head Gram"] = []
        time_bare_forward(model, batches[:1], loss_positions_only=False)  # warm-ups: first calls set up kernels
        extract(scratch / "sample.parquet", args.model, scratch / "extract-warm-up", params)
        for repeat in range(args.repeats):
            timings[bare].append(time_bare_forward(model, batches, loss_positions_only=False))
            timings[bare_loss].append(time_bare_forward(model, batches, loss_positions_only=True))
            started = time.perf_counter()
            stats = extract(scratch / "sample.parquet", args.model, scratch / f"extract-{repeat}", params)
            timings["extract stage"].append(time.perf_counter() - started)
            timings["extract model"].append(stats["model_seconds"])
            if proxy_only:
                timings["extract model, no head Gram"].append(extract(
                    scratch / "sample.parquet", args.model, scratch / f"extract-proxy-{repeat}",
                    proxy_only)["model_seconds"])
        assert stats["forward_batches"] == len(batches) and abs(stats["padding_waste"] - padding_waste(batches)) < 1e-4
        best = {name: min(values) for name, values in timings.items()}
        # Ratios are paired: one repeat runs every path back to back, so a change of load hits them alike.
        ratios = {name: [statistics.median([v / b for v, b in zip(values, timings[base])])
                         for base in (bare, bare_loss)] for name, values in timings.items()}
        exact_traces = [t for batch in batches for t in batch][:args.exact_n]
        exact_tokens = sum(len(t.input_ids) for t in exact_traces)
        per_trace = {}
        for target in args.exact_targets:  # scaled to the timed traces' tokens, so every row is per token alike
            per_trace[target] = time_exact(args.model, exact_traces, device, target)
            seconds = sum(per_trace[target])
            best[f"exact {target} (autograd)"] = seconds * tokens / exact_tokens
            ratios[f"exact {target} (autograd)"] = [best[f"exact {target} (autograd)"] / best[base]
                                                    for base in (bare, bare_loss)]

        exact = best[f"exact {args.exact_targets[0]} (autograd)"]
        print(f"\n{'path':<30} {'tokens/s':>9} {'ms/token':>9} {'x bare':>7} {'x bare loss pos.':>16} "
              f"{'exact ' + args.exact_targets[0] + ' / it':>18}")
        for name, seconds in best.items():
            print(f"{name:<30} {tokens / seconds:9.1f} {1000 * seconds / tokens:9.3f} {ratios[name][0]:7.3f} "
                  f"{ratios[name][1]:16.3f} {exact / seconds:18.1f}")
        print(f"(tokens/s and ms/token: best of {args.repeats} runs; x bare: median over runs of the paired ratio; "
              f"exact: timed once on {len(exact_traces)} traces, {exact_tokens} tokens, against the best runs)")
        print(f"(seconds per run: { {name: [round(v, 2) for v in values] for name, values in timings.items()} })")
        if args.probe_n:  # exact's cost against the spans per trace, at about the timed traces' length
            probe = span_probe(encoded, statistics.median(len(t.input_ids) for t in exact_traces), args.probe_n)
            target = args.exact_targets[0]
            exact_by_spans(f"exact {target}", probe, time_exact(args.model, probe, device, target),
                           best["extract model"] / tokens)

        print(f"\npadding waste on all {len(table)} traces of {args.segments}: {padding_waste(every):.2%} "
              f"({len(every)} batches)")
        if args.memory_traces:
            memory(args, table, scratch)


def memory(args: argparse.Namespace, table: pa.Table, scratch: Path) -> None:
    model = args.memory_model or tiny_model(scratch / "tiny-model")
    settings = {"device": "cpu"}
    one = table.slice(0, args.memory_traces)
    ten = copies(one, 10, "x")
    grown = pa.concat_tables([ten, copies(one.slice(0, max(1, len(ten) // 100)), 1, "new")])
    for name, part in [("1x", one), ("10x", ten), ("10x+1%", grown)]:
        write_parquet(scratch / f"{name}.parquet", part)
    runs = {"1x": memory_run(scratch / "1x.parquet", model, scratch / "m1", scratch / "cache-1x", settings),
            "10x": memory_run(scratch / "10x.parquet", model, scratch / "m10", scratch / "cache-10x", settings)}
    runs["10x+1%"] = memory_run(scratch / "10x+1%.parquet", model, scratch / "m11", scratch / "cache-10x", settings)
    print(f"\nmemory and increments (model {model}, subprocess per run, device cpu):")
    print(f"{'run':<8} {'traces':>7} {'computed':>8} {'cached':>7} {'seconds':>8} {'model s':>8} {'peak RSS MB':>11}")
    for name, run in runs.items():
        print(f"{name:<8} {run['read']:>7} {run['traces_computed']:>8} {run['traces_cached']:>7} {run['seconds']:8.1f} "
              f"{run['model_seconds']:8.2f} {run['peak_rss_mb']:11.0f}")
    print(f"peak RSS 10x / 1x: {runs['10x']['peak_rss_mb'] / runs['1x']['peak_rss_mb']:.3f}; "
          f"incremental run time / 10x run time: {runs['10x+1%']['seconds'] / runs['10x']['seconds']:.3f} "
          f"(model time {runs['10x+1%']['model_seconds'] / runs['10x']['model_seconds']:.3f})")


if __name__ == "__main__":
    main()
