"""The curate flow on multimodal traces: the chart sample's generator (scripts/make_mm_charts.py) and a tiny
random LLaVA, from ingest to export and report, with the image references kept in the exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.flows.test_curate import run_curate
from tests.flows.workspace import REPO
from tests.params_yaml import committed_document
from tests.tasks.tiny_vlm import build_tiny_vlm_dir

sys.path.insert(0, str(REPO / "scripts"))
from make_mm_charts import make_sample  # noqa: E402

N_CHARTS = 8


@pytest.fixture(scope="module")
def multimodal_run(prefect_api, tmp_path_factory):
    """One flow run on N_CHARTS charts (one image deleted, one replaced by text): (workspace, final state)."""
    root = tmp_path_factory.mktemp("curate_multimodal")
    model_dir = build_tiny_vlm_dir(tmp_path_factory.mktemp("tiny_vlm"))
    params = committed_document()
    params["model"]["source"] = str(model_dir)
    params["ingest"].update(preset="sharegpt", image_root="data/mm_charts")
    params["extract"].update(device="cpu", shard_size=4, cache_dir=None)
    params["select"].update(fractions=[0.5, 1.0], token_budget=100000)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    sample = root / "data" / "mm_charts"
    make_sample(sample, N_CHARTS, seed=0)
    (sample / "images" / "chart-0001.png").unlink()  # quarantined: image_missing
    (sample / "images" / "chart-0002.png").write_text("not a picture")  # quarantined: image_unreadable
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        from flows.curate import curate

        state = curate(input_path="data/mm_charts/pool.jsonl", return_state=True)
    return root, state


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; blank lines hold none (an empty quarantine.jsonl is one blank line)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_multimodal_traces_go_from_ingest_to_export(multimodal_run):
    root, state = multimodal_run
    assert state.is_completed(), state
    outputs = root / "outputs"
    reasons = {q["id"]: q["reason"] for q in read_jsonl(outputs / "ingest" / "quarantine.jsonl")}
    assert reasons == {"chart-0001": "image_missing", "chart-0002": "image_unreadable"}
    for stage in ("ingest", "segment", "extract", "score", "aggregate", "export"):
        stats = json.loads((outputs / stage / "stats.json").read_text(encoding="utf-8"))
        assert stats["read"] == stats["kept"] + stats["quarantined"], stage
    assert json.loads((outputs / "extract" / "stats.json").read_text())["kept"] == N_CHARTS - 2
    assert json.loads((outputs / "model" / "model_info.json").read_text())["vision"] is True
    assert json.loads((outputs / "validate" / "results.json").read_text())["success"]

    full = outputs / "export" / "subsets" / "top100pct"
    messages = read_jsonl(full / "messages.jsonl")
    assert len(messages) == N_CHARTS - 2
    for row in messages:  # TRL / LLaMA-Factory: image parts in the turns, the files in "images"
        user = row["messages"][0]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert row["images"] == [f"data/mm_charts/images/{row['id']}.png"]
        assert row["messages"][-1]["role"] == "assistant" and isinstance(row["messages"][-1]["content"], str)
    llava = json.loads((full / "llava.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in llava] == [r["id"] for r in messages]
    assert all(r["image"] == f"data/mm_charts/images/{r['id']}.png" and
               r["conversations"][0]["value"].startswith("<image>") for r in llava)
    alpaca = json.loads((full / "alpaca.json").read_text(encoding="utf-8"))
    assert all(r["instruction"].startswith("<image>") and len(r["images"]) == 1 for r in alpaca)
    table = pq.read_table(full / "data.parquet").to_pylist()
    assert all(r["images"] == [f"data/mm_charts/images/{r['id']}.png"] for r in table)
    subset = read_jsonl(outputs / "select" / "subsets" / "top100pct" / "subset.jsonl")
    assert all(r["image"] == f"images/{r['id']}.png" for r in subset)  # the input's own layout

    report = (outputs / "report" / "report.html").read_text(encoding="utf-8")
    assert report.count('<img class="thumb" src="data:image/png;base64,') >= 1


def test_grace_diff_reads_a_multimodal_run(multimodal_run):
    from tasks.tools.diff import diff_versions, load_version, to_markdown

    root, _ = multimodal_run
    version = load_version(str(root / "outputs"))
    result = diff_versions(version, version)
    assert result["scores"]["n_common"] == N_CHARTS - 2 and "Sample scores" in to_markdown(result)
