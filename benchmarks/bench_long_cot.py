"""Long chain-of-thought: extract's speed and peak memory next to a bare forward, at 1k-16k response tokens.

    python benchmarks/bench_long_cot.py                       # 1k, 4k, 16k on CPU, tiny random model
    python benchmarks/bench_long_cot.py --device cuda --lengths 1024 4096 16384 32768

A randomly initialised Llama-architecture model with a long context (--context, default 32768) and a
real vocabulary size (--vocab, default 49152 as SmolLM2's), so the LM head's (tokens, V) objects are
as large as a real model's; its decoder is tiny, so what differs between the rows is the head side.
One trace per run: a 64-token prompt, then --response tokens in paragraph-sized steps of --step
tokens and a 16-token answer (synthetic token ids: no tokenizer time). Rows, each in its own process
so the peak is its own:
  bare forward      the model's own forward, logits at every position: the (T, V) object a plain
                    Hugging Face forward makes
  bare, loss pos.   decoder, then the head at the loss positions only, all at once: (n, V)
  extract           ProxyModel.launch without the head Gram: logits in chunks of proxy.LOGIT_CHUNK
                    positions, bounded memory whatever n
  extract + head    with the exact LM-head Gram: (n, n) and (n, V) at once; only up to --head-max
Printed per row: response tokens/s (best of --repeats) and the peak memory above the loaded model
(CPU: the process's VmHWM minus its RSS after loading; CUDA: max_memory_allocated minus allocated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("bare_forward", "bare_loss_positions", "extract", "extract_head")

# One measurement in a fresh interpreter: argv = repo, model dir, device, mode, response tokens, step, repeats.
RUN = r"""
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from tasks.curate.proxy import ProxyModel
from tasks.curate.spans import EncodedTrace
model_dir, device, mode = sys.argv[2:5]
response, step, repeats = (int(v) for v in sys.argv[5:8])

def rss_mb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

model = ProxyModel(model_dir, device)
prompt, answer = 64, 16
rng = np.random.default_rng(0)
ids = rng.integers(10, model.model.config.vocab_size, prompt + response).astype(np.int64)  # (T,)
span = np.full(len(ids), -1, np.int32)  # loss at t belongs to token t+1's span
body = response - answer
span[prompt - 1:prompt - 1 + body] = np.arange(body) // step
span[prompt - 1 + body:len(ids) - 1] = span[prompt - 2 + body] + 1
trace = EncodedTrace(ids, span, int(span.max()) + 1, prompt, 0)
def run():
    if mode == "extract" or mode == "extract_head":
        return model.launch([trace], head_variant=mode == "extract_head").collect()
    with torch.inference_mode(), model._autocast():
        x = torch.from_numpy(ids).to(device)[None]
        if mode == "bare_forward":
            out = model.model(input_ids=x, use_cache=False).logits  # (1, T, V)
        else:
            h = model.decoder(input_ids=x, use_cache=False).last_hidden_state[0, prompt - 1:-1]  # (n, d)
            out = model.head(h)  # (n, V)
        return float(out[..., 0].sum())
run()  # warm-up (kernels, allocator)
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss_mb("VmRSS:")
best = float("inf")
for _ in range(repeats):
    started = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    best = min(best, time.perf_counter() - started)
peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mb("VmHWM:") - base
print(json.dumps({"seconds": best, "tokens_per_s": response / best, "peak_mb": peak, "spans": trace.n_spans}))
"""


def build_model(path: Path, vocab: int, context: int, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "model_info.json").write_text(json.dumps({"identity": f"bench-long-v{vocab}-h{hidden}", "source": "bench"}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="response tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--step", type=int, default=256, help="tokens per reasoning step (paragraph)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--head-max", type=int, default=4096, help="longest response run with the head Gram")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.vocab, args.context, args.hidden, args.layers)
        print(f"device {args.device}, vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
              f"step {args.step} tokens")
        print(f"{'response':>9} {'mode':<20} {'spans':>5} {'tokens/s':>10} {'peak MB':>9}")
        for length in args.lengths:
            for mode in MODES:
                if mode == "extract_head" and length > args.head_max:
                    continue
                done = subprocess.run([sys.executable, "-c", RUN, str(REPO), str(model), args.device, mode, str(length),
                                       str(args.step), str(args.repeats)], capture_output=True, text=True)
                if done.returncode:
                    print(f"{length:>9} {mode:<20} failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{length:>9} {mode:<20} {row['spans']:>5} {row['tokens_per_s']:>10.0f} {row['peak_mb']:>9.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
