"""No silent stage (issue 24): every step that can run for minutes logs progress lines off a terminal.

Each stage runs as its dvc.yaml runs it, `python -m tasks.<package>.<stage>`, with stderr a pipe (not a
terminal, as under nohup, a scheduler or CI) and GRACE_PROGRESS left unset (auto), on tiny inputs and the tiny
random model. GRACE_PROGRESS_SECONDS=0 (tasks/core/progress.py; 30 s by default) makes every update a line, so
each step shows a line with its count, rate and estimate while it is under way, and one when it ends.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.curate import ingest
from tasks.finetune.subsets import Params as FinetuneParams
from tests.conftest import GSM_ROWS
from tests.tasks.curate.test_model import tiny_gguf_wheel  # noqa: F401 (a fixture)
from tests.tasks.finetune.test_subsets import MORE_ROWS, curation, subsets  # noqa: F401 (curation: a fixture)
from tests.tasks.tiny_pipeline import build_extract, build_segments

REPO = Path(__file__).resolve().parents[1]


def run_stage(module: str, tmp_path: Path, params: dict, **paths) -> str:
    """`python -m module --params ... --path ...` with stderr a pipe; its stderr."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "GRACE_PROGRESS_SECONDS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("GRACE_PROGRESS", None)  # auto: the line mode must come from stderr not being a terminal
    command = [sys.executable, "-m", module, "--params", str(tmp_path / "params.yaml"),
               *[f"--{name.replace('_', '-')}={path}" for name, path in paths.items()]]
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def assert_progress(stderr: str, desc: str, unit: str, total: int | None = None) -> None:
    """A line under way (count of total, rate, time left) and the closing line (100%, rate, time taken)."""
    of = r"\d+" if total is None else str(total)
    count = rf"\d+/{of} {unit}s"
    under_way = rf"{re.escape(desc)}: {count} \(\d+%\), [\d.e+-]+ {unit}s/s, about \d+ (?:s|min|h)[\w ]* left"
    closing = rf"{re.escape(desc)}: (\d+)/\1 {unit}s \(100%\), [\d.e+-]+ {unit}s/s in \d+"
    assert re.search(under_way, stderr), (under_way, stderr[-3000:])
    assert re.search(closing, stderr), (closing, stderr[-3000:])


def test_runs_trunk_fine_tune_and_generation(curation, tmp_path):  # noqa: F811
    """The frozen-trunk pass, each fine-tune and each evaluation's generation (one line per generate() batch)."""
    params = FinetuneParams(methods=("grace",), fractions=(0.5,), variants=(), lora_layers=1, batch_tokens=128,
                            accuracy_problems=2, max_new_tokens=4, eval_batch_size=1, device="cpu", cache_dir=None)
    subsets(curation, tmp_path / "subsets", params)
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
    stderr = run_stage("tasks.finetune.runs", tmp_path, {"finetune_eval": section}, subsets=tmp_path / "subsets",
                       segments=curation["segments"], test=curation["test"], model=curation["model"],
                       out_dir=tmp_path / "runs")
    assert_progress(stderr, "trunk (pool)", "example", 8)
    assert_progress(stderr, "fine-tune", "step")
    assert_progress(stderr, "generate", "problem", 2)
    assert_progress(stderr, "finetune_eval", "run", 3)


def test_warmup(tmp_path, tiny_model_dir):
    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS] + MORE_ROWS)
    stderr = run_stage("tasks.finetune.warmup", tmp_path,
                       {"warmup": {"fraction": 0.5, "batch_tokens": 128, "device": "cpu"}},
                       segments=segments, model=tiny_model_dir, out_dir=tmp_path / "out")
    assert_progress(stderr, "warmup", "step")


def test_scorers(tmp_path, tiny_model_dir):
    """Each scorer's extract logs its traces; the stage counts its scorers."""
    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS] + MORE_ROWS)
    scorers = {"whole": {"model": "base", "projected": False, "pool": None},
               "pooled": {"model": "base", "projected": False, "pool": 4}}
    stderr = run_stage("tasks.finetune.scorers", tmp_path,
                       {"finetune_eval": {"scorers": scorers, "variants": []},
                        "extract": {"device": "cpu", "cache_dir": None, "batch_tokens": 256}},
                       segments=segments, model=tiny_model_dir, warmup=tmp_path / "no-warmup",
                       out_dir=tmp_path / "out")
    assert_progress(stderr, "scorers", "scorer", 2)
    assert_progress(stderr, "extract", "trace", 8)
    assert_progress(stderr, "extract", "trace", 4)


def test_fidelity(tmp_path, tiny_model_dir):
    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS] + MORE_ROWS)
    extract_dir = build_extract(tmp_path, segments, tiny_model_dir)
    stderr = run_stage("tasks.diagnostics.fidelity", tmp_path,
                       {"fidelity": {"n_traces": 4, "targets": ["head", "lora"], "lora_r": 2},
                        "extract": {"device": "cpu", "cache_dir": None}},
                       segments=segments, extract_dir=extract_dir, model=tiny_model_dir, out_dir=tmp_path / "out")
    assert_progress(stderr, "fidelity head", "trace", 4)
    assert_progress(stderr, "fidelity lora", "trace", 4)


def test_model_conversion(tmp_path, tiny_gguf_wheel):  # noqa: F811
    """The GGUF's tensors, dequantized one by one; a second outputs directory reuses the conversion instead."""
    params = {"model": {"source": "gguf-wheel", "wheel": str(tiny_gguf_wheel), "gguf_file": "Tiny.gguf",
                        "cache_dir": str(tmp_path / "cache")}}
    assert_progress(run_stage("tasks.curate.model", tmp_path, params, out_dir=tmp_path / "a"),
                    "model: dequantize", "tensor", 21)
    second = run_stage("tasks.curate.model", tmp_path, params, out_dir=tmp_path / "b")
    assert "dequantize" not in second and "model: reusing the converted model in" in second
