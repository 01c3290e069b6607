"""The stage ledger's counts: one log line per stage, stats.json for bookkeeping, metrics.json for comparing."""

from __future__ import annotations

import json

from tasks.ingest import main as ingest_main
from tasks.stage import StageLedger


def test_a_stage_logs_read_kept_and_quarantined_by_reason_in_one_line(tmp_path, gsm_rows, tasks_log):
    missing_question = [{"id": f"m{i}", "answer": "#### 1"} for i in range(3)]
    no_answer = [{"id": "n0", "question": "q?", "answer": "I do not know"}]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in gsm_rows[:2] + missing_question + no_answer))
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {}\n")
    ingest_main(["--params", str(params), "--input", str(pool), "--out-dir", str(tmp_path / "out")])
    lines = [r.getMessage() for r in tasks_log if r.name == "tasks.ingest"]
    assert lines == ["ingest: read 6, kept 2, quarantined 4 (missing_field 3, no_answer 1)"]
    assert "metrics.json" not in {p.name for p in (tmp_path / "out").iterdir()}  # ingest compares nothing


def test_ledger_without_quarantine_logs_and_splits_metrics_from_stats(tmp_path, tasks_log):
    ledger = StageLedger("score")
    ledger.count_read(5)
    ledger.keep(5)
    ledger.extra.update(gradient="proxy", mean_alpha=0.25)
    ledger.metrics["mean_alpha"] = 0.25
    stats = ledger.write_stats(tmp_path / "stats.json")
    assert [r.getMessage() for r in tasks_log] == ["score: read 5, kept 5, quarantined 0"]
    assert json.loads((tmp_path / "stats.json").read_text()) == stats and stats["gradient"] == "proxy"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"mean_alpha": 0.25}
