"""Stage `fidelity`: proxy and head scores against exact-gradient scores on a tiny end-to-end case."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate import extract
from tasks.diagnostics.fidelity import Params, main
from tests.tasks.tiny_pipeline import build_extract, build_segments

MORE_ROWS = [
    {"id": "gsm-d", "question": "Tom has 3 apples and buys 5 more. He eats 2. How many are left?",
     "answer": "Tom has 3 + 5 = <<3+5=8>>8 apples.\nHe eats 2, so 8 - 2 = <<8-2=6>>6 are left.\n#### 6"},
    {"id": "gsm-e", "question": "A box holds 12 pens. How many pens are in 4 boxes?",
     "answer": "Each box holds 12 pens.\nThere are 4 boxes.\nSo 4 x 12 = <<4*12=48>>48 pens.\n#### 48"},
]


def test_fidelity_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, gsm_rows):
    segments = build_segments(tmp_path, gsm_rows + MORE_ROWS)
    extract_dir = build_extract(tmp_path, segments, tiny_model_dir)
    (tmp_path / "params.yaml").write_text(
        "fidelity:\n  n_traces: 4\n  last_n_blocks: 1\n  lora_r: 2\n  select_fraction: 0.5\n"
        "  targets: [head, last_blocks, lora, full]\n"
        "extract:\n  device: cpu\n  cache_dir: null\n")
    report = main(["--params", str(tmp_path / "params.yaml"), "--segments", str(segments), "--extract-dir",
                   str(extract_dir), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "fidelity")])
    metrics = json.loads((tmp_path / "fidelity" / "fidelity.json").read_text())
    timings = json.loads((tmp_path / "fidelity" / "stats.json").read_text())["targets"]
    # the DVC metrics file holds no timing (a cross-machine `dvc metrics diff` shows real changes only)
    assert not any(key in result for result in metrics["targets"].values() for key in ("seconds", "ms_per_token"))
    assert {t: {**metrics["targets"][t], **timings[t]} for t in timings} == report["targets"]
    assert {**metrics, "targets": report["targets"]} == report
    assert report["n_traces"] == 4 and set(report["targets"]) == {"head", "last_blocks", "lora", "full"}
    for target, result in report["targets"].items():
        assert result["max_span_loss_rel_diff_vs_extract"] < 1e-4  # exact mode ran the tokens extract ran
        for name in ("proxy", "head"):
            for signal in ("alpha", "step_score", "sample_score"):
                value = result[name][signal]["spearman"]
                assert value is not None and -1 <= value <= 1, (target, name, signal)
            assert 0 <= result[name]["jaccard_top50pct"] <= 1
    head = report["targets"]["head"]["head"]  # extract's head Gram is exact for the head: identical scores
    assert head["alpha"]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert head["step_score"]["spearman"] == pytest.approx(1.0) and head["jaccard_top50pct"] == 1.0
    steps = pq.read_table(tmp_path / "fidelity" / "steps.parquet")
    assert steps.num_rows == report["n_steps"] and "alpha_exact_lora" in steps.column_names
    assert "| head | proxy |" in (tmp_path / "fidelity" / "fidelity.md").read_text()


def test_projected_row_at_full_dimension_matches_exact_lora(tmp_path, tiny_model_dir, gsm_rows):
    """extract.projected on the LoRA target, unprojected, is exact mode's LoRA Gram: its row must agree exactly."""
    segments = build_segments(tmp_path, gsm_rows + MORE_ROWS)
    extract.extract(segments, tiny_model_dir, tmp_path / "extract", extract.Params(
        device="cpu", cache_dir=None, projected=True, projected_target="lora", projection_dim=None, projected_lora_r=2))
    (tmp_path / "params.yaml").write_text(
        "fidelity:\n  n_traces: 4\n  lora_r: 2\n  select_fraction: 0.5\n  targets: [lora]\n"
        "extract:\n  device: cpu\n  cache_dir: null\n")
    report = main(["--params", str(tmp_path / "params.yaml"), "--segments", str(segments), "--extract-dir",
                   str(tmp_path / "extract"), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "fidelity")])
    projected = report["targets"]["lora"]["projected"]
    for signal in ("alpha", "consistency", "step_score", "sample_score"):
        assert projected[signal]["pearson"] == pytest.approx(1.0, abs=1e-6), signal
    assert report["targets"]["lora"]["proxy"]["alpha"]["pearson"] < 1 - 1e-3  # the proxy is not exact
    assert "| lora | projected |" in (tmp_path / "fidelity" / "fidelity.md").read_text()


def test_params_name_the_setting_at_fault():
    assert params_from_dict(Params, "fidelity", {}) == Params()
    for bad, name in [({"targets": ["all"]}, "fidelity.targets"), ({"n_traces": 2}, "fidelity.n_traces"),
                      ({"select_fraction": 0}, "fidelity.select_fraction")]:
        with pytest.raises(ParamsError, match=name):
            params_from_dict(Params, "fidelity", bad)
