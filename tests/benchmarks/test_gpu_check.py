"""benchmarks/gpu_check.py in its CPU mode (--cpu --tiny), through its wrapper: every section gives numbers.

The GPU host has torch, transformers and a few more but not pydantic: the wheels in .whl/ fill the gap,
so the second test keeps the script's import closure within what the host has and the wheels ship.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

from tasks.core.closure import ROOT, import_closure

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_cpu_tiny_run_writes_every_section_with_numbers(tmp_path):
    gpu_check = load_script()
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--tiny", "--out", str(out)],
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=3600)  # ~40 s on 2 idle cores; minutes on a loaded one
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[gpu_check" in done.stdout and "extract_vs_bare: ok" in done.stdout  # progress lines
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in gpu_check.SECTIONS}

    assert number(sections["matmul_peak"]["measured_tflops"]) and sections["matmul_peak"]["measured_tflops"] > 0
    rows = sections["extract_vs_bare"]["rows"]
    assert [(r["shape"], r["length"]) for r in rows] == [
        (shape, length) for shape in gpu_check.TINY_SHAPES for length in gpu_check.SIZES["lengths"][1]]
    for row in rows:
        assert all(number(v) and v > 0 for v in row["tokens_per_s"].values()), row
        assert number(row["x_bare_bf16"]) and number(row["x_bare_autocast"]) and number(row["padding_waste"])
    mfu = sections["mfu"]
    assert mfu["shape"] == gpu_check.MFU_SHAPE and len(mfu["rows"]) == 2
    assert all(number(r["extract_mfu_matmul"]) and r["extract_mfu_matmul"] > 0 for r in mfu["rows"])
    numerics = sections["bf16_vs_fp32"]
    # on a CPU the bf16 run is the CPU's autocast: extract's bf16 paths run, and the numbers differ a little
    assert all(numerics["spearman"][name] > 0.9 for name in ("alpha", "consistency", "sample_score"))
    assert 0 < numerics["max_span_loss_gap_relative"] < 0.05
    projected = sections["projected"]
    assert set(projected["tokens_per_s"]) == {"extract", "projected", "exact full"}
    assert all(number(v) and v > 0 for v in [*projected["tokens_per_s"].values(), *projected["x_extract"].values()])
    for mode in ("lora", "full"):
        assert number(sections["finetune"]["modes"][mode]["steps_per_s"]), sections["finetune"]
    tests = sections["cuda_tests"]
    assert tests["ids"] and tests["tests"] == len(tests["ids"]) == tests["skipped"]  # no CUDA here: skipped
    assert "tests/tasks/curate/test_proxy.py::test_launch_queues_a_batch_without_host_sync" in tests["ids"]

    text = (out / "gpu_check.md").read_text()
    assert all(f"## {name}: ok" in text for name in gpu_check.SECTIONS)


def test_the_script_imports_only_what_the_gpu_host_has_or_the_wheels_ship():
    gpu_check = load_script()
    third_party = set()
    for path in import_closure(SCRIPT):  # lazy imports included: a lazily imported module may still run
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                third_party |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                third_party.add(node.module.split(".")[0])
    third_party -= set(sys.stdlib_module_names) | {"tasks", "flows", "__future__"}
    missing = third_party - set(gpu_check.HOST_PACKAGES) - set(gpu_check.WHEELS) - set(gpu_check.UNUSED_LAZY)
    assert not missing, f"the GPU host lacks {sorted(missing)}: ship wheels (gpu_check.sh) or keep them out of reach"


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path):
    """mfu alone has no extract_vs_bare rows to read: it fails, in the files, and the sections after it run."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(tmp_path), "--sections",
                           "mfu", "matmul_peak"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["mfu"]["status"] == "error" and "no qwen2.5-1.5b row" in sections["mfu"]["error"]
    assert sections["matmul_peak"]["status"] == "ok" and sections["matmul_peak"]["measured_tflops"] > 0
    assert "## mfu: error" in (tmp_path / "gpu_check.md").read_text()
