"""What extract's fixed single thread costs on CPU (a benchmark, not a test).

    python benchmarks/bench_threads.py [--hidden 256 --layers 4 --traces 48 --threads 2 --repeats 3]

Extract runs every CPU batch on tasks.curate.proxy.COMPUTE_THREADS (1) torch thread so that its bytes do
not depend on the machine's cores or load (tasks/curate/proxy.py). This runs the extract stage on the same
traces and a small random model (built on the spot, so no download) once with that count and once
with --threads, alternating, best of --repeats, and prints tokens/s of each and whether the shards
are byte-identical. The cache is off: every run computes every trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tasks.curate.proxy  # noqa: E402
from tasks.curate.extract import Params, extract, load_model  # noqa: E402
from tests.conftest import build_bpe_tokenizer, build_tiny_model_dir  # noqa: E402
from tests.tasks import tiny_pipeline  # noqa: E402
from tests.tasks.curate.test_extract_scale import gsm_rows  # noqa: E402


def shard_digest(out_dir: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((out_dir / "shards").glob("*.parquet")))).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--traces", type=int, default=48)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the count compared with 1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        scratch = Path(scratch)
        model = build_tiny_model_dir(scratch / "model", build_bpe_tokenizer(), hidden=args.hidden, layers=args.layers)
        (scratch / "data").mkdir()
        segments = tiny_pipeline.build_segments(scratch / "data", gsm_rows(args.traces))
        params = dataclasses.replace(Params(), device="cpu", cache_dir=None)
        load_model(str(model), "cpu")  # loaded once, outside the timings
        best: dict[int, float] = {}
        digests: dict[int, str] = {}
        for repeat in range(args.repeats):
            for threads in (1, args.threads):
                tasks.curate.proxy.COMPUTE_THREADS = threads
                out = scratch / f"out-{threads}-{repeat}"
                stats = extract(segments, model, out, params)
                best[threads] = max(best.get(threads, 0.0), stats["tokens_per_s"])
                digests[threads] = shard_digest(out)
        print(f"command: python benchmarks/bench_threads.py --hidden {args.hidden} --layers {args.layers} "
              f"--traces {args.traces} --threads {args.threads} --repeats {args.repeats}")
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers; {args.traces} traces; "
              f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print(json.dumps({f"{t} thread(s) tokens/s (best of {args.repeats})": best[t] for t in best}))
        print(f"cost of 1 thread: {best[args.threads] / best[1]:.2f}x the time of {args.threads}; "
              f"shards byte-identical: {digests[1] == digests[args.threads]}")


if __name__ == "__main__":
    main()
