"""Hand-made curation outputs in the real schemas, and tiny git+DVC repos, for the diff, report,
export and remote tests.

`build_outputs(root)` writes what ingest..validate would: segments.parquet, step_scores.parquet,
sample_scores.parquet, select/subsets/<name>/ids.txt + ranking.parquet + manifest.json, every
stage's stats.json, model/model_info.json and validate/results.json (all of OUTPUT_DIRS). Step scores follow the method (s = lambda*alpha + (1-lambda)*c, sample score = mean),
so changing lambda_ reorders traces the way a real re-run would.

`python -m tests.tasks.outputs_tree` does the same from ./params.yaml (score.lambda_,
select.fractions) into ./outputs: the command of `init_pipeline_repo`'s one-stage pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.schema import SAMPLE_SCORE_SCHEMA, SEGMENT_SCHEMA, STEP_SCORE_SCHEMA, content_hash

ROOT = Path(__file__).resolve().parents[2]
STAGE_STATS = {  # distinct numbers per stage, so a test can find each stage's row
    "ingest": {"read": 1013, "kept": 1000, "quarantined": 13, "quarantined_no_answer": 9, "quarantined_empty_response": 4},
    "segment": {"read": 1000, "kept": 993, "quarantined": 7, "quarantined_no_steps": 7},
    "extract": {"read": 993, "kept": 991, "quarantined": 2, "quarantined_too_long": 2},
    "score": {"read": 991, "kept": 991, "quarantined": 0},
    "aggregate": {"read": 991, "kept": 987, "quarantined": 4, "quarantined_no_step_scores": 4},
    "select": {"read": 987, "kept": 987, "quarantined": 0, "method": "grace"},
}
OUTPUT_DIRS = (*STAGE_STATS, "model", "validate")
MODEL_INFO = {"identity": "9f" * 32, "source": "tiny test model", "n_params": 12345}


def build_outputs(root: Path, n: int = 30, lambda_: float = 0.5, fractions=(0.1, 0.2), seed: int = 0) -> dict:
    """Write an outputs/ tree under `root`; returns {"scores": id -> score, "subsets": name -> ids}."""
    rng = np.random.default_rng(seed)
    ids = [f"t{i:03d}" for i in range(n)]
    segments, steps, scores = [], [], {}
    for row, id_ in enumerate(ids):
        k = int(rng.integers(2, 5))
        lines = [f"Step {j + 1}: {id_} adds {j} + {j} = {2 * j}." for j in range(k)]
        response = "\n".join(lines) + f"\n#### {k}"
        starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
        prompt = [{"role": "user", "content": f"Question {id_}: what is {k}?"}]
        if row % 3 == 0:  # some traces carry a system turn (Alpaca `input`)
            prompt.insert(0, {"role": "system", "content": "Think step by step."})
        prompt_json = json.dumps(prompt, ensure_ascii=False)
        segments.append({
            "id": id_, "source_row": row, "content_hash": content_hash(prompt_json, response),
            "question": prompt[-1]["content"], "prompt_messages": prompt_json, "response": response,
            "final_answer": str(k), "answer_source": "gsm8k", "raw": json.dumps({"id": id_}),
            "scored_response": response, "step_starts": starts,
            "step_ends": [s + len(line) for s, line in zip(starts, lines)],
            "answer_start": len(response) - len(f"#### {k}"), "answer_end": len(response), "n_steps": k,
        })
        alpha, consistency = rng.uniform(-1, 1, k), rng.uniform(-1, 1, k)
        step_score = lambda_ * alpha + (1 - lambda_) * consistency
        for j in range(k):
            steps.append({"id": id_, "step_index": j, "alpha": float(alpha[j]), "consistency": float(consistency[j]),
                          "step_score": float(step_score[j]), "n_tokens": 5})
        scores[id_] = float(step_score.mean())
    out = root
    (out / "segment").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(segments, schema=SEGMENT_SCHEMA), out / "segment/segments.parquet")
    (out / "score").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(steps, schema=STEP_SCORE_SCHEMA), out / "score/step_scores.parquet")
    (out / "aggregate").mkdir(parents=True, exist_ok=True)
    sample_rows = [{"id": i, "score": scores[i], "method": "grace", "n_steps": s["n_steps"], "n_tokens": 20}
                   for i, s in zip(ids, segments)]
    pq.write_table(pa.Table.from_pylist(sample_rows, schema=SAMPLE_SCORE_SCHEMA), out / "aggregate/sample_scores.parquet")
    order = sorted(ids, key=lambda i: (-scores[i], i))
    subsets = {f"top{f * 100:g}pct": order[: max(1, round(f * n))] for f in fractions}
    for name, members in subsets.items():
        (out / "select/subsets" / name).mkdir(parents=True, exist_ok=True)
        (out / "select/subsets" / name / "ids.txt").write_text("".join(i + "\n" for i in members))
    ranking = {"id": order, "score": [scores[i] for i in order], "rank": list(range(1, n + 1)),
               "selected_in": [[s for s, m in subsets.items() if i in m] for i in order]}
    pq.write_table(pa.table(ranking), out / "select/subsets/ranking.parquet")
    manifest = {name: {"fraction": f, "n_selected": len(subsets[name]), "n_tokens": 20 * len(subsets[name]),
                       "score_threshold": min(scores[i] for i in subsets[name])}
                for name, f in zip(subsets, fractions)}
    (out / "select/manifest.json").write_text(json.dumps({"n_scored": n, "method": "grace", "stratify_by": None,
                                                          "subsets": manifest}))
    settings = {"score": {"gradient": "proxy", "lambda_": lambda_, "trajectory": "sum", "first_step": "alpha"},
                "aggregate": {"method": "grace", "how": "mean"}}
    for stage, stats in STAGE_STATS.items():
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "stats.json").write_text(json.dumps({"stage": stage, **stats, **settings.get(stage, {})}))
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "model/model_info.json").write_text(json.dumps(MODEL_INFO))
    (out / "validate").mkdir(parents=True, exist_ok=True)
    (out / "validate/results.json").write_text(json.dumps({"success": True, "n_suites": 3, "n_expectations": 17,
                                                           "n_failed": 0, "suites": {}}))
    return {"scores": scores, "subsets": subsets}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> None:
    from dvc.cli import main as dvc_main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")  # the CLI would otherwise report usage over the network
        mp.chdir(repo)
        assert dvc_main(list(args)) == 0, f"dvc {' '.join(args)} failed"


def init_pipeline_repo(repo: Path, lambda_: float, fractions: list[float]) -> None:
    """A git+DVC repo whose one stage writes a whole outputs/ tree from params.yaml (seconds to run)."""
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    dvc(repo, "init", "-q")
    write_params(repo, lambda_, fractions)
    stage = {"cmd": f'PYTHONPATH="{ROOT}" "{sys.executable}" -m tests.tasks.outputs_tree',
             "params": ["score.lambda_", "select.fractions"], "outs": ["outputs"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"curate": stage}}))


def write_params(repo: Path, lambda_: float, fractions: list[float]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"score": {"lambda_": lambda_, "method": "grace"},
                                                      "select": {"fractions": fractions}}))


if __name__ == "__main__":
    params = yaml.safe_load(Path("params.yaml").read_text())
    build_outputs(Path("outputs"), lambda_=params["score"]["lambda_"], fractions=params["select"]["fractions"])
