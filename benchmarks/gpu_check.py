"""A GPU check that runs in minutes: extract's speed, MFU and bf16 numerics, projected and exact cost, fine-tune steps/s.

    bash benchmarks/gpu_check.sh --out $OUT/gpu                  # a GPU host, repo root: est. 3-5 min on one H200
    python benchmarks/gpu_check.py --cpu --tiny --out /tmp/gpu    # seconds: tests/benchmarks/test_gpu_check.py

No download and no data: the models are randomly initialised from public configurations built here
(SHAPES: SmolLM2-135M, Qwen2.5-0.5B and -1.5B), and the traces are synthetic token ids with K steps and
an answer (synthetic_traces), fed to the project's own code: extract's batch loop (tasks.curate.extract
._compute: pack_batches, ProxyModel.launch, one batch in flight), ProjectedModel, ExactModel, the score
and aggregate functions, and the fine-tune loop (tasks.finetune.train.train). Only the loading is
replaced: the scorers get the model built in memory (scorer()), ExactModel a directory saved from it.

Sections, each timed side by side in one run, guarded (an error is recorded, the rest still run) and
time-boxed (a soft budget its loops check, a hard one by SIGALRM, and --total-s for the run); the JSON and the markdown are
rewritten after every section, so a run killed midway keeps what it finished:
  matmul_peak     the measured bf16 TFLOP/s of a big matmul, next to the table's peak for this GPU
  cuda_tests      the tests the CPU suite skips for want of CUDA (a skipif naming cuda), run with pytest
  extract_vs_bare extract tokens/s against a bare forward on the same batches (model(input_ids) under
                  no_grad: bf16 weights, and the fp32 model under bf16 autocast as extract runs it), at
                  ~300 and ~2k tokens per trace, per shape; target <= 1.10x the bf16 forward's time
  mfu             extract's model FLOPs utilisation at the 1.5B shape against the bf16 dense peak; >= 40%
  bf16_vs_fp32    extract under bf16 autocast and in fp32 on the same traces: Spearman of alpha,
                  consistency and sample score (>= 0.99), the largest span-loss gap
  projected       extract, the projected source (extract.projected defaults) and exact `full` autograd
                  (tasks/diagnostics/exact.py) tokens/s on the same few traces, and their ratio to extract
  finetune        optimizer steps/s of tasks.finetune.train.train (finetune_eval defaults: LoRA on the last
                  4 layers; and mode full) on the 135M shape

Wheels: the host may lack pydantic (tasks.core.stage needs it). gpu_check.sh installs the wheels in
.whl/ (git-ignored) when the import fails. Fill .whl/ on a machine with network (versions: constraints.txt):
    for p in pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \\
             typing_extensions==4.16.0; do
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p
    done
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import gc
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.core.artifacts import pack_batches  # noqa: E402
from tasks.curate import aggregate, score  # noqa: E402
from tasks.curate.extract import Params as ExtractParams, _compute, projected_spec  # noqa: E402
from tasks.curate.projected import ProjectedModel  # noqa: E402
from tasks.curate.proxy import ProxyModel, collate, fixed_threads  # noqa: E402
from tasks.curate.spans import EncodedTrace  # noqa: E402
from tasks.diagnostics.exact import ExactModel, ExactSpec  # noqa: E402
from tasks.diagnostics.rankstats import correlations  # noqa: E402
from tasks.finetune.subsets import Params as FinetuneParams  # noqa: E402
from tasks.finetune.train import Example, train  # noqa: E402

# What the GPU host has (the plan of issue 24), and what .whl/ ships; tests/benchmarks/test_gpu_check.py checks
# every third-party module this script's project imports reach is one of them.
HOST_PACKAGES = ("torch", "transformers", "peft", "pyarrow", "numpy", "sklearn", "scipy", "threadpoolctl",
                 "pytest", "yaml", "safetensors", "tokenizers", "tqdm")
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")
# Imported inside functions this script never calls: the image functions (tasks/curate/images.py, vlm.py), and
# the fan-out over worker processes (tasks/curate/fanout.py): batches here go through extract's _compute directly.
UNUSED_LAZY = ("PIL", "dask", "distributed", "psutil")

# Public configurations (the models' config.json), randomly initialised: the speed depends on the shape only.
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768)),
}
TINY_SHAPES = {  # --tiny: the same families, a few seconds on a CPU
    "smollm2-135m": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                                   max_position_embeddings=1024)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=160, vocab_size=1024, tie_word_embeddings=True,
                                   max_position_embeddings=1024)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=192, vocab_size=1024, tie_word_embeddings=True,
                                   max_position_embeddings=1024)),
}
MFU_SHAPE = "qwen2.5-1.5b"
# bf16 dense peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name(); first match wins
PEAK_TFLOPS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
               ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
               ("RTX 4090", 165.0))

# Work per section: (GPU, --tiny). tokens: fed tokens per timed pass; budgets in seconds (soft: the
# loops check it; hard: SIGALRM at budget + 30 s, within --total-s).
SIZES = {
    "run_tokens": (131072, 768), "lengths": ((300, 2000), (48, 160)), "repeats": (5, 1),
    "numerics_traces": (256, 12), "projected_traces": (12, 3), "exact_traces": (3, 2), "finetune_steps": (24, 3),
    "matmul_n": (8192, 256),
}
BUDGETS = {"matmul_peak": 20, "cuda_tests": 75, "extract_vs_bare": 140, "mfu": 5, "bf16_vs_fp32": 40, "projected": 60,
           "finetune": 45}
TINY_SLACK = 10  # --tiny multiplies the time boxes: they guard a GPU's minutes, not a busy CI machine's CPU
TARGETS = {"extract_vs_bare": 1.10, "mfu": 0.40, "spearman": 0.99}

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


class Check:
    """Run settings shared by the sections: device, sizes, where shapes and the tokenizer come from."""

    def __init__(self, args) -> None:
        self.args, self.tiny = args, args.tiny
        self.device = "cpu" if args.cpu else "cuda"
        self.cuda = self.device == "cuda"
        self.shapes = TINY_SHAPES if args.tiny else SHAPES
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.tokenizer = tiny_tokenizer()
        self.params = ExtractParams()  # extract's defaults: batch_tokens 8192, head_variant false
        self.results: dict = {}

    def size(self, name: str):
        return SIZES[name][1 if self.tiny else 0]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, run) -> float:
        self.sync()
        started = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - started

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def tiny_tokenizer():
    """A fast word-level tokenizer: ProxyModel wants one (a fast tokenizer, a pad id, the logits probe); traces are ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "Probe:", "12", "+", "30", "=", "42."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(check: Check, shape: str, seed: int = 0):
    """A randomly initialised fp32 causal LM of `shape`, created on the device (no host copy of the weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, sizes = check.shapes[shape]
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**sizes, pad_token_id=0, bos_token_id=1,
                                                                  eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(check.device):
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def model_dir(check: Check, shape: str, model=None) -> Path:
    """A model directory: model_info.json (the identity extract keys on) and the tokenizer; with `model`, its weights."""
    path = check.tmp / (shape + ("-saved" if model is not None else ""))
    path.mkdir(exist_ok=True)
    (path / "model_info.json").write_text(json.dumps({"identity": f"random-{shape}", "source": "gpu_check"}))
    check.tokenizer.save_pretrained(path)
    if model is not None:
        model.save_pretrained(path, safe_serialization=True)
    return path


def scorer(check: Check, base: type, model, shape: str, *args, fp32: bool = False, cpu_bf16: bool = False):
    """`base` (ProxyModel or ProjectedModel) on the model built in memory; fp32: no bf16 autocast on CUDA;
    cpu_bf16: the CPU's bf16 autocast where extract has none, standing in for CUDA's (the bf16 paths, on a CPU)."""
    members = {"_load": lambda self, _dir: (check.tokenizer, model)}
    if fp32:
        members["_autocast"] = lambda self: contextlib.nullcontext()
    elif cpu_bf16 and not check.cuda:
        members["_autocast"] = lambda self: torch.autocast("cpu", dtype=torch.bfloat16)
    built = type(f"Random{base.__name__}", (base,), members)(model_dir(check, shape), check.device, *args)
    if fp32:
        built.head_dtype = torch.float32
    return built


def synthetic_traces(n: int, length: int, vocab: int, seed: int, steps=(2, 8)) -> list[EncodedTrace]:
    """n traces of length +-25% around `length`: a prompt of 15-35%, then K steps and an answer as loss spans."""
    rng = np.random.default_rng(seed)
    traces = []
    for _ in range(n):
        total = int(rng.integers(int(length * 0.75), int(length * 1.25) + 1))
        prompt = max(2, int(total * rng.uniform(0.15, 0.35)))
        k = int(rng.integers(steps[0], steps[1] + 1))
        n_loss = total - prompt  # loss positions prompt-1 .. total-2: position t predicts token t+1
        cuts = np.sort(rng.choice(np.arange(1, n_loss), size=k, replace=False))  # K cuts: K+1 non-empty spans
        loss_span = np.full(total, -1, dtype=np.int32)
        loss_span[prompt - 1:total - 1] = np.repeat(np.arange(k + 1), np.diff(np.r_[0, cuts, n_loss]))
        ids = rng.integers(4, vocab, size=total).astype(np.int64)
        traces.append(EncodedTrace(ids, loss_span, k + 1, prompt, 0, question_start=1))
    return traces


def forward_flops(config, traces: list[EncodedTrace], head_positions: str) -> float:
    """Useful FLOPs of one forward over the traces' real tokens: 2 x matmul weights per token, causal attention,
    and the LM head at every position ("all", a bare forward) or at the loss positions ("loss", extract)."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = config.num_key_value_heads * head_dim
    linear = layers * (d * heads * head_dim + 2 * d * kv + heads * head_dim * d + 3 * d * config.intermediate_size)
    total = 0.0
    for trace in traces:
        length = len(trace.input_ids)
        logits = length if head_positions == "all" else int((trace.loss_span >= 0).sum())
        # QK^T and AV over the lower triangle: 2 x (T^2 / 2) x head_dim x 2 FLOPs per head and layer
        total += 2 * linear * length + 2 * layers * heads * head_dim * length ** 2 + 2 * d * config.vocab_size * logits
    return total


# ---- sections -------------------------------------------------------------------------------------------------

def matmul_peak(check: Check, deadline: Deadline, out: dict) -> dict:
    """The measured TFLOP/s of an (n, n) @ (n, n) matmul in bf16 (fp32 on CPU), best of the timed runs."""
    n = check.size("matmul_n")
    dtype = torch.bfloat16 if check.cuda else torch.float32
    a, b = (torch.randn(n, n, device=check.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best, iters = float("inf"), 20 if check.cuda else 2
    for _ in range(5):
        if deadline.left() < 0:
            break
        best = min(best, check.timed(lambda: [a @ b for _ in range(iters)]) / iters)
    name = torch.cuda.get_device_name() if check.cuda else platform.processor() or "cpu"
    table = next((peak for key, peak in PEAK_TFLOPS if key in name), None) if check.cuda else None
    peak = check.args.peak_tflops or table
    return out | {"device_name": name, "dtype": str(dtype).removeprefix("torch."), "n": n,
            "measured_tflops": round(2 * n ** 3 / best / 1e12, 4), "table_peak_tflops": table,
            "peak_tflops_used": peak, "peak_source": "--peak-tflops" if check.args.peak_tflops else
            ("table" if table else "measured matmul (no table entry; pass --peak-tflops)")}


def extract_vs_bare(check: Check, deadline: Deadline, out: dict) -> dict:
    """Per shape and length: extract's loop against model(input_ids) on the same batches, paired repeats."""
    rows = out.setdefault("rows", [])  # filled as they come: a section stopped midway keeps its rows
    out["target_x_bare_bf16"] = TARGETS["extract_vs_bare"]
    for shape_index, shape in enumerate(check.shapes):
        if deadline.left() < 0:
            rows.append({"shape": shape, "skipped": "time box"})
            continue
        try:
            extract_vs_bare_shape(check, deadline, shape, shape_index, rows)
        except Exception as error:  # noqa: BLE001 - one shape's failure (out of memory?) leaves the others
            rows.append({"shape": shape, "error": "".join(traceback.format_exception(error))[-1500:]})
        check.free()
    failed = [row["shape"] for row in rows if "error" in row]
    if failed:  # the section is an error, its other rows kept (partial)
        raise RuntimeError(f"extract_vs_bare failed at {failed}: see their rows")
    return out


def extract_vs_bare_shape(check: Check, deadline: Deadline, shape: str, shape_index: int, rows: list) -> None:
    """extract_vs_bare at one shape, every length."""
    model = build_model(check, shape)
    bf16 = copy.deepcopy(model).to(torch.bfloat16) if check.cuda else model
    proxy = scorer(check, ProxyModel, model, shape)
    for length_index, length in enumerate(check.size("lengths")):
        n = max(2, check.size("run_tokens") // length)
        traces = synthetic_traces(n, length, model.config.vocab_size, seed=100 * shape_index + length_index)
        encoded = dict(enumerate(traces))
        batches = [collate([traces[i] for i in batch], proxy.pad_id, pin=False)["input_ids"].to(check.device)
                   for batch in pack_batches([len(t.input_ids) for t in traces], check.params.batch_tokens)]

        def bare(which):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if check.cuda and which is model else \
                contextlib.nullcontext()
            with torch.no_grad(), autocast, fixed_threads(check.device):  # CPU: extract's one thread
                for ids in batches:
                    which(input_ids=ids, use_cache=False)

        paths = {"extract": lambda: _compute(proxy, encoded, check.params, None),
                 "bare bf16": lambda: bare(bf16), "bare autocast": lambda: bare(model)}
        for run in paths.values():  # warm-up: every batch shape once (cuBLAS heuristics, allocator)
            run()
        seconds = {name: [] for name in paths}
        for _ in range(check.size("repeats")):
            for name, run in paths.items():
                seconds[name].append(check.timed(run))
            if deadline.left() < 0:
                break
        tokens = sum(len(t.input_ids) for t in traces)
        padded = sum(len(b) * b.shape[1] for b in batches)
        best = {name: min(s) for name, s in seconds.items()}
        flops = {"extract": forward_flops(model.config, traces, "loss"),
                 "bare": forward_flops(model.config, traces, "all")}
        row = {"shape": shape, "length": length, "traces": n, "tokens": tokens, "batches": len(batches),
               "padding_waste": round(1 - tokens / padded, 4),
               "tokens_per_s": {name: round(tokens / s, 1) for name, s in best.items()},
               "seconds": {name: [round(v, 4) for v in s] for name, s in seconds.items()},
               # the median over repeats of the paired ratio: load hits both sides of a pair alike
               "x_bare_bf16": round(statistics.median(
                   e / b for e, b in zip(seconds["extract"], seconds["bare bf16"])), 4),
               "x_bare_autocast": round(statistics.median(
                   e / b for e, b in zip(seconds["extract"], seconds["bare autocast"])), 4),
               "tflops": {"extract": round(flops["extract"] / best["extract"] / 1e12, 4),
                          "bare bf16": round(flops["bare"] / best["bare bf16"] / 1e12, 4)}}
        row["target_met"] = row["x_bare_bf16"] <= TARGETS["extract_vs_bare"]
        rows.append(row)
        say(f"  {shape} ~{length} tok: extract {row['tokens_per_s']['extract']:,.0f} tok/s, "
            f"x bare bf16 {row['x_bare_bf16']:.3f}, x bare autocast {row['x_bare_autocast']:.3f}")
        if deadline.left() < 0:
            break


def mfu(check: Check, deadline: Deadline, out: dict) -> dict:
    """Extract's TFLOP/s at MFU_SHAPE (from extract_vs_bare) over the bf16 dense peak and the measured matmul."""
    peak_section = check.results.get("matmul_peak", {})
    rows = [r for r in check.results.get("extract_vs_bare", {}).get("rows", [])
            if r.get("shape") == MFU_SHAPE and "tflops" in r]
    if not rows:
        raise RuntimeError(f"extract_vs_bare has no {MFU_SHAPE} row to take the rate from")
    peak, measured = peak_section.get("peak_tflops_used"), peak_section.get("measured_tflops")
    out |= {"shape": MFU_SHAPE, "peak_tflops": peak, "measured_matmul_tflops": measured,
           "target": TARGETS["mfu"], "rows": []}
    for row in rows:
        entry = {"length": row["length"], "extract_tflops": row["tflops"]["extract"],
                 "bare_bf16_tflops": row["tflops"]["bare bf16"]}
        for name, reference in (("peak", peak), ("matmul", measured)):
            if reference:
                entry[f"extract_mfu_{name}"] = round(row["tflops"]["extract"] / reference, 4)
                entry[f"bare_bf16_mfu_{name}"] = round(row["tflops"]["bare bf16"] / reference, 4)
        out["rows"].append(entry)
    reference = "extract_mfu_peak" if peak else "extract_mfu_matmul"  # no peak (a CPU): the measured matmul's
    best = max((r.get(reference, 0.0) for r in out["rows"]), default=0.0)
    out.update(best_extract_mfu=best, best_of=reference.removeprefix("extract_mfu_"),
               target_met=bool(peak) and best >= TARGETS["mfu"])
    return out


def step_table(traces: list[EncodedTrace], numbers: dict) -> tuple[pa.Table, np.ndarray]:
    """score.step_signals on each trace's proxy Gram -> a STEP_SCORE_SCHEMA table (ids t00000...) and span losses."""
    columns = {name: [] for name in ("id", "step_index", "alpha", "consistency", "step_score", "n_tokens")}
    for i, trace in enumerate(traces):
        k = trace.n_spans - 1
        signals = score.step_signals(numbers[i].proxy_gram[None], score.Params())  # (1, K) each
        columns["id"] += [f"t{i:05d}"] * k
        columns["step_index"] += list(range(k))
        for name in ("alpha", "consistency", "step_score"):
            columns[name] += signals[name][0].tolist()
        columns["n_tokens"] += trace.span_token_counts[:k].tolist()
    from tasks.core.schema import STEP_SCORE_SCHEMA

    table = pa.Table.from_pydict(columns, schema=STEP_SCORE_SCHEMA)
    return table, np.concatenate([numbers[i].span_loss_sums for i in range(len(traces))])


def bf16_vs_fp32(check: Check, deadline: Deadline, out: dict) -> dict:
    """The same traces through extract under bf16 autocast and in fp32; the score and aggregate signals compared."""
    shape = next(iter(check.shapes))
    model = build_model(check, shape)
    traces = synthetic_traces(check.size("numerics_traces"), check.size("lengths")[0], model.config.vocab_size, 7)
    encoded = dict(enumerate(traces))
    runs = {}
    for name, fp32 in (("bf16", False), ("fp32", True)):  # on a CPU, bf16 is the CPU's autocast
        runs[name] = step_table(traces, _compute(scorer(check, ProxyModel, model, shape, fp32=fp32, cpu_bf16=True),
                                                 encoded, check.params, None)[0])
    agg = aggregate.Params()
    samples = {name: aggregate.grace_sample_scores(table, agg.how, agg.softmin_tau)[1] for name, (table, _) in
               runs.items()}
    out |= {"shape": shape, "traces": len(traces), "steps": runs["bf16"][0].num_rows,
            "bf16": "CUDA autocast" if check.cuda else "CPU autocast (standing in for CUDA's)",
            "target_spearman": TARGETS["spearman"], "spearman": {}}
    for name in ("alpha", "consistency", "step_score"):
        out["spearman"][name] = correlations(runs["bf16"][0][name].to_numpy(zero_copy_only=False),
                                             runs["fp32"][0][name].to_numpy(zero_copy_only=False))["spearman"]
    out["spearman"]["sample_score"] = correlations(samples["bf16"], samples["fp32"])["spearman"]
    out["spearman"]["span_loss"] = correlations(runs["bf16"][1], runs["fp32"][1])["spearman"]
    gap = np.abs(runs["bf16"][1] - runs["fp32"][1])  # (spans,)
    counts = np.concatenate([t.span_token_counts for t in traces])
    out.update(max_span_loss_gap=float(gap.max()), max_span_loss_gap_relative=float((gap / runs["fp32"][1]).max()),
               max_span_loss_gap_per_token=float((gap / counts).max()),
               max_alpha_gap=float(np.abs(runs["bf16"][0]["alpha"].to_numpy() - runs["fp32"][0]["alpha"].to_numpy())
                                   .max()))
    wanted = [out["spearman"][name] for name in ("alpha", "consistency", "sample_score")]
    out["target_met"] = all(v is not None and v >= TARGETS["spearman"] for v in wanted)
    del model
    check.free()
    return out


def projected(check: Check, deadline: Deadline, out: dict) -> dict:
    """Extract, the projected source and exact `full` on the same few traces of the 135M shape; ratios to extract."""
    shape = next(iter(check.shapes))
    model = build_model(check, shape)
    saved = model_dir(check, shape, model)  # ExactModel loads a directory; the same weights
    traces = synthetic_traces(check.size("projected_traces") + 1, check.size("lengths")[0], model.config.vocab_size,
                              11, steps=(2, 6))
    warm, traces = traces[:1], traces[1:]
    exact_n = check.size("exact_traces")
    tokens = sum(len(t.input_ids) for t in traces)
    exact_tokens = sum(len(t.input_ids) for t in traces[:exact_n])
    seconds = out.setdefault("seconds", {})
    proxy = scorer(check, ProxyModel, model, shape)
    _compute(proxy, dict(enumerate(warm)), check.params, None)
    seconds["extract"] = check.timed(lambda: _compute(proxy, dict(enumerate(traces)), check.params, None))
    spec = projected_spec(dataclasses.replace(check.params, projected=True))
    projected_model = scorer(check, ProjectedModel, model, shape, spec)
    _compute(projected_model, dict(enumerate(warm)), check.params, None)
    seconds["projected"] = check.timed(lambda: _compute(projected_model, dict(enumerate(traces)), check.params, None))
    out |= {"shape": shape, "traces": len(traces), "tokens": tokens, "spans": sum(t.n_spans for t in traces),
           "projected_spec": dataclasses.asdict(spec), "projected_dimension": projected_model.dimension,
           "batched_vjp": projected_model.batched}
    del proxy, projected_model, model
    check.free()
    if deadline.left() > 0:
        try:
            exact = ExactModel(saved, ExactSpec("full"), check.device)
            exact.grams(warm[0])
            seconds["exact full"] = check.timed(lambda: [exact.grams(t) for t in traces[:exact_n]])
            out.update(exact_traces=exact_n, exact_tokens=exact_tokens)
        except Exception as error:  # noqa: BLE001 - extract and projected stand without it
            out["exact_error"] = "".join(traceback.format_exception(error))[-1500:]
        exact = None
        check.free()
    else:
        out["exact_skipped"] = "time box"
    rates = {name: (exact_tokens if name == "exact full" else tokens) / s for name, s in seconds.items()}
    out["tokens_per_s"] = {name: round(rate, 2) for name, rate in rates.items()}
    out["x_extract"] = {name: round(rates["extract"] / rate, 2) for name, rate in rates.items() if name != "extract"}
    out["seconds"] = {name: round(s, 3) for name, s in seconds.items()}
    if "exact_error" in out:
        raise RuntimeError("exact full failed (exact_error); extract and projected are measured")
    return out


def finetune(check: Check, deadline: Deadline, out: dict) -> dict:
    """Optimizer steps/s of the project's training loop, LoRA (finetune_eval defaults) and all parameters."""
    shape = next(iter(check.shapes))
    base = FinetuneParams()
    length = check.size("lengths")[0]
    per_step = max(1, base.batch_tokens // int(length * 1.25))
    steps = check.size("finetune_steps")
    traces = synthetic_traces(per_step * steps, length, check.shapes[shape][1]["vocab_size"], 13)
    examples = [Example(tuple(int(i) for i in t.input_ids), t.prompt_tokens, False) for t in traces]
    out |= {"shape": shape, "examples": len(examples), "tokens": sum(len(e.input_ids) for e in examples), "modes": {}}
    for mode, learning_rate in (("lora", base.learning_rate), ("full", 1.0e-5)):
        if deadline.left() < 0:
            out["modes"][mode] = {"skipped": "time box"}
            continue
        params = dataclasses.replace(base, mode=mode, learning_rate=learning_rate)
        model, _ = train(build_model(check, shape), examples[:per_step], params, pad_id=0)  # warm-up: one step
        trained = []
        elapsed = check.timed(lambda: trained.append(train(model, examples, params, pad_id=0)))
        model, log = trained[0]
        out["modes"][mode] = {"steps": log["steps"], "seconds": round(elapsed, 3),
                              "steps_per_s": round(log["steps"] / elapsed, 3),
                              "tokens_per_s": round(out["tokens"] / elapsed, 1),
                              "trainable_parameters": log["trainable_parameters"],
                              "lora_layers": params.lora_layers if mode == "lora" else None,
                              "loss_first": log["loss_first"], "loss_last": log["loss_last"]}
        del model
        check.free()
    return out


def cuda_test_ids() -> list[str]:
    """pytest node ids of the test functions under tests/ with a skipif whose condition names cuda."""
    ids = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                for decorator in node.decorator_list:
                    text = ast.unparse(decorator)
                    if "skipif" in text and "cuda" in text:
                        ids.append(f"{path.relative_to(REPO).as_posix()}::{node.name}")
                        break
    return ids


def cuda_tests(check: Check, deadline: Deadline, out: dict) -> dict:
    """The CUDA-only tests with pytest in a subprocess: passed, failed, errors, skipped (junit XML)."""
    ids = cuda_test_ids()
    xml = check.tmp / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, deadline.left()))
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"pytest ran past the time box: {str(error.stdout or '')[-2000:]}") from None
    out |= {"ids": ids, "returncode": done.returncode, "output_tail": (done.stdout + done.stderr)[-2000:]}
    if xml.is_file():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        out.update(counts)
        out["skip_reasons"] = sorted({s.get("message", "") for s in root.iter("skipped")})
    else:
        out["no_report"] = "pytest wrote no junit XML (missing package? see output_tail)"
    return out


# cuda_tests early: cheap, in its own process, and never run on a GPU before; then the measurements by value
SECTIONS = {"matmul_peak": matmul_peak, "cuda_tests": cuda_tests, "extract_vs_bare": extract_vs_bare, "mfu": mfu,
            "bf16_vs_fp32": bf16_vs_fp32, "projected": projected, "finetune": finetune}


# ---- output ---------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    meta, sections = report["meta"], report["sections"]
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             f"device {meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"commit {meta['commit']}, {'tiny shapes' if meta['tiny'] else 'full shapes'}, "
             f"started {meta['started_utc']}, {meta.get('seconds', '?')} s", f"command: `{meta['command']}`", ""]
    for name, section in sections.items():
        lines.append(f"## {name}: {section['status']} ({section.get('section_seconds', '?')} s)")
        if section["status"] != "ok":
            lines += ["", "```", section.get("error", section["status"]), "```", ""]
            if section.get("partial"):
                lines += ["partial results:", "", "```json", json.dumps(section["partial"], default=str)[:4000], "```", ""]
            continue
        lines.append("")
        if name == "matmul_peak":
            lines.append(f"{section['dtype']} {section['n']}^3 matmul: {section['measured_tflops']} TFLOP/s measured; "
                         f"peak used {section['peak_tflops_used']} TFLOP/s ({section['peak_source']})")
        elif name == "extract_vs_bare":
            lines += ["| shape | ~tokens/trace | traces | extract tok/s | bare bf16 tok/s | bare autocast tok/s | "
                      "x bare bf16 | x bare autocast | padding | target <= 1.10 |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in section["rows"]:
                if "skipped" in r or "error" in r:
                    why = f"skipped: {r['skipped']}" if "skipped" in r else "error: " + r["error"].strip().splitlines()[-1]
                    lines.append(f"| {r['shape']} | {why[:300]} |||||||||")
                    continue
                t = r["tokens_per_s"]
                lines.append(f"| {r['shape']} | {r['length']} | {r['traces']} | {t['extract']:,.0f} | "
                             f"{t['bare bf16']:,.0f} | {t['bare autocast']:,.0f} | {r['x_bare_bf16']:.3f} | "
                             f"{r['x_bare_autocast']:.3f} | {r['padding_waste']:.1%} | {'yes' if r['target_met'] else 'NO'} |")
        elif name == "mfu":
            lines.append(f"{section['shape']}: peak {section['peak_tflops']} TFLOP/s, measured matmul "
                         f"{section['measured_matmul_tflops']} TFLOP/s; best extract MFU {section['best_extract_mfu']:.1%} of the "
                         f"{section['best_of']} "
                         f"(target >= {section['target']:.0%}: {'met' if section['target_met'] else 'NOT met'})")
            for r in section["rows"]:
                lines.append(f"- ~{r['length']} tok/trace: extract {r['extract_tflops']} TFLOP/s "
                             f"(MFU {r.get('extract_mfu_peak', 'n/a')}, of matmul {r.get('extract_mfu_matmul', 'n/a')}); "
                             f"bare bf16 {r['bare_bf16_tflops']} TFLOP/s (MFU {r.get('bare_bf16_mfu_peak', 'n/a')})")
        elif name == "bf16_vs_fp32":
            s = section["spearman"]
            lines.append(f"{section['shape']}, {section['traces']} traces, {section['steps']} steps: Spearman alpha "
                         f"{s['alpha']}, consistency {s['consistency']}, step score {s['step_score']}, sample score "
                         f"{s['sample_score']}, span loss {s['span_loss']} (target >= 0.99: "
                         f"{'met' if section['target_met'] else 'NOT met'}); largest span-loss gap "
                         f"{section['max_span_loss_gap']:.4g} nats ({section['max_span_loss_gap_relative']:.3g} relative, "
                         f"{section['max_span_loss_gap_per_token']:.3g} per token); largest alpha gap "
                         f"{section['max_alpha_gap']:.3g}")
        elif name == "projected":
            rates, ratios = section["tokens_per_s"], section["x_extract"]
            lines.append(f"{section['shape']}, {section['traces']} traces, {section['tokens']} tokens, "
                         f"{section['spans']} spans; projected dimension {section['projected_dimension']:,}, "
                         f"batched VJP {section['batched_vjp']}")
            for path, rate in rates.items():
                lines.append(f"- {path}: {rate:,.1f} tok/s" + (f", {ratios[path]}x extract's time" if path in ratios
                                                             else ""))
        elif name == "finetune":
            for mode, m in section["modes"].items():
                lines.append(f"- {mode}: " + (f"skipped ({m['skipped']})" if "skipped" in m else
                                              f"{m['steps_per_s']} steps/s, {m['tokens_per_s']:,.0f} tok/s, "
                                              f"{m['steps']} steps, {m['trainable_parameters']:,} trainable"))
        elif name == "cuda_tests":
            lines.append(f"{len(section['ids'])} tests: passed {section.get('passed')}, failed "
                         f"{section.get('failures')}, errors {section.get('errors')}, skipped "
                         f"{section.get('skipped')}")
            lines += [f"- `{i}`" for i in section["ids"]]
            if section.get("failures") or section.get("errors") or section.get("no_report"):
                lines += ["", "```", section["output_tail"], "```"]
        lines.append("")
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


class HardTimeout(BaseException):  # not an Exception: a per-shape guard must not swallow it
    pass


def run_section(check: Check, name: str, total: Deadline) -> dict:
    """One section, guarded: its soft budget for its loops, SIGALRM at the hard one (or the run's own end)."""
    budget = BUDGETS[name] * check.args.budget_scale * TINY_SLACK ** check.tiny
    if total.left() < 5:
        say(f"{name}: skipped, the run's time box ({check.args.total_s:.0f} s) is spent")
        return {"status": "skipped: the run's time box is spent", "section_seconds": 0.0}
    deadline = Deadline(min(budget, total.left()))
    hard = min(budget + 30, total.left())

    def expire(signum, frame):
        raise HardTimeout(f"section {name} ran past its hard time box ({hard:.0f} s)")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, hard)
    started = time.perf_counter()
    say(f"{name}: start (budget {budget:.0f} s)")
    out: dict = {}  # the section fills it as it goes: what it finished survives its failure
    try:
        result = {"status": "ok", **SECTIONS[name](check, deadline, out)}
    except BaseException as error:  # noqa: BLE001 - a section's failure is reported, the others still run
        if isinstance(error, KeyboardInterrupt):
            raise
        result = {"status": "error", "error": "".join(traceback.format_exception(error))[-3000:], "partial": out}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["section_seconds"] = round(time.perf_counter() - started, 1)
    check.free()
    say(f"{name}: {result['status']} in {result['section_seconds']} s")
    return result


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: the test suite's mode)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few traces: seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: table by GPU name)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every section's time box")
    parser.add_argument("--total-s", type=float, default=360.0, help="the whole run's time box: later sections skip")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device; use --cpu (and --tiny) to check the script itself")
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    check = Check(args)
    report = {"meta": {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": check.device, "device_name": torch.cuda.get_device_name() if check.cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "commit": git_commit(), "tiny": args.tiny,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "sizes": {
            name: check.size(name) for name in SIZES}}, "sections": {}}
    say(f"device {report['meta']['device_name']}, torch {torch.__version__}, out {args.out}")
    total = Deadline(args.total_s * TINY_SLACK ** args.tiny)
    for name in args.sections:
        report["sections"][name] = check.results[name] = run_section(check, name, total)
        report["meta"]["seconds"] = round(time.perf_counter() - STARTED, 1)
        write(args.out, report)
    say(f"done: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    print(markdown(report), flush=True)
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
