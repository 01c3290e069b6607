"""benchmarks/calibration_steps.py: a selector's row trained by the sweep is the table's cached run, not a second one."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from tasks.curate import ingest
from tasks.finetune.runs import run_all
from tasks.finetune.subsets import Params
from tests.tasks.finetune.test_subsets import curation, subsets  # noqa: F401 (curation: a module fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import calibration_steps  # noqa: E402

PARAMS = Params(methods=("grace", "random"), random_seeds=(0,), fractions=(0.5,), variants=(), lora_layers=1,
                batch_tokens=256, accuracy_problems=2, max_new_tokens=4, eval_batch_size=2, device="cpu", steps=2,
                trunk_cache=False, token_matched_random=False, include_base=False)


def write_params(path: Path, params: Params) -> Path:
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
    path.write_text(yaml.safe_dump({"finetune_eval": section,
                                    "ingest": {"answer_patterns": list(ingest.Params().answer_patterns)}}))
    return path


def sweep(curation: dict, tmp_path: Path, params_file: Path, *extra: str) -> list[dict]:  # noqa: F811
    out = tmp_path / "sweep"
    calibration_steps.main(["--subsets", str(tmp_path / "subsets"), "--segments", str(curation["segments"]),
                            "--test", str(curation["test"]), "--model", str(curation["model"]), "--params",
                            str(params_file), "--out", str(out), "--fractions", "0.5", *extra])
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_a_selector_row_run_by_the_sweep_is_reused_by_the_table(curation, tmp_path):  # noqa: F811
    params = dataclasses.replace(PARAMS, cache_dir=str(tmp_path / "cache"))
    subsets(curation, tmp_path / "subsets", params)
    params_file = write_params(tmp_path / "params.yaml", params)
    other_steps = sweep(curation, tmp_path, params_file, "--steps", "3", "--rows", "grace",
                        "--cache-dir", params.cache_dir)
    assert [r["method"] for r in other_steps] == ["grace"] and not (tmp_path / "cache").exists()  # steps differ
    records = sweep(curation, tmp_path, params_file, "--steps", "2", "--rows", "grace", "random",
                    "--cache-dir", params.cache_dir)[1:]
    assert [(r["method"], r["from_cache"]) for r in records] == [("grace", False), ("random", False)]  # rows' order
    table = run_all(tmp_path / "subsets", curation["segments"], curation["test"], curation["model"], tmp_path / "runs",
                    params, ingest.Params())
    assert (table["trained"], table["from_cache"]) == (1, 2)  # only full data trains
    grace = json.loads((tmp_path / "runs" / "grace-top50pct.json").read_text())
    assert grace["eval"]["accuracy"] == records[0]["eval"]["accuracy"]


def test_without_rows_only_calibration_rows_run_and_a_trunk_cached_table_is_not_shared(curation, tmp_path):  # noqa: F811
    subsets(curation, tmp_path / "subsets", PARAMS)
    records = sweep(curation, tmp_path, write_params(tmp_path / "p.yaml", PARAMS), "--steps", "1")
    assert {r["method"] for r in records} == {"random"}  # the unlabelled pool's one calibration row at 50%
    trunk = write_params(tmp_path / "trunk.yaml", dataclasses.replace(PARAMS, trunk_cache=True))
    with pytest.raises(SystemExit):
        sweep(curation, tmp_path, trunk, "--steps", "2", "--cache-dir", str(tmp_path / "cache"))
