"""Stage `diagnostics`: detection metrics of every scorer on hand-made extract rows and labels."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.schema import UNCONDITIONAL_SCHEMA
from tasks.core.stage import write_parquet
from tasks.diagnostics.diagnostics import main
from tests.tasks.extract_tables import extract_row, write_extract

E1, E2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
# id: (span vectors steps..., answer; response tokens; label)
TRACES = {
    "c1": ([E1, E1 + 0.1 * E2, E1], 12, {"corrupted": False, "corruption": None, "bad_step": None, "n_steps": 2}),
    "c2": ([E1, E1, E1], 9, {"corrupted": False, "corruption": None, "bad_step": None, "n_steps": 2}),
    "c3": ([E1, E1, E1 + E2, E1], 15, {"corrupted": False, "corruption": None, "bad_step": None, "n_steps": 3}),
    # the bad step points away from the answer: lowest step score
    "x1": ([E1, -E1, E1, E1], 6, {"corrupted": True, "corruption": "wrong_step_result", "bad_step": 1, "n_steps": 3}),
    # an irrelevant first step, orthogonal to the answer: alpha 0 (c_1 = alpha_1) vs 0.5 for step 2
    "x2": ([E2, E1, E1], 20, {"corrupted": True, "corruption": "irrelevant_step", "bad_step": 0, "n_steps": 2}),
    "x3": ([E1, E1, -E1], 3, {"corrupted": True, "corruption": "wrong_final_answer", "bad_step": 2, "n_steps": 2}),
    # labelled with 3 steps where segmentation found 2: not ranked
    "x4": ([E1, E2, E1], 8, {"corrupted": True, "corruption": "dropped_steps", "bad_step": 0, "n_steps": 3}),
}


@pytest.fixture
def inputs(tmp_path):
    rows = []
    for id_, (vectors, tokens, _) in TRACES.items():
        counts = [tokens // len(vectors)] * (len(vectors) - 1) + [tokens - tokens // len(vectors) * (len(vectors) - 1)]
        rows.append(extract_row(id_, np.array(vectors), token_counts=counts, loss_sums=[1.0] * len(vectors),
                                head_vectors=np.array(vectors)))
    write_extract(tmp_path / "extract", rows)
    write_parquet(tmp_path / "losses.parquet", pa.Table.from_pylist(
        [{"id": i, "n_tokens": 1, "loss_sum": 1.0, "mean_loss": 1.0} for i in TRACES], schema=UNCONDITIONAL_SCHEMA))
    labels = [{"id": i, **label} for i, (_, _, label) in TRACES.items()]
    labels.append({"id": "quarantined", "corrupted": False, "corruption": None, "bad_step": None, "n_steps": 1})
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
    (tmp_path / "params.yaml").write_text("diagnostics:\n  fractions: [0.3, 0.5]\n")
    return tmp_path


def run(root):
    return main(["--params", str(root / "params.yaml"), "--extract-dir", str(root / "extract"), "--unconditional",
                 str(root / "losses.parquet"), "--labels", str(root / "labels.jsonl"), "--out-dir",
                 str(root / "diagnostics")])


def test_detection_metrics_of_every_scorer(inputs):
    report = run(inputs)
    assert report == json.loads((inputs / "diagnostics" / "diagnostics.json").read_text())
    assert report["n_traces"] == 7 and report["n_clean"] == 3 and report["labels_not_scored"] == 1
    assert set(report["scorers"]) == {"grace_proxy", "grace_head", "grace_proxy_alpha", "grace_proxy_consistency",
                                      "random", "full", "length", "loss", "answer_loss", "ifd", "sample_align"}
    length = report["scorers"]["length"]
    # clean lengths 12, 9, 15 vs corrupted 6, 20, 3, 8: each clean trace outranks 3 of the 4 corrupted
    assert length["auroc"] == pytest.approx(9 / 12)
    assert length["auroc_irrelevant_step"] == 0.0 and length["auroc_wrong_step_result"] == 1.0
    # top 30% of 7 = round(2.1) = 2 traces: x2 (20) and c3 (15); top 50% = 4: + c1 (12), c2 (9)
    assert length["precision_top30pct"] == pytest.approx(0.5) and length["precision_top50pct"] == pytest.approx(0.75)
    assert report["scorers"]["full"]["auroc"] == 0.5  # a constant score separates nothing
    assert "bad_step" not in length
    # recall: the 4 shortest (as many as are corrupted: x3 3, x1 6, x4 8, c2 9) flagged; x2 (20) escapes
    assert (length["recall_wrong_final_answer"], length["recall_wrong_step_result"], length["recall_dropped_steps"],
            length["recall_irrelevant_step"]) == (1.0, 1.0, 1.0, 0.0)
    text = (inputs / "diagnostics" / "diagnostics.md").read_text()
    assert "| length | 1.000 | 0.000 | 1.000 | 1.000 |" in text  # dropped, irrelevant, wrong answer, wrong step


def test_bad_step_ranks_of_step_level_scorers(inputs):
    for name in ("grace_proxy", "grace_head"):
        bad = run(inputs)["scorers"][name]["bad_step"]
        assert bad["n"] == 2 and bad["mean_normalised_rank"] == 0.0 and bad["fraction_lowest"] == 1.0
        assert bad["skipped_answer_span"] == 1 and bad["skipped_n_steps_mismatch"] == 1
        assert set(bad["by_corruption"]) == {"wrong_step_result", "irrelevant_step"}
    text = (inputs / "diagnostics" / "diagnostics.md").read_text()
    assert "| grace_proxy | wrong_step_result | 1 | 0.000 | 1.000 |" in text


def test_step_loss_is_the_bad_step_baseline(tmp_path):
    """The step loss ranks steps: a bad step with the highest mean token loss is the lowest scored (rank 0); one
    with the lowest loss, the highest (rank 1). Per-token, not per-span: a long step with a larger loss sum but a
    lower mean is not suspect."""
    rows = [  # (token counts, loss sums) per span: steps..., answer
        extract_row("x1", np.array([E1, E1, E1, E1]), token_counts=[2, 2, 2, 1], loss_sums=[1.0, 6.0, 1.0, 1.0]),
        extract_row("x2", np.array([E1, E1, E1]), token_counts=[10, 1, 1], loss_sums=[5.0, 2.0, 1.0]),
        extract_row("c1", np.array([E1, E1, E1]), token_counts=[2, 2, 1], loss_sums=[1.0, 1.0, 1.0])]
    write_extract(tmp_path / "extract", rows)
    write_parquet(tmp_path / "losses.parquet", pa.Table.from_pylist(
        [{"id": i, "n_tokens": 1, "loss_sum": 1.0, "mean_loss": 1.0} for i in ("x1", "x2", "c1")],
        schema=UNCONDITIONAL_SCHEMA))
    labels = [{"id": "x1", "corrupted": True, "corruption": "wrong_step_result", "bad_step": 1, "n_steps": 3},
              {"id": "x2", "corrupted": True, "corruption": "irrelevant_step", "bad_step": 0, "n_steps": 2},
              {"id": "c1", "corrupted": False, "corruption": None, "bad_step": None, "n_steps": 2}]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
    (tmp_path / "params.yaml").write_text("diagnostics:\n  fractions: [0.5]\n")
    bad = run(tmp_path)["step_loss"]["bad_step"]
    # x1: step 1 has mean loss 3 against 0.5 and 0.5: the lowest score; x2: step 0 has mean 0.5 against 2: the highest
    assert bad["by_corruption"]["wrong_step_result"] == {"n": 1, "mean_normalised_rank": 0.0, "fraction_lowest": 1.0}
    assert bad["by_corruption"]["irrelevant_step"] == {"n": 1, "mean_normalised_rank": 1.0, "fraction_lowest": 0.0}
    text = (tmp_path / "diagnostics" / "diagnostics.md").read_text()
    assert "| step loss (minus the step's mean token loss) | wrong_step_result | 1 | 0.000 | 1.000 |" in text


def test_an_unlabelled_trace_is_refused(inputs):
    lines = (inputs / "labels.jsonl").read_text().splitlines()
    (inputs / "labels.jsonl").write_text("\n".join(line for line in lines if '"x2"' not in line) + "\n")
    with pytest.raises(ValueError, match=r"no label for traces \['x2'\]"):
        run(inputs)
