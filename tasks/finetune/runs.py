"""Stage `runs` of the fine-tune table: fine-tune the base model on each subset and evaluate it.

    python -m tasks.finetune.runs --subsets outputs/finetune/subsets \
        --segments outputs/segment/segments.parquet --test outputs/finetune/test/traces.parquet \
        --model outputs/model --out-dir outputs/finetune/runs

For every run of subsets/index.json: a fresh copy of the base model, fine-tuned on the run's traces
(tasks/finetune/train.py; the base run is not), evaluated on the held-out test traces (tasks/finetune/evaluate.py).
Each result is cached under finetune_eval.cache_dir, keyed by what determines it (the subset's ids
and content, the fine-tune and eval settings, the model identity, the test problems, the code), so
an interrupted stage resumes at the first unfinished run and an unchanged run is never retrained,
even when DVC reruns the stage because something else changed (another method, a new fraction).
Writes runs/<name>.json (settings, numbers, every generation) and runs/index.json (run order, counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core.closure import import_closure
from tasks.core.progress import show_progress
from tasks.core.stage import Stage, module_logger, write_json
from tasks.curate import ingest as ingest_stage
from tasks.curate.proxy import model_identity
from tasks.finetune import evaluate, train, trunk
from tasks.finetune.subsets import Params

log = module_logger(__name__)
# Every project module this stage imports, transitively: the run cache key follows the code (tasks/core/closure.py),
# so a change to, say, core.artifacts.pack_batches (which decides the training batches) retrains what it touches.
CODE = import_closure(__file__)
# Settings that decide which runs exist, or where results go, but not a run's numbers. variants and scorers
# decide which subsets exist; a run's own subset is in its key through its ids, so adding a variant to the table
# trains that variant only instead of every run again. Likewise the budget kind and the calibration rows (ids), and
# repeats (a run's own training seed is in its key as `seed`): the gate rows run first stay cached for the full table.
NOT_IN_KEY = ("methods", "random_seeds", "fractions", "include_base", "cache_dir", "device", "variants", "scorers",
              "budget", "repeats", "token_matched_random", "calibration", "dose_shares", "dose_fraction")
EVAL_SETTINGS = ("max_seq_len", "batch_tokens", "accuracy_problems", "max_new_tokens", "eval_batch_size",
                 "trunk_cache")


def evaluation_problems(test: Path) -> list[dict]:
    """The test traces sorted by id, prompt turns parsed; each must carry a gold answer."""
    rows = sorted(pq.read_table(test).to_pylist(), key=lambda row: row["id"])
    unanswered = [row["id"] for row in rows if not row["final_answer"]]
    if unanswered:  # ingest keeps marker-less responses; accuracy would count them wrong, unseen
        raise ValueError(f"{test}: {len(unanswered)} held-out problems have no gold answer (no marker, no "
                         f"ingest.answer_field), e.g. {unanswered[:5]}")
    return [{**row, "prompt_messages": json.loads(row["prompt_messages"])} for row in rows]


def run_key(pool_rows: list[dict] | None, problems: list[dict], params: Params, identity: str, device: str,
            patterns: tuple[str, ...]) -> str:
    """sha256 of everything a run's numbers depend on; a base run has no pool and no training settings."""
    settings = {k: v for k, v in dataclasses.asdict(params).items() if k not in NOT_IN_KEY}
    if pool_rows is None:
        settings = {k: settings[k] for k in EVAL_SETTINGS}
    payload = {"pool": None if pool_rows is None else [(r["id"], r["content_hash"]) for r in pool_rows],
               "test": [(p["id"], p["content_hash"], p["final_answer"]) for p in problems], "settings": settings,
               "model": identity, "precision": train.resolve_precision(params.precision, device),
               "device": "cuda" if device.startswith("cuda") else "cpu",  # other kernels, other numbers
               "patterns": list(patterns), "code": [hashlib.sha256(path.read_bytes()).hexdigest() for path in CODE]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def encode_row(tokenizer, row: dict, params: Params) -> train.Example:
    return train.encode(tokenizer, json.loads(row["prompt_messages"]), row["response"], params.max_seq_len)


def fine_tune_and_evaluate(pool_rows: list[dict] | None, problems: list[dict], model_dir: Path, tokenizer,
                           params: Params, device: str, patterns: tuple[str, ...],
                           cache: trunk.TrunkCache | None) -> dict:
    """One run: fine-tune a fresh copy of the base model on pool_rows (None: no training), evaluate it."""
    model = train.load_model(model_dir, device)
    result: dict = {"n_train": 0, "n_train_tokens": 0, "n_truncated": 0, "train": None,
                    "trunk_cache": cache is not None}
    if pool_rows is not None:
        examples = [encode_row(tokenizer, row, params) for row in pool_rows]
        states = None if cache is None else [cache.pool[row["id"]] for row in pool_rows]
        started = time.perf_counter()
        with show_progress("fine-tune", None, "step", log, leave=False) as progress:
            model, train_log = train.train(model, examples, params, train.padding_id(tokenizer), progress,
                                              states, train.processor_of(tokenizer))
        result.update(n_train=len(examples), n_train_tokens=sum(len(e.input_ids) for e in examples),
                      n_truncated=sum(e.truncated for e in examples),
                      train={**train_log, "seconds": round(time.perf_counter() - started, 1)})
    started = time.perf_counter()
    result["eval"] = evaluate.evaluate(model, tokenizer, problems, params, patterns,
                                       None if cache is None else (cache.end, cache.test))
    result["eval"]["seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_all(subsets: Path, segments: Path, test: Path, model: Path, out_dir: Path, params: Params,
            ingest: ingest_stage.Params) -> dict:
    """Fine-tune and evaluate every run of subsets/index.json (cached); runs/<name>.json and index.json."""
    started = time.perf_counter()
    runs = json.loads((Path(subsets) / "index.json").read_text(encoding="utf-8"))["runs"]
    columns = ["id", "content_hash", "prompt_messages", "response"]
    pool = {row["id"]: row for row in pq.read_table(segments, columns=columns).to_pylist()}
    problems = evaluation_problems(test)
    device, identity = train.resolve_device(params.device), model_identity(Path(model))
    tokenizer = train.load_tokenizer(Path(model))  # a VLM's processor
    cache_dir = Path(params.cache_dir) if params.cache_dir else None
    plans = []  # (run, its training rows (None: base), its key, its cached result file)
    for run in runs:
        ids = None if run["ids"] is None else sorted(
            (Path(subsets) / run["ids"]).read_text(encoding="utf-8").splitlines())
        rows = None if ids is None else [pool[i] for i in ids]  # sorted: order-free key and batches
        # a run's own training seed (a seeded row's, or one of a deterministic row's repeats)
        run_params = dataclasses.replace(params, seed=run.get("train_seed") if run.get("train_seed") is not None
                                         else params.seed)
        key = run_key(rows, problems, run_params, identity, device, ingest.answer_patterns)
        plans.append((run, rows, key, cache_dir / f"{key}.json" if cache_dir else None, run_params))
    pending = [plan for plan in plans if plan[3] is None or not plan[3].is_file()]
    log.info("finetune_eval: %d runs, %d to train, precision %s on %s", len(plans), len(pending),
             train.resolve_precision(params.precision, device), device)
    cache, trunk_started, refused = None, time.perf_counter(), trunk.refusal(Path(model))
    if pending and params.trunk_cache and refused:
        log.info("finetune_eval.trunk_cache: off, %s", refused)
    if pending and params.trunk_cache and not refused:  # one trunk pass over every example a pending run trains on
        needed = {row["id"]: encode_row(tokenizer, row, params) for plan in pending for row in plan[1] or []}
        tests = [train.encode(tokenizer, p["prompt_messages"], p["response"], params.max_seq_len) for p in problems]
        cache = trunk.prepare(train.load_model(Path(model), device), needed, tests, params,
                              train.padding_id(tokenizer))
    trunk_seconds = round(time.perf_counter() - trunk_started, 1)
    with show_progress("finetune_eval", len(plans), "run", log) as progress:
        for run, rows, key, cached, run_params in plans:
            if cached is not None and cached.is_file():
                result = json.loads(cached.read_text(encoding="utf-8"))
            else:
                result = fine_tune_and_evaluate(rows, problems, Path(model), tokenizer, run_params, device,
                                                ingest.answer_patterns, cache)
                if cached is not None:
                    write_json(cached, result)  # before the next run starts: an interruption loses one run at most
            write_json(Path(out_dir) / f"{run['name']}.json", {**run, **result, "key": key})
            progress.update(1)
    stats = {"runs": [run["name"] for run, *_ in plans], "trained": len(pending),
             "precision": train.resolve_precision(params.precision, device),
             "from_cache": len(plans) - len(pending), "device": device, "trunk_cache": cache is not None,
             "trunk_seconds": trunk_seconds, "seconds": round(time.perf_counter() - started, 1)}
    write_json(Path(out_dir) / "index.json", stats)
    return stats


STAGE = Stage(run_all, Params, paths=[
    ("subsets", "output directory of the subsets stage (tasks.finetune.subsets)"),
    ("segments", "segments.parquet: the training texts"),
    ("test", "traces.parquet of the held-out test set (ingest stage)"),
    ("model", "model directory (model stage)"),
    ("out_dir", "directory for the run results"),
], extra_sections=[("ingest", ingest_stage.Params)])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
