"""The first `dvc repro` of the bundled sample, per stage, as a new user meets it (issue 24).

    python benchmarks/first_repro.py run --label before --rev f969865 --out bench/first_repro
    python benchmarks/first_repro.py run --label after --rev HEAD --out bench/first_repro
    python benchmarks/first_repro.py run --label after-w0 --rev HEAD --set extract.workers=0 --out bench/first_repro
    python benchmarks/first_repro.py compare --out bench/first_repro before after after-w0
    python benchmarks/first_repro.py scaling      # what 2 single-threaded processes get here, against one

Each run is a fresh clone of this repository at --rev (no outputs, no DVC cache, no extract cache,
no converted-model cache: everything a first run pays for), with --set overrides written into its
params.yaml, then `dvc repro` with this environment's Python first on PATH. Stage wall times come
from the moments DVC prints "Running stage '<name>'" (a stage ends where the next begins; the last
at DVC's exit), so they include each stage's Python start and imports, as a user waits for them.
`compare` prints every label's seconds per stage and its ratio to the first label. Runs meant to be
compared go one after another on one machine (one sitting): the machine and load are in each JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def set_params(params_file: Path, overrides: list[str]) -> None:
    """Write key.sub=value overrides (values parsed as YAML) into a params file."""
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for override in overrides:
        dotted, _, value = override.partition("=")
        *parents, leaf = dotted.split(".")
        section = params
        for name in parents:
            section = section[name]
        section[leaf] = yaml.safe_load(value)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "cores": os.cpu_count(),
            "avx512f": "avx512f" in flags, "amx": "amx_bf16" in flags, "load_before": os.getloadavg()}


def run(label: str, rev: str, overrides: list[str], out: Path, keep: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"first-repro-{label}-"))
    clone = workdir / "repo"
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", rev], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    if overrides:
        set_params(clone / "params.yaml", overrides)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the clone's own code, imported from its working directory
    info = {"label": label, "rev": rev, "commit": commit, "set": overrides, "machine": machine()}
    log_path = out / f"{label}.log"
    marks: list[tuple[str, float]] = []
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            now = time.monotonic() - started
            log.write(f"[{now:8.1f}] {line}")
            log.flush()
            match = STAGE_LINE.search(line)
            if match:
                marks.append((match.group(1), now))
        returncode = process.wait()
    total = time.monotonic() - started
    ends = [at for _, at in marks[1:]] + [total]
    info.update(returncode=returncode, total_seconds=round(total, 1), load_after=os.getloadavg(),
                stages={name: round(end - at, 1) for (name, at), end in zip(marks, ends)})
    extract_stats = clone / "outputs" / "extract" / "stats.json"
    if extract_stats.is_file():
        stats = json.loads(extract_stats.read_text(encoding="utf-8"))
        info["extract"] = {key: stats.get(key) for key in ("workers", "model_seconds", "tokens_per_s", "kept")}
    (out / f"{label}.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if returncode:
        raise SystemExit(f"dvc repro failed (rc {returncode}) for {label}; see {log_path}")
    return info


def compare(out: Path, labels: list[str]) -> str:
    runs = [json.loads((out / f"{label}.json").read_text(encoding="utf-8")) for label in labels]
    stages = list(dict.fromkeys(name for info in runs for name in info["stages"]))
    base = runs[0]
    header = "| stage | " + " | ".join(f"{info['label']} s" for info in runs) + " | " + " | ".join(
        f"{info['label']}/{base['label']}" for info in runs[1:]) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(runs) - 1)]
    for name in stages + ["total"]:
        values = [info["total_seconds"] if name == "total" else info["stages"].get(name) for info in runs]
        ratios = [f"{value / values[0]:.2f}x" if value and values[0] else "-" for value in values[1:]]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in values) + " | "
                     + " | ".join(ratios) + " |")
    for info in runs:
        lines.append(f"\n{info['label']}: commit {info['commit']} set {info['set'] or 'nothing'}; "
                     f"{info['machine']['cpu']}, {info['machine']['cores']} cores, load before "
                     f"{info['machine']['load_before'][0]:.2f} after {info['load_after'][0]:.2f}; "
                     f"extract {info.get('extract')}")
    return "\n".join(lines)


def _rate(kind: str, seconds: float) -> float:
    """Operations per second on one torch thread: `matmul`, the MLP-shaped product that is most of extract's
    compute, or `logits`, the LM head's log-softmax over the 49k vocabulary that streams ~200 MB per chunk."""
    import torch

    torch.set_num_threads(1)
    tokens, hidden, inner, vocab = 2048, 576, 1536, 49152  # SmolLM2-135M's shapes
    if kind == "matmul":
        x, w = torch.randn(tokens, hidden), torch.randn(hidden, inner)
        step = lambda: torch.mm(x, w)  # noqa: E731
    else:
        h, head = torch.randn(1024, hidden), torch.randn(hidden, vocab)
        step = lambda: torch.log_softmax(h @ head, dim=-1)  # noqa: E731
    step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += 1
    return done / (time.perf_counter() - started)


def core_scaling(kind: str, seconds: float = 20.0, processes: int = 2) -> dict:
    """What `processes` single-threaded workers get together, against one alone: the ceiling of extract.workers
    on this machine (shared caches, memory bandwidth, hyperthread siblings and neighbours on a VM host)."""
    import functools
    import multiprocessing

    alone = _rate(kind, seconds)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        together = pool.map(functools.partial(_rate, kind), [seconds] * processes)
    return {"kind": kind, "one_process_rate": round(alone, 2), "per_process_rates": [round(r, 2) for r in together],
            "speedup": round(sum(together) / alone, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one first dvc repro in a fresh clone")
    one.add_argument("--label", required=True)
    one.add_argument("--rev", default="HEAD")
    one.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--keep", action="store_true", help="keep the clone (its path is in the log)")
    both = commands.add_parser("compare", help="stage table of earlier runs, ratios to the first label")
    both.add_argument("--out", type=Path, required=True)
    both.add_argument("labels", nargs="+")
    probe = commands.add_parser("scaling", help="what N single-threaded processes get together, against one")
    probe.add_argument("--seconds", type=float, default=20.0)
    probe.add_argument("--processes", type=int, default=2)
    probe.add_argument("--kind", choices=["matmul", "logits"], action="append", help="default: both")
    args = parser.parse_args(argv)
    if args.command == "scaling":
        for kind in args.kind or ["matmul", "logits"]:
            print(json.dumps(core_scaling(kind, args.seconds, args.processes)))
    elif args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        info = run(args.label, args.rev, args.set, args.out, args.keep)
        print(json.dumps(info, indent=1))
    else:
        print(compare(args.out, args.labels))


if __name__ == "__main__":
    main()
